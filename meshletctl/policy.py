"""`meshletctl policy`: show this machine's host policy, set one key, or replace it from a
file (docs/cli.md, "Host policy"; docs/protocol.md section 21). Registered on the app by
`meshletctl.cli`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from meshletctl.client import ControlClient
from meshletd.errors import InvalidRequest

CTL = "farm.meshlet.ctl."
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


policy_app = typer.Typer(
    help="This machine's host policy: show it, set one key, or replace it from a file.",
    no_args_is_help=False,
)


def _toml(v: Any) -> str:
    """A setting's value as TOML (JSON strings escape control characters)."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(v)


def _show_policy(data: dict[str, Any]) -> None:
    if not data.get("published"):
        print("# no host policy published yet: the defaults apply")
    settings = data.get("settings") or {}
    if not settings:
        print("# every setting at its default (docs/cli.md, [policy])")
    for key, value in settings.items():
        print(f"{key} = {_toml(value)}")


@policy_app.callback(invoke_without_command=True)
def policy(
    ctx: typer.Context,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            "-f",
            help="Replace the whole policy: a TOML file of [policy] keys (as in "
            "meshlet.toml), or a .json file holding a hostPolicy record value.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the host policy this machine publishes (or replace it with --file)."""
    if ctx.invoked_subcommand is not None:
        return
    if file is None:
        from meshletctl.cli import _run

        _run(as_json, lambda c: c.query(CTL + "getPolicy"), _show_policy)
        return
    from meshletctl.cli import _run

    body = _policy_file(file, as_json)

    def put(c: ControlClient) -> Any:
        c.procedure(CTL + "setPolicy", body)
        return c.query(CTL + "getPolicy")

    _run(as_json, put, _show_policy)


def _policy_file(path: str, as_json: bool) -> dict[str, Any]:
    import tomllib

    from meshletctl.cli import fail

    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".json"):
            return {"policy": json.loads(raw)}
        doc = tomllib.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as e:
        raise fail(InvalidRequest(f"{path}: {e}"), as_json) from None
    table = doc.get("policy", doc)
    return {"settings": table if isinstance(table, dict) else {}}


@policy_app.command("set")
def policy_set(
    key: Annotated[str, typer.Argument(help="A [policy] key (docs/cli.md), or evict/unevict.")],
    value: Annotated[str, typer.Argument(help="Its value as text; '' restores the default.")],
    as_json: JsonOpt = False,
) -> None:
    """Change one setting of the host policy and publish it."""
    from meshletctl.cli import _run

    def put(c: ControlClient) -> Any:
        c.procedure(CTL + "setPolicy", {"key": key, "value": value})
        return c.query(CTL + "getPolicy")

    _run(as_json, put, _show_policy)
