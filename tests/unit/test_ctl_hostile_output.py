"""Others' strings reach the terminal escaped: every human command of meshletctl, against a
daemon whose answers carry names with newlines, terminal escapes, bidi overrides and rich
markup; `--json` keeps the exact strings; and the invalid records of an owner are shown with
the field and the reason."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from typer.testing import CliRunner

from meshletctl import cli, render
from meshletd.errors import MeshletError, NotFound

# A newline that fakes a second row, a colour escape, a bell, an RLO that reverses
# "txt.exe", an isolate, a C1 CSI, DEL, rich markup that would restyle or crash.
HOSTILE = "web\nALICE\x1b[31mred\x07\u202etxt.exe\u2066x\u2069\x9b\x7f[bold]b[/]:smile:"
SHOWN = r"web\nALICE\x1b[31mred\x07\u202etxt.exe\u2066x\u2069\x9b\x7f[bold]b[/]:smile:"
# What must never reach a terminal raw (a newline is checked separately: output has lines).
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]")

ALICE, ALICEMESH, BOB, BOBMESH = "did:plc:alice", "did:plc:alicemesh", "did:plc:bob", "did:plc:bobm"
URI = f"at://{ALICE}/commune.scheduler.workload/3k"
BAD_URI = f"at://{ALICE}/commune.scheduler.workload/3bad"
RES = {"milliCpu": 1000, "memoryMiB": 512}

ANSWERS: dict[str, Any] = {
    "farm.meshlet.ctl.getStatus": {
        "did": ALICEMESH, "ownerDid": ALICE, "state": HOSTILE, "members": 1, "replicas": 0,
        "workloads": 1, "capacity": {"total": RES, "allocated": RES, "free": RES},
        "backend": "memory", "version": HOSTILE,
    },
    "farm.meshlet.ctl.getHandles": {"handles": [{"did": BOBMESH, "handle": HOSTILE}]},
    "farm.meshlet.ctl.listMembers": {"members": [
        {"cluster": HOSTILE, "ownerDid": BOB, "meshletDids": [BOBMESH], "verified": False,
         "reason": HOSTILE},
    ]},
    "farm.meshlet.listWorkloads": {
        "workloads": [{"uri": URI, "name": HOSTILE, "ownerDid": ALICE, "replicas": 1,
                       "running": [{"workload": URI, "slot": 0, "round": 0,
                                    "meshletDid": ALICEMESH, "state": HOSTILE,
                                    "reason": HOSTILE}]}],
        "invalid": [{"uri": BAD_URI, "ownerDid": ALICE, "name": "bad" + HOSTILE,
                     "problem": {"field": "image", "reason": "why" + HOSTILE}}],
    },
    "farm.meshlet.ctl.getBids": {"workload": HOSTILE, "rounds": [
        {"round": 0, "bids": [{"meshletDid": BOBMESH, "priority": 1, "accepted": True}],
         "winners": [BOBMESH], "why": HOSTILE},
    ]},
    "farm.meshlet.ctl.getBalance": {
        "owners": [{"ownerDid": BOB, "gaveMilliCpuSeconds": 1000, "tookMilliCpuSeconds": 0}],
        "halfLifeSeconds": 3600, "at": HOSTILE,
    },
    "farm.meshlet.getLogs": {"entries": [{"line": HOSTILE, "time": "2026-12-04T05:00:00Z"}]},
    "farm.meshlet.ping": {"did": ALICEMESH, "state": "active", "version": HOSTILE},
    "farm.meshlet.putSecret": {},
    "farm.meshlet.ctl.createWorkload": {"uri": URI + HOSTILE, "cid": "bafy"},
    "farm.meshlet.deleteWorkload": {},
    "farm.meshlet.drain": {"state": HOSTILE},
    "farm.meshlet.undrain": {"state": HOSTILE},
}  # fmt: skip


class HostileDaemon:
    """Answers every call with the canned hostile answer of its method."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    def __enter__(self) -> HostileDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def query(self, nsid: str, **params: Any) -> Any:
        if nsid == "farm.meshlet.ctl.getStatus" and FAIL.get("status"):
            raise FAIL["status"]
        return ANSWERS[nsid]

    def procedure(self, nsid: str, body: dict[str, Any] | None = None) -> Any:
        if nsid == "farm.meshlet.deleteWorkload" and FAIL.get("delete"):
            raise FAIL["delete"]
        return ANSWERS[nsid]


FAIL: dict[str, MeshletError] = {}


@pytest.fixture(autouse=True)
def hostile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "ControlClient", HostileDaemon)
    FAIL.clear()


def run(*argv: str) -> Any:
    result = CliRunner().invoke(cli.app, list(argv), env={"COLUMNS": "1000"})
    return result


