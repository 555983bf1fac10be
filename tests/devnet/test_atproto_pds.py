"""Writing to our repo on the real PDS: sessions, batching, the ledger, outages."""

from __future__ import annotations

import itertools

import trio

from meshletd.atproto.pds import MAX_BATCH, PdsClient, Write
from meshletd.atproto.records import record_to_json
from meshletd.atproto.writequeue import WriteQueue
from meshletd.core.nsid import NSID_MEMBERSHIP as MEMBERSHIP
from meshletd.core.records import Membership, at_uri, parse_datetime_ms

_n = itertools.count()


async def client_for(devnet, pds=0, url=None):
    acct = await devnet.create_account_async(f"w{next(_n)}p", pds=pds)
    c = PdsClient(url or acct.pds_url, acct.did, acct.app_password)
    await c.login()
    return acct, c


def rec(cluster, did="did:plc:x"):
    when = parse_datetime_ms("2026-11-27T06:00:00.000Z")
    uri = at_uri("did:plc:x", MEMBERSHIP, cluster)
    return record_to_json(Membership(uri, "did:plc:x", cluster, frozenset({did}), when))


async def test_idempotent_puts_batches_and_the_ledger(devnet):
    _acct, c = await client_for(devnet)
    await c.put_record(MEMBERSHIP, "home", rec("home"))
    await c.put_record(MEMBERSHIP, "home", rec("home"))  # identical: not written
    assert c.ledger.summary()["creates"] == 1 and c.ledger.commits == 1
    await c.put_record(MEMBERSHIP, "home", rec("home", "did:plc:y"))
    writes = [Write("put", MEMBERSHIP, f"c{i}", rec(f"c{i}")) for i in range(MAX_BATCH + 50)]
    await c.apply_writes(writes)
    assert c.ledger.commits == 4  # 1 + 1 + two batches of <= 200
    assert len(await c.list_records(MEMBERSHIP)) == MAX_BATCH + 51
    await c.delete_record(MEMBERSHIP, "c0")
    s = c.ledger.summary()
    assert (s["creates"], s["updates"], s["deletes"]) == (MAX_BATCH + 51, 1, 1)
    assert s["points_this_hour"] == 3 * (MAX_BATCH + 51) + 2 + 1 == s["points_today"]


async def test_many_tasks_hitting_an_expired_session_refresh_it_once(devnet):
    _acct, c = await client_for(devnet)
    c.session.access = c.session.access[:-6] + "AAAAAA"  # as good as expired
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(c.put_record, MEMBERSHIP, f"r{i}", rec(f"r{i}"))
    assert c.session.refreshes == 1
    assert len(await c.list_records(MEMBERSHIP)) == 8


class Proxy:
    """A TCP forwarder to the PDS that can be taken down and brought back."""

    def __init__(self, target_host, target_port):
        self.target_host = target_host  # where the devnet listens (loopback or a gateway)
        self.target_port = target_port
        self.up = True
        self.port = 0
        self._conns: list[trio.CancelScope] = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client):
        if not self.up:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._conns.append(scope)
            async with client, await trio.open_tcp_stream(self.target_host, self.target_port) as up:

                async def pump(a, b):
                    while data := await a.receive_some(65536):
                        await b.send_all(data)

                async with trio.open_nursery() as n:
                    n.start_soon(pump, client, up)
                    n.start_soon(pump, up, client)

    def down(self):
        self.up = False
        for s in self._conns:
            s.cancel()
        self._conns.clear()


async def test_writes_are_kept_in_order_while_the_pds_is_down(devnet):
    acct = await devnet.create_account_async(f"w{next(_n)}p", pds=1)
    port = int(acct.pds_url.rsplit(":", 1)[1])
    proxy = Proxy(devnet.host, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        c = PdsClient(f"http://127.0.0.1:{proxy.port}", acct.did, acct.app_password)
        await c.login()
        q = WriteQueue(c, backoff_initial_s=0.05, backoff_max_s=0.2)
        await nursery.start(q.run)
        q.submit(Write("put", MEMBERSHIP, "a", rec("a")))
        await q.flushed()
        proxy.down()
        q.submit(Write("put", MEMBERSHIP, "b", rec("b")))
        q.submit(Write("delete", MEMBERSHIP, "a"))
        q.submit(Write("put", MEMBERSHIP, "c", rec("c")))
        with trio.move_on_after(1):
            await q.flushed()
        assert q.failures >= 2 and len(q.pending) == 3  # kept, not dropped
        proxy.up = True
        with trio.fail_after(10):
            await q.flushed()
        nursery.cancel_scope.cancel()
    direct = PdsClient(acct.pds_url, acct.did, acct.app_password)
    await direct.login()
    assert sorted(r[0] for r in await direct.list_records(MEMBERSHIP)) == ["b", "c"]
    assert q.rejected == []
