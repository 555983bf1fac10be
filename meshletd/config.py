"""meshletd's configuration: `/etc/meshlet/meshlet.toml`, validated, plus its credentials.

Errors name the file and the dotted key (`clusters[0].members[1]`) so an operator can fix
them without reading code. Credentials (app passwords) never live in the TOML: they come
from systemd credentials (`$CREDENTIALS_DIRECTORY/<name>`, `LoadCredential=`) or from a
root-only file, and are held as `pydantic.SecretStr` so they never reach a log or a repr.

Example::

    did = "did:plc:alicemesh"            # this meshlet's own DID
    owner = "did:plc:alice"              # the person who owns this machine
    pds = "https://pds.example.org"      # the meshlet account's PDS
    public_endpoint = "https://mesh.alice.example:2585"

    [[clusters]]
    name = "friends"
    members = ["did:plc:bob", "did:plc:carol"]

    [contribution]
    milli_cpu = 2000
    memory_mib = 4096

    [listen]
    xrpc = "0.0.0.0:2585"
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from meshletd.core.timing import (
    DEFAULT_TIMING,
    FEED_QUIET_MS,
    LEASE_MAX_VALID_MS,
    LEASE_SLACK_MS,
    Timing,
)
from meshletd.errors import ConfigError
from meshletd.policy_settings import PolicySettings

DEFAULT_PATH = Path("/etc/meshlet/meshlet.toml")
DEFAULT_CREDENTIALS_FILE = Path("/etc/meshlet/credentials.toml")

# Credential names, the same as the systemd credential file names in the unit.
MESHLET_PASSWORD = "meshlet-app-password"
OWNER_PASSWORD = "owner-app-password"
CREDENTIAL_NAMES = (MESHLET_PASSWORD, OWNER_PASSWORD)
CREDENTIAL_DIR_PREFIX = "meshlet"

Did = Annotated[
    str, StringConstraints(pattern=r"^did:(plc|web):[A-Za-z0-9._:%-]+$", max_length=2048)
]
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cluster(_Section):
    """One set of owner DIDs this meshlet consents to (overlapping clusters are normal)."""

    name: Name
    members: list[Did] = Field(default_factory=list, max_length=1000)


class Contribution(_Section):
    """What the commune may take from this machine (the slice caps)."""

    milli_cpu: int = Field(default=1000, ge=0, le=1_024_000)
    memory_mib: int = Field(default=1024, ge=0, le=16_777_216)
    storage_mib: int = Field(default=10_240, ge=0, le=16_777_216)
    max_replicas: int = Field(default=16, ge=0, le=1000)
    # Memory each replica costs beyond its workload's (conmon, slirp4netns, the container's
    # init), counted against memory_mib when this meshlet bids: what it promises fits in
    # the slice (measured ~2 MiB at rest; docs/runtime.md).
    replica_overhead_mib: int = Field(default=8, ge=0, le=1024)
    # Processes and threads of all replicas together (None: no cap beyond systemd's own).
    tasks_max: int | None = Field(default=None, ge=1, le=4_194_304)


class Isolation(_Section):
    """How tenants are kept apart from each other and from the host (docs/runtime.md)."""

    # Ids of each replica's own user namespace (podman --userns=auto:size=N); 0: all
    # replicas share the meshlet user's one mapping (no isolation between tenants).
    userns_size: int = Field(default=65536, ge=0, le=1 << 24)
    # After a replica starts, storage copies its image for this many more ranges ahead of
    # need, in the background (rootless podman copies an image per range on first use;
    # each copy takes the image's size on disk). 0: each range's copy is made by the
    # replica that first needs it, during its start.
    userns_warm: int = Field(default=2, ge=0, le=16)
    # meshlet's nftables rules hold replicas to the host policy's network grant (default
    # "internet": no LAN, private ranges, metadata or host ports). False: the host's
    # administrator enforces it some other way.
    network_rules: bool = True


class Listen(_Section):
    """Where the two transports of the XRPC API listen."""

    xrpc: str = "127.0.0.1:2585"
    control_socket: Path = Path("/run/meshlet/control.sock")

    @field_validator("xrpc")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:2585")
        return value

    @property
    def xrpc_host(self) -> str:
        return self.xrpc.rpartition(":")[0].strip("[]")

    @property
    def xrpc_port(self) -> int:
        return int(self.xrpc.rpartition(":")[2])


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8788")
    return value


class Web(_Section):
    """The read-only web page of the commune and its /metrics (meshletd/web).

    Loopback by default: the page shows only public records, but it is this machine's page
    and opening it to a network is the operator's decision."""

    enabled: bool = True
    listen: str = "127.0.0.1:8788"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _check_host_port(value)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class Control(_Section):
    """Who may use the control socket: reads for `group`, mutations for root or `admin_group`."""

    group: str = "meshlet"
    admin_group: str = "meshlet-admin"


