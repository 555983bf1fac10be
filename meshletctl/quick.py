"""Fast paths for the commands people run most (`status`), without typer.

typer builds a pydantic validator for every parameter of every command at start-up (about
150 ms of CPU); `meshletctl status` needs none of that. `__main__` routes the plain forms
here (`status`, `status --json`); anything else goes through typer. The typer command calls
the same function, so both paths print and exit identically.
"""

from __future__ import annotations

import json
import sys

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


def route(argv: list[str]) -> int | None:
    """Run a fast path for `argv` if there is one; None means: use the full CLI."""
    if argv[:1] == ["status"] and set(argv[1:]) <= {"--json"}:
        return status("--json" in argv[1:])
    return None
