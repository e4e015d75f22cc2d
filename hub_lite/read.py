"""Reading stored frames back: blocks decoded along their chains by the codec that stored them."""

from __future__ import annotations

import predictor_ext
from cloud_sync import BatchError, DeviceSchema, Frame
from cloud_sync.batch import Columns

from .blocks import decode_stored
from .storage import BlockRecord, Storage

__all__ = ("read_columns", "read_frames")


async def read_columns(
    storage: Storage, node_id: str, device_id: str, start_ms: int, end_ms: int
) -> list[Columns]:
    """The device's blocks with frames in [start_ms, end_ms), decoded (whole blocks, in batch
    order; chained blocks decoded from their keyframes)."""
    blocks = await storage.blocks(node_id, device_id, start_ms, end_ms)
    schemas: dict[bytes, DeviceSchema] = await storage.schemas(
        sorted({b.schema_digest for b in blocks})
    )
    states: dict[int, bytearray] = {}
    out: list[Columns] = []
    for b in blocks:
        schema = schemas.get(b.schema_digest)
        if schema is None:
            raise BatchError(f"{node_id}/{device_id}: block {b.batch_id} has no stored schema")
        cols = _decode(b, schema, states)
        if cols is not None and b.last_ts_ms >= start_ms and b.first_ts_ms < end_ms:
            out.append(cols)
    return out


def _decode(b: BlockRecord, schema: DeviceSchema, states: dict[int, bytearray]) -> Columns | None:
    if b.chain_from and not b.packed:
        prev = states.get(b.chain_from)
        if prev is None:
            return None  # its chain begins before what is kept (should not happen: whole days)
        state = bytearray(prev)
    else:
        state = predictor_ext.new_state(len(schema.fields))
    cols = decode_stored(b, schema, state)
    states[b.batch_id] = state
    return cols


async def read_frames(
    storage: Storage, node_id: str, device_id: str, start_ms: int, end_ms: int
) -> list[Frame]:
    """The device's frames with timestamps in [start_ms, end_ms), ordered by (ts, seq)."""
    out: list[Frame] = []
    for cols in await read_columns(storage, node_id, device_id, start_ms, end_ms):
        out.extend(f for f in cols.frames() if start_ms <= f.ts_ms < end_ms)
    out.sort(key=lambda f: (f.ts_ms, f.seq))
    return out