_T = DEFAULT_TIMING


class Images(_Section):
    """[images]: where replicas' images come from and what a pull may cost (docs/runtime.md,
    "Images from registries")."""

    # Resolve a published workload's tag to its digest at publish time (the owner's
    # meshlet asks the registry once; every replica then runs exactly those bits).
    resolve_tags: bool = True
    pull_timeout_s: int = Field(default=900, ge=1, le=86_400)
    pull_max_mib: int = Field(default=10_240, ge=1, le=16_777_216)


class Scheduling(_Section):
    """Timing of the scheduling protocol (docs/protocol.md section 3), in milliseconds.

    Commune-wide: `skew_ms`, `grace_ms` and `replacement_window_ms` enter the round
    formulas, and every meshlet of a commune MUST use the same values (different values let
    meshlets judge a bid differently, and their placements fork); `usage_period_ms` and
    `half_life_ms` SHOULD be equal too, so every member can reproduce the fair-share ledger.
    Local (this machine only): `bid_window_ms` (the default `bidWindowMs` of the workloads
    this meshlet publishes; each workload carries its own), probing (`probe_interval_ms`,
    `probe_failures`, `watchers`), `fence_timeout_ms`, `reopen_backoff_ms`, `bid_batch_ms`,
    `update_timeout_ms` (how long an update's new replica may take to run, section 25),
    and the lease a meshlet without `public_endpoint` writes (`lease_renew_ms`,
    `lease_valid_ms`: the validity travels in the lease, docs/protocol.md section 8).
    The defaults are the protocol's; read at start (a reload does not change them).
    """

    # local
    bid_window_ms: int = Field(default=5000, ge=500, le=600_000)
    # commune-wide: the round formulas (MUST be equal on every meshlet)
    skew_ms: int = Field(default=_T.skew_ms, ge=0, le=60_000)
    grace_ms: int = Field(default=_T.grace_ms, ge=0, le=600_000)
    replacement_window_ms: int = Field(default=_T.replacement_window_ms, ge=100, le=600_000)
    # commune-wide: fair share (SHOULD be equal, so the ledger is reproducible)
    usage_period_ms: int = Field(default=_T.usage_period_ms, ge=1000, le=7 * 86_400_000)
    half_life_ms: int = Field(default=_T.half_life_ms, ge=1000, le=3650 * 86_400_000)
    # local
    probe_interval_ms: int = Field(default=_T.probe_interval_ms, ge=100, le=60_000)
    probe_failures: int = Field(default=_T.probe_failures, ge=1, le=100)
    watchers: int = Field(default=_T.watchers, ge=1, le=9)
    fence_timeout_ms: int = Field(default=_T.fence_timeout_ms, ge=0, le=3_600_000)
    reopen_backoff_ms: int = Field(default=_T.reopen_backoff_ms, ge=0, le=3_600_000)
    # 2 ms, not the core's 50: it orders what arrives together (the records of one frame are
    # handled back to back), and it is on the publish -> running path (docs/benchmarks.md,
    # "End to end", "Session 11"); across batches fair share is section 23's waiting rule.
    bid_batch_ms: int = Field(default=2, ge=0, le=10_000)
    update_timeout_ms: int = Field(default=_T.update_timeout_ms, ge=1000, le=3_600_000)
    # only written by a meshlet without public_endpoint (it cannot be probed)
    lease_renew_ms: int = Field(default=_T.lease_renew_ms, ge=1000, le=600_000)
    lease_valid_ms: int = Field(default=_T.lease_valid_ms, ge=1000, le=LEASE_MAX_VALID_MS)

    @field_validator("lease_valid_ms")
    @classmethod
    def _lease_outlives_its_renewal(cls, value: int, info: ValidationInfo) -> int:
        renew = info.data.get("lease_renew_ms")
        if renew is not None and value < renew + LEASE_SLACK_MS:
            raise ValueError(
                f"must be at least lease_renew_ms ({renew}) + {LEASE_SLACK_MS}: a watcher "
                f"cut from this meshlet's PDS takes that PDS for silent only after "
                f"{FEED_QUIET_MS // 1000} s, and a lease that expires sooner after its last "
                "renewal makes a healthy meshlet look dead to it (docs/protocol.md, section 8)"
            )
        return value

    @field_validator("half_life_ms")
    @classmethod
    def _half_life_covers_a_period(cls, value: int, info: ValidationInfo) -> int:
        period = info.data.get("usage_period_ms")
        if period is not None and value < period:
            raise ValueError(
                f"must be at least usage_period_ms ({period}): usage is published once per "
                "period, so a shorter half-life decays it before anyone reads it"
            )
        return value

    def timing(self) -> Timing:
        """The scheduler core's `Timing` from these settings (every key but the local
        `bid_window_ms` is one of its fields, with the same name)."""
        return Timing(**self.model_dump(exclude={"bid_window_ms"}))


