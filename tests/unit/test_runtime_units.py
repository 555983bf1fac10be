"""Unit names, the podman argv and the unit properties a replica gets (pure builders)."""

from __future__ import annotations

from dataclasses import replace

from meshletd.runtime.naming import container_name, is_replica_unit, secret_name, unit_name
from meshletd.runtime.spec import ReplicaId, ReplicaSpec, Resources, Secret
from meshletd.runtime.units import (
    RuntimeConfig,
    cgroup_path,
    identity_from_environment,
    podman_rm_argv,
    podman_run_argv,
    slice_properties,
    unit_properties,
)

SPEC = ReplicaSpec(
    replica=ReplicaId("did:plc:abc123", "web", 2),
    owner_handle="alice.example.com",
    image="localhost/busybox:latest",
    resources=Resources(milli_cpu=250, memory_mib=128, tasks=16),
    args=("sh", "-c", "echo $(id); --privileged"),
    env=(("GREETING", "hello"),),
    secrets=(Secret("db-password", b"s3cret"), Secret("token", b"t0k", env="API_TOKEN")),
    revision="bafyrev1",
)
CONFIG = RuntimeConfig()


def test_unit_name_names_owner_workload_and_replica() -> None:
    name = unit_name(SPEC.replica, SPEC.owner_handle)
    assert name.startswith("meshlet-alice.example.com-web-2-")
    assert name.endswith(".service") and is_replica_unit(name)
    # 128 bits of tag: a name cannot be made to collide with someone else's (issue #15)
    assert len(name.removesuffix(".service").rsplit("-", 1)[1]) == 32


def test_workloads_whose_readable_names_collide_get_different_units() -> None:
    a = unit_name(ReplicaId("did:plc:a", "b-c", 0), "x")
    b = unit_name(ReplicaId("did:plc:a", "c", 0), "x-b")
    c = unit_name(ReplicaId("did:plc:other", "b-c", 0), "x")
    assert len({a, b, c}) == 3


def test_unit_names_only_use_characters_systemd_allows_and_stay_short() -> None:
    name = unit_name(ReplicaId("did:plc:a", "w~" + "x" * 400, 9999), "h" * 253)
    assert all(ch.isalnum() or ch in ".:_-" for ch in name)
    assert len(name) < 140


def test_the_same_replica_always_gets_the_same_name() -> None:
    assert unit_name(SPEC.replica, "alice.example.com") == unit_name(
        ReplicaId("did:plc:abc123", "web", 2), "alice.example.com"
    )


def test_podman_argv_has_the_sandbox_and_quadlet_conventions() -> None:
    container = container_name(SPEC.replica, SPEC.owner_handle)
    argv = podman_run_argv(SPEC, CONFIG, container)
    assert argv[:3] == ["/usr/bin/podman", "run", "-d"]
    for flag in (
        "--init",
        "--sdnotify=conmon",
        "--log-driver=passthrough",
        "--pull=never",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        "--read-only",
        "--replace",
        "--network=slirp4netns",
    ):
        assert flag in argv, flag
    joined = " ".join(argv)
    for forbidden in ("--privileged", "--network=host", "-v ", "--volume", "--cgroups=split"):
        assert forbidden not in joined.split("localhost/busybox:latest")[0], forbidden
    # image then args, untouched and in order (no shell anywhere)
    i = argv.index("localhost/busybox:latest")
    assert argv[i + 1 :] == list(SPEC.args)


def test_secrets_are_referenced_by_name_never_by_value() -> None:
    container = container_name(SPEC.replica, SPEC.owner_handle)
    argv = podman_run_argv(SPEC, CONFIG, container)
    props = unit_properties(SPEC, CONFIG, "u.service", container)
    flat = repr(argv) + repr(props)
    assert "s3cret" not in flat and "t0k" not in flat
    assert f"{secret_name(container, 'db-password')},type=mount,target=db-password" in argv
    assert f"{secret_name(container, 'token')},type=env,target=API_TOKEN" in argv


def test_cgroup_v2_adds_split_cgroups_and_writable_root_drops_read_only() -> None:
    argv = podman_run_argv(
        replace(SPEC, writable_root=True, network="none"), replace(CONFIG, cgroup_v2=True), "c"
    )
    assert "--cgroups=split" in argv and "--read-only" not in argv
    assert "--network=none" in argv


def test_unit_properties_carry_limits_and_conventions() -> None:
    props = unit_properties(SPEC, CONFIG, "u.service", "c")
    assert props["MemoryMax"] == (128 + CONFIG.memory_overhead_mib) << 20
    assert props["CPUQuotaPerSecUSec"] == CONFIG.launch_milli_cpu * 1000
    assert props["TasksMax"] == 16 + CONFIG.tasks_overhead
    assert props["Delegate"] is True and props["KillMode"] == "mixed"
    assert props["Type"] == "notify" and props["NotifyAccess"] == "all"
    assert props["User"] == "meshlet" and props["Slice"] == "meshlet.slice"
    assert props["RemainAfterExit"] is True
    assert props["ExecStop"] == [(CONFIG.podman, podman_rm_argv(CONFIG, "c", 10), True)]
    save = props["ExecStopPost"][0][1]  # type: ignore[index]
    assert save[-1] == "/run/meshlet-replicas/u.service"
    assert "/sys/fs/cgroup/memory/meshlet.slice/u.service/memory.oom_control" in save


