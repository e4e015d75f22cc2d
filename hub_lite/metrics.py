"""``/metrics`` in the Prometheus text format: the hub's only prometheus_client import.

A registry per call with a collector reading the ingestor's counters and the node table, so
nothing on the ingest path updates a metric.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from .ingest import Ingestor
from .storage import NodeRecord

__all__ = ("CONTENT_TYPE", "render")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.split("; charset")[0]


_COUNTERS = (
    ("gridlet_hub_batches", "batches", "Batches stored by this process"),
    (
        "gridlet_hub_duplicate_batches",
        "duplicates",
        "Batches answered as duplicates (nothing written)",
    ),
    ("gridlet_hub_frames", "frames", "New frames stored by this process"),
    (
        "gridlet_hub_duplicate_frames",
        "frames_duplicate",
        "Frames dropped because the hub held their sequence numbers",
    ),
    ("gridlet_hub_body_bytes", "bytes", "Bytes of stored upload bodies"),
    (
        "gridlet_hub_chain_rebuilds",
        "chain_rebuilds",
        "Chain states rebuilt from the database (another process had the predecessor)",
    ),
)
"""Counters of IngestStats: (metric, attribute, help)."""


class _HubCollector(Collector):
    def __init__(
        self, ingestor: Ingestor, nodes: Sequence[NodeRecord], now_ms: int, drift_warn_ms: int
    ) -> None:
        self.ingestor = ingestor
        self.nodes = nodes
        self.now_ms = now_ms
        self.drift_warn_ms = drift_warn_ms

    def collect(self) -> Iterator[Metric]:
        st = self.ingestor.stats
        for name, attr, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(st, attr))
        refused = CounterMetricFamily(
            "gridlet_hub_refused_batches", "Bodies refused, by reason", labels=["reason"]
        )
        for reason, n in sorted((st.refused or {}).items()):
            refused.add_metric([reason], n)
        yield refused
        seen = GaugeMetricFamily(
            "gridlet_hub_node_last_seen_seconds",
            "Unix time of the node's last batch",
            labels=["node"],
        )
        drift = GaugeMetricFamily(
            "gridlet_hub_node_clock_drift_seconds",
            "The node's clock minus the hub's at its last batch",
            labels=["node"],
        )
        flagged = GaugeMetricFamily(
            "gridlet_hub_node_clock_drift_flagged",
            "1 when the node's clock is off by more than the configured limit",
            labels=["node"],
        )
        backlog = GaugeMetricFamily(
            "gridlet_hub_node_backlog_frames",
            "Frames the node holds not yet acknowledged",
            labels=["node"],
        )
        for node in self.nodes:
            if node.last_seen_ms is not None:
                seen.add_metric([node.node_id], node.last_seen_ms / 1000)
            if node.drift_ms is not None:
                drift.add_metric([node.node_id], node.drift_ms / 1000)
                flagged.add_metric([node.node_id], float(abs(node.drift_ms) > self.drift_warn_ms))
            if node.status is not None:
                backlog.add_metric([node.node_id], node.status.backlog_frames)
        yield from (seen, drift, flagged, backlog)


def render(
    ingestor: Ingestor, nodes: Sequence[NodeRecord], now_ms: int, drift_warn_ms: int
) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_HubCollector(ingestor, nodes, now_ms, drift_warn_ms))
    out: bytes = generate_latest(registry)
    return out