class Config(_Section):
    """The validated content of meshlet.toml."""

    did: Did
    owner: Did
    pds: Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/.*)?$")]
    owner_pds: Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/.*)?$")] | None = None
    plc_url: str = "https://plc.directory"
    public_endpoint: str | None = None
    arch: str | None = None
    labels: list[Annotated[str, StringConstraints(max_length=128)]] = Field(
        default_factory=list, max_length=32
    )
    clusters: list[Cluster] = Field(default_factory=list)
    contribution: Contribution = Field(default_factory=Contribution)
    isolation: Isolation = Field(default_factory=Isolation)
    listen: Listen = Field(default_factory=Listen)
    control: Control = Field(default_factory=Control)
    web: Web = Field(default_factory=Web)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    images: Images = Field(default_factory=Images)
    # The host policy published at start (None: no [policy] section; the record in the
    # repo, if any, is left as it is). docs/protocol.md section 21, docs/cli.md.
    policy: PolicySettings | None = None
    state_dir: Path = Path("/var/lib/meshlet")
    # "atproto": the real cluster (PDS, firehose); "memory": a self-contained stand-in node
    # that runs every workload itself (demos, tests, benchmarks).
    backend: Literal["atproto", "memory"] = "atproto"
    # Where replicas run: "systemd" (transient units, rootless podman), "fake" (in memory,
    # for tests), "none" (observe only: no bids), "auto" (systemd when booted with it).
    runtime: Literal["auto", "systemd", "fake", "none"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("clusters")
    @classmethod
    def _unique_cluster_names(cls, value: list[Cluster]) -> list[Cluster]:
        names = [c.name for c in value]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"cluster names must be unique; repeated: {', '.join(dup)}")
        return value

    @property
    def members(self) -> list[str]:
        """Every configured member owner DID, across clusters, first-seen order."""
        seen: dict[str, None] = {}
        for cluster in self.clusters:
            for did in cluster.members:
                seen.setdefault(did, None)
        return list(seen)


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _explain(err: ValidationError, path: Path) -> ConfigError:
    lines = []
    for e in err.errors():
        key = _key_path(tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{path}: {key}: {msg}")
    return ConfigError("\n".join(lines))


def parse(text: str, path: Path = DEFAULT_PATH) -> Config:
    """Validate TOML text; `path` is only used to name the file in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise _explain(e, path) from None


def load(path: Path | str = DEFAULT_PATH) -> Config:
    """Read and validate the configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (see docs/cli.md for an example)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse(text, path)


class Credentials(BaseModel):
    """App passwords; `repr`/`str` never show them."""

    model_config = ConfigDict(frozen=True)

    meshlet_app_password: SecretStr | None = None
    owner_app_password: SecretStr | None = None


def _check_root_only(path: Path, st: os.stat_result) -> None:
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: credentials file must not be readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}; run: chmod 600 {path})"
        )
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path}: credentials file must be owned by uid {os.geteuid()}")


def load_credentials(
    environ: dict[str, str] | None = None, fallback: Path = DEFAULT_CREDENTIALS_FILE
) -> Credentials:
    """Credentials from `$CREDENTIALS_DIRECTORY` (systemd), else from a root-only TOML file.

    The file form is `meshlet-app-password = "…"` / `owner-app-password = "…"`. A missing
    source yields empty credentials (the daemon then runs read-only); a file readable by
    anyone but its owner is refused.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        for name in CREDENTIAL_NAMES:
            # `LoadCredential=NAME:FILE` gives NAME; the unit's directory form
            # (`LoadCredential=meshlet:/etc/meshlet/credentials`) gives meshlet_NAME.
            for candidate in (name, f"{CREDENTIAL_DIR_PREFIX}_{name}"):
                p = Path(cred_dir) / candidate
                try:
                    value = p.read_text(encoding="utf-8").strip()
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise ConfigError(f"{p}: cannot read credential: {e.strerror}") from None
                if value:  # an empty credential file counts as absent
                    values[name.replace("-", "_")] = SecretStr(value)
                    break
        return Credentials(**values)
    try:
        st = fallback.stat()
    except FileNotFoundError:
        return Credentials()
    _check_root_only(fallback, st)
    try:
        raw = tomllib.loads(fallback.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        # tomllib's messages name a position, never the text: safe to show.
        raise ConfigError(f"{fallback}: not valid TOML: {e}") from None
    for key, value in raw.items():
        if key not in CREDENTIAL_NAMES:
            raise ConfigError(f"{fallback}: {key}: unknown key")
        if not isinstance(value, str):
            raise ConfigError(f"{fallback}: {key}: must be a string")
        values[key.replace("-", "_")] = SecretStr(value.strip())
    return Credentials(**values)
