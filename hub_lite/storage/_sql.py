"""What the SQL backends share: column lists, row <-> record conversion, and the reads
that are the same statement on SQLite and PostgreSQL (written with ``?`` placeholders; a
backend names its own)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from cloud_sync import Loss, NodeStatus
from cloud_sync.rollup import DAY_MS

from .base import BlockRecord, CompletenessRecord, DeviceRecord, NodeRecord, Storage

__all__ = (
    "BLOCK_COLS",
    "DEVICE_COLS",
    "NODE_COLS",
    "SqlStorage",
    "block_from_row",
    "block_to_row",
    "completeness_from_row",
    "device_from_row",
    "device_to_row",
    "loss_rows",
    "node_from_row",
)

BLOCK_COLS = (
    "node_id, device_id, batch_id, schema_digest, first_ts_ms, last_ts_ms, first_seq, last_seq,"
    " frames, chain_from, key_batch, chain_len, packed, data"
)
DEVICE_COLS = (
    "node_id, device_id, schema_digest, kind, model, last_ts_ms, last_seq, latest, held,"
    " frames, n_values, wire_bytes, json_bytes"
)
NODE_COLS = (
    "node_id, public_key, added_ms, last_seen_ms, last_batch_id, status, drift_ms, batches,"
    " body_bytes"
)


def block_from_row(row: Sequence[Any]) -> BlockRecord:
    return BlockRecord(
        node_id=row[0],
        device_id=row[1],
        batch_id=row[2],
        schema_digest=bytes(row[3]),
        first_ts_ms=row[4],
        last_ts_ms=row[5],
        first_seq=row[6],
        last_seq=row[7],
        frames=row[8],
        chain_from=row[9],
        key_batch=row[10],
        chain_len=row[11],
        packed=bool(row[12]),
        data=bytes(row[13]),
    )


def block_to_row(r: BlockRecord) -> tuple[Any, ...]:
    return (
        r.node_id,
        r.device_id,
        r.batch_id,
        r.schema_digest,
        r.first_ts_ms,
        r.last_ts_ms,
        r.first_seq,
        r.last_seq,
        r.frames,
        r.chain_from,
        r.key_batch,
        r.chain_len,
        r.packed,
        r.data,
    )


def device_from_row(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        node_id=row[0],
        device_id=row[1],
        schema_digest=bytes(row[2]),
        kind=row[3],
        model=row[4],
        last_ts_ms=row[5],
        last_seq=row[6],
        latest=None if row[7] is None else bytes(row[7]),
        held=bytes(row[8]),
        frames=row[9],
        values=row[10],
        wire_bytes=row[11],
        json_bytes=row[12],
    )


def device_to_row(d: DeviceRecord) -> tuple[Any, ...]:
    return (
        d.node_id,
        d.device_id,
        d.schema_digest,
        d.kind,
        d.model,
        d.last_ts_ms,
        d.last_seq,
        d.latest,
        d.held,
        d.frames,
        d.values,
        d.wire_bytes,
        d.json_bytes,
    )


def node_from_row(row: Sequence[Any]) -> NodeRecord:
    return NodeRecord(
        node_id=row[0],
        public_key=bytes(row[1]),
        added_ms=row[2],
        last_seen_ms=row[3],
        last_batch_id=row[4],
        status=None if row[5] is None else msgspec.json.decode(row[5], type=NodeStatus),
        drift_ms=row[6],
        batches=row[7],
        body_bytes=row[8],
    )


def completeness_from_row(row: Sequence[Any]) -> CompletenessRecord:
    return CompletenessRecord(
        device_id=row[0],
        day_ms=row[1],
        live=row[2],
        backfill=row[3],
        evicted=row[4],
        rejected=row[5],
        gaps=row[6],
    )


def loss_rows(node_id: str, losses: Iterable[Loss]) -> list[tuple[Any, ...]]:
    return [
        (node_id, x.device_id, x.day_ms // DAY_MS * DAY_MS, x.evicted, x.rejected, x.gaps)
        for x in losses
    ]


class SqlStorage(Storage):
    """Reads written once for both SQL backends."""

    placeholder = "?"

    @abc.abstractmethod
    async def _all(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read outside any transaction; StorageError when the database fails."""

    def _sql(self, query: str) -> str:
        return query if self.placeholder == "?" else query.replace("?", self.placeholder)

    async def node_key(self, node_id: str) -> bytes | None:
        rows = await self._all(
            self._sql("SELECT public_key FROM nodes WHERE node_id = ?"), (node_id,)
        )
        return bytes(rows[0][0]) if rows else None

    async def nodes(self) -> list[NodeRecord]:
        rows = await self._all(f"SELECT {NODE_COLS} FROM nodes ORDER BY node_id")
        return [node_from_row(r) for r in rows]

    async def node(self, node_id: str) -> NodeRecord | None:
        rows = await self._all(
            self._sql(f"SELECT {NODE_COLS} FROM nodes WHERE node_id = ?"), (node_id,)
        )
        return node_from_row(rows[0]) if rows else None

    async def devices(self, node_id: str) -> list[DeviceRecord]:
        rows = await self._all(
            self._sql(f"SELECT {DEVICE_COLS} FROM devices WHERE node_id = ? ORDER BY device_id"),
            (node_id,),
        )
        return [device_from_row(r) for r in rows]

    async def block(self, node_id: str, device_id: str, batch_id: int) -> BlockRecord | None:
        rows = await self._all(
            self._sql(
                f"SELECT {BLOCK_COLS} FROM blocks WHERE node_id = ? AND device_id = ?"
                " AND batch_id = ?"
            ),
            (node_id, device_id, batch_id),
        )
        return block_from_row(rows[0]) if rows else None

    async def rollups(
        self, node_id: str, device_id: str, res_ms: int, start_ms: int, end_ms: int
    ) -> list[tuple[int, bytes, bytes]]:
        rows = await self._all(
            self._sql(
                "SELECT bucket_ms, schema_digest, stats FROM rollups WHERE node_id = ?"
                " AND device_id = ? AND res_ms = ? AND bucket_ms >= ? AND bucket_ms < ?"
                " ORDER BY bucket_ms"
            ),
            (node_id, device_id, res_ms, start_ms, end_ms),
        )
        return [(b, bytes(d), bytes(s)) for b, d, s in rows]

    async def completeness(self, node_id: str, day_ms: int) -> list[CompletenessRecord]:
        rows = await self._all(
            self._sql(
                "SELECT device_id, day_ms, live, backfill, evicted, rejected, gaps"
                " FROM completeness WHERE node_id = ? AND day_ms = ? ORDER BY device_id"
            ),
            (node_id, day_ms),
        )
        return [completeness_from_row(r) for r in rows]
