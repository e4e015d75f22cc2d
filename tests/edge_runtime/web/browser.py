"""Browser-test helpers: Debian chromium under Playwright, and a real site in a thread.

Playwright's sync API cannot run inside an asyncio event loop, so the site (simulated
GoodWe inverter and Eastron meters, the runtime wired by ``edge_runtime.app``, the SQLite
store, the dashboard under uvicorn) runs in a thread with a loop of its own; the tests drive
the browser from the main thread and reach into the site with ``BrowserSite.call``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import warnings
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    Route,
    ViewportSize,
)

from cloud_sync import Frame
from edge_runtime.app import build_drivers, open_store
from edge_runtime.bus import Reading
from edge_runtime.config import (
    GoodweDevice,
    HttpConfig,
    ModbusDevice,
    SiteConfig,
    SiteSection,
    StoreConfig,
)
from edge_runtime.devices.base import now_ms
from edge_runtime.devices.modbus import make_drivers
from edge_runtime.runtime import Runtime
from edge_runtime.simulators.goodwe import GoodweSimulator
from edge_runtime.simulators.sdm import SdmSimulator
from edge_runtime.store import DAY_MS, HOUR_MS, MINUTE_MS, Store
from edge_runtime.web import Dashboard

__all__ = (
    "CHROMIUM",
    "DESKTOP",
    "PHONE",
    "SPARE_TIMEOUT_S",
    "BrowserSite",
    "PageWatch",
    "launch_chromium",
)

T = TypeVar("T")

CHROMIUM = Path("/usr/lib/chromium/chromium")
"""Debian's chromium (the real binary: the /usr/bin wrapper script starts a second slower)."""
_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
# As root, chromium also wants these to start headless without phoning home.
_ROOT_ARGS = [
    "--headless",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 375, "height": 812}
