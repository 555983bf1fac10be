"""Credentials come from systemd credentials or a root-only file, and are never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshletd import config
from meshletd.errors import ConfigError


def test_systemd_credentials_directory_is_preferred(tmp_path: Path) -> None:
    (tmp_path / "meshlet-app-password").write_text("s3cret-meshlet\n")
    (tmp_path / "owner-app-password").write_text("s3cret-owner")
    creds = config.load_credentials({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert creds.meshlet_app_password is not None
    assert creds.meshlet_app_password.get_secret_value() == "s3cret-meshlet"
    assert creds.owner_app_password.get_secret_value() == "s3cret-owner"


def test_credentials_never_appear_in_repr_or_str(tmp_path: Path) -> None:
    (tmp_path / "meshlet-app-password").write_text("s3cret-meshlet")
    creds = config.load_credentials({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert "s3cret" not in repr(creds) and "s3cret" not in str(creds)
    assert "s3cret" not in creds.model_dump_json()


def test_a_root_only_file_is_read(tmp_path: Path) -> None:
    f = tmp_path / "credentials.toml"
    f.write_text('meshlet-app-password = "abc-def"\n')
    os.chmod(f, 0o600)
    creds = config.load_credentials({}, fallback=f)
    assert creds.meshlet_app_password.get_secret_value() == "abc-def"
    assert creds.owner_app_password is None


def test_a_group_or_world_readable_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "credentials.toml"
    f.write_text('meshlet-app-password = "abc-def"\n')
    os.chmod(f, 0o640)
    with pytest.raises(ConfigError, match="chmod 600") as e:
        config.load_credentials({}, fallback=f)
    assert "abc-def" not in str(e.value)


def test_an_unknown_credential_key_is_named_without_its_value(tmp_path: Path) -> None:
    f = tmp_path / "credentials.toml"
    f.write_text('meshlet_password = "abc-def"\n')
    os.chmod(f, 0o600)
    with pytest.raises(ConfigError, match="meshlet_password: unknown key") as e:
        config.load_credentials({}, fallback=f)
    assert "abc-def" not in str(e.value)


def test_no_credentials_at_all_is_allowed(tmp_path: Path) -> None:
    creds = config.load_credentials({}, fallback=tmp_path / "absent.toml")
    assert creds.meshlet_app_password is None


def test_an_empty_systemd_credential_counts_as_absent(tmp_path: Path) -> None:
    (tmp_path / "meshlet-app-password").write_text("")
    creds = config.load_credentials({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert creds.meshlet_app_password is None


def test_the_units_directory_form_of_credentials_is_understood(tmp_path: Path) -> None:
    # LoadCredential=meshlet:/etc/meshlet/credentials hands each file over as meshlet_<file>.
    (tmp_path / "meshlet_owner-app-password").write_text("from-dir")
    creds = config.load_credentials({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert creds.owner_app_password.get_secret_value() == "from-dir"
    assert creds.meshlet_app_password is None
