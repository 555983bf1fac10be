"""meshlet.toml: validated, with errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshletd import config
from meshletd.errors import ConfigError

GOOD = """
did = "did:plc:alicemesh"
owner = "did:plc:alice"
pds = "http://127.0.0.1:2583"

[[clusters]]
name = "friends"
members = ["did:plc:bob", "did:plc:carol"]

[[clusters]]
name = "work"
members = ["did:plc:carol", "did:plc:dave"]

[contribution]
milli_cpu = 2000
memory_mib = 4096

[listen]
xrpc = "0.0.0.0:2585"
control_socket = "/tmp/x.sock"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "meshlet.toml"
    p.write_text(text)
    return p


def test_a_valid_file_loads_with_defaults_filled_in(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.did == "did:plc:alicemesh"
    assert cfg.contribution.milli_cpu == 2000
    assert cfg.contribution.max_replicas == 16
    assert cfg.listen.xrpc_port == 2585 and cfg.listen.xrpc_host == "0.0.0.0"
    assert cfg.members == ["did:plc:bob", "did:plc:carol", "did:plc:dave"]
    assert cfg.scheduling.bid_window_ms == 5000


def test_an_unknown_key_is_named_with_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("memory_mib = 4096", "memory_mb = 4096"))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert f"{p}: contribution.memory_mb: unknown key" in e.value.message


def test_a_bad_member_did_names_its_index(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace('"did:plc:dave"', '"bob"'))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "clusters[1].members[1]" in e.value.message
    assert str(p) in e.value.message


def test_a_missing_required_key_is_named(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace('owner = "did:plc:alice"\n', ""))
    with pytest.raises(ConfigError, match="owner: required key is missing"):
        config.load(p)


def test_out_of_range_and_malformed_values_are_refused(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("milli_cpu = 2000", "milli_cpu = -1"))
    with pytest.raises(ConfigError, match=r"contribution\.milli_cpu"):
        config.load(p)
    p = write(tmp_path, GOOD.replace('"0.0.0.0:2585"', '"nowhere"'))
    with pytest.raises(ConfigError, match=r"listen\.xrpc: .*HOST:PORT"):
        config.load(p)


def test_duplicate_cluster_names_are_refused(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace('name = "work"', 'name = "friends"'))
    with pytest.raises(ConfigError, match="repeated: friends"):
        config.load(p)


def test_invalid_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "did = ")
    with pytest.raises(ConfigError, match=f"{p}: not valid TOML"):
        config.load(p)
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_config_error_has_its_own_exit_code() -> None:
    assert ConfigError("x").exit_code == 9


def test_scheduling_defaults_are_the_protocol_s_timing(tmp_path: Path) -> None:
    from dataclasses import replace

    from meshletd.core.timing import DEFAULT_TIMING

    # One local knob differs: the daemon bids 2 ms after a workload arrives (the core's
    # default batch is 50 ms; it is on the publish -> running path).
    expected = replace(DEFAULT_TIMING, bid_batch_ms=2)
    assert config.load(write(tmp_path, GOOD)).scheduling.timing() == expected


def test_scheduling_settings_reach_the_scheduler_s_timing(tmp_path: Path) -> None:
    text = GOOD + "[scheduling]\nusage_period_ms = 5000\nhalf_life_ms = 60000\nskew_ms = 100\n"
    t = config.load(write(tmp_path, text)).scheduling.timing()
    assert (t.usage_period_ms, t.half_life_ms, t.skew_ms) == (5000, 60000, 100)
    assert t.grace_ms == 1500 and t.settle_ms == 2 * 100 + 1500


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("usage_period_ms = 0", "scheduling.usage_period_ms"),
        ("watchers = 12", "scheduling.watchers"),
        ('grace_ms = "fast"', "scheduling.grace_ms"),
        ("max_skew_ms = 2000", "scheduling.max_skew_ms: unknown key"),
    ],
)
def test_bad_scheduling_settings_name_the_key(tmp_path: Path, setting: str, key: str) -> None:
    p = write(tmp_path, GOOD + f"[scheduling]\n{setting}\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert f"{p}: {key}" in e.value.message


def test_a_half_life_shorter_than_a_usage_period_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD + "[scheduling]\nusage_period_ms = 60000\nhalf_life_ms = 5000\n")
    with pytest.raises(ConfigError, match=r"scheduling\.half_life_ms: .*usage_period_ms"):
        config.load(p)


def test_a_lease_too_short_for_a_cut_watcher_to_notice_is_refused(tmp_path: Path) -> None:
    """Chaos seed 3 (session 10): with a lease valid 12 s and renewed every 5 s, a watcher
    cut from the lease's PDS saw the lease expire before it took that PDS for silent (12 s)
    and suspected a healthy meshlet behind NAT."""
    p = write(tmp_path, GOOD + "[scheduling]\nlease_renew_ms = 5000\nlease_valid_ms = 12000\n")
    with pytest.raises(ConfigError, match=r"scheduling\.lease_valid_ms: .*5000\) \+ 15000"):
        config.load(p)
    p = write(tmp_path, GOOD + "[scheduling]\nlease_renew_ms = 4000\nlease_valid_ms = 20000\n")
    assert config.load(p).scheduling.timing().lease_valid_ms == 20000
