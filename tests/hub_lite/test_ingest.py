"""Ingest checks, on every storage backend (the ``storage`` fixture): every bad body gets its
own clear refusal and changes nothing; chained batches decode only from a state the hub holds
(rebuilt from the database after a restart)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync import DeviceSchema, Frame, default_field, encode
from cloud_sync.signing import NodeKey, sign
from hub_lite.config import IngestConfig
from hub_lite.ingest import IngestError, Ingestor
from hub_lite.read import read_frames
from hub_lite.storage import Storage
from proto import telemetry_pb2 as pb

T0 = 1_790_000_000_000
NODE = "n1"
SCHEMA = DeviceSchema(
    kind="meter",
    model="sim",
    fields=(default_field("power_w", "W", 5.0), default_field("energy_kwh", "kWh", 0.001)),
)


def frames(start: int, n: int, t0: int = T0) -> list[Frame]:
    rng = random.Random(start)
    return [
        Frame(
            "m", t0 + (start + i) * 1000, start + i + 1, (rng.uniform(0, 3000), 0.01 * (start + i))
        )
        for i in range(n)
    ]


@pytest.fixture
async def key(storage: Storage) -> NodeKey:
    k = NodeKey.generate()
    assert await storage.add_node(NODE, k.public_bytes)
    return k


def body(key: NodeKey, batch_id: int, rows: list[Frame], **kw: object) -> bytes:
    node = str(kw.pop("node_id", NODE))
    raw = encode(rows, {"m": SCHEMA}, node_id=node, batch_id=batch_id, created_ms=T0, **kw)  # type: ignore[arg-type]
    return sign(key, NODE, raw)


async def snapshot(st: Storage) -> tuple[object, ...]:
    nodes = await st.nodes()
    devices = await st.devices(NODE)
    return (
        [(n.batches, n.last_batch_id) for n in nodes],
        [(d.frames, d.held) for d in devices],
        len(await read_frames(st, NODE, "m", 0, 2**62)),
    )


def ingestor(st: Storage, **cfg: object) -> Ingestor:
    return Ingestor(st, IngestConfig(max_future_s=10 * 365 * 86400, **cfg), clock=lambda: T0 / 1000)  # type: ignore[arg-type]


async def refused(ing: Ingestor, data: bytes, status: int, code: str) -> IngestError:
    before = await snapshot(ing.storage)
    with pytest.raises(IngestError) as info:
        await ing.ingest(data)
    assert (info.value.status, info.value.code) == (status, code), info.value.detail
    assert await snapshot(ing.storage) == before, "a refused body changed a row"
    return info.value


async def test_bad_bodies_are_refused_and_change_nothing(storage: Storage, key: NodeKey) -> None:
    ing = ingestor(storage, max_body_bytes=64 * 1024)
    ok = body(key, 1, frames(0, 50))
    assert (await ing.ingest(ok)).result == "stored"
    # A replay of a stored batch: 200 duplicate, nothing written.
    before = await snapshot(storage)
    ack = await ing.ingest(ok)
    assert (ack.result, ack.frames_new) == ("duplicate", 0)
    assert await snapshot(storage) == before
    # Wrong signature: another key signs for this node.
    await refused(
        ing,
        sign(
            NodeKey.generate(),
            NODE,
            encode(frames(50, 5), {"m": SCHEMA}, node_id=NODE, batch_id=2, created_ms=T0),
        ),
        401,
        "bad_signature",
    )
    # Unknown node.
    stranger = NodeKey.generate()
    raw = encode(frames(50, 5), {"m": SCHEMA}, node_id="nx", batch_id=2, created_ms=T0)
    await refused(ing, sign(stranger, "nx", raw), 403, "unknown_node")
    # The body names another node than the signer.
    await refused(ing, body(key, 3, frames(50, 5), node_id="n2"), 400, "node_mismatch")
    # Oversize.
    await refused(ing, b"\x00" * (64 * 1024 + 1), 413, "too_large")
    # Truncated and fuzzed.
    good = body(key, 4, frames(50, 20))
    await refused(ing, good[: len(good) // 2], 400, "malformed")
    rng = random.Random(7)
    before = await snapshot(storage)
    for _ in range(200):
        b = bytearray(good)
        for i in rng.sample(range(len(b)), rng.randint(1, 4)):
            b[i] ^= rng.randrange(1, 256)  # every chosen byte really changes
        with pytest.raises(IngestError) as info:
            await ing.ingest(bytes(b))
        assert 400 <= info.value.status < 500
    assert await snapshot(storage) == before  # no mangled body got through
    # Timestamps before 2000 and far in the future.
    await refused(ing, body(key, 5, frames(0, 3, t0=900_000_000_000)), 422, "bad_timestamp")
    far = T0 + 11 * 365 * 86_400_000
    await refused(ing, body(key, 6, frames(0, 3, t0=far)), 422, "bad_timestamp")
    # NaN where a value is required: a field's tolerance.
    msg = pb.Batch()
    msg.ParseFromString(
        encode(frames(60, 3), {"m": SCHEMA}, node_id=NODE, batch_id=7, created_ms=T0)
    )
    msg.devices[0].schema.fields[0].tolerance = float("nan")
    await refused(ing, sign(key, NODE, msg.SerializeToString()), 400, "malformed")
    # A device id no database should be asked to hold.
    raw = encode(
        [Frame("m\x00x", T0, 1, (1.0, 2.0))],
        {"m\x00x": SCHEMA},
        node_id=NODE,
        batch_id=10,
        created_ms=T0,
    )
    await refused(ing, sign(key, NODE, raw), 400, "malformed")
    # A chained batch whose predecessor the hub never got.
    chained = encode(
        frames(60, 3),
        {"m": SCHEMA},
        node_id=NODE,
        batch_id=8,
        created_ms=T0,
        chains={"m": (999, _state_after(frames(0, 3)))},
    )
    err = await refused(ing, sign(key, NODE, chained), 409, "chain_broken")
    assert err.extra["devices"] == ["m"]
    # The hub still serves.
    assert (await ing.ingest(body(key, 9, frames(50, 10)))).frames_new == 10


def _state_after(rows: list[Frame]) -> bytearray:
    out: dict[str, bytearray] = {}
    encode(rows, {"m": SCHEMA}, node_id=NODE, batch_id=1, created_ms=T0, states_out=out)
    return out["m"]


async def test_chained_batches_survive_a_hub_restart(storage: Storage, key: NodeKey) -> None:
    ing = ingestor(storage)
    states: dict[str, bytearray] = {}
    rows = frames(0, 5)
    raw = encode(rows, {"m": SCHEMA}, node_id=NODE, batch_id=1, created_ms=T0, states_out=states)
    ack = await ing.ingest(sign(key, NODE, raw))
    assert ack.chain == {"m": 1}
    sent = list(rows)
    for b in range(2, 12):
        rows = frames(5 * (b - 1), 5)
        chain = {"m": (b - 1, states["m"])}
        if b == 7:
            ing = ingestor(storage)  # a new process: the state comes back from the database
        raw = encode(
            rows,
            {"m": SCHEMA},
            node_id=NODE,
            batch_id=b,
            created_ms=T0,
            chains=chain,
            states_out=states,
        )
        ack = await ing.ingest(sign(key, NODE, raw))
        assert ack.chain == {"m": b}
        sent += rows
    assert ing.stats.chain_rebuilds == 1
    got = await read_frames(storage, NODE, "m", 0, 2**62)
    assert [f.seq for f in got] == [f.seq for f in sent]
    for want, have in zip(sent, got, strict=True):
        for f, x, y in zip(SCHEMA.fields, want.values, have.values, strict=True):
            assert x is not None and y is not None and abs(x - y) <= f.tol


async def test_overlapping_batches_store_each_frame_once(storage: Storage, key: NodeKey) -> None:
    ing = ingestor(storage)
    await ing.ingest(body(key, 1, frames(0, 30)))
    ack = await ing.ingest(body(key, 2, frames(20, 30)))  # a resend after a lost ack, and more
    assert (ack.frames_new, ack.frames_duplicate) == (20, 10)
    got = await read_frames(storage, NODE, "m", 0, 2**62)
    assert [f.seq for f in got] == list(range(1, 51))
    day = await storage.completeness(NODE, T0 // 86_400_000 * 86_400_000)
    assert sum(c.live + c.backfill for c in day) == 50


async def test_retention_drops_old_raw_days_and_keeps_recent(
    storage: Storage, key: NodeKey
) -> None:
    from hub_lite.app import prune_once
    from hub_lite.config import parse_hub_config

    ing = ingestor(storage)
    old = T0 - 40 * 86_400_000
    await ing.ingest(body(key, 1, frames(0, 20, t0=old)))
    await ing.ingest(body(key, 2, frames(20, 20)))
    assert len(await read_frames(storage, NODE, "m", 0, 2**62)) == 40
    dropped = await prune_once(storage, parse_hub_config(""), T0)
    assert dropped == 1
    got = await read_frames(storage, NODE, "m", 0, 2**62)
    assert [f.seq for f in got] == list(range(21, 41))
    # Rollups are kept far longer than raw frames.
    assert await storage.rollups(NODE, "m", 60_000, old - 60_000, old + 86_400_000)


async def test_rollups_are_the_edges_code_over_the_values_the_hub_holds(
    storage: Storage, key: NodeKey
) -> None:
    from array import array

    from cloud_sync.rollup import HOUR_MS, MINUTE_MS, bucket_blobs, merge_blobs

    ing = ingestor(storage)
    # 150 frames a second apart, in three batches that split minutes between them.
    for b, start in enumerate((0, 45, 100), start=1):
        n = {0: 45, 45: 55, 100: 50}[start]
        await ing.ingest(body(key, b, frames(start, n)))
    held = await read_frames(storage, NODE, "m", 0, 2**62)
    ts = array("q", [f.ts_ms for f in held])
    cols = [[f.values[j] for f in held] for j in range(2)]
    assert all(v is not None for col in cols for v in col)
    flat = array("d", [float(v or 0.0) for col in cols for v in col])  # column-major
    want = dict(bucket_blobs(ts, flat, 2, MINUTE_MS))
    got = {b: s for b, _, s in await storage.rollups(NODE, "m", MINUTE_MS, 0, 2**62)}
    assert set(got) == set(want)
    for bucket, blob in want.items():
        a, b2 = array("d", got[bucket]), array("d", blob)
        assert a[0::4] == b2[0::4] and a[1::4] == b2[1::4] and a[3::4] == b2[3::4]  # n/min/max
        for x, y in zip(a[2::4], b2[2::4], strict=True):  # avg: pieces merged, last bits aside
            assert abs(x - y) <= 1e-9 * max(1.0, abs(y))
    hours = {b: s for b, _, s in await storage.rollups(NODE, "m", HOUR_MS, 0, 2**62)}
    for hour, blob in hours.items():
        minutes = [got[m] for m in sorted(got) if hour <= m < hour + HOUR_MS]
        assert blob == merge_blobs(minutes, 2)


@given(st.lists(st.lists(st.integers(0, 300), max_size=40), max_size=8), st.integers(0, 300))
def test_held_sequence_numbers_behave_as_a_set(batches: list[list[int]], probe: int) -> None:
    from array import array

    from hub_lite.ingest import _Intervals

    held = _Intervals([])
    model: set[int] = set()
    for b in batches:
        held = _Intervals.from_bytes(held.to_bytes())  # as stored between batches
        held.add_all(array("q", b))
        model.update(b)
    assert all(held.contains(v) == (v in model) for v in range(-2, 303))
    lo, hi = sorted((probe, probe + 7))
    assert held.overlaps(lo, hi) == any(lo <= v <= hi for v in model)
    ranges = held.r
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ranges))
