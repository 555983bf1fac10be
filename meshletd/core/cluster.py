"""The cluster view: who may bid on whose workloads, judged only from public records.

A meshlet M may host a workload of owner O (cluster c) when
  * linkage both ways: M's meshletOwner names P, and P's repo has a meshlet record naming M;
  * M consents to O: some membership record in M's repo lists O;
  * O consents to P: P == O, or a membership record with rkey/cluster c in O's repo or in
    the repo of one of O's linked meshlets lists P;
  * M satisfies the workload's constraints (arch, labels, avoidMeshlets).
Every observer evaluates this from the same records, so overlapping clusters agree. M's host
policy (its hostPolicy record) is judged per round, at the round's close (`policy_admits`,
docs/protocol.md section 21), so it is kept here but is not part of `eligible`.

An owner's claims that count are the MAX_MESHLETS_PER_OWNER meshlet records with the
smallest record keys, and at most MAX_STORED_CLAIMS per owner are kept (the smallest keys):
docs/protocol.md section 19.4. This is the one view of cluster records in meshlet: the
scheduler judges eligibility with it, and the daemon its configured clusters
(`meshletd.atproto.cluster.ConfiguredClusters`).
"""

from __future__ import annotations

from .bounds import MEMBERSHIPS_PER_REPO
from .policy import admits, refusal, restrictive
from .records import HostPolicy, Membership, MeshletLink, MeshletOwner, Workload, split_at_uri
from .services import NO_INBOUND, Inbound, inbound_refusal

_EMPTY: frozenset[str] = frozenset()
MAX_MESHLETS_PER_OWNER = 64
MAX_STORED_CLAIMS = 1024


