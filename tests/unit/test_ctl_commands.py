"""Every meshletctl command against a running meshletd (in-memory node), human and --json."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshletctl.cli import app

ROOT = Path(__file__).parents[2]
PY = sys.executable


class Daemon:
    def __init__(self, base: Path, proc: subprocess.Popen[bytes]) -> None:
        self.base = base
        self.proc = proc
        self.socket = base / "control.sock"


def start_daemon(base: Path, group: str = "meshlet-test-nogroup", admin: str = "root") -> Daemon:
    cfg = base / "meshlet.toml"
    cfg.write_text(
        f"""
did = "did:plc:alicemesh"
owner = "did:plc:alice"
pds = "http://127.0.0.1:1"
state_dir = "{base}/state"
backend = "memory"
[[clusters]]
name = "friends"
members = ["did:plc:bob", "did:plc:carol"]
[contribution]
milli_cpu = 2000
memory_mib = 2048
[listen]
xrpc = "127.0.0.1:0"
control_socket = "{base}/control.sock"
[control]
group = "{group}"
admin_group = "{admin}"
"""
    )
    proc = subprocess.Popen(
        [PY, "-m", "meshletd", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=open(base / "meshletd.log", "wb"),
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )
    sock = base / "control.sock"
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"meshletd did not start: {(base / 'meshletd.log').read_text()}")
        time.sleep(0.02)
    return Daemon(base, proc)


def stop_daemon(d: Daemon) -> None:
    d.proc.terminate()
    try:
        d.proc.wait(10)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    # A world-traversable directory, so tests can also connect as an unprivileged user.
    base = Path(tempfile.mkdtemp(prefix="meshlet-ctl-"))
    os.chmod(base, 0o755)
    d = start_daemon(base, group="nogroup", admin="root")
    yield d
    stop_daemon(d)
    shutil.rmtree(base, ignore_errors=True)


def ctl(daemon: Daemon, *args: str):
    result = CliRunner().invoke(
        app, ["--socket", str(daemon.socket), *args], env={"COLUMNS": "200"}
    )
    return result


def ctl_json(daemon: Daemon, *args: str):
    r = ctl(daemon, *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_status_shows_identity_and_capacity(daemon: Daemon) -> None:
    r = ctl(daemon, "status")
    assert r.exit_code == 0, r.output
    assert "did:plc:alicemesh" in r.stdout and "did:plc:alice" in r.stdout
    assert "2 CPU, 2048 MiB" in r.stdout
    data = ctl_json(daemon, "status")
    assert data["did"] == "did:plc:alicemesh" and data["members"] == 2


def test_members_lists_every_configured_owner(daemon: Daemon) -> None:
    r = ctl(daemon, "members")
    assert r.exit_code == 0 and "did:plc:bob" in r.stdout and "friends" in r.stdout
    data = ctl_json(daemon, "members")
    assert {m["ownerDid"] for m in data} == {"did:plc:bob", "did:plc:carol"}


def test_run_then_workloads_then_stop(daemon: Daemon) -> None:
    r = ctl(
        daemon,
        "run",
        "docker.io/library/nginx:1.25",
        "--name",
        "web-a",
        "--cpu",
        "0.25",
        "--memory",
        "64Mi",
        "--replicas",
        "2",
        "--env",
        "MODE=prod",
        "--restart",
        "always",
        "--constraint",
        "packing",
        "--constraint",
        "arch=amd64",
    )
    assert r.exit_code == 0, r.output
    assert "published web-a: at://did:plc:alice/" in r.stdout
    r = ctl(daemon, "workloads")
    assert r.exit_code == 0 and "web-a" in r.stdout and "2/2" in r.stdout
    listed = {w["name"]: w for w in ctl_json(daemon, "workloads")}
    assert listed["web-a"]["replicas"] == 2
    r = ctl(daemon, "workloads", "--all")
    assert r.exit_code == 0 and "did:plc:alicemesh" in r.stdout
    placed = [w for w in ctl_json(daemon, "workloads", "--all") if w["name"] == "web-a"]
    assert [rep["slot"] for rep in placed[0]["running"]] == [0, 1]
    r = ctl(daemon, "stop", "web-a")
    assert r.exit_code == 0 and "stopped at://" in r.stdout
    assert "web-a" not in {w["name"] for w in ctl_json(daemon, "workloads")}


def test_run_with_json_returns_the_uri(daemon: Daemon) -> None:
    r = ctl(daemon, "run", "busybox", "--name", "web-b", "--kind", "job", "--json", "--", "echo")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["uri"].startswith("at://did:plc:alice/commune.scheduler.workload/")
    assert ctl_json(daemon, "stop", data["uri"])["stopped"] is True


def test_a_secret_is_read_from_a_file_and_never_put_in_the_record(
    daemon: Daemon, tmp_path: Path
) -> None:
    f = tmp_path / "pw"
    f.write_text("hunter2-very-secret")
    data = ctl_json(daemon, "run", "busybox", "--name", "with-secret", "--secret", f"db=@{f}")
    listed = ctl_json(daemon, "workloads")
    assert "hunter2" not in json.dumps(listed)
    ctl_json(daemon, "stop", data["uri"])
    log = (daemon.base / "meshletd.log").read_text()
    assert "hunter2" not in log


def test_a_secret_on_the_command_line_is_refused(daemon: Daemon) -> None:
    r = ctl(daemon, "run", "busybox", "--secret", "db=hunter2")
    assert r.exit_code == 2 and "@FILE" in r.output


def test_bad_sizes_are_usage_errors(daemon: Daemon) -> None:
    r = ctl(daemon, "run", "busybox", "--cpu", "lots")
    assert r.exit_code == 2 and "bad CPU amount" in r.output
    r = ctl(daemon, "run", "busybox", "--kind", "batch", "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"] == "InvalidRequest"


def test_an_invalid_record_is_refused_naming_the_field(daemon: Daemon) -> None:
    r = ctl(daemon, "run", "x" * 600, "--name", "too-long-image")
    assert r.exit_code == 3 and "image" in r.output


def test_logs_of_a_replica(daemon: Daemon) -> None:
    ctl_json(daemon, "run", "busybox", "--name", "logged")
    r = ctl(daemon, "logs", "logged")
    assert r.exit_code == 0 and "logged: started 1" in r.stdout
    data = ctl_json(daemon, "logs", "logged")
    assert data["lines"] == ["logged: started 1"]
    r = ctl(daemon, "logs", "logged", "--slot", "5")
    assert r.exit_code == 4
    ctl_json(daemon, "stop", "logged")


def test_logs_follow_prints_each_new_line_once(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import meshletctl.cli as cli
    from meshletctl.client import ControlClient

    uri = ctl_json(daemon, "run", "busybox", "--name", "followed")["uri"]
    # Between polls the workload is paused and resumed (the in-memory node logs both).
    steps = ["pause", "resume", None, "pause", "resume", "pause"]

    def sleep(_: float) -> None:
        if not steps:
            raise KeyboardInterrupt
        step = steps.pop(0)
        if step:
            with ControlClient(str(daemon.socket)) as c:
                c.procedure(f"farm.meshlet.{step}Workload", {"uri": uri})

    monkeypatch.setattr(cli, "time", SimpleNamespace(sleep=sleep))
    r = ctl(daemon, "logs", "followed", "-f", "-n", "1", "--timestamps")
    assert r.exit_code == 130, r.output
    lines = r.stdout.splitlines()
    assert [x.split(" ", 1)[1] for x in lines] == [
        "followed: started 1",
        "followed: paused",
        "followed: resumed",
        "followed: paused",
        "followed: resumed",
        "followed: paused",
    ]
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z ", x) for x in lines), lines
    ctl_json(daemon, "stop", "followed")


def test_bids_and_balance(daemon: Daemon) -> None:
    ctl_json(daemon, "run", "busybox", "--name", "bidded")
    r = ctl(daemon, "bids", "bidded")
    assert r.exit_code == 0 and "winners: did:plc:alicemesh" in r.stdout
    data = ctl_json(daemon, "bids", "bidded")
    assert data["rounds"][0]["winners"] == ["did:plc:alicemesh"]
    ctl_json(daemon, "stop", "bidded")
    r = ctl(daemon, "balance")
    assert r.exit_code == 0 and "did:plc:bob" in r.stdout
    assert {o["ownerDid"] for o in ctl_json(daemon, "balance")["owners"]} >= {"did:plc:bob"}


def test_usage_reports_what_ran_on_this_machine(daemon: Daemon) -> None:
    r = ctl(daemon, "usage", "--days", "3")
    assert r.exit_code == 0 and "no usage records of this meshlet in the last 3 days" in r.stdout
    data = ctl_json(daemon, "usage", "--days", "3")
    assert data["days"] == 3 and data["rows"] == [] and data["meshletDid"].startswith("did:")


def test_drain_wait_then_undrain(daemon: Daemon) -> None:
    ctl_json(daemon, "run", "busybox", "--name", "drained")
    r = ctl(daemon, "drain", "--wait", "--deadline", "5")
    assert r.exit_code == 0, r.output
    assert "draining" in r.stdout
    assert ctl_json(daemon, "status")["state"] == "draining"
    assert ctl_json(daemon, "undrain") == {"state": "active"}
    r = ctl(daemon, "drain")
    assert r.exit_code == 0 and "state: draining" in r.stdout
    r = ctl(daemon, "undrain")
    assert r.exit_code == 0 and "state: active" in r.stdout
    ctl_json(daemon, "stop", "drained")


def test_unknown_workload_exits_with_not_found(daemon: Daemon) -> None:
    r = ctl(daemon, "stop", "no-such-thing")
    assert r.exit_code == 4 and "no workload named" in r.output
    r = ctl(daemon, "stop", "no-such-thing", "--json")
    assert json.loads(r.stdout)["error"] == "NotFound"


def test_version_names_both_sides(daemon: Daemon) -> None:
    r = ctl(daemon, "version")
    assert r.exit_code == 0 and "meshletctl 0.1.0" in r.stdout and "meshletd 0.1.0" in r.stdout
    assert ctl_json(daemon, "version") == {"meshletctl": "0.1.0", "meshletd": "0.1.0"}


def test_no_daemon_means_a_clear_message_and_exit_code_7(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["--socket", str(tmp_path / "none.sock"), "status"])
    assert r.exit_code == 7 and "meshletd is not running" in r.output
    r = CliRunner().invoke(app, ["--socket", str(tmp_path / "none.sock"), "status", "--json"])
    assert r.exit_code == 7 and json.loads(r.stdout)["error"] == "DaemonUnavailable"
    r = CliRunner().invoke(app, ["--socket", str(tmp_path / "none.sock"), "version"])
    assert r.exit_code == 0 and "meshletd not reachable" in r.stdout


def as_nobody(daemon: Daemon, *args: str, groups: str = "") -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", "--reuid=65534", "--regid=65534"]
    cmd += [f"--groups={groups}"] if groups else ["--clear-groups"]
    return subprocess.run(
        [*cmd, PY, "-m", "meshletctl", "--socket", str(daemon.socket), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)


@needs_setpriv
def test_a_user_outside_the_group_is_refused_with_exit_code_6(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="meshlet-ctl-"))
    os.chmod(base, 0o755)
    d = start_daemon(base, group="meshlet-test-nogroup", admin="root")
    try:
        r = as_nobody(d, "status")
        assert r.returncode == 6, r.stderr
        assert "permission denied" in r.stderr and "meshlet" in r.stderr
    finally:
        stop_daemon(d)
        shutil.rmtree(base, ignore_errors=True)


@needs_setpriv
def test_the_group_may_read_but_not_mutate(daemon: Daemon) -> None:
    r = as_nobody(daemon, "status", "--json", groups="65534")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["did"] == "did:plc:alicemesh"
    r = as_nobody(daemon, "drain", groups="65534")
    assert r.returncode == 6, r.stderr
    assert "admin group" in r.stderr


def test_shell_completion_completes_commands_and_options() -> None:
    env = {**os.environ, "_MESHLETCTL_COMPLETE": "complete_bash", "COMP_CWORD": "1"}
    done = subprocess.run(
        [PY, "-m", "meshletctl"],
        env={**env, "COMP_WORDS": "meshletctl wo"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.split() == ["workloads"]
    done = subprocess.run(
        [PY, "-m", "meshletctl"],
        env={**env, "COMP_WORDS": "meshletctl drain --", "COMP_CWORD": "2"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert {"--wait", "--deadline", "--json"} <= set(done.stdout.split())


def test_the_meshletctl_command_prints_status_or_says_the_daemon_is_down(
    daemon: Daemon, tmp_path: Path
) -> None:
    env = {**os.environ, "MESHLET_SOCKET": str(daemon.socket)}
    as_json = subprocess.run(
        [PY, "-m", "meshletctl", "status", "--json"], env=env, capture_output=True, text=True
    )
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["did"] == ctl_json(daemon, "status")["did"]
    human = subprocess.run(
        [PY, "-m", "meshletctl", "status"], env=env, capture_output=True, text=True
    )
    assert human.returncode == 0 and "did:plc:alicemesh" in human.stdout
    env["MESHLET_SOCKET"] = str(tmp_path / "none.sock")
    down = subprocess.run(
        [PY, "-m", "meshletctl", "status"], env=env, capture_output=True, text=True
    )
    assert down.returncode == 7 and "meshletd is not running" in down.stderr


def test_pause_shows_paused_and_resume_runs_it_again(daemon: Daemon) -> None:
    ctl_json(daemon, "run", "busybox", "--name", "pausable")
    r = ctl(daemon, "pause", "pausable")
    assert r.exit_code == 0 and "paused at://" in r.stdout, r.output
    listed = {w["name"]: w for w in ctl_json(daemon, "workloads")}
    assert listed["pausable"]["paused"] is True
    r = ctl(daemon, "workloads")
    row = [line for line in r.stdout.splitlines() if "pausable" in line]
    assert row and "paused" in row[0]
    assert ctl_json(daemon, "resume", "pausable")["paused"] is False
    listed = {w["name"]: w for w in ctl_json(daemon, "workloads")}
    assert listed["pausable"]["paused"] is False
    r = ctl(daemon, "workloads")
    row = [line for line in r.stdout.splitlines() if "pausable" in line]
    assert row and "paused" not in row[0]
    ctl_json(daemon, "stop", "pausable")
