"""Reconciliation: make the local replicas match the placement (start what we own, stop what
we lost, make-before-break on moves), follow the runtime's reports and write our status
records (docs/protocol.md, sections 9-10); usage.py counts what they use."""

from __future__ import annotations

from .actions import StartReplica, StopReplica
from .bounds import MAX_EXIT_CODE, MAX_RESTARTS, MAX_STATUS_MESSAGE, MIN_EXIT_CODE, clamp
from .events import ReplicaStateChanged
from .placement import WorkloadEntry
from .policy import MAX_RUNTIME, REASON_TEXT, runtime_limit_s
from .records import (
    NSID_BID,
    NSID_STATUS,
    HostPolicy,
    Workload,
    WorkloadStatus,
    at_uri,
    split_at_uri,
)
from .services import MAX_TRIES, NO_INBOUND, STABLE_MS, choose_endpoints, inbound_of
from .state import Replica, ReplicaKey, status_rkey
from .usage import UsageCounting


def restart_backoff_ms(restarts: int) -> int:
    """How long a replica waits before its next restart (docs/protocol.md, section 10)."""
    return min(1000 << min(restarts, 6), 60_000)


class Reconciler(UsageCounting):
    """Local replicas: started, restarted, fenced and stopped by the placement."""

    def _waiting_replicas(self) -> list[tuple[ReplicaKey, Replica]]:
        """Local replicas waiting for a restart or a fence timeout (most wait for nothing:
        ticks and wake-ups look only at these)."""
        out = []
        waiting = self._replicas_waiting
        for key in list(waiting):
            rep = self._replicas.get(key)
            if rep is None or (
                rep.restart_at is None
                and rep.lost_at is None
                and rep.stop_at is None
                and not rep.surge
            ):
                del waiting[key]
            else:
                out.append((key, rep))
        return out

    def _reconcile_gone(self, uri: str) -> None:
        """The workload is gone: stop whatever we run of it."""
        self._involved.discard(uri)
        for key in [k for k in self._replicas if k[0] == uri]:
            if self._replicas[key].state == "paused":  # nothing runs; statuses go with it
                del self._replicas[key]
                self._owned_capacity.pop(key, None)
            else:
                self._stop(key, "deleted")

    def _reconcile(self, e: WorkloadEntry) -> None:
        """Make local replicas of e match the placement (make-before-break on moves)."""
        wl = e.wl
        uri = wl.uri
        me = self.me.did
        owners = e.owners or ()
        if uri not in self._involved:
            for c in owners:
                if c is not None and c[1] == me:
                    break
            else:
                return
        self._involved.add(uri)
        mine: dict[int, int] = {}  # our slots -> the round we own each in
        for s, cur in enumerate(owners):
            if cur is not None and cur[1] == me:
                mine[s] = cur[0]
        owned = self._owned_capacity
        for key in [
            k for k in owned if k[0] == uri and k[1] not in mine and k not in self._replicas
        ]:
            del owned[key]
        finished = e.finished or {}
        for s, rnd in mine.items():
            if s in finished:  # nothing runs or will: no room held (section 10)
                owned.pop((uri, s), None)
            else:
                owned[(uri, s)] = (wl.milli_cpu, self.replica_memory_mib(wl.memory_mib))
            self._reserved.pop((uri, s, rnd), None)
            if s == 0 or rnd == 0:
                self._reserved.pop((uri, -1, 0), None)
        for s in sorted(mine):
            key = (uri, s)
            rep = self._replicas.get(key)
            rnd = mine[s]
            done = e.finished.get(s) if e.finished else None
            if done is not None:
                # A job slot someone finished is finished (section 10): the finisher keeps
                # its exited replica and terminal status; a copy here of a later round
                # (opened before the completion was seen) is stopped, or never started.
                if done[0] != me and rep is not None and rep.state not in ("stopping", "exited"):
                    self._stop(key, "finished-elsewhere")
                continue
            if rep is None and (self.draining or self.cluster.policy_refusal(wl, me) is not None):
                # A draining meshlet starts nothing it does not already run. It can still
                # learn late that it won a round that closed before its drain (a bid seen
                # late moved the round's anchor): it re-offers the slot instead of starting
                # it, and the previous host keeps running it until the new owner runs
                # (docs/protocol.md, section 8). The same for a slot our host policy now
                # refuses (section 21).
                self._reopen(e, s, (rnd, me), force=True)
                continue
            if rep is None:
                rep = Replica(rnd, wl)
                self._replicas[key] = rep
                if wl.paused:
                    # Won (or learnt again after a restart) while paused: held, not started
                    # until the owner resumes it (docs/protocol.md, section 10).
                    rep.state = "paused"
                    self._write_status(wl, s, rep, "paused")
                else:
                    self._start(e, s, rep)
                continue
            rep.lost_at = None
            if rep.round != rnd:
                rep.round = rnd
                if rep.state in ("running", "paused"):
                    self._write_status(wl, s, rep, rep.state, force=True)
            if wl.paused or rep.state in ("paused", "pausing"):
                self._pause_or_resume(key, rep, wl)
                continue
            if rep.stop_at is not None and rep.stop_at <= self.now and rep.state == "running":
                self._stop_overrun(e, key, rep)
                continue
            if rep.restart_at is not None and rep.restart_at <= self.now:
                rep.restart_at = None
                rep.restarts += 1
                self._start(e, s, rep)
                continue
            self._roll(e, key, rep)
        for key in [k for k in self._replicas if k[0] == uri and k[1] not in mine]:
            rep = self._replicas[key]
            if rep.state == "stopping":
                continue
            s = key[1]
            if rep.state == "paused":
                # Nothing runs: no make-before-break to wait for.
                self._forget_paused(key, rep)
                continue
            if rep.state == "pausing":
                rep.state = "running"  # its stop is on the way: make it a plain stop
                self._stop(key, "scaled-down" if s >= wl.replicas else "lost-slot")
                continue
            if rep.state == "exited" or s >= wl.replicas or e.owners is None:
                if e.owners is None:
                    continue
                done = e.finished.get(s) if e.finished else None
                if rep.state == "exited" and s < wl.replicas and done and done[0] == me:
                    # Our copy finished the job after the slot moved on: its terminal
                    # status is the job's result and stays (the slot is never re-placed).
                    self._stop(key, "finished", keep_status=True)
                    continue
                self._stop(key, "scaled-down" if s >= wl.replicas else "lost-slot")
                continue
            if rep.surge is not None:
                # the slot moved on: its update is the new owner's now (section 25)
                self._end_surge(key, rep, "lost-slot")
            if rep.lost_at is None:
                rep.lost_at = self.now
                self._replicas_waiting[key] = None
            new = owners[s] if s < len(owners) else None
            replaced = False
            if new is not None and e.statuses:
                st = e.statuses.get((new[1], s))
                replaced = (
                    st is not None and st.round >= new[0] and st.state in ("running", "succeeded")
                )
            if new is None and not self.draining and me not in self.liveness.suspects:
                replaced = True
            if replaced or self.now >= rep.lost_at + self.t.fence_timeout_ms:
                why = "policy" if rep.note else "lost-slot"
                self._stop(key, "drained" if self.draining else why)
        if not mine and not any(k[0] == uri for k in self._replicas):
            self._involved.discard(uri)

    # -- host policy (docs/protocol.md, section 21) ---------------------------------------
    def _on_host_policy(self, rec: HostPolicy) -> None:
        """A hostPolicy record was seen: what it says about publishing ports (section 22)
        and what it lends, to whom (section 21); our own re-places what no longer fits."""
        self._note_mine(rec.uri)
        self.cluster.put_inbound(rec.meshlet, inbound_of(rec))
        if self.cluster.put_policy(rec) and rec.meshlet == self.me.did:
            self._replace_misfits(force=True)
            self._apply_runtime_limits()
        self._cluster_changed()

    def _on_host_policy_deleted(self, uri: str, repo: str) -> None:
        """A hostPolicy record was deleted: its meshlet is back to the defaults."""
        self.cluster.put_inbound(repo, NO_INBOUND)
        self.cluster.delete(uri, repo)
        self._cluster_changed()

    def _replace_misfits(self, force: bool) -> None:
        """Re-offer the slots our host policy no longer admits (an evicted owner, an image
        source, a network, a run time, an owner over its cap): the next round of each, as a
        drain does, with the reason in the replica's status; it keeps running until the new
        owner runs (make-before-break, section 9)."""
        misfits = self._policy_misfits()
        moving = {(e.wl.uri, s) for e, s, _cur, _why in misfits}
        for key, held in self._replicas.items():
            if held.note is not None and held.note != MAX_RUNTIME and key not in moving:
                held.note = None  # the policy admits it again: no longer moving
                entry = self.workloads.get(key[0])
                if entry is not None and held.written:
                    self._write_status(entry.wl, key[1], held, held.written, force=True)
        for e, s, cur, why in misfits:
            rep = self._replicas.get((e.wl.uri, s))
            if rep is not None and rep.note != why:
                rep.note = why
                if rep.written:
                    self._write_status(e.wl, s, rep, rep.written, force=True)
            self._reopen(e, s, cur, force)

    def _apply_runtime_limits(self) -> None:
        """Our host policy changed: every job running here gets the run time it now allows
        (counted from when it first ran here)."""
        pol = self.cluster.policies.get(self.me.did)
        for key, rep in self._replicas.items():
            e = self.workloads.get(key[0])
            if e is None or rep.started is None or rep.state != "running":
                continue
            limit = runtime_limit_s(pol, e.wl)
            rep.stop_at = None if limit is None else rep.started + limit * 1000
            if rep.stop_at is not None:
                self._replicas_waiting[key] = None
                self._dirty[key[0]] = None

    def _stop_overrun(self, e: WorkloadEntry, key: ReplicaKey, rep: Replica) -> None:
        """A job ran its time out (its maxRuntimeS or our jobMaxRuntimeS): stop it, report
        it failed with the reason, and never run the slot again."""
        self._account(key, rep)
        rep.state = "stopping"
        rep.stop_at = None
        rep.note = MAX_RUNTIME
        self._out.append(StopReplica(key[0], key[1], MAX_RUNTIME))
        self._write_status(e.wl, key[1], rep, "failed", force=True)
        if e.finished is None:
            e.finished = {}
        e.finished[key[1]] = (self.me.did, rep.round, "failed")

    def _pause_or_resume(self, key: ReplicaKey, rep: Replica, wl: Workload) -> None:
        """A slot we own of a paused workload stops its replica and keeps its placement and
        capacity; once resumed, it starts again here, in the same slot and round."""
        if rep.state in ("pausing", "stopping"):
            return  # the runtime's `stopped` decides what follows
        if wl.paused:
            if rep.state == "paused":
                self._write_status(wl, key[1], rep, "paused")
                return
            rep.restart_at = None
            self._end_surge(key, rep, "paused")
            if rep.state == "exited":  # waiting for a restart: nothing runs
                rep.state = "paused"
                self._write_status(wl, key[1], rep, "paused")
                return
            self._account(key, rep)
            rep.state = "pausing"
            self._out.append(StopReplica(key[0], key[1], "paused", rep.lane))
            return
        # resumed: nothing runs, so it starts as the record is now (no rolling to do)
        rep.exit_code = None
        rep.failed = rep.failed_reason = ""
        e = self.workloads.get(key[0])
        if e is not None:
            self._start(e, key[1], rep)

    def _start(self, e: WorkloadEntry, slot: int, rep: Replica) -> None:
        """Start (or restart) our replica of a slot, its ports published at the endpoints it
        holds, or at new ones from our inbound range (docs/protocol.md, section 22). With
        no free port left in the range it cannot start here: its slot is handed off. One
        our host policy now refuses (a restart, a resume) does not start here either
        (section 21): its slot is a misfit, offered to the others; it is tried again, with
        the restart backoff, and starts should the policy admit it while the slot is ours."""
        wl = e.wl
        if self.cluster.policy_refusal(wl, self.me.did) is not None:
            rep.state = "exited"
            rep.restart_at = self.now + restart_backoff_ms(rep.restarts)
            self._replicas_waiting[(wl.uri, slot)] = None
            return
        if [p.name for p in wl.ports] != [x.name for x in rep.endpoints]:
            key = (wl.uri, slot)
            used = [x.port for k, r in self._replicas.items() if k != key for x in r.endpoints]
            got = choose_endpoints(wl, self.cluster.inbound_of(self.me.did), used)
            if got is None:
                rep.state = "exited"
                if not rep.failing:
                    self._hand_off(e, slot, rep, "no free port in this meshlet's inbound range")
                return
            rep.endpoints = got
        rep.state = "starting"
        spec = self._restart_spec(e, rep)  # the record, or what ran if its version failed
        self._out.append(
            StartReplica(spec, slot, rep.round, lane=rep.lane, endpoints=rep.endpoints)
        )

    def _hand_off(self, e: WorkloadEntry, slot: int, rep: Replica, why: str) -> None:
        """Our replica of a slot failed its tries here: say why in its status, offer the
        slot to the others in a new round (a decline: make-before-break, as a drain does),
        and bid for this version of the workload no more (docs/protocol.md, section 22)."""
        wl = e.wl
        rep.failing = why
        self._gave_up[wl.uri] = wl.cid
        self._write_status(wl, slot, rep, "failing", force=True)
        owners = e.owners
        cur = owners[slot] if owners is not None and slot < len(owners) else None
        if cur is not None and cur[1] == self.me.did:
            self._reopen(e, slot, cur, force=True)

    def _drop_own_orphans(self) -> None:
        """Once the view is complete (section 13): delete our bids and statuses of workloads
        it does not hold (deleted while we were away), and our statuses of slots we neither
        own nor run (moved while we were away: a replica that died with its machine could
        not delete its status, as a stop does). A job's result stays."""
        me, o = self.me.did, self.orphans
        for b in [b for bids in list(o.bids.values()) for b in bids if b.meshlet == me]:
            self._delete(NSID_BID, split_at_uri(b.uri)[2])
            o.remove_bid(b.uri)
        for st in [s for sts in list(o.statuses.values()) for s in sts if s.meshlet == me]:
            self._delete(NSID_STATUS, split_at_uri(st.uri)[2])
            o.remove_status(st.uri)
        for e in self.workloads.values():
            owners = e.owners
            for (meshlet, slot), st in list((e.statuses or {}).items()):
                if meshlet != me or st.state in ("succeeded", "failed"):
                    continue
                cur = owners[slot] if owners is not None and slot < len(owners) else None
                if cur is None or cur[1] == me or (e.wl.uri, slot) in self._replicas:
                    continue  # ours (restarted and rewritten here), or not placed yet
                self._delete(NSID_STATUS, split_at_uri(st.uri)[2])

    def _forget_paused(self, key: ReplicaKey, rep: Replica) -> None:
        """A paused replica whose slot is no longer ours (or whose workload is gone): there
        is nothing to stop, only our status record to delete and the capacity to free."""
        del self._replicas[key]
        self._owned_capacity.pop(key, None)
        if rep.written:
            self._delete(NSID_STATUS, status_rkey(key[0], key[1]))
        e = self.workloads.get(key[0])
        if e is not None:
            self._bid_queue.add(key[0])

    def _stop(self, key: ReplicaKey, reason: str, keep_status: bool = False) -> None:
        """Stop a local replica (once) and delete its status record unless the workload is
        gone (its statuses are deleted with it) or the status is a job's result to keep."""
        rep = self._replicas.get(key)
        if rep is None or rep.state == "stopping":
            return
        self._account(key, rep)
        self._end_surge(key, rep, reason)
        rep.state = "stopping"
        self._out.append(StopReplica(key[0], key[1], reason, rep.lane))
        if reason != "deleted" and rep.written and not keep_status:
            self._delete(NSID_STATUS, status_rkey(key[0], key[1]))
            rep.written = ""

    # -- the runtime's reports -----------------------------------------------------------
    def _on_replica(self, ev: ReplicaStateChanged) -> None:
        """The runtime reports a local replica running, exited, failed to start or stopped."""
        key = (ev.workload_uri, ev.slot)
        rep = self._replicas.get(key)
        if rep is None:
            if ev.state == "running":
                # Adopt a replica found at start-up; reconcile decides whether it stays.
                rep = Replica(0, lane=ev.lane)
                rep.version = ev.version
                self._replicas[key] = rep
                self._involved.add(ev.workload_uri)
            else:
                return
        if ev.lane != rep.lane:
            self._on_other_lane(ev, key, rep)
            return
        e = self.workloads.get(ev.workload_uri)
        if ev.state == "pulling":
            # Progress of the image pull, shown in the status until the replica runs.
            if rep.state == "starting" and e is not None:
                self._write_status(e.wl, ev.slot, rep, "pulling", message=ev.message)
            return
        if ev.state == "stopped" and rep.state == "pausing":
            # Paused: the replica keeps its slot, its round and its capacity.
            rep.state = "paused"
            if e is not None and e.wl.paused:
                self._write_status(e.wl, ev.slot, rep, "paused")
            self._dirty[ev.workload_uri] = None  # resumed or moved meanwhile: reconcile says
            return
        if ev.state == "stopped":
            self._account(key, rep)
            del self._replicas[key]
            self._owned_capacity.pop(key, None)
            if e is not None:
                self._dirty[ev.workload_uri] = None
                self._bid_queue.add(ev.workload_uri)
            return
        if ev.state == "running":
            if rep.state in ("stopping", "pausing"):
                return  # started, then stopped before it ran: the stop wins, no status
            if ev.endpoints:
                rep.endpoints = ev.endpoints  # adopted: where it was published
            if rep.state != "running":
                rep.state = "running"
                rep.since = self.now
                rep.up_since = self.now
                rep.health = "starting"
                rep.served = rep.version
            if ev.health is not None:
                rep.health = ev.health
            if rep.started is None:
                rep.started = self.now
            if e is not None:
                limit = runtime_limit_s(self.cluster.policies.get(self.me.did), e.wl)
                if limit is not None:
                    rep.stop_at = rep.started + limit * 1000
                    self._replicas_waiting[key] = None
            if e is not None and not rep.failing:
                # a failing replica keeps its "failing" status while it is retried here
                self._write_status(e.wl, ev.slot, rep, "running")
            self._dirty[ev.workload_uri] = None
            return
        # exited or failed to start
        if rep.state in ("pausing", "paused") or rep.note == MAX_RUNTIME:
            return  # ended by (or after) the pause: no restart, no final status
        self._account(key, rep)
        rep.state = "exited"
        rep.exit_code = ev.exit_code if ev.exit_code is not None else -1
        if e is None:
            self._stop(key, "deleted")
            return
        wl = e.wl
        self._never_ran(e, key, rep, ev)
        ok = rep.exit_code == 0 and ev.state != "failed"
        unhealthy = ev.health == "unhealthy" or rep.health == "unhealthy"
        if ev.health is not None:
            rep.health = ev.health
        if rep.up_since is not None and self.now - rep.up_since >= STABLE_MS:
            rep.tries = 0  # it ran long enough: the failures before are forgotten
        rep.up_since = None
        if not ok:
            rep.tries += 1
        if _restarts(wl, ok):
            rep.restart_at = self.now + restart_backoff_ms(rep.restarts)
            self._replicas_waiting[key] = None
            if rep.tries >= MAX_TRIES and not rep.failing:
                why = (
                    f"cannot start: {ev.message or 'start failed'}"
                    if ev.state == "failed"
                    else f"unhealthy (exit {rep.exit_code})"
                    if unhealthy
                    else f"crashed (exit {rep.exit_code})"
                )
                self._hand_off(e, ev.slot, rep, f"{why}; handed off after {rep.tries} tries")
            elif unhealthy and not rep.failing:
                self._write_status(wl, ev.slot, rep, rep.written or "running")
            elif ev.state == "failed" and ev.message and not rep.failing:
                # It could not start (e.g. its image could not be pulled): say why while
                # it waits to try again. "pending", not "failed": a failed status is
                # terminal to every observer (the slot would never be placed again).
                self._write_status(wl, ev.slot, rep, "pending", message=ev.message)
            return
        final = "succeeded" if ok else "failed"
        self._write_status(wl, ev.slot, rep, final, force=True, message=ev.message)
        if e.finished is None:
            e.finished = {}
        e.finished[ev.slot] = (self.me.did, rep.round, final)
        self._owned_capacity.pop(key, None)  # finished: its room is free again

    def _write_status(
        self,
        wl: Workload,
        slot: int,
        rep: Replica,
        state: str,
        force: bool = False,
        message: str = "",
    ) -> None:
        """Write our status record of (wl, slot) when its state, health, message or version
        changed (or `force`). It names the version the replica runs and, while the record
        still wants it, a version whose update failed here and why (section 25)."""
        health = rep.health if wl.health_command and state in ("running", "failing") else None
        message = message[:MAX_STATUS_MESSAGE]
        failed = rep.failed if rep.failed and rep.failed == wl.version else ""
        versions = f"{rep.version}/{failed}"
        if (
            rep.written == state
            and rep.written_health == health
            and rep.message == message
            and rep.written_version == versions
            and not force
        ):
            return
        rkey = status_rkey(wl.uri, slot)
        st = WorkloadStatus(
            uri=at_uri(self.me.did, NSID_STATUS, rkey),
            meshlet=self.me.did,
            workload_uri=wl.uri,
            slot=slot,
            round=rep.round,
            state=state,
            updated_at=self.now,
            # the runtime's figures, brought into the lexicon's range (section 20)
            exit_code=None
            if rep.exit_code is None
            else clamp(rep.exit_code, MIN_EXIT_CODE, MAX_EXIT_CODE),
            restarts=min(rep.restarts, MAX_RESTARTS),
            workload_cid=wl.cid,
            message=(
                rep.failing[:1024]
                if state == "failing"
                else (rep.failed_reason[:1000] if failed else "")
                or message
                or _status_message(rep.note)
            ),
            health=health,
            endpoints=rep.endpoints if state in ("running", "failing") else (),
            version=rep.version,
            failed_version=failed,
        )
        rep.written = state
        rep.written_health = health
        rep.written_version = versions
        rep.message = message
        self._put(NSID_STATUS, rkey, st)

    # -- rolling updates (the layer above, updates.py) --------------------------------------
    def _roll(self, e: WorkloadEntry, key: ReplicaKey, rep: Replica) -> None:
        """One step of the update of a slot we own (updates.py)."""

    def _end_surge(self, key: ReplicaKey, rep: Replica, reason: str) -> None:
        """Stop the new version started beside the old one (updates.py)."""

    def _never_ran(
        self, e: WorkloadEntry, key: ReplicaKey, rep: Replica, ev: ReplicaStateChanged
    ) -> None:
        """A start of the record's version ended before it ever ran here (updates.py)."""

    def _restart_spec(self, e: WorkloadEntry, rep: Replica) -> Workload:
        """What a replica restarts as (updates.py)."""
        return rep.spec or e.wl

    def _on_other_lane(self, ev: ReplicaStateChanged, key: ReplicaKey, rep: Replica) -> None:
        """A report from the other lane of a slot (updates.py)."""


def _status_message(note: str | None) -> str | None:
    """The status message of a replica our host policy moves or stopped: the reason word
    first (stable, for tools), then what it means."""
    if note is None:
        return None
    if note == MAX_RUNTIME:
        return MAX_RUNTIME
    return f"moving ({note}): {REASON_TEXT.get(note, note)}"


def _restarts(wl: Workload, ok: bool) -> bool:
    """Whether a replica that exited (ok: with code 0) is restarted, by kind and policy."""
    policy = wl.restart_policy
    if wl.kind == "job" and ok:
        restart = False
    elif policy == "always":
        restart = True
    elif policy == "on-failure":
        restart = not ok
    else:
        restart = False
    if wl.kind == "service" and ok and policy == "on-failure":
        restart = False
    return restart


__all__ = ["Reconciler"]