HUMAN = [
    ("status",),
    ("members",),
    ("workloads",),
    ("workloads", "--all"),
    ("run", "busybox", "--name", "web"),
    ("stop", URI + HOSTILE),  # a pasted URI is echoed
    ("logs", URI),
    ("logs", URI, "--timestamps"),
    ("drain",),
    ("undrain",),
    ("bids", URI),
    ("balance",),
    ("version",),
]


@pytest.mark.parametrize("argv", HUMAN, ids=" ".join)
def test_human_output_shows_hostile_strings_escaped(argv: tuple[str, ...]) -> None:
    r = run(*argv)
    assert r.exit_code == 0, r.output
    assert not RAW.search(r.output), repr(r.output)
    assert "\nALICE" not in r.output  # no forged line
    assert SHOWN in r.output, r.output


def test_logs_follow_escapes_each_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    def stop(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "time", SimpleNamespace(sleep=stop, monotonic=lambda: 0.0))
    r = run("logs", URI, "--follow")
    assert r.exit_code == 130
    assert r.output == SHOWN + "\n"


def test_drain_wait_escapes_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    r = run("drain", "--wait")
    assert r.exit_code == 0, r.output
    assert not RAW.search(r.output) and SHOWN in r.output


@pytest.mark.parametrize("argv", [("stop", URI), ("status",)], ids=" ".join)
def test_an_error_message_is_escaped_on_stderr_and_exact_in_json(argv: tuple[str, ...]) -> None:
    FAIL["delete"] = FAIL["status"] = NotFound(f"no workload {HOSTILE}")
    r = run(*argv)
    assert r.exit_code == 4
    assert not RAW.search(r.output) and f"meshletctl: no workload {SHOWN}" in r.output
    r = run(*argv, "--json")
    assert r.exit_code == 4
    assert json.loads(r.stdout) == {"error": "NotFound", "message": f"no workload {HOSTILE}"}


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        (("status",), ["state"]),
        (("members",), [0, "cluster"]),
        (("workloads",), [0, "name"]),
        (("workloads", "--all"), [0, "running", 0, "state"]),
        (("bids", URI), ["workload"]),
        (("balance",), ["at"]),
        (("logs", URI), ["lines", 0]),
        (("drain",), ["state"]),
        (("undrain",), ["state"]),
        (("version",), ["meshletd"]),
    ],
    ids=lambda x: " ".join(map(str, x)),
)
def test_json_keeps_the_exact_strings(argv: tuple[str, ...], path: list[Any]) -> None:
    r = run(*argv, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    for key in path:
        got = got[key]
    assert got == HOSTILE


def test_the_owner_sees_an_invalid_record_with_the_field_and_the_reason() -> None:
    r = run("workloads")
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.output.splitlines() if " invalid: " in x]
    assert line == f"bad{SHOWN} invalid: image: why{SHOWN} ({BAD_URI})"
    listed = json.loads(run("workloads", "--json").stdout)
    assert [w["uri"] for w in listed] == [URI, BAD_URI]
    assert listed[1]["problem"] == {"field": "image", "reason": "why" + HOSTILE}


def test_an_invalid_record_of_the_owner_can_be_stopped_by_name() -> None:
    r = run("stop", "bad" + HOSTILE)
    assert r.exit_code == 0, r.output
    assert r.output == f"stopped {BAD_URI}\n"


def test_an_invalid_record_without_a_name_is_shown_by_its_uri() -> None:
    w = {"uri": BAD_URI, "ownerDid": ALICE, "problem": {"field": "", "reason": "not an object"}}
    lines = _render_lines([w])
    assert f"{BAD_URI} invalid: the record: not an object" in lines
    assert "no workloads" in lines


def _render_lines(items: list[dict[str, Any]]) -> list[str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        render.workloads(items)
    return out.getvalue().splitlines()


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", r"a\nb"),
        ("a\tb", r"a\tb"),
        ("\x00\x1f\x7f\x80\x9f", r"\x00\x1f\x7f\x80\x9f"),
        ("\u202a\u202b\u202c\u202d\u202e", r"\u202a\u202b\u202c\u202d\u202e"),
        ("\u2066\u2067\u2068\u2069", r"\u2066\u2067\u2068\u2069"),
        ("\u200e\u200f\u061c", r"\u200e\u200f\u061c"),
        ("plain é ü 名前 \\ [x]", "plain é ü 名前 \\ [x]"),
    ],
)
def test_safe_escapes_controls_and_bidi_and_nothing_else(raw: str, shown: str) -> None:
    assert render.safe(raw) == shown


def test_log_lines_keep_their_tabs() -> None:
    assert render.safe("a\tb\x1b", keep_tab=True) == "a\tb\\x1b"