def test_a_replica_starts_at_the_launch_quota_and_its_unit_then_sets_the_workloads() -> None:
    props = unit_properties(SPEC, CONFIG, "u.service", "c")
    assert props["CPUQuotaPerSecUSec"] == 2_000_000  # podman starts at full speed
    (path, argv, flags) = props["ExecStartPostEx"][0]  # type: ignore[index]
    assert flags == ["privileged"] and path == "/bin/systemctl"
    assert argv == [path, "set-property", "--runtime", "--", "u.service", "CPUQuota=25.0%"]
    big = replace(SPEC, resources=Resources(milli_cpu=3005, memory_mib=128, tasks=16))
    props = unit_properties(big, CONFIG, "u.service", "c")
    # One CPU or more: podman is not slowed by it, so the unit starts under the workload's
    # own quota and no launch step runs (no systemctl on the start path).
    assert props["CPUQuotaPerSecUSec"] == 3_005_000 and "ExecStartPostEx" not in props
    one = replace(SPEC, resources=Resources(milli_cpu=1000, memory_mib=128, tasks=16))
    assert unit_properties(one, CONFIG, "u", "c")["CPUQuotaPerSecUSec"] == 1_000_000
    assert "ExecStartPostEx" not in unit_properties(one, CONFIG, "u", "c")
    nearly = replace(SPEC, resources=Resources(milli_cpu=999, memory_mib=128, tasks=16))
    assert "ExecStartPostEx" in unit_properties(nearly, CONFIG, "u", "c")
    user = unit_properties(SPEC, replace(CONFIG, manager="user"), "u.service", "c")
    assert user["ExecStartPostEx"][0][1][1] == "--user"  # type: ignore[index]
    ident = identity_from_environment(props["Environment"])  # type: ignore[arg-type]
    assert ident is not None and ident.milli_cpu == 3005


def test_identity_round_trips_through_the_unit_environment() -> None:
    props = unit_properties(SPEC, CONFIG, "u.service", "c")
    ident = identity_from_environment(props["Environment"])  # type: ignore[arg-type]
    assert ident is not None
    assert ident.replica == SPEC.replica and ident.revision == "bafyrev1"
    assert ident.container == "c"
    assert identity_from_environment(["PATH=/bin"]) is None


def test_the_launch_quota_never_exceeds_the_slices() -> None:
    # cgroup v1 refuses a unit's quota above its slice's (systemd logged EINVAL each start).
    lent = replace(CONFIG, slice_milli_cpu=1000)
    assert unit_properties(SPEC, lent, "u", "c")["CPUQuotaPerSecUSec"] == 1_000_000
    assert "ExecStartPostEx" in unit_properties(SPEC, lent, "u", "c")  # 250 m set after
    more = replace(CONFIG, slice_milli_cpu=4000)
    assert unit_properties(SPEC, more, "u", "c")["CPUQuotaPerSecUSec"] == 2_000_000


def test_cgroup_paths_follow_systemd_slice_nesting() -> None:
    assert cgroup_path("meshlet.slice", "u.service") == "/meshlet.slice/u.service"
    assert cgroup_path("a-b.slice", "u.service") == "/a.slice/a-b.slice/u.service"
    assert cgroup_path("-.slice", "u.service") == "/u.service"


def test_slice_caps_are_optional() -> None:
    uncapped = slice_properties(CONFIG)
    assert uncapped["MemoryMax"] == uncapped["CPUQuotaPerSecUSec"] == 2**64 - 1
    capped = slice_properties(replace(CONFIG, slice_milli_cpu=1000, slice_memory_mib=8192))
    assert capped["CPUQuotaPerSecUSec"] == 1_000_000
    assert capped["MemoryMax"] == 8192 << 20


def test_under_the_user_manager_units_have_no_user_and_counters_come_from_its_cgroup() -> None:
    cfg = replace(CONFIG, manager="user")
    props = unit_properties(SPEC, cfg, "u.service", "c")
    assert "User" not in props and "Group" not in props
    save = props["ExecStopPost"][0][1]  # type: ignore[index]
    assert (
        "/sys/fs/cgroup/memory/user.slice/user-1000.slice/user@1000.service/meshlet.slice/"
        "u.service/memory.oom_control"
    ) in save


def test_a_podman_call_runs_as_the_replica_user_in_a_unit_of_its_own() -> None:
    from fnmatch import fnmatch

    from meshletd.runtime.naming import UNIT_PATTERN, podman_call_unit
    from meshletd.runtime.units import podman_call_properties

    unit = podman_call_unit("0123456789abcdef")
    assert unit == "meshletd-podman-0123456789abcdef.service"
    # Never taken for a replica: adoption lists units by UNIT_PATTERN.
    assert not fnmatch(unit, UNIT_PATTERN) and not is_replica_unit(unit)

    props = podman_call_properties(CONFIG, ["secret", "create", "c.db", "-"], 120)
    assert props["Type"] == "exec"
    assert props["ExecStart"] == [
        (CONFIG.podman, [CONFIG.podman, "secret", "create", "c.db", "-"], False)
    ]
    assert props["User"] == CONFIG.user and props["WorkingDirectory"] == CONFIG.home
    assert f"XDG_RUNTIME_DIR={CONFIG.runtime_dir}" in props["Environment"]  # type: ignore[operator]
    assert props["RuntimeMaxUSec"] == 120_000_000
    assert props["LogLevelMax"] == 3
    # Its stdio is the adapter's business (pipes), never data in a property.
    assert not any(k.startswith("Standard") for k in props)

    user = podman_call_properties(replace(CONFIG, manager="user"), ["ps"], 5)
    assert "User" not in user and "Group" not in user
