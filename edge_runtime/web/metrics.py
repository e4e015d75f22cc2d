"""``/metrics`` in the Prometheus text format: the only module that imports prometheus_client.

A custom collector reads the runtime's own counters when Prometheus scrapes, in its own
``CollectorRegistry``: nothing on the frame path updates a metric, and no process-global
registry is touched (so several runtimes in one process, as in tests, do not collide).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from ..runtime import Runtime
from .api import SyncInfo
from .live import LiveHub

__all__ = ("CONTENT_TYPE", "RuntimeCollector", "make_registry", "render")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.split("; charset")[0]
"""The classic text format every Prometheus version reads (the server adds the charset)."""


class RuntimeCollector(Collector):
    """Devices, store, bus and live fan-out, read at scrape time."""

    def __init__(
        self, runtime: Runtime, hub: LiveHub, sync: Callable[[], SyncInfo] | None = None
    ) -> None:
        self.runtime = runtime
        self.hub = hub
        self.sync = sync

    def collect(self) -> Iterator[Metric]:
        yield from self._devices()
        yield from self._store()
        yield from self._bus()
        yield from self._live()
        yield from self._sync()

    def _sync(self) -> Iterator[Metric]:
        if self.sync is None:
            return
        st = self.sync()
        yield GaugeMetricFamily(
            "gridlet_sync_backlog_frames",
            "Stored frames the hub has not acknowledged yet",
            value=st.backlog_frames or 0,
        )
        yield GaugeMetricFamily(
            "gridlet_sync_rate_frames_per_second",
            "Frames the hub acknowledged per second over the last minute",
            value=st.rate_fps or 0.0,
        )
        yield GaugeMetricFamily(
            "gridlet_sync_up", "1 while the hub acknowledges uploads", value=st.state == "ok"
        )
        if st.last_upload_ms is not None:
            yield GaugeMetricFamily(
                "gridlet_sync_last_upload_seconds",
                "Unix time of the last acknowledged upload",
                value=st.last_upload_ms / 1000,
            )
        if st.drift_ms is not None:
            yield GaugeMetricFamily(
                "gridlet_sync_clock_drift_seconds",
                "This node's clock minus the hub's",
                value=st.drift_ms / 1000,
            )
            yield GaugeMetricFamily(
                "gridlet_sync_clock_drift_flagged",
                "1 when this node's clock is more than 60 s from the hub's",
                value=float(st.drift_flagged),
            )

    def _devices(self) -> Iterator[Metric]:
        online = GaugeMetricFamily(
            "gridlet_device_online", "1 while the device answers, else 0", labels=["device"]
        )
        reads = CounterMetricFamily(
            "gridlet_device_reads", "Successful reads or messages", labels=["device"]
        )
        errors = CounterMetricFamily(
            "gridlet_device_errors", "Failed reads, timeouts included", labels=["device"]
        )
        timeouts = CounterMetricFamily(
            "gridlet_device_timeouts", "Reads the device did not answer in time", labels=["device"]
        )
        last_seen = GaugeMetricFamily(
            "gridlet_device_last_seen_seconds",
            "Unix time of the last successful read",
            labels=["device"],
        )
        for device_id, st in sorted(self.runtime.statuses.items()):
            online.add_metric([device_id], 1.0 if st.online else 0.0)
            reads.add_metric([device_id], st.reads)
            errors.add_metric([device_id], st.errors)
            timeouts.add_metric([device_id], st.timeouts)
            if st.last_seen_ms is not None:
                last_seen.add_metric([device_id], st.last_seen_ms / 1000)
        yield from (online, reads, errors, timeouts, last_seen)

    def _store(self) -> Iterator[Metric]:
        s = self.runtime.store.stats
        yield CounterMetricFamily(
            "gridlet_store_committed_frames", "Frames made durable", value=s.committed_frames
        )
        yield GaugeMetricFamily(
            "gridlet_store_size_bytes", "Database size at the last upkeep", value=s.size_bytes
        )
        evicted = CounterMetricFamily(
            "gridlet_store_evicted_frames",
            "Frames deleted by the size cap, by whether they had been uploaded",
            labels=["synced"],
        )
        evicted.add_metric(["true"], s.evicted_synced)
        evicted.add_metric(["false"], s.evicted_unsynced)
        yield evicted
        yield CounterMetricFamily(
            "gridlet_store_dead_letters", "Messages kept as unusable", value=s.dead_letters
        )

    def _bus(self) -> Iterator[Metric]:
        bus = self.runtime.bus
        yield CounterMetricFamily(
            "gridlet_bus_published", "Readings published", value=bus.published
        )
        dropped = CounterMetricFamily(
            "gridlet_bus_dropped",
            "Readings a subscriber lost because it fell behind",
            labels=["subscriber"],
        )
        for name, st in sorted(bus.stats().items()):
            dropped.add_metric([name], st["dropped"])
        yield dropped

    def _live(self) -> Iterator[Metric]:
        st = self.hub.stats()
        yield GaugeMetricFamily(
            "gridlet_live_clients", "Connected live dashboard clients", value=st["clients"]
        )
        yield CounterMetricFamily(
            "gridlet_live_messages", "Live messages sent", value=st["messages"]
        )
        yield CounterMetricFamily(
            "gridlet_live_dropped_updates",
            "Frames merged into a newer one for a client that could not keep up",
            value=st["dropped_updates"],
        )


def make_registry(
    runtime: Runtime, hub: LiveHub, sync: Callable[[], SyncInfo] | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime, hub, sync))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
