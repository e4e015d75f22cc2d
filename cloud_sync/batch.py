"""The batch codec: frames <-> one protobuf upload body, compressed by predictor_ext.

``encode`` groups frames by device and codes each device's rows as one block, a keyframe or,
given the state a previous block ended with, a chained block. A receiver ``parse``s a body
(header, status and block headers; schemas resolved), then ``decode_columns`` each block with
the state it holds for a chained one; ``decode`` does both for bodies of keyframes. Every bad
input raises ``BatchError``. Decoding is bounded: the body size and the number of values it may
declare are capped before anything is allocated, and every loop is bounded by those counts.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Container, Iterable, Mapping, Sequence

import msgspec
from google.protobuf.message import DecodeError

import predictor_ext
from proto import telemetry_pb2 as pb

from .model import DeviceHealth, DeviceSchema, Field, Frame, Loss, Model, NodeStatus

__all__ = (
    "MAX_BODY_BYTES",
    "MAX_FIELDS",
    "MAX_VALUES",
    "READABLE_VERSIONS",
    "WIRE_VERSION",
    "Batch",
    "BatchError",
    "BlockHeader",
    "ChainError",
    "Columns",
    "Parsed",
    "UnknownSchemaError",
    "check_id",
    "decode",
    "decode_columns",
    "encode",
    "parse",
)

WIRE_VERSION = 2
READABLE_VERSIONS = (1, 2)
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


class ChainError(BatchError):
    """Chained blocks arrived for devices whose predecessor state the receiver does not hold.

    ``device_ids`` lists them; the sender should send those frames again as keyframes.
    """

    def __init__(self, device_ids: Sequence[str]) -> None:
        self.device_ids = tuple(device_ids)
        super().__init__(
            "no state to continue for device(s) " + ", ".join(repr(d) for d in self.device_ids)
        )


class Batch(msgspec.Struct, frozen=True):
    """A decoded upload: who sent it, and its frames with the schemas they follow."""

    node_id: str
    batch_id: int
    created_ms: int
    frames: list[Frame]
    schemas: dict[str, DeviceSchema]
    status: NodeStatus | None = None


MAX_ID_CHARS = 128


def check_id(value: str, what: str) -> None:
    """Raise BatchError for an empty, overlong or non-printable node or device id."""
    if not value:
        raise BatchError(f"empty {what}")
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise BatchError(f"{what} {value[:40]!r} is over {MAX_ID_CHARS} characters or unprintable")


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


class BlockHeader(msgspec.Struct):
    """One device block of a parsed body, not yet decoded.

    ``schema`` is None for a chained block: it follows its predecessor's schema.
    """

    device_id: str
    frames: int
    first_ts_ms: int
    first_seq: int
    chain_from: int
    data: bytes
    schema: DeviceSchema | None
    schema_digest: bytes | None


class Parsed(msgspec.Struct):
    """A body's header, the node's status and its blocks, schemas resolved, nothing decoded."""

    version: int
    node_id: str
    batch_id: int
    created_ms: int
    status: NodeStatus | None
    blocks: list[BlockHeader]
    declared_values: int
    """Values the keyframe blocks declare (timestamps and sequence numbers included)."""


class Columns(msgspec.Struct):
    """One decoded block: int64 timestamps and sequence numbers, float64 values column-major
    (field j at ``values[j * n:(j + 1) * n]``, MISSING for missing), as the codec keeps them."""

    device_id: str
    schema: DeviceSchema
    ts: array[int]
    seqs: array[int]
    values: array[float]

    @property
    def n(self) -> int:
        return len(self.ts)

    def frames(self) -> list[Frame]:
        return _frames(self.device_id, self.ts, self.seqs, self.values, len(self.schema.fields))


def encode(
    frames: Iterable[Frame],
    schemas: Mapping[str, DeviceSchema],
    *,
    node_id: str,
    batch_id: int,
    created_ms: int,
    known_schemas: Container[bytes] = frozenset(),
    chains: Mapping[str, tuple[int, bytes | bytearray]] | None = None,
    states_out: dict[str, bytearray] | None = None,
    status: NodeStatus | None = None,
) -> bytes:
    """Encode frames (and the node's status) into one upload body.

    ``schemas`` maps each device id to its schema; a schema whose digest is in
    ``known_schemas`` (the receiver holds it) travels by reference, any other whole.
    ``chains`` maps a device id to (batch id, state): its block continues the state that
    device's block in that batch ended with (the caller's state is not changed). Every other
    block is a keyframe. ``states_out``, when given, receives each device's end state, from
    which a later batch may continue once the receiver confirms it holds it.
    Raises ValueError for frames that do not fit their schema.
    """
    by_device: dict[str, list[Frame]] = {}
    for frame in frames:
        by_device.setdefault(frame.device_id, []).append(frame)
    msg = pb.Batch(version=WIRE_VERSION, node_id=node_id, batch_id=batch_id, created_ms=created_ms)
    if status is not None:
        _status_to_pb(status, msg.status)
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
        chain = chains.get(device_id) if chains else None
        state = bytearray(chain[1]) if chain else predictor_ext.new_state(nf)
        data = predictor_ext.encode_block(ts, seqs, values, tols, kinds, alphas, betas, state=state)
        if states_out is not None:
            states_out[device_id] = state
        block = msg.devices.add(device_id=device_id, frames=len(rows), data=data)
        if chain:
            block.chain_from = chain[0]
            continue
        block.first_ts_ms = ts[0]
        block.first_seq = seqs[0]
        digest = schema.digest()
        if digest in known_schemas:
            block.schema_hash = digest
        else:
            _schema_to_pb(schema, block.schema)
    out: bytes = msg.SerializeToString()
    return out


def parse(
    body: bytes,
    schemas: Mapping[bytes, DeviceSchema] | None = None,
    *,
    max_bytes: int = MAX_BODY_BYTES,
    max_values: int = MAX_VALUES,
) -> Parsed:
    """Parse an upload body without decoding its blocks; ``schemas`` maps digests to schemas
    the receiver already holds.

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
    if msg.version not in READABLE_VERSIONS:
        raise BatchError(
            f"unknown wire format version {msg.version} (this side reads "
            + ", ".join(map(str, READABLE_VERSIONS))
            + ")"
        )
    known = schemas or {}
    blocks: list[BlockHeader] = []
    missing: list[bytes] = []
    total = 0
    seen: set[str] = set()
    for block in msg.devices:
        check_id(block.device_id, "device id")
        if block.device_id in seen:
            raise BatchError(f"device {block.device_id!r} appears twice")
        seen.add(block.device_id)
        if block.frames == 0:
            raise BatchError(f"device {block.device_id!r}: a block of zero frames")
        which = block.WhichOneof("schema_ref")
        schema: DeviceSchema | None = None
        digest: bytes | None = None
        if block.chain_from:
            if msg.version < 2:
                raise BatchError(f"device {block.device_id!r}: a chained block in version 1")
            if which is not None:
                raise BatchError(f"device {block.device_id!r}: a chained block carries a schema")
        elif which == "schema":
            schema = _schema_from_pb(block.schema)
            digest = schema.digest()
        elif which == "schema_hash":
            digest = bytes(block.schema_hash)
            schema = known.get(digest)
            if schema is None:
                missing.append(digest)
                continue
        else:
            raise BatchError(f"device {block.device_id!r} carries no schema")
        if schema is not None:
            total += block.frames * (len(schema.fields) + 2)
            if total > max_values:
                raise BatchError(f"batch declares over {max_values} values")
        blocks.append(
            BlockHeader(
                device_id=block.device_id,
                frames=block.frames,
                first_ts_ms=block.first_ts_ms,
                first_seq=block.first_seq,
                chain_from=block.chain_from,
                data=block.data,
                schema=schema,
                schema_digest=digest,
            )
        )
    if missing:
        raise UnknownSchemaError(missing)
    return Parsed(
        version=msg.version,
        node_id=msg.node_id,
        batch_id=msg.batch_id,
        created_ms=msg.created_ms,
        status=_status_from_pb(msg.status) if msg.HasField("status") else None,
        blocks=blocks,
        declared_values=total,
    )


