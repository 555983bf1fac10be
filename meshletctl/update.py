"""`meshletctl update`: roll a workload to a new image (docs/cli.md, "Updates";
docs/protocol.md section 25). Registered on the app by `meshletctl.cli`."""

from typing import Annotated, Any

import typer

from meshletctl.client import ControlClient


def update(
    workload: Annotated[str, typer.Argument(help="Workload name or at:// URI")],
    image: Annotated[str, typer.Option(help="The new container image")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Roll a workload to a new image: one replica at a time, each new one started beside
    the old and the old stopped once the new one runs; a version that never runs is rolled
    back, with the reason in `meshletctl workloads`."""
    from meshletctl.cli import _run, _say, resolve_workload

    def fetch(c: ControlClient) -> dict[str, Any]:
        body = {"uri": resolve_workload(c, workload), "image": image}
        return dict(c.procedure("farm.meshlet.updateWorkload", body))

    _run(as_json, fetch, lambda d: _say(f"updating {d['uri']} to version {d['version']}"))
