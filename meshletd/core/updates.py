"""Rolling updates of the slots we own (docs/protocol.md, section 25).

When a workload record's spec version changes, each slot's owner starts the new version
beside the old one, in the slot's other lane, when its turn comes (every lower slot serves
the new version, as its owner's status says), stops the old one once the new one serves,
and writes its status with the new version: that status is the next slot's turn. A new
version that does not serve within `update_timeout_ms` (or exits, or cannot start) is
stopped, the old one keeps running, and the status names the failed version and why: no
other slot starts it. Placement never changes: no round, no bid.
"""

from __future__ import annotations

from .actions import StartReplica, StopReplica
from .events import ReplicaStateChanged
from .placement import WorkloadEntry
from .reconcile import Reconciler
from .records import Endpoint, Workload
from .services import choose_endpoints
from .state import Replica, ReplicaKey, Surge
from .versions import serving


class Updates(Reconciler):
    """The update of each slot we own to its workload's current version."""

    def _roll(self, e: WorkloadEntry, key: ReplicaKey, rep: Replica) -> None:
        """One step of the update of a slot we own, running and not paused: start the new
        version when it is this slot's turn, fail it when its time is up."""
        wl = e.wl
        target = wl.version
        surge = rep.surge
        if surge is not None:
            if surge.wl.version != target:
                # The record changed again meanwhile: this version is no longer wanted.
                self._end_surge(key, rep, "superseded")
            elif self.now >= surge.started_at + self.t.update_timeout_ms:
                secs = self.t.update_timeout_ms // 1000
                self._update_failed(e, key, rep, f"not serving within {secs} s")
                return
            else:
                return
        if rep.state != "running" or wl.kind != "service":
            return  # a running job finishes as it started (a restart takes the record)
        if rep.spec is None and rep.version == wl.cid and wl.cid:
            # Adopted from a meshletd that stored the record's CID, not the version: it
            # runs this very record (a restart or upgrade of meshletd touches nothing).
            rep.version = target
        if rep.failed and rep.failed != target:
            rep.failed = rep.failed_reason = ""  # a newer version is wanted: forget it
            self._write_status(wl, key[1], rep, "running")
        if rep.version == target or rep.failed == target:
            return
        if self._halted(e, target) or not self._my_turn(e, key[1], target):
            return
        cpu, mem = self.free_capacity()
        left = self.free_replicas()
        endpoints: tuple[Endpoint, ...] | None = ()
        if wl.ports:  # the new one publishes on ports of its own, beside the old one's
            used = [x.port for r in self._replicas.values() for x in r.endpoints]
            used += [x.port for r in self._replicas.values() if r.surge for x in r.surge.endpoints]
            endpoints = choose_endpoints(wl, self.cluster.inbound_of(self.me.did), used)
        if cpu < wl.milli_cpu or mem < wl.memory_mib or left == 0 or endpoints is None:
            # No room for the new version beside the old: hand the slot on instead (a
            # replacement round; the winner starts the new version, make-before-break,
            # section 9).
            owners = e.owners or ()
            cur = owners[key[1]] if key[1] < len(owners) else None
            if cur is not None:
                self._reopen(e, key[1], cur, force=True)
            return
        lane = 1 - rep.lane
        rep.surge = Surge(wl, lane, self.now, endpoints)
        self._surge_capacity[key] = (wl.milli_cpu, wl.memory_mib)
        self._replicas_waiting[key] = None
        self._resched = True
        self._out.append(StartReplica(wl, key[1], rep.round, lane=lane, endpoints=endpoints))

    def _never_ran(
        self, e: WorkloadEntry, key: ReplicaKey, rep: Replica, ev: ReplicaStateChanged
    ) -> None:
        """The record's version, started here with nothing else running (a new slot, a
        failover, a restart), ended before it ever ran: that is a failed version as much as
        an update's that does not run, so the status says so and the owner rolls it back
        (the restart policy keeps trying meanwhile)."""
        version = rep.version
        if not version or rep.served == version or rep.failed == version:
            return
        if e.wl.previous is None:
            return  # nothing to roll back to: the restart policy alone, as for any replica
        if version != e.wl.version or e.wl.kind != "service":
            return
        rep.failed = version
        rep.failed_reason = f"update to version {version} failed: {_why(ev)}"
        self._write_status(e.wl, key[1], rep, "starting", force=True)

    def _restart_spec(self, e: WorkloadEntry, rep: Replica) -> Workload:
        """What a replica starts as when nothing of it runs (a new slot, a failover, a
        restart: there is nothing to roll): the record as it is now, unless the record's
        version failed (here, or in a slot owner's status): then the version it last ran
        here, else the record's previous spec, else the record anyway."""
        wl = e.wl
        spec = wl
        if rep.failed == wl.version or self._halted(e, wl.version):
            if rep.spec is not None and rep.served == rep.version != wl.version:
                spec = rep.spec
            elif wl.previous is not None:
                spec = wl.previous
        rep.spec, rep.version = spec, spec.version
        return spec

    def _due(self, rep: Replica) -> int:
        """The first deadline of `rep` besides its restart and fence: a job's stop (its
        run time is up), the time the new version started beside it must serve by."""
        due = rep.stop_at if rep.stop_at is not None else 1 << 62
        if rep.surge is not None:
            due = min(due, rep.surge.started_at + self.t.update_timeout_ms)
        return due

    def _halted(self, e: WorkloadEntry, version: str) -> bool:
        """Whether the update to `version` failed on some slot (ours, or as the status of
        the slot's owner says; anyone else's word does not count): then no other slot
        starts it."""
        uri = e.wl.uri
        replicas = self._replicas
        for s in range(e.wl.replicas):
            rep = replicas.get((uri, s))
            if rep is not None and rep.failed == version:
                return True
        owners = e.owners or ()
        for (meshlet, slot), st in (e.statuses or {}).items():
            if st.failed_version == version and slot < len(owners):
                cur = owners[slot]
                if cur is not None and cur[1] == meshlet:
                    return True
        return False

    def _my_turn(self, e: WorkloadEntry, slot: int, version: str) -> bool:
        """Slot `slot` may start `version` once every lower slot serves it, as its owner's
        status (or our own replica) says. Not waited for: a slot without owner, finished,
        paused, whose owner we suspect lost, or whose owner's status carries no version (a
        meshletd that does not update)."""
        owners = e.owners or ()
        me = self.me.did
        uri = e.wl.uri
        statuses = e.statuses or {}
        for j in range(min(slot, len(owners))):
            cur = owners[j]
            if cur is None or (e.finished and j in e.finished):
                continue
            rnd, meshlet = cur
            if meshlet == me:
                rep = self._replicas.get((uri, j))
                if rep is not None and rep.state == "running" and rep.version != version:
                    return False
                continue
            if meshlet in self.liveness.suspects:
                continue
            st = statuses.get((meshlet, j))
            if st is None or st.round < rnd:
                return False  # its owner has not reported it yet
            if st.state == "paused" or not st.version:
                continue
            if st.version != version or not serving(
                st.state, getattr(st, "health", ""), _checked(e.wl)
            ):
                return False
        return True

    def _end_surge(self, key: ReplicaKey, rep: Replica, reason: str) -> None:
        """Stop the new version started beside the old one (not a failure of it)."""
        surge = rep.surge
        if surge is None:
            return
        rep.surge = None
        self._surge_capacity.pop(key, None)
        self._out.append(StopReplica(key[0], key[1], reason, surge.lane))

    def _update_failed(self, e: WorkloadEntry, key: ReplicaKey, rep: Replica, why: str) -> None:
        """The new version did not serve: stop it, keep the old one, and say so in our
        status (every observer stops the rollout of that version)."""
        surge = rep.surge
        if surge is None:
            return
        self._end_surge(key, rep, "update-failed")
        rep.failed = surge.wl.version
        rep.failed_reason = f"update to version {surge.wl.version} failed: {why}"
        if rep.state == "running":
            self._write_status(e.wl, key[1], rep, "running", force=True)

    def _promote(self, key: ReplicaKey, rep: Replica) -> None:
        """The new version serves: it becomes the slot's replica and the old one stops."""
        surge = rep.surge
        if surge is None:
            return
        rep.surge = None
        self._surge_capacity.pop(key, None)
        self._account(key, rep)
        self._out.append(StopReplica(key[0], key[1], "updated", rep.lane))
        rep.lane = surge.lane
        rep.spec = surge.wl
        rep.version = rep.served = surge.wl.version
        rep.endpoints = surge.endpoints  # the status names where the new one publishes
        rep.health = "healthy" if _checked(surge.wl) else None
        rep.failed = rep.failed_reason = ""
        rep.state = "running"
        rep.restarts = 0
        rep.exit_code = None
        rep.restart_at = None
        rep.since = rep.up_since = self.now
        rep.tries = 0
        e = self.workloads.get(key[0])
        if e is not None:
            self._write_status(e.wl, key[1], rep, "running", force=True)
        self._dirty[key[0]] = None  # our next slot may be next

    def _on_other_lane(self, ev: ReplicaStateChanged, key: ReplicaKey, rep: Replica) -> None:
        """A report from the lane our replica does not run in: the new version starting
        beside it, or an old one we stopped."""
        surge = rep.surge
        e = self.workloads.get(key[0])
        if surge is None or ev.lane != surge.lane:
            if ev.state != "running" or rep.state in ("stopping", "pausing", "paused"):
                return  # the end of a replica we stopped
            # Both lanes run (adopted after a restart in the middle of an update): keep the
            # one of the record's version, stop the other.
            if e is not None and ev.version == e.wl.version and rep.version != ev.version:
                rep.surge = Surge(e.wl, ev.lane, self.now)
                self._promote(key, rep)
            else:
                self._out.append(StopReplica(key[0], key[1], "updated", ev.lane))
            return
        if ev.state == "running":
            if serving(ev.state, getattr(ev, "health", ""), _checked(surge.wl)):
                self._promote(key, rep)
            return
        if ev.state not in ("exited", "failed") or e is None:
            return  # pulling (its image), or the stop of one we ended
        self._update_failed(e, key, rep, _why(ev))


def _checked(wl: Workload) -> bool:
    """Whether the workload declares a health check (a field of the services' records;
    absent from records that predate it): its replicas serve once healthy."""
    return bool(getattr(wl, "health_command", ()))


def _why(ev: ReplicaStateChanged) -> str:
    """Why a start ended before it ran, in words."""
    if ev.state == "failed":
        return "it could not start"
    return f"it exited with code {ev.exit_code} before serving"


__all__ = ["Updates"]