class ClusterView:
    """Index of meshletOwner, meshlet (link) and membership records."""

    def __init__(self) -> None:
        self.owners: dict[str, MeshletOwner] = {}  # meshlet DID -> its meshletOwner record
        # meshlets whose record says draining or lists past drains (most have neither)
        self._drainy: dict[str, MeshletOwner] = {}
        self._links: dict[str, MeshletLink] = {}  # uri -> link
        self._linked: dict[str, set[str]] = {}  # owner DID -> meshlet DIDs it claims
        self._claims: dict[str, dict[str, str]] = {}  # owner DID -> rkey -> meshlet DID
        self._memberships: dict[str, Membership] = {}  # uri -> record
        self._by_repo: dict[str, dict[str, Membership]] = {}  # repo -> cluster -> record
        self.version = 0
        self._consent_of: dict[str, frozenset[str]] = {}
        self._cluster_consent: dict[tuple[str, str], frozenset[str]] = {}
        self._members: dict[tuple[object, ...], tuple[str, ...]] = {}
        # meshlet -> (its meshletOwner record, the owners it consents to); None: not verified
        self._hosts: dict[str, tuple[MeshletOwner, frozenset[str]] | None] = {}
        self._cache_version = -1
        # meshlet -> what its host policy says about publishing ports (section 22)
        self._inbound: dict[str, Inbound] = {}
        self.policies: dict[str, HostPolicy] = {}  # meshlet DID -> its hostPolicy record
        # meshlets whose policy can refuse a workload that needs no more than `internet`
        self._strict: dict[str, HostPolicy] = {}

    # -- updates ---------------------------------------------------------------------
    def _changed(self) -> None:
        self.version += 1

    def put_owner(self, rec: MeshletOwner) -> None:
        """A meshletOwner record was seen."""
        self.owners[rec.meshlet] = rec
        if rec.state == "draining" or rec.drains:
            self._drainy[rec.meshlet] = rec
        else:
            self._drainy.pop(rec.meshlet, None)
        self._changed()

    def put_inbound(self, meshlet: str, inbound: Inbound) -> None:
        """The `inbound` of a meshlet's host policy record (NO_INBOUND: none, or deleted)."""
        if self._inbound.get(meshlet, NO_INBOUND) == inbound:
            return
        if inbound == NO_INBOUND:
            self._inbound.pop(meshlet, None)
        else:
            self._inbound[meshlet] = inbound
        self._changed()

    def inbound_of(self, meshlet: str) -> Inbound:
        """What a meshlet's host policy says about publishing ports."""
        return self._inbound.get(meshlet, NO_INBOUND)

    def put_link(self, rec: MeshletLink) -> None:
        """A meshlet (owner → machine) record was seen."""
        claims = self._claims.setdefault(rec.owner, {})
        claims[split_at_uri(rec.uri)[2]] = rec.meshlet
        self._links[rec.uri] = rec
        if len(claims) > MAX_STORED_CLAIMS:
            drop = max(claims)
            del claims[drop]
            self._links.pop(rec.uri.rsplit("/", 1)[0] + "/" + drop, None)
        self._count_claims(rec.owner)
        self._changed()

    def _count_claims(self, owner: str) -> None:
        """The meshlets an owner's claims name that count (section 19.4)."""
        claims = self._claims.get(owner, {})
        if len(claims) <= MAX_MESHLETS_PER_OWNER:
            self._linked[owner] = set(claims.values())
        else:
            self._linked[owner] = {claims[k] for k in sorted(claims)[:MAX_MESHLETS_PER_OWNER]}

    def put_membership(self, rec: Membership) -> None:
        """A membership record was seen."""
        by = self._by_repo.setdefault(rec.repo, {})
        replaced = by.get(rec.cluster)
        if replaced is not None and replaced.uri != rec.uri:
            self._memberships.pop(replaced.uri, None)  # one record per cluster name counts
        self._memberships[rec.uri] = rec
        by[rec.cluster] = rec
        if len(by) > MEMBERSHIPS_PER_REPO:
            # A repo's memberships that count: the smallest cluster names (section 20).
            dropped = by.pop(max(by))
            self._memberships.pop(dropped.uri, None)
        self._changed()

    def delete(self, uri: str, repo: str) -> bool:
        """Forget a record of ours by URI; True when it was one of the three kinds."""
        link = self._links.pop(uri, None)
        if link is not None:
            self._claims.get(link.owner, {}).pop(split_at_uri(uri)[2], None)
            self._count_claims(link.owner)
            self._changed()
            return True
        mem = self._memberships.pop(uri, None)
        if mem is not None:
            by = self._by_repo.get(mem.repo, {})
            if by.get(mem.cluster) is mem:
                del by[mem.cluster]
            self._changed()
            return True
        mo = self.owners.get(repo)
        if mo is not None and mo.uri == uri:
            del self.owners[repo]
            self._drainy.pop(repo, None)
            self._changed()
            return True
        pol = self.policies.get(repo)
        if pol is not None and pol.uri == uri:
            del self.policies[repo]
            self._strict.pop(repo, None)
            self._changed()
            return True
        return False

    def put_policy(self, rec: HostPolicy) -> bool:
        """A hostPolicy record was seen; False when it changes nothing."""
        if self.policies.get(rec.meshlet) == rec:
            return False
        self.policies[rec.meshlet] = rec
        if restrictive(rec):
            self._strict[rec.meshlet] = rec
        else:
            self._strict.pop(rec.meshlet, None)
        self._changed()
        return True

    def put(self, rec: MeshletOwner | MeshletLink | Membership) -> None:
        """Any of the three cluster records was seen."""
        if isinstance(rec, MeshletOwner):
            self.put_owner(rec)
        elif isinstance(rec, MeshletLink):
            self.put_link(rec)
        else:
            self.put_membership(rec)

    def forget_repo(self, repo: str) -> None:
        """Drop every record of one repo (it is no longer followed)."""
        for uri in [u for u, link in self._links.items() if link.owner == repo]:
            self.delete(uri, repo)
        for uri in [u for u, m in self._memberships.items() if m.repo == repo]:
            self.delete(uri, repo)
        mo = self.owners.get(repo)
        if mo is not None:
            self.delete(mo.uri, repo)
        pol = self.policies.get(repo)
        if pol is not None:
            self.delete(pol.uri, repo)

    # -- queries ---------------------------------------------------------------------
    def claims(self, owner: str) -> dict[str, str]:
        """The claims of an owner kept (rkey -> meshlet DID; at most MAX_STORED_CLAIMS)."""
        return dict(self._claims.get(owner, {}))

    def claimed(self, owner: str) -> frozenset[str]:
        """Meshlets an owner's meshlet records name that count (whether or not they name
        it back): those of its MAX_MESHLETS_PER_OWNER claims with the smallest keys."""
        return frozenset(self._linked.get(owner, _EMPTY))

    def membership(self, repo: str, cluster: str) -> Membership | None:
        """One named membership record of a repo."""
        return self._by_repo.get(repo, {}).get(cluster)

    def _fresh(self) -> None:
        if self._cache_version != self.version:
            self._consent_of.clear()
            self._cluster_consent.clear()
            self._members.clear()
            self._hosts.clear()
            self._cache_version = self.version

    def verified(self, meshlet: str) -> bool:
        """Linkage both ways holds for this meshlet."""
        mo = self.owners.get(meshlet)
        return mo is not None and meshlet in self._linked.get(mo.owner, _EMPTY)

    def consent_of(self, meshlet: str) -> frozenset[str]:
        """Owner DIDs this meshlet consents to (union of its membership records)."""
        self._fresh()
        got = self._consent_of.get(meshlet)
        if got is None:
            recs = list(self._by_repo.get(meshlet, {}).values())
            if len(recs) == 1:
                got = recs[0].members  # shared, no copy
            else:
                got = frozenset().union(*(r.members for r in recs)) if recs else _EMPTY
            self._consent_of[meshlet] = got
        return got

    def cluster_consent(self, owner: str, cluster: str) -> frozenset[str]:
        """Owner DIDs that `owner` accepts as hosts for workloads offered to `cluster`."""
        self._fresh()
        key = (owner, cluster)
        got = self._cluster_consent.get(key)
        if got is None:
            recs = []
            r = self._by_repo.get(owner, {}).get(cluster)
            if r is not None:
                recs.append(r)
            for m in sorted(self._linked.get(owner, _EMPTY)):
                mo = self.owners.get(m)
                if mo is None or mo.owner != owner:
                    continue
                r = self._by_repo.get(m, {}).get(cluster)
                if r is not None:
                    recs.append(r)
            if len(recs) == 1:
                got = recs[0].members
            else:
                got = frozenset().union(*(x.members for x in recs)) if recs else _EMPTY
            self._cluster_consent[key] = got
        return got

    def eligible(self, wl: Workload, meshlet: str) -> bool:
        """Whether `meshlet` may host replicas of `wl` (linkage, mutual consent, constraints)."""
        if self._cache_version != self.version:
            self._fresh()
        try:
            host = self._hosts[meshlet]
        except KeyError:
            host = self._host(meshlet)
        if host is None:
            return False
        mo, consent = host
        if wl.owner not in consent:
            return False
        if mo.owner != wl.owner:
            cc = self._cluster_consent.get((wl.owner, wl.cluster))
            if cc is None:
                cc = self.cluster_consent(wl.owner, wl.cluster)
            if mo.owner not in cc:
                return False
        if wl.avoid and meshlet in wl.avoid:
            return False
        if wl.arch and mo.arch not in wl.arch:
            return False
        if wl.ports and inbound_refusal(self._inbound.get(meshlet, NO_INBOUND), wl):
            return False
        return not (wl.labels and not all(lab in mo.labels for lab in wl.labels))

    def host_table(
        self, wl: Workload
    ) -> tuple[dict[str, tuple[MeshletOwner, frozenset[str]] | None], frozenset[str]] | None:
        """For a workload without constraints (arch, labels, avoidMeshlets): the verified-host
        cache and the owner's cluster consent, so that a caller checking many bids can do
        `eligible` inline: a meshlet M listed in the table is eligible exactly when its entry
        (mo, consent) is not None, wl.owner is in consent, and mo.owner is wl.owner or in the
        cluster consent. A meshlet not listed yet: call `eligible` (it fills the table).
        None for a workload with constraints (call `eligible`)."""
        if wl.avoid or wl.arch or wl.labels or wl.ports:
            return None
        if self._cache_version != self.version:
            self._fresh()
        cc = self._cluster_consent.get((wl.owner, wl.cluster))
        if cc is None:
            cc = self.cluster_consent(wl.owner, wl.cluster)
        return self._hosts, cc

    def drainy(self) -> dict[str, MeshletOwner]:
        """Meshlets whose record says draining or lists past drains (read-only): a meshlet
        not in it is never `drained_at` any time."""
        return self._drainy

    def policy_of(self, meshlet: str) -> HostPolicy:
        """The meshlet's host policy: its record, or the defaults when it publishes none."""
        got = self.policies.get(meshlet)
        return got if got is not None else HostPolicy.default(meshlet)

    def strict(self) -> dict[str, HostPolicy]:
        """Meshlets whose policy can refuse a workload that needs no more network than
        `internet` (read-only): for such a workload, a meshlet not in it admits it always."""
        return self._strict

    def policy_admits(self, wl: Workload, meshlet: str, close: int) -> bool:
        """Whether the meshlet's host policy lets its bid for wl count in a round that
        closes at `close` (docs/protocol.md, section 21)."""
        if wl.network != "lan":
            pol = self._strict.get(meshlet)
            return pol is None or admits(pol, wl, close)
        return admits(self.policy_of(meshlet), wl, close)

    def policy_refusal(self, wl: Workload, meshlet: str) -> str | None:
        """Why the meshlet's current policy refuses wl whatever the time, or None."""
        if wl.network != "lan" and meshlet not in self._strict:
            return None
        return refusal(self.policy_of(meshlet), wl)

    def _host(self, meshlet: str) -> tuple[MeshletOwner, frozenset[str]] | None:
        mo = self.owners.get(meshlet)
        got = None
        if mo is not None and meshlet in self._linked.get(mo.owner, _EMPTY):
            got = (mo, self.consent_of(meshlet))
        self._hosts[meshlet] = got
        return got

    def draining_since(self, meshlet: str) -> int | None:
        """Time the meshlet started draining (from its meshletOwner record), or None."""
        mo = self.owners.get(meshlet)
        if mo is None or mo.state != "draining":
            return None
        return mo.state_since

    def drained_at(self, meshlet: str, t: int) -> bool:
        """Whether the meshlet's record says it was draining at time t (its current drain
        started at or before t, or t is inside one of its past drain intervals): such a
        meshlet gets nothing from a round that closes at t (docs/protocol.md, section 4)."""
        mo = self._drainy.get(meshlet)
        return mo is not None and mo.drained_at(t)

    def member_estimate(self, wl: Workload) -> int:
        """How many meshlets may bid on wl, estimated as the size of the owner's cluster
        (plus one for the owner). Only used to size the candidate sample, never for validity."""
        if self._cache_version != self.version:
            self._fresh()
        cc = self._cluster_consent.get((wl.owner, wl.cluster))
        if cc is None:
            cc = self.cluster_consent(wl.owner, wl.cluster)
        return len(cc) + 1

    def active_members(self, wl: Workload) -> tuple[str, ...]:
        """Exactly the eligible, non-draining meshlets for wl, sorted (O(cluster size) the
        first time after a change of the cluster records, then cached)."""
        self._fresh()
        key = (wl.owner, wl.cluster, wl.arch, wl.labels, wl.avoid)
        got = self._members.get(key)
        if got is None:
            owners = set(self.cluster_consent(wl.owner, wl.cluster)) | {wl.owner}
            out = []
            for o in sorted(owners):
                for m in sorted(self._linked.get(o, _EMPTY)):
                    if self.eligible(wl, m) and self.draining_since(m) is None:
                        out.append(m)
            got = tuple(out)
            self._members[key] = got
        if self._strict or wl.network == "lan":
            # a meshlet whose policy refuses wl will not bid: not a candidate either
            return tuple(m for m in got if self.policy_refusal(wl, m) is None)
        return got

    def eligible_members(self, wl: Workload) -> list[str]:
        """Every eligible meshlet for wl, draining or not, sorted (uncached; for queries)."""
        owners = set(self.cluster_consent(wl.owner, wl.cluster)) | {wl.owner}
        return [
            m
            for o in sorted(owners)
            for m in sorted(self._linked.get(o, _EMPTY))
            if self.eligible(wl, m)
        ]

    def all_verified(self) -> list[str]:
        """Every meshlet with linkage both ways, sorted."""
        return sorted(m for m in self.owners if self.verified(m))


__all__ = ["ClusterView"]
