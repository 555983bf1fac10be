"""Pure builder: the nftables rules that keep replicas off the host's LAN and the host itself.

A replica's network is rootless podman's slirp4netns: its traffic leaves the host from
ordinary sockets of `slirp4netns`, a process of user `meshlet` in the replica's unit (so in
`meshlet.slice`). The rules match those sockets on the host's `output` hook:

- `meta skuid <meshlet>`: only sockets of the replica user are looked at; meshletd (root)
  and everything else on the host is never touched (its peer traffic, the PDS, the
  firehose);
- minus the sockets of meshletd's own podman calls (`podman pull` as user meshlet), which
  run in `system.slice` units: a registry on the LAN stays reachable for pulls. Matched by
  `socket cgroupv2`, the only cgroup match nftables has; the rule is an exception, so a
  cgroup that cannot be matched makes pulls fail, never replicas escape (fail closed);
- what is left (the replicas, their slirp4netns and conmon) goes through the host's grant
  (`commune.scheduler.hostPolicy#network`, docs/records.md):

  - "none": nothing leaves (the runtime also starts replicas with `--network=none`);
  - "internet" (default): no address of the host itself (any port, any of its addresses:
    `fib daddr type local`), no private, shared, link-local (cloud metadata
    169.254.169.254), loopback, multicast or reserved range, v4 or v6; DNS to the
    resolvers of the host's /etc/resolv.conf stays allowed (slirp4netns forwards the
    container's DNS to them, and they are often on the LAN);
  - "lan": the LAN too, but still not the host itself and not the metadata address.

`level`: the kernel matches an ancestor of the socket's cgroup at an absolute depth, which
a host in a container (systemd-nspawn's cgroup namespace) cannot know; `system.slice` is
matched at every depth from 1 to `MAX_LEVEL` (its id is unique, so only its own depth
ever matches).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Literal

NetworkGrant = Literal["none", "internet", "lan"]
GRANTS: tuple[NetworkGrant, ...] = ("none", "internet", "lan")


def grant_of(network: str) -> NetworkGrant:
    """A host policy's `network` as a grant (the lexicon admits only these three; anything
    else is read as the default, internet only)."""
    for g in GRANTS:
        if g == network:
            return g
    return "internet"


TABLE = "meshlet"
MAX_LEVEL = 8

# Not "the internet": RFC 1918 private, 100.64/10 shared (CGNAT), loopback, link-local
# (169.254/16, cloud metadata), this-network, IETF protocol assignments, benchmarking,
# multicast, reserved, broadcast.
PRIVATE_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
# Loopback, unspecified, v4-mapped (reaches v4 private space), ULA, link-local, multicast.
PRIVATE_V6 = ("::/127", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "ff00::/8")
# Cloud metadata services: never reachable, whatever the grant.
METADATA_V4 = ("169.254.169.254", "169.254.170.2", "100.100.100.200")
METADATA_V6 = ("fd00:ec2::254",)


def resolvers_from(resolv_conf: str) -> tuple[list[str], list[str]]:
    """The IPv4 and IPv6 nameservers of a resolv.conf text (others are ignored)."""
    v4: list[str] = []
    v6: list[str] = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            (v4 if addr.version == 4 else v6).append(str(addr))
    return sorted(set(v4)), sorted(set(v6))


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def ruleset(
    grant: NetworkGrant,
    *,
    uid: int,
    cgroup_v2: bool,
    resolvers_v4: Iterable[str] = (),
    resolvers_v6: Iterable[str] = (),
) -> str:
    """The `nft -f` text for `grant`: replaces table inet meshlet atomically (one batch)."""
    if grant not in GRANTS:
        raise ValueError(f"network grant must be one of {GRANTS}, got {grant!r}")
    # nft resolves cgroupv2 paths below /sys/fs/cgroup; a hybrid host mounts v2 at unified/.
    system_slice = "system.slice" if cgroup_v2 else "unified/system.slice"
    lines = [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        f"    meta skuid != {uid} return",
    ]
    lines += [
        f'    socket cgroupv2 level {level} "{system_slice}" return'
        for level in range(1, MAX_LEVEL + 1)
    ]
    lines += ["    jump replica", "  }", "  chain replica {"]
    if grant == "none":
        lines.append("    counter drop")
    else:
        # Replies of connections others opened to a published port (rootlessport runs as
        # the replica user) go back to whoever connected, private address or not.
        lines.append("    ct direction reply counter accept")
        lines.append(f"    ip daddr {_set(METADATA_V4)} counter drop")
        lines.append(f"    ip6 daddr {_set(METADATA_V6)} counter drop")
        if grant == "internet":
            dns4, dns6 = sorted(set(resolvers_v4)), sorted(set(resolvers_v6))
            dns = "meta l4proto { tcp, udp } th dport 53 accept"
            if dns4:
                lines.append(f"    ip daddr {_set(dns4)} {dns}")
            if dns6:
                lines.append(f"    ip6 daddr {_set(dns6)} {dns}")
        lines.append("    fib daddr type local counter drop")
        if grant == "internet":
            lines.append(f"    ip daddr {_set(PRIVATE_V4)} counter drop")
            lines.append(f"    ip6 daddr {_set(PRIVATE_V6)} counter drop")
    lines += ["  }", "}", ""]
    return "\n".join(lines)
