"""`meshletctl run`: the record it publishes and what it prints, for the forms people type,
and how typer refuses the rest (one parser: this is the only path)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from typer.testing import CliRunner

from meshletctl import cli

URI = "at://did:plc:o/commune.scheduler.workload/3k"
BUSYBOX = {
    "name": "busybox",
    "image": "localhost/busybox:latest",
    "resources": {"milliCpu": 100, "memoryMiB": 128},
}  # replicas, kind and restartPolicy left out: meshletd fills them, once

CASES = [
    (["run", "localhost/busybox:latest"], BUSYBOX),
    (
        ["run", "--json", "--name", "web", "--replicas", "2", "--cpu", "200m", "--memory",
         "64Mi", "localhost/busybox:latest", "--", "sh", "-c", "while true; do date; done"],
        {**BUSYBOX, "name": "web", "replicas": 2,
         "resources": {"milliCpu": 200, "memoryMiB": 64},
         "args": ["sh", "-c", "while true; do date; done"]},
    ),
    (
        ["run", "--name=job1", "--kind", "job", "--restart=never", "-e", "A=1", "--env",
         "B=x=y", "--constraint", "arch=amd64", "--constraint", "packing", "--cluster", "home",
         "img:1"],
        {"name": "job1", "image": "img:1", "resources": {"milliCpu": 100, "memoryMiB": 128},
         "kind": "job", "restartPolicy": "never",
         "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "x=y"}],
         "constraints": {"arch": ["amd64"], "allowPacking": True}, "cluster": "home"},
    ),
    (
        ["run", "--cpu", "0.5", "img", "--", "--json", "-x"],
        {**BUSYBOX, "name": "img", "image": "img", "resources": {"milliCpu": 500,
         "memoryMiB": 128}, "args": ["--json", "-x"]},
    ),
    (
        ["run", "img", "extra", "args"],  # container arguments without `--` are arguments too
        {**BUSYBOX, "name": "img", "image": "img", "args": ["extra", "args"]},
    ),
    (
        ["run", "--port", "http:8080", "--port=dns:53/udp", "--health-cmd",
         "wget -q -O- 'http://127.0.0.1:8080/a b'", "--health-interval", "5s",
         "--health-retries", "2", "--health-start-period", "1m", "img"],
        {**BUSYBOX, "name": "img", "image": "img",
         "ports": [{"name": "http", "containerPort": 8080, "protocol": "tcp"},
                   {"name": "dns", "containerPort": 53, "protocol": "udp"}],
         "healthCheck": {"command": ["wget", "-q", "-O-", "http://127.0.0.1:8080/a b"],
                         "intervalS": 5, "retries": 2, "startPeriodS": 60}},
    ),
    (
        ["run", "--network", "none", "img"],  # replicas without a network (section 21)
        {**BUSYBOX, "name": "img", "image": "img", "network": "none"},
    ),
]  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def publish(self, c: Any, record: dict[str, Any], secrets: Any) -> dict[str, str]:
        self.records.append(record)
        return {"uri": URI, "cid": "bafy"}


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(cli, "publish", rec.publish)
    monkeypatch.setattr(cli, "_client", lambda: contextlib.nullcontext())
    return rec


@pytest.mark.parametrize(("argv", "record"), CASES)
def test_run_publishes_the_record_the_options_describe(
    argv: list[str], record: dict[str, Any], recorder: Recorder
) -> None:
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 0, result.output
    assert recorder.records == [record]
    if "--json" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        assert json.loads(result.stdout) == {"uri": URI, "cid": "bafy"}
    else:
        assert result.stdout == f"published {record['name']}: {URI}\n"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["run"], "Missing argument 'image'"),
        (["run", "--bogus", "1", "img"], "No such option: --bogus"),
        (["run", "--replicas", "0", "img"], "'--replicas': 0 is not in the range"),
        (["run", "--name"], "Option '--name' requires an argument"),
        (["run", "--port", "8080", "img"], "give NAME:PORT"),
        (["run", "--port", "web:80/sctp", "img"], "tcp or udp"),
        (["run", "--health-cmd", "x", "--health-interval", "soon", "img"], "give seconds"),
        (["run", "--network", "everywhere", "img"], "--network must be none, internet or lan"),
    ],
)
def test_a_malformed_run_is_a_usage_error_that_publishes_nothing(
    argv: list[str], says: str, recorder: Recorder
) -> None:
    result = CliRunner().invoke(cli.app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert says in result.output
    assert recorder.records == []


def test_run_help_lists_its_options_and_publishes_nothing(recorder: Recorder) -> None:
    result = CliRunner().invoke(cli.app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for opt in ("--name", "--cpu", "--memory", "--replicas", "--env", "--secret", "--json"):
        assert opt in result.output
    assert recorder.records == []


def test_a_bad_value_is_an_invalid_request_in_json_too(recorder: Recorder) -> None:
    result = CliRunner().invoke(cli.app, ["run", "--json", "--cpu", "lots", "img"])
    assert result.exit_code == 2
    answer = json.loads(result.stdout)
    assert answer["error"] == "InvalidRequest" and "bad CPU amount" in answer["message"]
    assert recorder.records == []


def test_the_socket_option_reaches_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    class Client(contextlib.nullcontext):  # type: ignore[type-arg]
        def __init__(self, path: str | None = None) -> None:
            seen.append(path)
            super().__init__()

    monkeypatch.setattr(cli, "ControlClient", Client)
    monkeypatch.setattr(cli, "publish", lambda c, r, s: {"uri": URI})
    result = CliRunner().invoke(cli.app, ["--socket", "/tmp/x.sock", "run", "img"])
    assert result.exit_code == 0, result.output
    assert seen == ["/tmp/x.sock"]
