"""The batch codec: frames <-> one protobuf upload body, compressed by predictor_ext.

``encode`` groups frames by device and codes each device's rows as one block; ``decode`` turns
any body back into frames or raises ``BatchError``, the one exception type for bad input.
Decoding is bounded: the body size and the number of values it may declare are capped before
anything is allocated, and every loop is bounded by those declared counts.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Container, Iterable, Mapping, Sequence

import msgspec
from google.protobuf.message import DecodeError

import predictor_ext
from proto import telemetry_pb2 as pb

from .model import DeviceSchema, Field, Frame, Model

__all__ = (
    "MAX_BODY_BYTES",
    "MAX_FIELDS",
    "MAX_VALUES",
    "WIRE_VERSION",
    "Batch",
    "BatchError",
    "UnknownSchemaError",
    "decode",
    "encode",
)

WIRE_VERSION = 1
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_VALUES = 2_000_000  # per batch, timestamps and sequence numbers included
MAX_FIELDS = 4096  # per device schema
_MODEL_TO_PB = {"level": pb.LEVEL, "trend": pb.TREND}
_PB_TO_MODEL: dict[int, Model] = {pb.LEVEL: "level", pb.TREND: "trend"}


class BatchError(ValueError):
    """An upload body is corrupt, truncated, hostile or of an unknown version.

    Raised by ``decode`` for every bad input; nothing partial is ever returned.
    """


class UnknownSchemaError(BatchError):
    """The body names device schemas by hash that the receiver does not hold.

    ``hashes`` lists them; the sender should send the batch again with those schemas whole.
    """

    def __init__(self, hashes: Sequence[bytes]) -> None:
        self.hashes = tuple(hashes)
        super().__init__("unknown device schema(s): " + ", ".join(h.hex() for h in self.hashes))


class Batch(msgspec.Struct, frozen=True):
    """A decoded upload: who sent it, and its frames with the schemas they follow."""

    node_id: str
    batch_id: int
    created_ms: int
    frames: list[Frame]
    schemas: dict[str, DeviceSchema]


def _alpha_q(x: float) -> int:
    return round(x * predictor_ext.ALPHA_ONE)


def _schema_to_pb(schema: DeviceSchema, out: pb.DeviceSchema) -> None:
    out.kind = schema.kind
    out.model = schema.model
    for f in schema.fields:
        out.fields.add(
            name=f.name,
            unit=f.unit,
            tolerance=f.tol,
            model=_MODEL_TO_PB[f.model],
            alpha=_alpha_q(f.alpha),
            beta=_alpha_q(f.beta),
        )


def _schema_from_pb(msg: pb.DeviceSchema) -> DeviceSchema:
    if len(msg.fields) > MAX_FIELDS:
        raise BatchError(f"schema {msg.model!r} has {len(msg.fields)} fields, over {MAX_FIELDS}")
    one = predictor_ext.ALPHA_ONE
    try:
        fields = tuple(
            Field(
                name=f.name,
                unit=f.unit,
                tol=f.tolerance,
                model=_PB_TO_MODEL[f.model],
                alpha=f.alpha / one,
                beta=f.beta / one,
            )
            for f in msg.fields
        )
        return DeviceSchema(kind=msg.kind, model=msg.model, fields=fields)
    except (KeyError, ValueError) as exc:
        raise BatchError(f"invalid schema for model {msg.model!r}: {exc}") from exc


def _params(schema: DeviceSchema) -> tuple[list[float], list[int], list[int], list[int]]:
    fields = schema.fields
    return (
        [f.tol for f in fields],
        [predictor_ext.TREND if f.model == "trend" else predictor_ext.LEVEL for f in fields],
        [_alpha_q(f.alpha) for f in fields],
        [_alpha_q(f.beta) for f in fields],
    )


def _flat_columns(rows: Sequence[Frame], nf: int) -> array[float]:
    """The rows' values column-major in one float64 buffer; None becomes MISSING."""
    out = array("d")
    missing = predictor_ext.MISSING
    for col in zip(*(r.values for r in rows), strict=True):
        start = len(out)
        try:
            out.extend(col)
        except TypeError:  # a None in the column; extend() may have taken a prefix
            del out[start:]
            out.extend([missing if v is None else v for v in col])
    assert len(out) == nf * len(rows)
    return out


