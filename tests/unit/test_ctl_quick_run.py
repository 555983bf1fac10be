"""`meshletctl run` has a fast path without typer (it is on the publish -> running path):
it must publish exactly what the typer command publishes, and leave anything unusual to typer."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from typer.testing import CliRunner

from meshletctl import cli, quick

ARGVS = [
    ["run", "localhost/busybox:latest"],
    ["run", "--json", "--name", "web", "--replicas", "2", "--cpu", "200m", "--memory", "64Mi",
     "localhost/busybox:latest", "--", "sh", "-c", "while true; do date; sleep 1; done"],
    ["run", "--name=job1", "--kind", "job", "--restart=never", "-e", "A=1", "--env", "B=x=y",
     "--constraint", "arch=amd64", "--constraint", "packing", "--cluster", "home", "img:1"],
    ["run", "--cpu", "0.5", "img", "--", "--json", "-x"],
]  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def publish(self, c: Any, record: dict[str, Any], secrets: Any) -> dict[str, str]:
        self.records.append(record)
        return {"uri": "at://did:plc:o/commune.scheduler.workload/3k", "cid": "bafy"}


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(quick, "publish", rec.publish)
    monkeypatch.setattr(quick, "ControlClient", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(cli, "_client", lambda: contextlib.nullcontext())
    return rec


@pytest.mark.parametrize("argv", ARGVS)
def test_the_fast_run_publishes_what_the_full_cli_publishes(
    argv: list[str], recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    assert quick.route(argv) == 0
    fast_out = capsys.readouterr().out
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 0, result.output
    fast, full = recorder.records
    fast.pop("createdAt", None)
    full.pop("createdAt", None)
    assert fast == full
    assert fast_out == result.output


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--help"],
        ["run"],
        ["run", "--bogus", "1", "img"],
        ["run", "img", "extra"],  # container arguments without --
        ["run", "--replicas", "0", "img"],
        ["run", "--name", "a", "--name", "b", "img"],
        ["run", "--name"],
        ["--socket", "/tmp/x", "run", "img"],
    ],
)
def test_anything_unusual_is_left_to_the_full_cli(argv: list[str], recorder: Recorder) -> None:
    assert quick.route(argv) is None
    assert recorder.records == []


def test_a_bad_value_is_reported_like_the_full_cli(
    recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--json", "--cpu", "lots", "img"]
    code = quick.route(argv)
    fast_out = capsys.readouterr().out
    result = CliRunner().invoke(cli.app, argv)
    assert code == result.exit_code != 0
    assert fast_out == result.output
