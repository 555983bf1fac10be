"""meshletctl commands: typer is the only parser.

Start-up is on every command's path (`meshletctl status` has a 200 ms goal and `run` is on
the publish -> running path), so this module imports only typer and the stdlib-only control
client; rendering (rich, on first table), parsing of `run`'s options, logs and base64 are
imported by the commands that use them. Measure with `python -X importtime -m meshletctl
status` (docs/benchmarks.md, "One parser").
"""

import json
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from meshletctl.client import ControlClient
from meshletctl.policy import policy_app
from meshletctl.update import update as update_command
from meshletd.errors import InvalidRequest, MeshletError, NotFound, TimedOut

CTL = "farm.meshlet.ctl."

app = typer.Typer(
    name="meshletctl",
    help="Control the local meshletd: workloads, members, drain, logs, fair share.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


class _State:
    socket: str | None = None


@app.callback()
def _main(
    socket: Annotated[
        str | None,
        typer.Option(
            "--socket",
            envvar="MESHLET_SOCKET",
            help="meshletd control socket [default: /run/meshlet/control.sock]",
        ),
    ] = None,
) -> None:
    _State.socket = socket


def _client() -> ControlClient:
    return ControlClient(_State.socket)


def report(err: MeshletError, as_json: bool) -> int:
    """Print an error the way every command does (stderr, escaped; or a JSON object on
    stdout with --json, exact); return its exit code."""
    if as_json:
        print(json.dumps({"error": err.name, "message": err.message}))
    else:
        from meshletctl.render import safe

        print(f"meshletctl: {safe(err.message)}", file=sys.stderr)
    return err.exit_code


def _say(line: str) -> None:
    """Print one line of human output, escaped (it may hold others' strings)."""
    from meshletctl.render import safe

    print(safe(line))


def fail(err: MeshletError, as_json: bool) -> typer.Exit:
    """Report an error; the typer exit that carries its code."""
    return typer.Exit(report(err, as_json))


def _run(as_json: bool, fetch: Callable[[ControlClient], Any], show: Callable[[Any], None]) -> None:
    try:
        with _client() as c:
            data = fetch(c)
    except MeshletError as e:
        raise fail(e, as_json) from None
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        show(data)


def _run_named(
    as_json: bool,
    fetch: Callable[[ControlClient], Any],
    show: Callable[[Any, dict[str, str]], None],
) -> None:
    """Like `_run`, and human tables show handles instead of DIDs where the daemon knows
    them (`--json` keeps DIDs)."""
    names: dict[str, str] = {}

    def both(c: ControlClient) -> Any:
        data = fetch(c)
        if not as_json:
            names.update(handles(c))
        return data

    _run(as_json, both, lambda data: show(data, names))


def handles(c: ControlClient) -> dict[str, str]:
    """DID -> handle from the daemon; {} from a daemon that does not offer it."""
    try:
        got = c.query(CTL + "getHandles")
    except MeshletError:
        return {}
    return {h["did"]: h["handle"] for h in got.get("handles", [])}


def _all_workloads(c: ControlClient, owner: str | None = None) -> list[dict[str, Any]]:
    """Every workload record the daemon lists: its workload views, then the records it
    ignores as invalid (`invalidWorkloadView`s, each with a `problem`: field and reason)."""
    out: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = c.query("farm.meshlet.listWorkloads", owner=owner, limit=500, cursor=cursor)
        out.extend(page["workloads"])
        invalid.extend(page.get("invalid", []))
        cursor = page.get("cursor")
        if not cursor:
            return out + invalid


def resolve_workload(c: ControlClient, ref: str) -> str:
    """An at:// URI as given, or the URI of this machine's owner's workload named `ref`
    (an invalid record too: its owner may want to stop it)."""
    if ref.startswith("at://"):
        return ref
    owner = c.query(CTL + "getStatus")["ownerDid"]
    matches = [str(w["uri"]) for w in _all_workloads(c, owner=owner) if w.get("name") == ref]
    if not matches:
        raise NotFound(f"no workload named {ref!r} owned by {owner}")
    if len(matches) > 1:
        raise InvalidRequest(f"{ref!r} names several workloads; give the at:// URI")
    return matches[0]


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """This meshlet: identity, state, members, replicas, capacity."""
    from meshletctl import render

    _run(as_json, lambda c: c.query(CTL + "getStatus"), render.status)


@app.command()
def members(as_json: JsonOpt = False) -> None:
    """Cluster members (owner DIDs) and whether they are mutually verified."""
    from meshletctl import render

    _run_named(as_json, lambda c: c.query(CTL + "listMembers")["members"], render.members)


@app.command()
def workloads(
    all_: Annotated[
        bool, typer.Option("--all", "-a", help="Every workload of the commune, per replica.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Workloads of this machine's owner and those running here (--all: the commune's);
    records ignored as invalid are listed with the field and the reason."""
    from meshletctl import render

    def fetch(c: ControlClient) -> list[dict[str, Any]]:
        items = _all_workloads(c)
        if all_:
            return items
        me = c.query(CTL + "getStatus")
        return [
            w
            for w in items
            if w["ownerDid"] == me["ownerDid"]
            or any(r.get("meshletDid") == me["did"] for r in w.get("running", []))
        ]

    _run_named(
        as_json, fetch, lambda data, names: render.workloads(data, placements=all_, names=names)
    )


def publish(c: ControlClient, record: dict[str, Any], secrets: list[tuple[str, bytes]]) -> Any:
    """Store the secrets on the local meshlet, then publish the workload record."""
    import base64

    for sname, value in secrets:
        c.procedure(
            "farm.meshlet.putSecret",
            {"name": sname, "value": {"$bytes": base64.b64encode(value).decode()}},
        )
    return c.procedure(CTL + "createWorkload", {"record": record})


@app.command()
def run(
    image: Annotated[str, typer.Argument(help="Container image, e.g. docker.io/library/nginx")],
    args: Annotated[
        list[str] | None, typer.Argument(help="Arguments for the container (after --).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Workload name [default: from image]")] = None,
    cpu: Annotated[
        str, typer.Option(help="CPU per replica: milli-CPU (200 or 200m) or cores (0.5, 2.0)")
    ] = "100m",
    memory: Annotated[
        str, typer.Option(help="Memory per replica: MiB (64) or with a unit (64Mi, 1Gi)")
    ] = "128Mi",
    replicas: Annotated[
        int | None, typer.Option(min=1, max=1000, help="[default: 1, filled in by meshletd]")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (plaintext; repeatable)")
    ] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option(help="NAME=@FILE: stored on this meshlet, never in the record (repeatable)"),
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="service or job [default: service, filled in by meshletd]")
    ] = None,
    restart: Annotated[
        str | None,
        typer.Option(help="always, on-failure or never [default: on-failure, the lexicon's]"),
    ] = None,
    constraint: Annotated[
        list[str] | None,
        typer.Option(help="arch=amd64, label=K[=V], prefer=DID, avoid=DID, packing"),
    ] = None,
    cluster: Annotated[str | None, typer.Option(help="Cluster to offer it to")] = None,
    network: Annotated[
        str | None,
        typer.Option(
            help="What its replicas reach: none, internet or lan (only hosts whose policy "
            "grants it) [default: internet]"
        ),
    ] = None,
    pull_secret: Annotated[
        str | None,
        typer.Option(
            help="NAME=@FILE: registry credentials (auth file or user:password), for pulls only"
        ),
    ] = None,
    port: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME:PORT (or NAME:PORT/udp) the container serves, published where the "
            "host allows it (repeatable)"
        ),
    ] = None,
    health_cmd: Annotated[
        str | None, typer.Option(help="Health check run in the container (no shell)")
    ] = None,
    health_interval: Annotated[
        str | None, typer.Option(help="Between checks (default 30s)")
    ] = None,
    health_timeout: Annotated[str | None, typer.Option(help="Per check (default 30s)")] = None,
    health_retries: Annotated[
        int | None, typer.Option(min=1, max=100, help="Failures = unhealthy (default 3)")
    ] = None,
    health_start_period: Annotated[
        str | None, typer.Option(help="Failures do not count before (default 0s)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish a workload record in the owner's repo; the commune places its replicas.

    The image's tag is resolved to a digest once, now, by this meshlet: every replica runs
    exactly those bits (shown as "pinned to sha256:...")."""
    from meshletctl import parse

    try:
        health = None
        if health_cmd is not None:
            health = parse.health_check(
                health_cmd, health_interval, health_timeout, health_retries, health_start_period
            )
        record, secrets = parse.workload_record(
            image,
            args or [],
            name=name,
            cpu=cpu,
            memory=memory,
            replicas=replicas,
            env=env or [],
            secret=secret or [],
            kind=kind,
            restart=restart,
            constraint=constraint or [],
            cluster=cluster,
            pull_secret=pull_secret,
            port=port or [],
            health=health,
            network=network,
        )
    except parse.ParseError as e:
        raise fail(InvalidRequest(str(e)), as_json) from None

    def said(d: dict[str, Any]) -> None:
        _say(f"published {record['name']}: {d['uri']}")
        if d.get("imageDigest"):
            _say(f"image {image} pinned to {d['imageDigest']}")

    _run(as_json, lambda c: publish(c, record, secrets), said)


@app.command()
def stop(
    workload: Annotated[str, typer.Argument(help="Workload name or at:// URI")],
    as_json: JsonOpt = False,
) -> None:
    """Delete a workload record: every replica stops."""

    def fetch(c: ControlClient) -> dict[str, Any]:
        uri = resolve_workload(c, workload)
        c.procedure("farm.meshlet.deleteWorkload", {"uri": uri})
        return {"uri": uri, "stopped": True}

    _run(as_json, fetch, lambda d: _say(f"stopped {d['uri']}"))


def _set_paused(workload: str, paused: bool, as_json: bool) -> None:
    method = "farm.meshlet.pauseWorkload" if paused else "farm.meshlet.resumeWorkload"
    word = "paused" if paused else "resumed"

    def fetch(c: ControlClient) -> dict[str, Any]:
        uri = resolve_workload(c, workload)
        c.procedure(method, {"uri": uri})
        return {"uri": uri, "paused": paused}

    _run(as_json, fetch, lambda d: _say(f"{word} {d['uri']}"))


@app.command()
def pause(
    workload: Annotated[str, typer.Argument(help="Workload name or at:// URI")],
    as_json: JsonOpt = False,
) -> None:
    """Pause a workload: its replicas stop and keep their placement."""
    _set_paused(workload, True, as_json)


@app.command()
def resume(
    workload: Annotated[str, typer.Argument(help="Workload name or at:// URI")],
    as_json: JsonOpt = False,
) -> None:
    """Resume a paused workload: its replicas start again where they were."""
    _set_paused(workload, False, as_json)


@app.command()
def logs(
    workload: Annotated[str, typer.Argument(help="Workload name or at:// URI")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    slot: Annotated[int, typer.Option(min=0, max=999, help="Replica index")] = 0,
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=1, max=10000, help="How many of the last lines")
    ] = 200,
    timestamps: Annotated[
        bool, typer.Option("--timestamps", "-t", help="Start each line with its RFC 3339 time.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Logs of one replica, the same wherever it runs: the meshletd hosting it reads them
    from journald (there, `journalctl -u <unit>` shows them too)."""
    from meshletctl import logs as lg

    try:
        with _client() as c:
            uri = resolve_workload(c, workload)

            def query(n: int, cursor: str | None) -> dict[str, Any]:
                more = {"cursor": cursor} if cursor is not None else {}
                got: dict[str, Any] = c.query(
                    "farm.meshlet.getLogs", uri=uri, slot=slot, lines=n, **more
                )
                return got

            if not follow:
                answer = query(lines, None)
                entries = lg.entries_of(answer)
                if as_json:
                    doc = {"uri": uri, "slot": slot, "entries": entries}
                    doc["lines"] = [e["line"] for e in entries]  # as before entries had times
                    if answer.get("cursor") is not None:
                        doc["cursor"] = answer["cursor"]
                    print(json.dumps(doc, indent=2))
                else:
                    for e in entries:
                        print(lg.text(e, timestamps))
                return
            for e in lg.follow(query, lines, time.sleep):
                print(lg.json_line(e) if as_json else lg.text(e, timestamps), flush=True)
    except MeshletError as e:
        raise fail(e, as_json) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def drain(
    wait: Annotated[bool, typer.Option(help="Wait until no replica is left here.")] = False,
    deadline: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop taking new work and move replicas elsewhere (make-before-break)."""
    try:
        with _client() as c:
            state = c.procedure("farm.meshlet.drain", {})["state"]
            if not wait:
                result = {"state": state}
            else:
                result = _wait_drained(c, deadline, show=not as_json)
    except MeshletError as e:
        raise fail(e, as_json) from None
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        _say(f"state: {result['state']}" + (" (no replica left)" if wait else ""))


def _wait_drained(c: ControlClient, deadline: float | None, show: bool) -> dict[str, Any]:
    start = time.monotonic()
    st = c.query(CTL + "getStatus")
    total = max(st["replicas"], 1)
    from meshletctl import render

    with render.drain_progress(total, enabled=show) as progress:
        while True:
            st = c.query(CTL + "getStatus")
            progress(total - st["replicas"], st["replicas"])
            if st["replicas"] == 0:
                return {"state": st["state"], "replicas": 0, "seconds": time.monotonic() - start}
            if deadline is not None and time.monotonic() - start > deadline:
                raise TimedOut(f"{st['replicas']} replica(s) still here after {deadline:g} s")
            time.sleep(0.5)


@app.command()
def undrain(as_json: JsonOpt = False) -> None:
    """Accept work again."""
    _run(
        as_json,
        lambda c: c.procedure("farm.meshlet.undrain", {}),
        lambda d: _say(f"state: {d['state']}"),
    )


@app.command()
def bids(
    workload: Annotated[str, typer.Argument(help="Workload name or at:// URI")],
    as_json: JsonOpt = False,
) -> None:
    """Rounds, bids and winners of a workload, and why they won."""
    from meshletctl import render

    _run_named(
        as_json,
        lambda c: c.query(CTL + "getBids", uri=resolve_workload(c, workload)),
        render.bids,
    )


@app.command()
def endpoints(
    workload: Annotated[str, typer.Argument(help="Workload name or at:// URI")],
    as_json: JsonOpt = False,
) -> None:
    """Where each replica of a workload serves its ports (address:port), and its health."""
    from meshletctl import render

    _run_named(
        as_json,
        lambda c: c.query(CTL + "getEndpoints", uri=resolve_workload(c, workload)),
        render.endpoints,
    )


@app.command()
def balance(as_json: JsonOpt = False) -> None:
    """Each owner's standing: what it gave and took (fair share), lent and used over this
    host's minContribution period, the ratio, and how this host serves it."""
    from meshletctl import render

    _run_named(as_json, lambda c: c.query(CTL + "getBalance"), render.balance)


@app.command()
def usage(
    days: Annotated[int, typer.Option(min=1, max=366, help="UTC days back, today included")] = 7,
    as_json: JsonOpt = False,
) -> None:
    """What ran on this machine, per owner and per UTC day, from its usage records."""
    from meshletctl import render

    _run_named(as_json, lambda c: c.query(CTL + "getUsage", days=days), render.usage)


@app.command()
def version(as_json: JsonOpt = False) -> None:
    """meshletctl's version, and the daemon's when it is running."""
    from meshletd import __version__

    daemon: str | None = None
    try:
        with _client() as c:
            daemon = c.query("farm.meshlet.ping").get("version")
    except MeshletError:
        pass
    if as_json:
        print(json.dumps({"meshletctl": __version__, "meshletd": daemon}))
    else:
        print(f"meshletctl {__version__}")
        _say(f"meshletd {daemon}" if daemon else "meshletd not reachable")


app.command(name="update")(update_command)
app.add_typer(policy_app, name="policy")


def main() -> int:
    try:
        app(prog_name="meshletctl")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
