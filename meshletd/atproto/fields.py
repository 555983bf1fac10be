"""Which core field carries each lexicon property, record by record: the table the JSON
boundary (`meshletd.atproto.records`) converts by and a unit test checks against the lexicons
and the dataclasses in both directions (tests/unit/test_atproto_records.py)."""

from __future__ import annotations

from typing import Final

from meshletd.core.records import (
    Bid,
    Endpoint,
    EnvVar,
    HostPolicy,
    Lease,
    Membership,
    MeshletLink,
    MeshletOwner,
    PortSpec,
    SecretRef,
    Usage,
    UsageEntry,
    Workload,
    WorkloadStatus,
)

# Lexicon property (dotted through nested objects) -> the core field that carries it, per
# record class. Fields that come from the record's address, not its value (uri, cid, the
# repo DID) are not listed. Checked against the lexicons by tests/unit/test_atproto_records.py.
FIELDS: Final[dict[type, dict[str, str]]] = {
    Workload: {
        "name": "name",
        "image": "image",
        "command": "command",
        "args": "args",
        "env": "env",
        "resources.milliCpu": "milli_cpu",
        "resources.memoryMiB": "memory_mib",
        "resources.storageMiB": "storage_mib",
        "replicas": "replicas",
        "kind": "kind",
        "restartPolicy": "restart_policy",
        "constraints.arch": "arch",
        "constraints.labels": "labels",
        "constraints.preferMeshlets": "prefer",
        "constraints.avoidMeshlets": "avoid",
        "constraints.allowPacking": "allow_packing",
        "secrets": "secrets",
        "cluster": "cluster",
        "bidWindowMs": "bid_window_ms",
        "paused": "paused",
        "ports": "ports",
        "healthCheck.command": "health_command",
        "healthCheck.intervalS": "health_interval_s",
        "healthCheck.timeoutS": "health_timeout_s",
        "healthCheck.retries": "health_retries",
        "healthCheck.startPeriodS": "health_start_period_s",
        "network": "network",
        "maxRuntimeS": "max_runtime_s",
        "imageDigest": "image_digest",
        "imagePullSecret": "image_pull_secret",
        "createdAt": "created_at",
    },
    Bid: {
        "workload.uri": "workload_uri",
        "workload.cid": "workload_cid",
        "round": "round",
        "slot": "slot",
        "priority": "priority",
        "slots": "slots",
        "free.milliCpu": "free_milli_cpu",
        "free.memoryMiB": "free_memory_mib",
        "free.storageMiB": "",  # not modelled: a bid offers CPU and memory
        "createdAt": "created_at",
    },
    WorkloadStatus: {
        "workload.uri": "workload_uri",
        "workload.cid": "workload_cid",
        "round": "round",
        "slot": "slot",
        "state": "state",
        "exitCode": "exit_code",
        "restarts": "restarts",
        "message": "message",
        "unit": "unit",
        "startedAt": "started_at",
        "finishedAt": "finished_at",
        "health": "health",
        "endpoints": "endpoints",
        "updatedAt": "updated_at",
    },
    Usage: {
        "periodStart": "period_start",
        "periodEnd": "period_end",
        "entries": "entries",
        "createdAt": "created_at",
    },
    Membership: {"cluster": "cluster", "members": "members", "createdAt": "created_at"},
    MeshletOwner: {
        "ownerDid": "owner",
        "endpoint": "endpoint",
        "state": "state",
        "stateSince": "state_since",
        "drains": "drains",
        "capacity.milliCpu": "milli_cpu",
        "capacity.memoryMiB": "memory_mib",
        "capacity.storageMiB": "storage_mib",
        "arch": "arch",
        "labels": "labels",
        "encryptionKey": "encryption_key",
        "version": "version",
        "createdAt": "",  # written as stateSince; read only when stateSince is absent
    },
    MeshletLink: {"meshletDid": "meshlet", "name": "name", "createdAt": "created_at"},
    Lease: {
        "renewedAt": "renewed_at",
        "validMs": "valid_ms",
        "createdAt": "",  # written as renewedAt
    },
    HostPolicy: {
        "owners.defaultShare": "default_share",
        "owners.caps": "caps",
        "evicted": "evicted",
        "images.allow": "image_allow",
        "images.digestsOnly": "digests_only",
        "network": "network",
        "inbound.allowed": "inbound_allowed",
        "inbound.portMin": "port_min",
        "inbound.portMax": "port_max",
        "inbound.address": "inbound_address",
        "schedule": "schedule",
        "jobMaxRuntimeS": "job_max_runtime_s",
        "minContribution.ratioPermille": "min_ratio_permille",
        "minContribution.periodDays": "min_period_days",
        "minContribution.mode": "min_mode",
        "createdAt": "created_at",
    },
}
# Objects of commune.scheduler.defs carried by their own core class: property -> field.
DEF_FIELDS: Final[dict[str, tuple[type, dict[str, str]]]] = {
    "envVar": (EnvVar, {"name": "name", "value": "value"}),
    "secretRef": (SecretRef, {"name": "name", "target": "target", "env": "env"}),
    "portSpec": (
        PortSpec,
        {"name": "name", "containerPort": "container_port", "protocol": "protocol"},
    ),
    "endpoint": (
        Endpoint,
        {"name": "name", "address": "address", "port": "port", "protocol": "protocol"},
    ),
    "usageEntry": (
        UsageEntry,
        {
            "ownerDid": "owner",
            "milliCpuSeconds": "milli_cpu_seconds",
            "memoryMiBSeconds": "memory_mib_seconds",
        },
    ),
}
# Fields a record takes from its address (at://repo/collection/rkey, cid), not its value.
ADDRESS_FIELDS: Final = frozenset({"uri", "cid", "owner", "meshlet", "repo", "extra"})

__all__ = ["ADDRESS_FIELDS", "DEF_FIELDS", "FIELDS"]
