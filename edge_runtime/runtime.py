"""The scheduler: polls every device at its interval, runs push sources, feeds the bus.

Every device has one named task in one TaskGroup. Reads fall on slots of the wall clock
(``Cadence``), so devices with the same interval are read together. A read has a timeout;
failures mark the device offline and back off with jittered exponential delays; after several
in a row the driver's ``recover()`` gets a chance (the GoodWe wake broadcast). A driver bug is
logged and backed off like a device failure, so one bad device never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from cloud_sync import DeviceSchema, Frame
from cloud_sync.backoff import Backoff

from .bus import Bus, Reading
from .devices.base import (
    DeviceError,
    DeviceGoneError,
    DeviceStatus,
    DeviceTimeoutError,
    PolledDriver,
    PushDriver,
    Values,
    now_ms,
)
from .store import Store

__all__ = ("Backoff", "Cadence", "Polled", "Runtime")

log = logging.getLogger(__name__)


def _raise_if_cancelling() -> None:
    """Python 3.11's wait_for (used inside pymodbus and goodwe) can swallow a cancellation
    that lands just as a reply arrives; a task asked to stop must stop all the same."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Cadence:
    """Read slots on the wall clock: slot ``k`` starts at ``k * interval`` seconds of Unix time.

    Every device with the same interval is read at the same instants (on the whole second at
    1 s), so values from an inverter and a meter describe the same moment and the live view
    sends them in one message. A read that overruns skips the slots it missed; a clock that
    steps (NTP at boot on a Pi without RTC) re-anchors at the next slot, never sleeps long.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.time) -> None:
        if not interval_s > 0:
            raise ValueError("interval must be positive")
        self.interval = interval_s
        self.clock = clock
        self._slot: int | None = None

    def delay(self) -> float:
        """Seconds from now to the next slot, which becomes the current one."""
        now = self.clock()
        nxt = math.floor(now / self.interval) + 1
        if self._slot is None:
            # The first read happened on connect, off the grid: not again within half a slot.
            if (nxt * self.interval - now) < self.interval / 2:
                nxt += 1
        elif nxt == self._slot:  # woke a hair early, before the slot's own start
            nxt += 1
        self._slot = nxt
        return max(0.0, nxt * self.interval - now)


@dataclass(frozen=True)
class Polled:
    """A polled driver with its timing."""

    driver: PolledDriver
    interval_s: float
    timeout_s: float
    wake_after_failures: int = 3


class Runtime:
    """Runs drivers and implements the Sink that push drivers hand readings to."""

    def __init__(
        self,
        store: Store,
        polled: Sequence[Polled] = (),
        push: Sequence[PushDriver] = (),
        *,
        bus: Bus | None = None,
        services: Sequence[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = (),
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
    ) -> None:
        self.store = store
        self.bus = bus or Bus()
        self.polled = list(polled)
        self.push = list(push)
        self.services = list(services)
        """Long-lived helpers run beside the drivers (the dashboard's web server, the live
        fan-out, the uploader): (task name, coroutine function)."""
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.statuses: dict[str, DeviceStatus] = {}
        self._seq: dict[str, int] = {}
        self._store_sub = self.bus.subscribe("store", maxsize=500_000)
        self.started_ms: int | None = None

    # ------------------------------------------------------------------ Sink

    def frame(
        self, device_id: str, schema: DeviceSchema, values: Values, ts_ms: int | None = None
    ) -> None:
        seq = self._seq.get(device_id, 0) + 1
        self._seq[device_id] = seq
        ts = now_ms() if ts_ms is None else ts_ms
        self.bus.publish(Reading(Frame(device_id, ts, seq, tuple(values)), schema))

    def status(self, device_id: str, kind: str) -> DeviceStatus:
        st = self.statuses.get(device_id)
        if st is None:
            st = self.statuses[device_id] = DeviceStatus(device_id, kind)
        return st

    def dead_letter(self, source: str, key: str, payload: bytes, reason: str) -> None:
        self.store.dead_letter(source, key, payload, reason)

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Run until cancelled; on cancellation the store commits what it received."""
        self._seq.update(await self.store.last_seq())
        self.started_ms = now_ms()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.store.run(self._store_sub), name="store-writer")
            for p in self.polled:
                tg.create_task(self._poll(p), name=f"poll:{p.driver.device_id}")
            for d in self.push:
                tg.create_task(self._push(d), name=f"push:{d.device_id}")
            for name, service in self.services:
                tg.create_task(service(), name=name)

    async def _poll(self, p: Polled) -> None:
        drv = p.driver
        st = self.status(drv.device_id, drv.kind)
        backoff = Backoff(max(p.interval_s, self.min_backoff_s), self.max_backoff_s)
        failures = 0
        schema: DeviceSchema | None = None
        try:
            while True:
                try:
                    if schema is None:
                        async with asyncio.timeout(p.timeout_s * 3):
                            schema = await drv.connect()
                        _raise_if_cancelling()
                        st.info.update(getattr(drv, "info", {}))
                        log.info("%s: connected (%d fields)", drv.device_id, len(schema.fields))
                    cadence = Cadence(p.interval_s)
                    while True:
                        values = await self._read(drv, p.timeout_s)
                        _raise_if_cancelling()
                        self.frame(drv.device_id, schema, values)
                        st.seen()
                        st.last_error = None
                        if failures:
                            log.info("%s: back after %d failed reads", drv.device_id, failures)
                        failures = 0
                        backoff.reset()
                        await asyncio.sleep(cadence.delay())
                except DeviceError as exc:
                    failures += 1
                    self._failed(st, exc, failures)
                    if isinstance(exc, DeviceGoneError):
                        schema = None
                except Exception as exc:  # a driver bug must not stop the other devices
                    failures += 1
                    log.exception("%s: driver error", drv.device_id)
                    self._failed(st, exc, failures)
                    schema = None
                if failures % p.wake_after_failures == 0:
                    await self._recover(drv)
                await asyncio.sleep(backoff.next())
        finally:
            await drv.close()

    @staticmethod
    async def _read(drv: PolledDriver, timeout_s: float) -> Values:
        try:
            async with asyncio.timeout(timeout_s):
                return await drv.read()
        except TimeoutError as exc:
            raise DeviceTimeoutError(f"no answer within {timeout_s:g} s") from exc

    @staticmethod
    async def _recover(drv: PolledDriver) -> None:
        try:
            async with asyncio.timeout(5):
                await drv.recover()
        except Exception:
            log.exception("%s: recover() failed", drv.device_id)

    def _failed(self, st: DeviceStatus, exc: BaseException, failures: int) -> None:
        st.online = False
        st.errors += 1
        if isinstance(exc, DeviceTimeoutError):
            st.timeouts += 1
        st.last_error = f"{type(exc).__name__}: {exc}"
        # The first failure of a streak is news; the rest would flood an SD-card log.
        level = logging.WARNING if failures == 1 else logging.DEBUG
        log.log(level, "%s: %s (failure %d)", st.device_id, st.last_error, failures)

    async def _push(self, drv: PushDriver) -> None:
        st = self.status(drv.device_id, drv.kind)
        backoff = Backoff(self.min_backoff_s, self.max_backoff_s)
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await drv.run(self)
                exc: BaseException = DeviceGoneError("source ended")
            except DeviceError as e:
                exc = e
            except Exception as e:
                log.exception("%s: driver error", drv.device_id)
                exc = e
            if time.monotonic() - started > 60:
                failures = 0
                backoff.reset()
            failures += 1
            self._failed(st, exc, failures)
            await asyncio.sleep(backoff.next())
