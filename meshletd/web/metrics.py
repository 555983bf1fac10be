"""`/metrics`: the process's counters (meshletd/metrics.py) and gauges of the view, in the
Prometheus text format, rendered by prometheus-client into our own server (no thread, no
HTTP server of its own).

Gauges are computed at scrape time from the node, so they cost nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshletd import metrics


class ViewCollector(Collector):
    """Replicas by state, workloads, meshlets by state, the PDS write queue's depth."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from meshletd.web.pages import meshlets_of

        node = self.node
        slots = GaugeMetricFamily(
            "meshlet_replicas",
            "Replicas of the commune's workloads in this meshlet's view, by state "
            "(pending: a slot nobody serves yet).",
            labels=["state"],
        )
        counts: dict[str, int] = {}
        workloads = node.workloads(None, True)
        for w in workloads:
            for r in w.get("running", []):
                st = str(r.get("state", "unknown"))
                counts[st] = counts.get(st, 0) + 1
        for st in ("pending", "starting", "running", "exited", "failed", "lost", "stopping"):
            counts.setdefault(st, 0)
        for st, n in sorted(counts.items()):
            slots.add_metric([st], n)
        yield slots
        yield GaugeMetricFamily(
            "meshlet_workloads", "Workloads in this meshlet's view.", value=len(workloads)
        )
        local = GaugeMetricFamily(
            "meshlet_local_replicas",
            "Replicas running or starting on this meshlet.",
            value=int(node.summary().get("replicas", 0)),
        )
        yield local
        members = GaugeMetricFamily(
            "meshlet_meshlets",
            "Meshlets of the commune by state (verified ones only).",
            labels=["state"],
        )
        mstates: dict[str, int] = {"active": 0, "draining": 0, "lost": 0}
        for m in meshlets_of(node):
            if m.get("verified"):
                mstates[m["state"]] = mstates.get(m["state"], 0) + 1
        for st, n in sorted(mstates.items()):
            members.add_metric([st], n)
        yield members
        writes = getattr(node, "writes", None)
        pending = getattr(writes, "pending", None)
        yield GaugeMetricFamily(
            "meshlet_pds_write_queue_depth",
            "Writes waiting for this meshlet's PDS (queued or kept for retry).",
            value=len(pending) if pending is not None else 0,
        )


def render_metrics(node: Any) -> tuple[bytes, str]:
    """The text exposition of the counters and of the node's gauges."""
    view = CollectorRegistry(auto_describe=False)
    view.register(ViewCollector(node))
    return generate_latest(metrics.REGISTRY) + generate_latest(view), CONTENT_TYPE_LATEST
