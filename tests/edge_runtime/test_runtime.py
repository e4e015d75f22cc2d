"""The scheduler with scripted drivers: cadence, timeouts, backoff, recovery, isolation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from cloud_sync import DeviceSchema, default_field
from edge_runtime.devices.base import DeviceError, DeviceGoneError, Sink, Values
from edge_runtime.runtime import Backoff, Cadence, Polled, Runtime
from edge_runtime.store import Reader, Store

SCHEMA = DeviceSchema("meter", "fake", (default_field("power_w", "W", 5),))


class FakeDriver:
    kind = "fake"

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.reads = 0
        self.connects = 0
        self.recovers = 0
        self.closed = False
        self.mode = "ok"  # ok | hang | fail | gone
        self.read_times: list[float] = []

    async def connect(self) -> DeviceSchema:
        self.connects += 1
        if self.mode == "gone":
            raise DeviceGoneError("refused")
        return SCHEMA

    async def read(self) -> Values:
        self.read_times.append(asyncio.get_running_loop().time())
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "fail":
            raise DeviceError("bad answer")
        if self.mode == "gone":
            raise DeviceGoneError("dropped")
        self.reads += 1
        return (float(self.reads),)

    async def recover(self) -> None:
        self.recovers += 1

    async def close(self) -> None:
        self.closed = True


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "db.sqlite", commit_interval_ms=50)
    yield s
    await s.close()


def test_backoff_is_jittered_exponential_and_capped() -> None:
    b = Backoff(1.0, 10.0)
    delays = [b.next() for _ in range(8)]
    for n, d in enumerate(delays):
        top = min(10.0, 2.0**n)
        assert top / 2 <= d <= top
    b.reset()
    assert b.next() <= 1.0


def test_cadence_reads_on_wall_clock_slots_and_skips_missed_ones() -> None:
    now = [1000.37]
    c = Cadence(0.5, lambda: now[0])
    assert c.delay() == pytest.approx(0.63)  # 1000.5 is under half a slot after connect
    now[0] = 1001.0 - 1e-9  # the sleep ended a hair early: that read was slot 1001.0's
    assert c.delay() == pytest.approx(0.5)
    now[0] = 1001.52  # a 20 ms read
    assert c.delay() == pytest.approx(0.48)
    now[0] = 1002.7  # a read overran: 1002.0 and 1002.5 are skipped, not read back to back
    assert c.delay() == pytest.approx(0.3)
    now[0] = 900.1  # the clock stepped back (NTP at boot): the next slot of the new time
    assert c.delay() == pytest.approx(0.4)
    now[0] = 5000.0  # stepped forward
    assert c.delay() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        Cadence(0)


async def test_devices_with_one_interval_are_read_together(store: Store) -> None:
    drivers = [FakeDriver(f"m{i}") for i in range(3)]
    rt = Runtime(store, [Polled(d, 0.1, 0.2) for d in drivers])
    task = asyncio.create_task(rt.run())
    try:
        await until(lambda: all(d.reads >= 6 for d in drivers))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # after the read on connect, each read lands on the same 100 ms slot for all three
    for k in range(1, 5):
        times = [d.read_times[k] for d in drivers]
        assert max(times) - min(times) < 0.02, times


async def test_cadence_and_a_silent_device_does_not_disturb_the_others(store: Store) -> None:
    good, silent = FakeDriver("good"), FakeDriver("silent")
    silent.mode = "hang"
    rt = Runtime(
        store,
        [Polled(good, 0.05, 0.2), Polled(silent, 0.05, 0.2, 2)],
        min_backoff_s=0.05,
        max_backoff_s=0.4,
    )
    task = asyncio.create_task(rt.run())
    try:
        await until(lambda: good.reads >= 20)
        gaps = [b - a for a, b in zip(good.read_times, good.read_times[1:], strict=False)]
        assert max(gaps) < 0.15, gaps  # the silent device never held the good one back
        assert sum(gaps) / len(gaps) == pytest.approx(0.05, rel=0.3)
        st = rt.statuses["silent"]
        await until(lambda: st.timeouts >= 3)
        assert (
            not st.online and st.errors >= 3 and "no answer within 0.2 s" in (st.last_error or "")
        )
        assert silent.recovers >= 1  # after wake_after_failures=2 failures in a row
        assert rt.statuses["good"].online
        # it comes back
        silent.mode = "ok"
        await until(lambda: silent.reads >= 3)
        assert st.online and st.last_error is None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert good.closed and silent.closed


async def test_failures_back_off_and_gone_devices_reconnect(store: Store) -> None:
    drv = FakeDriver("flaky")
    drv.mode = "fail"
    rt = Runtime(store, [Polled(drv, 0.01, 0.1, 100)], min_backoff_s=0.01, max_backoff_s=0.16)
    task = asyncio.create_task(rt.run())
    try:
        await until(lambda: len(drv.read_times) >= 6)
        gaps = [b - a for a, b in zip(drv.read_times, drv.read_times[1:], strict=False)]
        assert gaps[3] > gaps[0]  # exponential growth
        assert max(gaps) < 0.25  # capped
        drv.mode = "gone"
        connects = drv.connects
        await until(lambda: drv.connects >= connects + 2)  # reconnects after a drop
        drv.mode = "ok"
        await until(lambda: drv.reads >= 3)
        assert rt.statuses["flaky"].online
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_stalled_subscriber_never_blocks_drivers(store: Store) -> None:
    drv = FakeDriver("fast")
    rt = Runtime(store, [Polled(drv, 0.001, 0.1)])
    stalled = rt.bus.subscribe("stalled-dashboard", maxsize=10)
    task = asyncio.create_task(rt.run())
    try:
        await until(lambda: drv.reads >= 200)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(stalled) == 10
    assert stalled.dropped >= drv.reads - 10
    stored = list(Reader(store.path).frames("fast"))
    assert len(stored) == drv.reads  # the store's own queue lost nothing


class FlakyPush:
    kind = "push"
    device_id = "push-1"

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, sink: Sink) -> None:
        self.runs += 1
        sink.frame("node-a", SCHEMA, (float(self.runs),))
        sink.status("node-a", "node").seen()
        if self.runs < 3:
            raise DeviceGoneError("port vanished")
        await asyncio.sleep(3600)


async def test_push_sources_are_restarted_after_errors(store: Store) -> None:
    drv = FlakyPush()
    rt = Runtime(store, push=[drv], min_backoff_s=0.01, max_backoff_s=0.05)
    task = asyncio.create_task(rt.run())
    try:
        await until(lambda: drv.runs >= 3)
        assert rt.statuses["push-1"].errors == 2
        assert "port vanished" in (rt.statuses["push-1"].last_error or "")
        assert rt.statuses["node-a"].online
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [f.values[0] for f, _ in Reader(store.path).frames("node-a")] == [1.0, 2.0, 3.0]