def decode_columns(
    block: BlockHeader,
    schema: DeviceSchema,
    state: bytearray | None = None,
    *,
    max_values: int = MAX_VALUES,
) -> Columns:
    """Decode one block. A chained block needs the ``state`` its predecessor ended with (and
    the predecessor's schema); a keyframe may take a fresh state to receive its end state.
    ``state`` is updated in place only when the block decodes. Raises BatchError."""
    n = block.frames
    nf = len(schema.fields)
    if n * (nf + 2) > max_values:
        raise BatchError(f"device {block.device_id!r}: block declares over {max_values} values")
    if block.chain_from and state is None:
        raise ChainError([block.device_id])
    ts = array("q", bytes(8 * n))
    seqs = array("q", bytes(8 * n))
    flat = array("d", bytes(8 * n * nf))
    tols, kinds, alphas, betas = _params(schema)
    try:
        predictor_ext.decode_block(
            block.data,
            n,
            0 if block.chain_from else block.first_ts_ms,
            0 if block.chain_from else block.first_seq,
            tols,
            kinds,
            alphas,
            betas,
            ts,
            seqs,
            flat,
            state=state,
        )
    except (predictor_ext.CodecError, ValueError, OverflowError) as exc:
        raise BatchError(f"device {block.device_id!r}: {exc}") from exc
    return Columns(block.device_id, schema, ts, seqs, flat)