SPARE_TIMEOUT_S = 0.5
"""Read timeout of the meter that a test switches off."""
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def launch_chromium(pw: Playwright) -> Browser:
    """Debian chromium, never a browser Playwright downloads; missing is a failure."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Debian chromium is missing ({CHROMIUM}): `make test` installs it"
            " (apt-get install chromium)",
            pytrace=False,
        )
    args = _ARGS + (_ROOT_ARGS if os.geteuid() == 0 else [])
    return pw.chromium.launch(executable_path=str(CHROMIUM), args=args)


@dataclass
class PageWatch:
    """Collects what must not happen on a page: console errors, uncaught exceptions and
    requests to anything but this machine (those are aborted, so no CDN can hide)."""

    errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def guard(self, context: BrowserContext) -> None:
        context.route("**/*", self._route)

    def watch(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text} ({msg.location.get('url', '')})")

    def _route(self, route: Route) -> None:
        url = route.request.url
        if urlsplit(url).hostname in _LOOPBACK or url.startswith(("data:", "blob:")):
            self.requests.append(url)
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")

    def check(self) -> None:
        assert not self.blocked, f"the page reached beyond this machine: {self.blocked}"
        assert not self.errors, "\n".join(self.errors)


class BrowserSite:
    """A running edge on simulators, with a year of history for one meter, in a thread.

    Devices: ``inverter`` (GoodWe ET simulator over UDP, read every 0.1 s), ``grid-meter``
    (Eastron SDM630 over Modbus TCP, with prefilled history) and ``heat-pump-meter`` (another
    SDM630 whose simulator a test may stop: ``call(site.spare.stop())``)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.url = ""
        self.cfg: SiteConfig | None = None
        self.runtime: Runtime | None = None
        self.spare: SdmSimulator | None = None
        self.prefilled = 0
        self.lost_cancellations = 0
        """Times the runtime ignored its cancellation at shutdown (see ``_main``)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="browser-site", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the site did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError("the site failed to start") from self._error

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the site did not stop"
        if self._error is not None:
            raise RuntimeError("the site failed") from self._error
        if self.lost_cancellations:
            warnings.warn(
                f"the runtime ignored {self.lost_cancellations} cancellation(s) at shutdown"
                " (asyncio.wait_for in Python 3.11 loses a cancel that races a reply)",
                RuntimeWarning,
                stacklevel=2,
            )

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        """Run a coroutine in the site's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            # Half a simulated day per five minutes, from mid-morning: the sun shines.
            inverter = GoodweSimulator(day_seconds=600.0, start_hour=10.5)
            await inverter.start()
            stack.push_async_callback(inverter.stop)
            grid = await stack.enter_async_context(SdmSimulator(tcp_port=0, seed=1))
            self.spare = await stack.enter_async_context(SdmSimulator(tcp_port=0, seed=2))
            grid_meter = ModbusDevice(
                id="grid-meter",
                profile="sdm630",
                host="127.0.0.1",
                port=grid.tcp_port,
                interval_s=0.2,
                timeout_s=1,
            )
            self.cfg = cfg = SiteConfig(
                site=SiteSection(node_id="browser-test", name="Browser test site"),
                store=StoreConfig(path="site.db", commit_interval_ms=200),
                http=HttpConfig(host="127.0.0.1", live_rate=10),
                devices=[
                    GoodweDevice(id="inverter", host=inverter.host, interval_s=0.1, timeout_s=1),
                    grid_meter,
                    ModbusDevice(
                        id="heat-pump-meter",
                        profile="sdm630",
                        host="127.0.0.1",
                        port=self.spare.tcp_port,
                        interval_s=0.2,
                        timeout_s=SPARE_TIMEOUT_S,
                    ),
                ],
            )
            store = await open_store(cfg, self.data_dir)
            stack.push_async_callback(store.close)
            self.prefilled = await prefill_history(store, grid_meter)
            polled, push = build_drivers(cfg, self.data_dir)
            self.runtime = runtime = Runtime(store, polled, push, min_backoff_s=0.1)
            dash = Dashboard(runtime, cfg, port=0)
            runtime.services.extend(dash.services())
            task = asyncio.create_task(runtime.run(), name="browser-site-runtime")

            async def stop_runtime() -> None:
                # Python 3.11's asyncio.wait_for, which pymodbus awaits every reply with,
                # loses a cancellation that lands as the reply arrives (fixed in 3.12): the
                # poll loop then runs on. Cancel again until the runtime stops, and say so.
                for attempt in range(10):
                    task.cancel()
                    await asyncio.wait({task}, timeout=2.0)
                    if task.done():
                        break
                    self.lost_cancellations = attempt + 1
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            stack.push_async_callback(stop_runtime)
            runtime.dead_letter("mqtt", "gridlet/node-9/telemetry", b"\xff\x00{", "not JSON")
            async with asyncio.timeout(15):
                await dash.ready.wait()
            self.url = dash.url
            self._ready.set()
            await self._stop.wait()


async def prefill_history(store: Store, dev: ModbusDevice) -> int:
    """Write past frames of ``dev`` (schema and values from one real read, swinging over a
    day) so that every history range has data: 30 s apart in the last hour, 5 min in the
    last day, 30 min in the last week, 6 h before that, back to 364 days ago."""
    drv = make_drivers([dev])[0]
    try:
        schema = await drv.connect()
        values = await drv.read()
    finally:
        await drv.close()
    now = now_ms()
    stamps: list[int] = []
    t = now - 364 * DAY_MS
    while t < now - 2 * MINUTE_MS:
        stamps.append(t)
        age = now - t
        if age > 8 * DAY_MS:
            t += 6 * HOUR_MS
        elif age > DAY_MS + HOUR_MS:
            t += 30 * MINUTE_MS
        elif age > HOUR_MS + 5 * MINUTE_MS:
            t += 5 * MINUTE_MS
        else:
            t += 30_000
    readings = [
        Reading(
            Frame(
                dev.id,
                ts,
                seq,
                tuple(
                    None if v is None else v * (1 + 0.25 * math.sin(2 * math.pi * ts / DAY_MS))
                    for v in values
                ),
            ),
            schema,
        )
        for seq, ts in enumerate(stamps, start=1)
    ]
    for i in range(0, len(readings), 1000):
        await store.write(readings[i : i + 1000])
    return len(readings)
