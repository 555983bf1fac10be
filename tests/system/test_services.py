"""Services people can use (issue 18: ports and endpoints, health), on three booted hosts
with addresses of their own: each meshlet's host policy allows publishing ports on its own
address, the owner reaches a service from her machine at the endpoint its replica's status
names, the endpoint moves with the replica when its host dies, and a replica that turns
unhealthy is restarted in place and then handed to another meshlet (docs/protocol.md,
section 22).

The commune is booted once for the module; each test runs its own workload.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.commune import Commune, Meshlet, booted, wait_for, wait_formed
from tests.system.hostenv import host_kind

pytestmark = pytest.mark.skipif(
    host_kind() == "local", reason="boots three hosts of its own: dev/hostenv hosts only"
)

PORT_MIN, PORT_MAX = 20000, 20009
POLICY = "commune.scheduler.hostPolicy"
# A web server: busybox httpd serving a page written at start (the root is read-only;
# podman mounts a tmpfs on /tmp).
PAGE = "hello from web"
WEB = [
    "sh",
    "-c",
    f"mkdir -p /tmp/www && echo '{PAGE}' > /tmp/www/index.html "
    "&& exec httpd -f -p 8080 -h /tmp/www",
]


def put_record(m: Meshlet, collection: str, rkey: str, value: dict[str, Any]) -> None:
    """Write a record in m's meshlet repo, as its meshletd would (its app password)."""
    acct = m.mesh

    def call(nsid: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{acct.pds_url}/xrpc/{nsid}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "content-type": "application/json",
                **({"authorization": f"Bearer {token}"} if token else {}),
            },
        )
        with urllib.request.urlopen(req, timeout=30) as res:
            out: dict[str, Any] = json.loads(res.read())
            return out

    jwt = call(
        "com.atproto.server.createSession",
        {"identifier": acct.did, "password": acct.app_password},
    )["accessJwt"]
    body = {"repo": acct.did, "collection": collection, "rkey": rkey, "record": value}
    call("com.atproto.repo.putRecord", body, jwt)


