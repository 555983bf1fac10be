"""`meshletctl policy`: show the host policy, set one key, replace it from a file (against
a running meshletd, in-memory node)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_ctl_commands import Daemon, ctl, ctl_json, start_daemon, stop_daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="meshlet-ctl-policy-"))
    os.chmod(base, 0o755)
    d = start_daemon(base, group="nogroup", admin="root")
    yield d
    stop_daemon(d)
    shutil.rmtree(base, ignore_errors=True)


def test_policy_shows_the_defaults_before_anything_is_published(daemon: Daemon) -> None:
    r = ctl(daemon, "policy")
    assert r.exit_code == 0, r.output
    assert "no host policy published" in r.stdout


def test_policy_set_changes_one_key_and_policy_shows_it(daemon: Daemon) -> None:
    r = ctl(daemon, "policy", "set", "evict", "did:plc:mallory")
    assert r.exit_code == 0, r.output
    r = ctl(daemon, "policy", "set", "schedule", "Mon-Fri 18:00-08:00")
    assert r.exit_code == 0, r.output
    r = ctl(daemon, "policy")
    assert 'evicted = ["did:plc:mallory"]' in r.stdout
    assert 'schedule = ["Mon-Fri 18:00-24:00", "Tue-Sat 00:00-08:00"]' in r.stdout
    data = ctl_json(daemon, "policy")
    assert data["published"] is True
    assert data["policy"]["evicted"] == ["did:plc:mallory"]
    assert data["policy"]["schedule"][0] == {"days": [0, 1, 2, 3, 4], "start": 1080, "end": 1440}


def test_a_bad_value_is_refused_naming_the_key(daemon: Daemon) -> None:
    r = ctl(daemon, "policy", "set", "default_share", "2000")
    assert r.exit_code != 0
    assert "default_share" in r.output


def test_policy_file_replaces_the_whole_policy(daemon: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "policy.toml"
    f.write_text(
        '[policy]\ndefault_share = 250\ncaps = { "did:plc:bob" = 1000 }\nnetwork = "none"\n'
        'images = ["registry.example:5000/**"]\ndigests_only = true\njob_max_runtime_s = 3600\n'
    )
    data = ctl_json(daemon, "policy", "--file", str(f))
    assert data["settings"] == {
        "default_share": 250,
        "caps": {"did:plc:bob": 1000},
        "network": "none",
        "images": ["registry.example:5000/**"],
        "digests_only": True,
        "job_max_runtime_s": 3600,
    }  # the eviction set before is gone: the file is the whole policy
    j = tmp_path / "policy.json"
    j.write_text(json.dumps({"evicted": ["did:plc:eve"]}))
    data = ctl_json(daemon, "policy", "--file", str(j))
    assert data["settings"] == {"evicted": ["did:plc:eve"]}
