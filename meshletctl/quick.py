"""Fast paths for the commands people run most (`status`, `run`), without typer.

typer builds a pydantic validator for every parameter of every command at start-up (about
150 ms of CPU); `meshletctl status` needs none of that, and `meshletctl run` is on the
publish -> running path. `__main__` routes the plain forms here: `status [--json]`, and
`run` with only the options it declares, each given once as `--opt VALUE` or `--opt=VALUE`
(repeatable ones repeated), the image, and container arguments after `--`. Anything else
(help, a typo, a bad value, arguments without `--`) goes through typer, which explains it.
The typer commands call the same functions, so both paths print and exit identically.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from meshletctl.client import ControlClient
from meshletd.errors import MeshletError


def report(err: MeshletError, as_json: bool) -> int:
    """Print an error the way every command does; return its exit code."""
    if as_json:
        print(json.dumps({"error": err.name, "message": err.message}))
    else:
        print(f"meshletctl: {err.message}", file=sys.stderr)
    return err.exit_code


def status(as_json: bool, socket: str | None = None) -> int:
    try:
        with ControlClient(socket) as c:
            data = c.query("farm.meshlet.ctl.getStatus")
    except MeshletError as e:
        return report(e, as_json)
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        from meshletctl import render

        render.status(data)
    return 0


def publish(c: ControlClient, record: dict[str, Any], secrets: list[tuple[str, bytes]]) -> Any:
    """Store the secrets on the local meshlet, then publish the workload record."""
    import base64

    for sname, value in secrets:
        c.procedure(
            "farm.meshlet.putSecret",
            {"name": sname, "value": {"$bytes": base64.b64encode(value).decode()}},
        )
    return c.procedure("farm.meshlet.ctl.createWorkload", {"record": record})


_RUN_OPTS = {"--name", "--cpu", "--memory", "--replicas", "--kind", "--restart", "--cluster"}
_RUN_REPEAT = {"--env": "env", "-e": "env", "--secret": "secret", "--constraint": "constraint"}


def parse_run(argv: list[str]) -> dict[str, Any] | None:
    """`run` options as keyword arguments of `parse.workload_record` (plus `json`), or None
    for anything the full CLI should handle."""
    kw: dict[str, Any] = {"args": [], "json": False}
    image = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            kw["args"] = argv[i + 1 :]
            break
        if arg == "--json":
            kw["json"] = True
            i += 1
            continue
        if arg.startswith("-"):
            opt, eq, value = arg.partition("=")
            if opt not in _RUN_OPTS and opt not in _RUN_REPEAT:
                return None
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    return None
                value = argv[i + 1]
                i += 1
            i += 1
            if opt in _RUN_REPEAT:
                kw.setdefault(_RUN_REPEAT[opt], []).append(value)
            elif opt[2:] in kw:
                return None
            else:
                kw[opt[2:]] = value
            continue
        if image is not None:
            return None  # container arguments without `--`: typer's rules apply
        image = arg
        i += 1
    if image is None:
        return None
    kw["image"] = image
    if "replicas" in kw:
        if not kw["replicas"].isdigit() or not 1 <= int(kw["replicas"]) <= 1000:
            return None
        kw["replicas"] = int(kw["replicas"])
    return kw


def run(argv: list[str]) -> int | None:
    kw = parse_run(argv)
    if kw is None:
        return None
    from meshletctl import parse
    from meshletd.errors import InvalidRequest

    as_json = kw.pop("json")
    try:
        record, secrets = parse.workload_record(kw.pop("image"), kw.pop("args"), **kw)
    except parse.ParseError as e:
        return report(InvalidRequest(str(e)), as_json)
    try:
        with ControlClient() as c:
            data = publish(c, record, secrets)
    except MeshletError as e:
        return report(e, as_json)
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(f"published {record['name']}: {data['uri']}")
    return 0


def route(argv: list[str]) -> int | None:
    """Run a fast path for `argv` if there is one; None means: use the full CLI."""
    if argv[:1] == ["status"] and set(argv[1:]) <= {"--json"}:
        return status("--json" in argv[1:])
    if argv[:1] == ["run"]:
        return run(argv[1:])
    return None