@pytest.fixture(scope="module")
def commune(devnet: Any) -> Iterator[Commune]:
    with booted(devnet) as c:
        for m in c:
            # Each host lends ports 20000-20009 on its own address (its host policy).
            put_record(
                m,
                POLICY,
                "self",
                {
                    "$type": POLICY,
                    "inbound": {
                        "allowed": True,
                        "portMin": PORT_MIN,
                        "portMax": PORT_MAX,
                        "address": m.address,
                    },
                    "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                },
            )
        wait_formed(c, 90)
        yield c


def endpoints(m: Meshlet, name: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = m.ctl_json("endpoints", name)["endpoints"]
    return got


def fetch_from(m: Meshlet, address: str, port: int) -> str | None:
    """GET http://address:port/ from m's host (another machine on the network), or None."""
    done = m.run(
        "python3",
        "-c",
        "import sys, urllib.request; "
        "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())",
        f"http://{address}:{port}/",
        timeout=30,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def run(m: Meshlet, *args: str) -> None:
    done = m.ctl("run", *args, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_owner_reaches_the_service_at_its_endpoint_and_it_moves_with_a_failover(
    commune: Commune,
) -> None:
    alice = commune["alice"]
    run(
        alice,
        "--name",
        "web",
        "--port",
        "http:8080",
        "--cpu",
        "100",
        "--memory",
        "32",
        # on another machine than alice's: she reaches it over the network
        "--constraint",
        f"avoid={alice.did}",
        "localhost/busybox:latest",
        "--",
        *WEB,
    )

    def serving() -> dict[str, Any] | None:
        eps = [e for e in endpoints(alice, "web") if e["state"] == "running"]
        return eps[0] if len(eps) == 1 else None

    ep = wait_for(serving, 90, "web's endpoint in its status")
    host = commune.by_did(ep["meshletDid"])
    assert host is not alice
    assert (ep["name"], ep["address"], ep["protocol"]) == ("http", host.address, "tcp")
    assert PORT_MIN <= ep["port"] <= PORT_MAX
    body = wait_for(lambda: fetch_from(alice, ep["address"], ep["port"]), 30, "the page")
    assert body == PAGE
    # every meshlet names the same endpoint (from the host's status record)
    uri = next(w["uri"] for w in alice.ctl_json("workloads") if w.get("name") == "web")
    for m in commune:
        wait_for(
            lambda m=m: (
                [(e["address"], e["port"]) for e in endpoints(m, uri)]
                == [(ep["address"], ep["port"])]
            ),
            30,
            f"{m.person} names the endpoint",
        )

    # The hosting machine dies: the replica runs on the third machine, and the endpoint
    # in the status moves with it.
    commune.power_off(host.person)

    def moved() -> dict[str, Any] | None:
        got = serving()
        return got if got is not None and got["meshletDid"] != host.did else None

    new = wait_for(moved, 120, "web's endpoint on another meshlet")
    third = commune.by_did(new["meshletDid"])
    assert third is not alice and third is not host
    assert new["address"] == third.address != ep["address"]
    body = wait_for(lambda: fetch_from(alice, new["address"], new["port"]), 30, "the page")
    assert body == PAGE
    assert fetch_from(alice, ep["address"], ep["port"]) is None  # the old one is gone


def test_an_unhealthy_replica_is_restarted_then_handed_to_another_meshlet(
    commune: Commune,
) -> None:
    alice = commune["alice"]
    # Healthy for ~6 s after each start, then its check fails: podman kills it, the
    # meshlet restarts it in place, and after 3 tries hands it off.
    run(
        alice,
        "--name",
        "flaky",
        "--cpu",
        "100",
        "--memory",
        "32",
        "--health-cmd",
        "test -f /tmp/ok",
        "--health-interval",
        "1s",
        "--health-retries",
        "2",
        "localhost/busybox:latest",
        "--",
        "sh",
        "-c",
        "touch /tmp/ok; sleep 6; rm /tmp/ok; exec sleep 1000",
    )
    seen: list[dict[str, Any]] = []

    def views() -> list[dict[str, Any]]:
        for w in alice.ctl_json("workloads"):
            if w.get("name") == "flaky":
                rows: list[dict[str, Any]] = w.get("running", [])
                return rows
        return []

    def hosts() -> list[str]:
        rows = views()
        seen.extend(rows)
        return [r["meshletDid"] for r in rows if r.get("meshletDid")]

    first = wait_for(lambda: (hosts() or [None])[0], 90, "flaky placed")

    def moved() -> str | None:
        rows = views()
        seen.extend(rows)
        live = [
            r["meshletDid"]
            for r in rows
            if r.get("meshletDid") not in (None, first) and r.get("state") == "running"
        ]
        return live[0] if live else None

    # three tries of ~8 s each (start, 6 s healthy, 2 failed checks) and the backoffs
    second = wait_for(moved, 240, "flaky handed to another meshlet", every=0.5)
    assert second != first
    # What the first host did, from its journal (states shown briefly may fall between
    # two looks at the workload; the journal has every step).
    journal = commune.by_did(first).journal(lines=400)
    assert journal.count("is healthy") >= 2, journal  # it started healthy, and again
    assert journal.count("(unhealthy: killed by its health check)") >= 3, journal
    assert "handed off: unhealthy (exit 137); handed off after 3 tries" in journal, journal
    # its status said how healthy it was (healthy ~6 s of each ~8 s try: a look catches it)
    shown = [r for r in seen if r.get("meshletDid") == first]
    assert any(r.get("health") == "healthy" for r in shown), shown
    # make-before-break: the first host stops its copy once the new one runs
    wait_for(
        lambda: not [r for r in views() if r.get("meshletDid") == first] or None,
        90,
        "the first host's copy stopped",
    )
