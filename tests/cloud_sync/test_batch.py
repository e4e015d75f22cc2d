"""The batch codec: round trips, schemas by reference, and every kind of bad body."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync import (
    BatchError,
    DeviceSchema,
    Field,
    Frame,
    UnknownSchemaError,
    decode,
    default_field,
    encode,
)
from proto import telemetry_pb2 as pb

METER = DeviceSchema(
    kind="meter",
    model="SDM630",
    fields=(
        default_field("grid_power_w", "W", 5.0),
        default_field("voltage_l1_v", "V", 0.5),
        default_field("energy_import_kwh", "kWh", 0.0005),
    ),
)
NODE = DeviceSchema(
    kind="node",
    model="esp32-ct",
    fields=(Field("temperature_c", "C", 0.05, alpha=0.5), Field("rssi_dbm", "dBm", 0.5)),
)
SCHEMAS = {"meter-1": METER, "node-7": NODE}


def sample_frames(n: int = 200) -> list[Frame]:
    frames = []
    for i in range(n):
        power = 1500.0 + 800.0 * math.sin(i / 20.0) if i % 50 != 13 else None
        frames.append(
            Frame(
                "meter-1",
                1_700_000_000_000 + 1000 * i,
                i,
                (power, 230.0 + (i % 5) * 0.2, 1234.5 + i * 0.0004),
            )
        )
        if i % 4 == 0:
            temp = math.nan if i == 40 else 21.5 + i * 0.003
            frames.append(Frame("node-7", 1_700_000_000_000 + 1000 * i + 3, i // 4, (temp, -61.0)))
    return frames


def body(**kw: object) -> bytes:
    args: dict[str, object] = {"node_id": "site-a", "batch_id": 42, "created_ms": 1_700_000_999_000}
    args.update(kw)
    frames = args.pop("frames", sample_frames())
    return encode(frames, SCHEMAS, **args)  # type: ignore[arg-type]


def assert_within(orig: list[Frame], got: list[Frame], schemas: dict[str, DeviceSchema]) -> None:
    def key(f: Frame) -> tuple[str, int]:
        return (f.device_id, f.seq)

    assert sorted(map(key, orig)) == sorted(map(key, got))
    by_key = {key(f): f for f in got}
    for f in orig:
        g = by_key[key(f)]
        assert g.ts_ms == f.ts_ms
        for field, x, y in zip(schemas[f.device_id].fields, f.values, g.values, strict=True):
            if x is None:
                assert y is None
            elif math.isnan(x):
                assert y is not None and math.isnan(y)
            else:
                assert y is not None and abs(y - x) <= field.tol, (field.name, x, y)


def test_round_trip_keeps_schema_timestamps_nan_and_missing() -> None:
    frames = sample_frames()
    batch = decode(body(frames=frames))
    assert (batch.node_id, batch.batch_id, batch.created_ms) == ("site-a", 42, 1_700_000_999_000)
    assert batch.schemas == SCHEMAS
    assert_within(frames, batch.frames, SCHEMAS)


def test_encode_is_deterministic_and_compact() -> None:
    a, b = body(), body()
    assert a == b
    values = sum(len(f.values) for f in sample_frames())
    assert 8 * len(a) / values < 8  # bits per value, schema and timestamps included


def test_schema_by_reference_and_unknown_schema() -> None:
    known = {METER.digest(), NODE.digest()}
    small = body(known_schemas=known)
    assert len(small) < len(body())
    with pytest.raises(UnknownSchemaError) as err:
        decode(small)
    assert set(err.value.hashes) == known
    with pytest.raises(UnknownSchemaError) as err:
        decode(small, {METER.digest(): METER})
    assert err.value.hashes == (NODE.digest(),)
    batch = decode(small, {METER.digest(): METER, NODE.digest(): NODE})
    assert_within(sample_frames(), batch.frames, SCHEMAS)


def test_schema_digest_depends_on_every_parameter() -> None:
    changed = DeviceSchema(METER.kind, METER.model, (*METER.fields[:2], Field("energy_import_kwh",
                           "kWh", 0.0005, model="trend", alpha=0.5, beta=0.25)))  # fmt: skip
    assert changed.digest() != METER.digest()
    assert DeviceSchema(METER.kind, METER.model, METER.fields).digest() == METER.digest()


def test_empty_batch_and_device_without_fields() -> None:
    assert decode(body(frames=[])).frames == []
    bare = DeviceSchema("host", "pi", ())
    frames = [Frame("pi", 5 + i, i, ()) for i in range(3)]
    out = decode(encode(frames, {"pi": bare}, node_id="n", batch_id=1, created_ms=0))
    assert out.frames == frames


def test_frames_that_do_not_fit_their_schema_are_value_errors() -> None:
    with pytest.raises(ValueError, match="no schema for device 'ghost'"):
        encode([Frame("ghost", 0, 0, (1.0,))], SCHEMAS, node_id="n", batch_id=1, created_ms=0)
    with pytest.raises(ValueError, match="has 1 values, schema has 3 fields"):
        encode([Frame("meter-1", 0, 0, (1.0,))], SCHEMAS, node_id="n", batch_id=1, created_ms=0)


def mutate(raw: bytes, **fields: object) -> bytes:
    msg = pb.Batch()
    msg.ParseFromString(raw)
    for path, value in fields.items():
        target: Any = msg
        *parents, last = path.split("__")
        for part in parents:
            target = (
                target.devices[int(part[1:])] if part.startswith("d") else getattr(target, part)
            )
        setattr(target, last, value)
    out: bytes = msg.SerializeToString()
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 3}, "unknown wire format version 3"),
        ({"d0__frames": 10**9}, "declares over"),
        ({"d0__frames": 201}, "truncated|does not match|out of range"),
        ({"d0__frames": 199}, "truncated|does not match|out of range"),
        ({"d0__data": b""}, "too short"),
        ({"d0__device_id": ""}, "empty device id"),
        ({"d1__device_id": "meter-1"}, "appears twice"),
        ({"d0__first_ts_ms": 2**62}, "out of range"),
        ({"d0__schema__fields__0__tolerance": -1.0}, "tolerance"),
    ],
)
def test_hostile_bodies_raise_batch_error(change: dict[str, object], message: str) -> None:
    raw = body()
    if "d0__schema__fields__0__tolerance" in change:
        msg = pb.Batch()
        msg.ParseFromString(raw)
        msg.devices[0].schema.fields[0].tolerance = -1.0
        bad = msg.SerializeToString()
    else:
        bad = mutate(raw, **change)
    with pytest.raises(BatchError, match=message):
        decode(bad)


def test_block_without_schema_and_unknown_model() -> None:
    msg = pb.Batch()
    msg.ParseFromString(body())
    msg.devices[0].ClearField("schema")
    with pytest.raises(BatchError, match="carries no schema"):
        decode(msg.SerializeToString())
    msg.ParseFromString(body())
    msg.devices[0].schema.fields[0].model = 9  # type: ignore[assignment]
    with pytest.raises(BatchError, match="invalid schema"):
        decode(msg.SerializeToString())


def test_oversize_body_is_refused_before_parsing() -> None:
    with pytest.raises(BatchError, match="over the limit"):
        decode(b"\x00" * 1025, max_bytes=1024)


def test_decompression_bomb_is_refused_without_allocating() -> None:
    """A tiny body that declares millions of frames is refused before any buffer exists."""
    bomb = mutate(body(frames=sample_frames(8)), d0__frames=4_000_000)
    assert len(bomb) < 400
    start = time.perf_counter()
    with pytest.raises(BatchError, match="declares over"):
        decode(bomb)
    assert time.perf_counter() - start < 0.5


@given(st.binary(max_size=2048))
def test_random_bodies_raise_only_batch_error(raw: bytes) -> None:
    """Anything but a BatchError (or a clean decode) fails the test."""
    with contextlib.suppress(BatchError):
        decode(raw)


VALID = body(frames=sample_frames(60))


@given(st.data())
def test_mutated_bodies_raise_only_batch_error(data: st.DataObject) -> None:
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.integers(0, 3))
        i = data.draw(st.integers(0, len(raw) - 1)) if raw else 0
        if op == 0 and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == 1:
            del raw[i : i + data.draw(st.integers(1, 16))]
        elif op == 2:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        batch = decode(bytes(raw))
    except BatchError:
        return
    for frame in batch.frames:
        assert len(frame.values) == len(batch.schemas[frame.device_id].fields)
