from importlib.metadata import entry_points


def test_console_scripts_meshletd_and_meshletctl_are_installed() -> None:
    names = {ep.name for ep in entry_points(group="console_scripts")}
    assert {"meshletd", "meshletctl"} <= names
