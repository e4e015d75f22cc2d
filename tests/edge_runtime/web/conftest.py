"""Fixtures for the dashboard: a real Runtime and Store on scripted drivers, served by uvicorn.

``start_site(...)`` starts a site (runtime, store in tmp_path, dashboard on a free port) and
returns a ``WebSite``; ``site`` is one with no drivers, fed by ``site.publish(...)``. Tests
elsewhere can import the fixtures (and helpers) from ``tests.edge_runtime.web.conftest``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from cloud_sync import DeviceSchema, default_field
from edge_runtime.config import HttpConfig, SiteConfig, SiteSection
from edge_runtime.devices.base import DeviceError, Sink, Values
from edge_runtime.runtime import Polled, Runtime
from edge_runtime.store import Store
from edge_runtime.web import Dashboard, LiveHub

__all__ = (
    "INDEX_HTML",
    "SCHEMA",
    "PushSource",
    "ScriptedDriver",
    "StartSite",
    "WebSite",
    "until",
)

SCHEMA = DeviceSchema(
    "meter",
    "Fake SDM",
    (
        default_field("power_w", "W", 5),
        default_field("voltage_v", "V", 0.1),
        default_field("energy_kwh", "kWh", 0.0005),
    ),
)
INDEX_HTML = "<!doctype html><title>gridlet test page</title>"


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition (polled), failing the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


class ScriptedDriver:
    """A polled driver: read n returns ``values(n)``; ``mode = "fail"`` makes reads fail."""

    kind = "fake"

    def __init__(
        self,
        device_id: str,
        schema: DeviceSchema = SCHEMA,
        values: Callable[[int], Values] | None = None,
        *,
        connect_delay_s: float = 0.0,
    ) -> None:
        self.device_id = device_id
        self.connect_delay_s = connect_delay_s
        self.schema = schema
        self.values = values or (lambda n: (float(n), 230.0, n / 1000))
        self.mode = "ok"
        self.reads = 0

    async def connect(self) -> DeviceSchema:
        await asyncio.sleep(self.connect_delay_s)
        return self.schema

    async def read(self) -> Values:
        if self.mode == "fail":
            raise DeviceError("scripted failure")
        self.reads += 1
        return self.values(self.reads)

    async def recover(self) -> None:
        pass

    async def close(self) -> None:
        pass


class PushSource:
    """A push driver sending ``count`` frames at ``rate_hz`` (value n in field 0), then idle."""

    kind = "push"

    def __init__(
        self,
        device_id: str,
        rate_hz: float,
        count: int,
        schema: DeviceSchema = SCHEMA,
        values: Callable[[int], Values] | None = None,
    ) -> None:
        self.device_id = device_id
        self.rate_hz = rate_hz
        self.count = count
        self.schema = schema
        self.values = values or (lambda n: (float(n), 230.0, n / 1000))
        self.sent = 0
        self.done = asyncio.Event()
        self.go = asyncio.Event()
        self.go.set()

    async def run(self, sink: Sink) -> None:
        await self.go.wait()
        loop = asyncio.get_running_loop()
        due = loop.time()
        st = sink.status(self.device_id, self.kind)
        while self.sent < self.count:
            self.sent += 1
            sink.frame(self.device_id, self.schema, self.values(self.sent))
            st.seen()
            due += 1 / self.rate_hz
            await asyncio.sleep(max(0.0, due - loop.time()))
        self.done.set()
        await asyncio.Event().wait()  # a source that went quiet, not one that ended


@dataclass
class WebSite:
    """A running site and its dashboard."""

    runtime: Runtime
    store: Store
    cfg: SiteConfig
    dashboard: Dashboard
    base_url: str

    @property
    def hub(self) -> LiveHub:
        return self.dashboard.hub

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url.removeprefix("http") + "/api/live"

    def publish(
        self,
        device_id: str,
        values: Values,
        schema: DeviceSchema = SCHEMA,
        ts_ms: int | None = None,
    ) -> None:
        """One reading through the runtime's Sink, as a push driver delivers it."""
        self.runtime.frame(device_id, schema, values, ts_ms)
        self.runtime.status(device_id, "fake").seen(ts_ms)


class StartSite(Protocol):
    def __call__(
        self,
        polled: Sequence[Polled] = (),
        push: Sequence[PushSource] = (),
        *,
        password_hash: str | None = None,
        live_rate: int = 10,
        send_timeout_s: float = 5.0,
        static_dir: Path | None = None,
        before_start: Callable[[Runtime], Awaitable[None]] | None = None,
    ) -> Awaitable[WebSite]: ...


@pytest.fixture
async def start_site(tmp_path: Path) -> AsyncIterator[StartSite]:
    """Start sites (each with its own store); all are stopped and checked at teardown."""
    running: list[tuple[asyncio.Task[None], Store]] = []
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text(INDEX_HTML, encoding="utf-8")
    (static / "app.js").write_text("console.log('gridlet');\n", encoding="utf-8")

    async def start(
        polled: Sequence[Polled] = (),
        push: Sequence[PushSource] = (),
        *,
        password_hash: str | None = None,
        live_rate: int = 10,
        send_timeout_s: float = 5.0,
        static_dir: Path | None = None,
        before_start: Callable[[Runtime], Awaitable[None]] | None = None,
    ) -> WebSite:
        n = len(running)
        store = await Store.open(tmp_path / f"site{n}.sqlite", commit_interval_ms=50)
        cfg = SiteConfig(
            site=SiteSection(node_id=f"test-{n}", name="gridlet test site"),
            http=HttpConfig(
                host="127.0.0.1", port=8000, live_rate=live_rate, password_hash=password_hash
            ),
        )
        runtime = Runtime(store, polled, push, min_backoff_s=0.02, max_backoff_s=0.05)
        dash = Dashboard(
            runtime,
            cfg,
            static_dir=static_dir or static,
            port=0,  # a free port
            send_timeout_s=send_timeout_s,
        )
        runtime.services.extend(dash.services())
        if before_start is not None:
            await before_start(runtime)
        task = asyncio.create_task(runtime.run(), name=f"test-runtime-{n}")
        running.append((task, store))
        async with asyncio.timeout(10):
            await dash.ready.wait()
        return WebSite(runtime, store, cfg, dash, dash.url)

    try:
        yield start
    finally:
        for task, store in reversed(running):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await store.close()
        # Nothing of the dashboard may outlive its runtime.
        me = asyncio.current_task()
        left = [
            t.get_name()
            for t in asyncio.all_tasks()
            if t is not me and t.get_name().startswith(("uvicorn", "web-", "live-"))
        ]
        assert not left, left


@pytest.fixture
async def site(start_site: StartSite) -> WebSite:
    """A site with no drivers: tests feed it with ``site.publish``."""
    return await start_site()