def decode(
    body: bytes,
    schemas: Mapping[bytes, DeviceSchema] | None = None,
    *,
    max_bytes: int = MAX_BODY_BYTES,
    max_values: int = MAX_VALUES,
) -> Batch:
    """Decode a body of keyframe blocks into frames; ``schemas`` maps digests to schemas the
    receiver already holds.

    Raises BatchError for anything that is not a valid batch, UnknownSchemaError (a
    BatchError) when the body names schemas by a digest that ``schemas`` lacks, and
    ChainError (a BatchError) when it holds chained blocks.
    """
    parsed = parse(body, schemas, max_bytes=max_bytes, max_values=max_values)
    chained = [b.device_id for b in parsed.blocks if b.schema is None]
    if chained:
        raise ChainError(chained)
    frames: list[Frame] = []
    by_device: dict[str, DeviceSchema] = {}
    for block in parsed.blocks:
        assert block.schema is not None
        by_device[block.device_id] = block.schema
        frames.extend(decode_columns(block, block.schema).frames())
    return Batch(
        node_id=parsed.node_id,
        batch_id=parsed.batch_id,
        created_ms=parsed.created_ms,
        frames=frames,
        schemas=by_device,
        status=parsed.status,
    )


def _frames(dev: str, ts: array[int], seqs: array[int], flat: array[float], nf: int) -> list[Frame]:
    n = len(ts)
    values: list[list[float | None]] = [list(flat[j * n : (j + 1) * n]) for j in range(nf)]
    for col in values:
        for i, v in enumerate(col):
            if v != v and _is_missing(v):  # noqa: PLR0124 - NaN check
                col[i] = None
    if nf == 0:
        return [Frame(dev, ts[i], seqs[i], ()) for i in range(n)]
    return [
        Frame(dev, t, s, row) for t, s, row in zip(ts, seqs, zip(*values, strict=True), strict=True)
    ]


def _is_missing(v: float | None) -> bool:
    return v is not None and math.isnan(v) and _bits(v) == predictor_ext.MISSING_BITS


def _bits(v: float) -> int:
    return int.from_bytes(array("d", [v]).tobytes(), "little")


def _opt(v: int) -> int | None:
    return v or None


def _status_to_pb(st: NodeStatus, out: pb.NodeStatus) -> None:
    out.software_version = st.software_version
    out.boot_ms = st.boot_ms or 0
    out.started_ms = st.started_ms or 0
    out.backlog_frames = st.backlog_frames
    out.backlog_oldest_ms = st.backlog_oldest_ms or 0
    out.disk_free_bytes = st.disk_free_bytes or 0
    out.drift_ms = st.drift_ms or 0
    for d in st.devices:
        out.devices.add(
            device_id=d.device_id,
            online=d.online,
            last_seen_ms=d.last_seen_ms or 0,
            errors=d.errors,
            timeouts=d.timeouts,
            last_error=d.last_error or "",
        )
    for loss in st.losses:
        out.losses.add(
            device_id=loss.device_id,
            day_ms=loss.day_ms,
            evicted=loss.evicted,
            rejected=loss.rejected,
            gaps=loss.gaps,
        )


def _status_from_pb(msg: pb.NodeStatus) -> NodeStatus:
    if len(msg.devices) > MAX_FIELDS or len(msg.losses) > 64 * MAX_FIELDS:
        raise BatchError("node status lists too many devices or losses")
    try:
        return NodeStatus(
            software_version=msg.software_version,
            boot_ms=_opt(msg.boot_ms),
            started_ms=_opt(msg.started_ms),
            backlog_frames=msg.backlog_frames,
            backlog_oldest_ms=_opt(msg.backlog_oldest_ms),
            disk_free_bytes=_opt(msg.disk_free_bytes),
            drift_ms=_opt(msg.drift_ms),
            devices=tuple(
                DeviceHealth(
                    device_id=d.device_id,
                    online=d.online,
                    last_seen_ms=_opt(d.last_seen_ms),
                    errors=d.errors,
                    timeouts=d.timeouts,
                    last_error=d.last_error or None,
                )
                for d in msg.devices
            ),
            losses=tuple(
                Loss(
                    device_id=x.device_id,
                    day_ms=x.day_ms,
                    evicted=x.evicted,
                    rejected=x.rejected,
                    gaps=x.gaps,
                )
                for x in msg.losses
            ),
        )
    except (TypeError, ValueError) as exc:
        raise BatchError(f"invalid node status: {exc}") from exc