def encode(
    frames: Iterable[Frame],
    schemas: Mapping[str, DeviceSchema],
    *,
    node_id: str,
    batch_id: int,
    created_ms: int,
    known_schemas: Container[bytes] = frozenset(),
) -> bytes:
    """Encode frames into one upload body.

    ``schemas`` maps each device id to its schema; a schema whose digest is in
    ``known_schemas`` (the receiver holds it) travels by reference, any other whole.
    Raises ValueError for frames that do not fit their schema.
    """
    by_device: dict[str, list[Frame]] = {}
    for frame in frames:
        by_device.setdefault(frame.device_id, []).append(frame)
    msg = pb.Batch(version=WIRE_VERSION, node_id=node_id, batch_id=batch_id, created_ms=created_ms)
    for device_id, rows in by_device.items():
        schema = schemas.get(device_id)
        if schema is None:
            raise ValueError(f"no schema for device {device_id!r}")
        nf = len(schema.fields)
        for row in rows:
            if len(row.values) != nf:
                raise ValueError(
                    f"device {device_id!r}: frame seq {row.seq} has {len(row.values)} values, "
                    f"schema has {nf} fields"
                )
        ts = array("q", [r.ts_ms for r in rows])
        seqs = array("q", [r.seq for r in rows])
        values = _flat_columns(rows, nf)
        tols, kinds, alphas, betas = _params(schema)
        data = predictor_ext.encode_block(ts, seqs, values, tols, kinds, alphas, betas)
        block = msg.devices.add(
            device_id=device_id, frames=len(rows), first_ts_ms=ts[0], first_seq=seqs[0], data=data
        )
        digest = schema.digest()
        if digest in known_schemas:
            block.schema_hash = digest
        else:
            _schema_to_pb(schema, block.schema)
    out: bytes = msg.SerializeToString()
    return out


def decode(
    body: bytes,
    schemas: Mapping[bytes, DeviceSchema] | None = None,
    *,
    max_bytes: int = MAX_BODY_BYTES,
    max_values: int = MAX_VALUES,
) -> Batch:
    """Decode an upload body; ``schemas`` maps digests to schemas the receiver already holds.

    Raises BatchError for anything that is not a valid batch, and UnknownSchemaError (a
    BatchError) when the body names schemas by a digest that ``schemas`` lacks.
    """
    if len(body) > max_bytes:
        raise BatchError(f"body of {len(body)} bytes is over the limit of {max_bytes}")
    msg = pb.Batch()
    try:
        msg.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BatchError(f"not a protobuf Batch: {exc}") from exc
    if msg.version != WIRE_VERSION:
        raise BatchError(f"unknown wire format version {msg.version} (this side reads 1)")
    known = schemas or {}
    resolved: list[DeviceSchema] = []
    missing: list[bytes] = []
    total = 0
    seen: set[str] = set()
    for block in msg.devices:
        if not block.device_id:
            raise BatchError("a device block has no device id")
        if block.device_id in seen:
            raise BatchError(f"device {block.device_id!r} appears twice")
        seen.add(block.device_id)
        which = block.WhichOneof("schema_ref")
        if which == "schema":
            schema = _schema_from_pb(block.schema)
        elif which == "schema_hash":
            held = known.get(block.schema_hash)
            if held is None:
                missing.append(block.schema_hash)
                continue
            schema = held
        else:
            raise BatchError(f"device {block.device_id!r} carries no schema")
        total += block.frames * (len(schema.fields) + 2)
        if total > max_values:
            raise BatchError(f"batch declares over {max_values} values")
        resolved.append(schema)
    if missing:
        raise UnknownSchemaError(missing)

    frames: list[Frame] = []
    by_device: dict[str, DeviceSchema] = {}
    for block, schema in zip(msg.devices, resolved, strict=True):
        by_device[block.device_id] = schema
        frames.extend(_decode_block(block, schema))
    return Batch(
        node_id=msg.node_id,
        batch_id=msg.batch_id,
        created_ms=msg.created_ms,
        frames=frames,
        schemas=by_device,
    )


def _decode_block(block: pb.DeviceBlock, schema: DeviceSchema) -> list[Frame]:
    n = block.frames
    nf = len(schema.fields)
    if n == 0:
        if block.data:
            raise BatchError(f"device {block.device_id!r}: data for zero frames")
        return []
    ts = array("q", bytes(8 * n))
    seqs = array("q", bytes(8 * n))
    flat = array("d", bytes(8 * n * nf))
    tols, kinds, alphas, betas = _params(schema)
    try:
        predictor_ext.decode_block(
            block.data,
            n,
            block.first_ts_ms,
            block.first_seq,
            tols,
            kinds,
            alphas,
            betas,
            ts,
            seqs,
            flat,
        )
    except (predictor_ext.CodecError, ValueError, OverflowError) as exc:
        raise BatchError(f"device {block.device_id!r}: {exc}") from exc
    values: list[list[float | None]] = [list(flat[j * n : (j + 1) * n]) for j in range(nf)]
    for col in values:
        for i, v in enumerate(col):
            if v != v and _is_missing(v):  # noqa: PLR0124 - NaN check
                col[i] = None
    dev = block.device_id
    if nf == 0:
        return [Frame(dev, ts[i], seqs[i], ()) for i in range(n)]
    return [
        Frame(dev, t, s, row) for t, s, row in zip(ts, seqs, zip(*values, strict=True), strict=True)
    ]


def _is_missing(v: float | None) -> bool:
    return v is not None and math.isnan(v) and _bits(v) == predictor_ext.MISSING_BITS


def _bits(v: float) -> int:
    return int.from_bytes(array("d", [v]).tobytes(), "little")
