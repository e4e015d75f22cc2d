"""The SQLite store: batched commits, rollups, retention, the size cap, restarts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cloud_sync import DeviceSchema, Frame, default_field
from cloud_sync.syncstate import SyncState
from edge_runtime.bus import Bus, Reading
from edge_runtime.store import (
    HOUR_MS,
    MINUTE_MS,
    CommitReport,
    Reader,
    Store,
    pack_values,
    unpack_values,
)

SCHEMA = DeviceSchema(
    "meter", "test", (default_field("power_w", "W", 5), default_field("voltage_v", "V", 0.1))
)
T0 = 1_800_000_000_000 // HOUR_MS * HOUR_MS


def reading(seq: int, ts: int, p: float | None, v: float = 230.0, dev: str = "m1") -> Reading:
    return Reading(Frame(dev, ts, seq, (p, v)), SCHEMA)


def test_pack_round_trip_keeps_none_and_nan() -> None:
    vals = (1.5, None, math.nan, -0.0, 1e300)
    out = unpack_values(pack_values(vals))
    assert out[0] == 1.5 and out[1] is None and math.isnan(out[2] or 0.0) and out[4] == 1e300
    assert len(pack_values(vals)) == 4 + 8 * len(vals)  # 1e300 needs float64


def test_pack_keeps_decimals_and_float32_registers_small() -> None:
    decimals = (236.9, 1.2, None, -108.0, 49.99)  # scaled registers, JSON numbers
    assert len(pack_values(decimals)) == 4 + 2 * 5
    assert unpack_values(pack_values(decimals)) == decimals
    float32 = (229.87370300292969, 0.9876543283462524, None)  # SDM630 float32 registers
    assert len(pack_values(float32)) == 4 + 4 * 3
    assert unpack_values(pack_values(float32)) == float32


async def test_frames_and_rollups(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite")
    try:
        # two full minutes and a bit of a third, one value missing
        batch = [
            reading(i + 1, T0 + i * 1000, None if i == 7 else float(i), 230.0 + (i % 3))
            for i in range(150)
        ]
        report = await store.write(batch)
        assert report.frames == 150 and report.devices == {"m1": (1, 150, 150)}
    finally:
        await store.close()
    reader = Reader(tmp_path / "db.sqlite")
    frames = list(reader.frames("m1"))
    assert [f.seq for f, _ in frames] == list(range(1, 151))
    assert frames[7][0].values == (None, 231.0)
    assert frames[0][1] == SCHEMA
    minute = reader.rollups("m1", MINUTE_MS)
    assert [r.bucket_ms for r, _ in minute] == [T0, T0 + MINUTE_MS]  # the third is still open
    first = minute[0][0]
    assert first.count == (59, 60)
    assert first.min == (0.0, 230.0) and first.max == (59.0, 232.0)
    assert first.avg[0] == pytest.approx(sum(i for i in range(60) if i != 7) / 59)
    hour = reader.rollups("m1", HOUR_MS)
    assert len(hour) == 1 and hour[0][0].count == (119, 120) and hour[0][0].max == (119.0, 232.0)
    assert next(iter(reader.frames("m1", T0 + 10_000, T0 + 20_000)))[0].seq == 11


async def test_open_minute_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await Store.open(path)
    await store.write([reading(i + 1, T0 + i * 1000, float(i)) for i in range(30)])
    await store.close()
    store = await Store.open(path)
    assert await store.last_seq() == {"m1": 30}
    await store.write([reading(31 + i, T0 + (30 + i) * 1000, 100.0) for i in range(40)])
    await store.close()
    ((r, _),) = Reader(path).rollups("m1", MINUTE_MS)
    assert r.count[0] == 60 and r.max[0] == 100.0 and r.min[0] == 0.0


async def test_retention_drops_old_raw_and_counts(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite", raw_retention_days=1, rollup_retention_days=2)
    try:
        await store.write([reading(i + 1, T0 + i * 1000, 1.0) for i in range(120)])
        await store.maintain(now_ms=T0 + 86_400_000 + 60_000)  # a day and a minute later
        assert store.stats.expired_frames == 60
        reader = Reader(tmp_path / "db.sqlite")
        assert len(list(reader.frames("m1"))) == 60
        assert len(reader.rollups("m1", MINUTE_MS)) == 1  # rollups kept longer
        assert reader.counters()["expired_frames"] == 60
    finally:
        await store.close()


async def test_size_cap_evicts_synced_first_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await Store.open(path, max_size_bytes=10**9)
    try:
        await store.write([reading(i + 1, T0 + i * 100, float(i)) for i in range(20_000)])
        store.set_sync("m1", SyncState(5000, 5000, 5000))  # the hub holds seq 1..5000
        await store.write([])
        size = await store._size()
        store.max_size_bytes = size * 3 // 4
        await store.maintain(now_ms=T0)
        assert store.stats.size_bytes <= store.max_size_bytes
        assert store.stats.evicted_synced == 5000
        assert store.stats.evicted_unsynced > 0
        counters = Reader(path).counters()
        assert counters["evicted_synced"] == 5000
        assert counters["evicted_unsynced"] == store.stats.evicted_unsynced
        seqs = [f.seq for f, _ in Reader(path).frames("m1")]
        assert seqs == list(range(20_001 - len(seqs), 20_001))  # the oldest went, in order
        # Every unsynced frame evicted is counted per device and day for the hub to hear of.
        losses = Reader(path).losses()
        assert sum(ev for _, _, ev, _ in losses) == store.stats.evicted_unsynced
        assert {dev for dev, _, _, _ in losses} == {"m1"}
    finally:
        await store.close()


async def test_writer_loop_commits_in_batches_and_flushes_on_cancel(tmp_path: Path) -> None:
    import asyncio

    store = await Store.open(tmp_path / "db.sqlite", commit_interval_ms=200)
    bus = Bus()
    sub = bus.subscribe("store")
    reports: list[CommitReport] = []
    store.on_commit.append(reports.append)
    task = asyncio.create_task(store.run(sub))
    for i in range(500):
        bus.publish(reading(i + 1, T0 + i, 1.0))
        if i % 50 == 0:
            await asyncio.sleep(0.01)
    async with asyncio.timeout(5):
        while sum(r.frames for r in reports) < 300:
            await asyncio.sleep(0.01)
    assert len(reports) < 10  # batched, not one commit per frame
    for i in range(500, 600):
        bus.publish(reading(i + 1, T0 + i, 1.0))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()
    assert sum(r.frames for r in reports) == 600
    assert len(list(Reader(tmp_path / "db.sqlite").frames("m1"))) == 600


async def test_dead_letters_are_kept(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite")
    store.dead_letter("mqtt", "gridlet/x/telemetry", b"{not json", "not JSON")
    await store.write([])
    await store.close()
    ((_, source, key, reason, payload),) = Reader(tmp_path / "db.sqlite").dead_letters()
    assert (source, key, reason, payload) == (
        "mqtt",
        "gridlet/x/telemetry",
        "not JSON",
        b"{not json",
    )


async def test_sequence_numbers_never_repeat_after_their_frames_are_gone(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await Store.open(path, raw_retention_days=1)
    try:
        await store.write([reading(i + 1, T0 + i * 100, float(i)) for i in range(100)])
        await store.maintain(now_ms=T0 + 3 * 86_400_000)  # every frame expires
        assert Reader(path).newest_key("m1") is None
    finally:
        await store.close()
    store = await Store.open(path)
    try:
        # The hub holds 1..100 by sequence number: a restarted node must go on at 101.
        assert await store.last_seq() == {"m1": 100}
    finally:
        await store.close()
