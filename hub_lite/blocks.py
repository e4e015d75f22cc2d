"""Stored blocks back into columns: coded blocks decoded along their chain (the ingest's chain
rebuild and every read use this), packed blocks unpacked."""

from __future__ import annotations

from array import array

from cloud_sync import DeviceSchema
from cloud_sync.batch import BlockHeader, Columns, decode_columns

from .storage import BlockRecord

__all__ = ("decode_stored", "pack_columns", "unpack_columns")


def decode_stored(b: BlockRecord, schema: DeviceSchema, state: bytearray) -> Columns:
    """Decode a stored block: ``state`` is a fresh state for a keyframe, else the state its
    predecessor ended with; it is left at this block's end state. A packed block leaves the
    state alone (it ends its chain). Raises BatchError for a block that does not decode."""
    if b.packed:
        ts, seqs, values = unpack_columns(b.data, len(schema.fields))
        return Columns(b.device_id, schema, ts, seqs, values)
    header = BlockHeader(
        device_id=b.device_id,
        frames=b.frames,
        first_ts_ms=b.first_ts_ms,
        first_seq=b.first_seq,
        chain_from=b.chain_from,
        data=b.data,
        schema=schema if b.chain_from == 0 else None,
        schema_digest=b.schema_digest,
    )
    return decode_columns(header, schema, state)


def pack_columns(ts: array[int], seqs: array[int], values: array[float]) -> bytes:
    """Frames packed losslessly: n, then ts, seqs and the column-major values, raw."""
    return array("q", [len(ts)]).tobytes() + ts.tobytes() + seqs.tobytes() + values.tobytes()


def unpack_columns(data: bytes, nf: int) -> tuple[array[int], array[int], array[float]]:
    head = array("q", data[:8])
    n = head[0]
    ts = array("q", data[8 : 8 + 8 * n])
    seqs = array("q", data[8 + 8 * n : 8 + 16 * n])
    values = array("d", data[8 + 16 * n :])
    if len(values) != n * nf:
        raise ValueError("a packed block does not match its schema")
    return ts, seqs, values
