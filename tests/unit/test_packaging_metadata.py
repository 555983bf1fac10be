from importlib.metadata import entry_points


def test_console_scripts_meshletd_and_meshletctl_are_installed() -> None:
    names = {ep.name for ep in entry_points(group="console_scripts")}
    assert {"meshletd", "meshletctl"} <= names


# ---- man pages (packaging/man): what they document must exist, and the reverse ----------

import re  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from pydantic import BaseModel  # noqa: E402

MAN = Path(__file__).resolve().parents[2] / "packaging" / "man"
PAGES = {"meshletd.8": 8, "meshletctl.1": 1, "meshlet.toml.5": 5}


def _text(page: str) -> str:
    """The page as a reader sees it (groff's output, hyphenation off)."""
    done = subprocess.run(
        ["groff", "-man", "-t", "-Tutf8", "-rHY=0", "-rLL=200n", "-ww", MAN / page],
        capture_output=True,
        text=True,
        env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin", "GROFF_NO_SGR": "1"},
        check=True,
    )
    assert not done.stderr, done.stderr  # groff warnings: a roff mistake
    return re.sub(r".\x08", "", done.stdout).replace("\u2010", "-").replace("\u2212", "-")


@pytest.mark.parametrize("page", sorted(PAGES))
def test_each_man_page_renders_without_warnings_and_names_its_section(page: str) -> None:
    name, _, section = page.rpartition(".")
    header = (MAN / page).read_text().splitlines()[1]
    assert header.startswith(f".TH {name.upper()} {section} ")
    assert _text(page).strip()


def test_meshletctl_1_documents_every_command_and_exit_code() -> None:
    from typer.main import get_command

    from meshletctl.cli import app
    from meshletd import errors

    text = _text("meshletctl.1")
    commands = get_command(app).commands  # type: ignore[attr-defined]
    for name, command in commands.items():
        assert re.search(rf"^\s+{re.escape(name)}\b", text, re.M), f"command {name} missing"
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt not in ("--json", "--help"):
                    assert opt in text, f"{name} {opt} missing"
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.MeshletError) and cls.name:
            assert re.search(rf"^\s+{cls.exit_code}\s.*", text, re.M), cls.name
            if cls.exit_code != 5:  # the authentication errors share one line
                assert cls.name in text, cls.name


def test_meshletd_8_documents_every_option() -> None:
    from meshletd.__main__ import _parser

    text = _text("meshletd.8")
    for action in _parser()._actions:
        for opt in action.option_strings:
            assert opt in text, opt


def test_meshlet_toml_5_documents_every_configuration_key() -> None:
    from meshletd.config import Config

    text = _text("meshlet.toml.5")

    def keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
        out = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            inner = getattr(ann, "__args__", (ann,))
            sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if sub is not None:
                assert f"[{name}]" in text or f"[[{name}]]" in text, f"table [{name}] missing"
                out += keys(sub, f"{name}.")
            else:
                out.append((f"{prefix}{name}", field.default))
        return out

    for key, default in keys(Config):
        leaf = key.rpartition(".")[2]
        found = re.search(rf"^\s+{re.escape(leaf)}\b.*?(?:\n\s*\n|\Z)", text, re.M | re.S)
        assert found, f"{key} missing"
        # A documented default is the real one.
        if isinstance(default, int | str | Path) and not isinstance(default, bool):
            assert str(default) in found.group(0), f"{key}: default {default} not in its entry"


def test_the_shipped_example_config_shows_the_real_defaults() -> None:
    """packaging/meshlet.toml (the conffile users edit) comments out every optional key with
    its default: uncommenting a line must not change behaviour, and every table exists."""
    import tomllib

    from meshletd.config import Config

    source = (Path(__file__).resolve().parents[2] / "packaging" / "meshlet.toml").read_text()
    tables = set(tomllib.loads(source))
    section: str | None = None
    shown = 0
    for line in source.splitlines():
        if m := re.match(r"^\[\[?(\w+)\]\]?", line):
            section = m.group(1)
            assert section in Config.model_fields, f"[{section}] is not a configuration table"
            continue
        m = re.match(r"^#(\w+) = (.+?)\s*(?:#.*)?$", line)
        if not m or section is None or section == "clusters":
            continue
        key, value = m.groups()
        model = Config.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        assert key in model.model_fields, f"[{section}] {key} is not a configuration key"
        default = model.model_fields[key].default
        shown_value = tomllib.loads(f"v = {value}")["v"]
        parsed = getattr(model.model_validate({key: shown_value}), key)
        assert parsed == default, f"[{section}] {key}: shows {value}, default is {default!r}"
        shown += 1
    assert shown >= 15 and {"contribution", "listen", "control", "scheduling"} <= tables
