"""What the SQL backends share: column lists, row <-> record conversion, and the reads
that are the same statement on SQLite and PostgreSQL (written with ``?`` placeholders; a
backend names its own)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

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
    "columns",
    "completeness_from_row",
    "device_from_row",
    "device_to_row",
    "from_row",
    "loss_rows",
    "node_from_row",
    "to_row",
)

_COLUMN = {"values": "n_values"}
"""Record fields whose column has another name (``values`` is an SQL keyword)."""

_R = TypeVar("_R", bound=msgspec.Struct)


def columns(record: type[msgspec.Struct]) -> str:
    """The record's columns, in its fields' order (the order rows are read and written in)."""
    return ", ".join(_COLUMN.get(f, f) for f in record.__struct_fields__)


BLOCK_COLS = columns(BlockRecord)
DEVICE_COLS = columns(DeviceRecord)
NODE_COLS = columns(NodeRecord)


def to_row(rec: msgspec.Struct) -> tuple[Any, ...]:
    """A record as the values of its columns (a node's status as JSON)."""
    return tuple(
        msgspec.json.encode(v) if isinstance(v, NodeStatus) else v
        for v in msgspec.structs.astuple(rec)
    )


def from_row(record: type[_R], row: Sequence[Any]) -> _R:
    """A record from a row of its columns: blobs as bytes, flags as bool, status decoded."""
    fields: dict[str, Any] = {}
    for name, v in zip(record.__struct_fields__, row, strict=True):
        fields[name] = bytes(v) if isinstance(v, memoryview) else v
    if fields.get("status") is not None:
        fields["status"] = msgspec.json.decode(fields["status"], type=NodeStatus)
    if "packed" in fields:
        fields["packed"] = bool(fields["packed"])
    return record(**fields)


def block_from_row(row: Sequence[Any]) -> BlockRecord:
    return from_row(BlockRecord, row)


def device_from_row(row: Sequence[Any]) -> DeviceRecord:
    return from_row(DeviceRecord, row)


def node_from_row(row: Sequence[Any]) -> NodeRecord:
    return from_row(NodeRecord, row)


def completeness_from_row(row: Sequence[Any]) -> CompletenessRecord:
    return from_row(CompletenessRecord, row)


block_to_row = to_row
device_to_row = to_row


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
