"""The embedded hub database: SQLite in WAL mode, one writer connection, one reader.

Transactions are ``BEGIN IMMEDIATE`` on the writer, one at a time (an asyncio lock), and
``synchronous=FULL``: an acknowledged batch survives a power cut, since the node forgets what
the hub acknowledged. Reads use their own connection and see only committed data.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from cloud_sync import DeviceSchema, Loss, NodeStatus
from cloud_sync.rollup import DAY_MS

from ._sql import (
    BLOCK_COLS,
    DEVICE_COLS,
    SqlStorage,
    block_from_row,
    block_to_row,
    device_from_row,
    device_to_row,
    loss_rows,
)
from .base import BlockRecord, DeviceRecord, StorageError, Tx

__all__ = ("SqliteStorage",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    added_ms INTEGER NOT NULL,
    last_seen_ms INTEGER,
    last_batch_id INTEGER,
    status BLOB,
    drift_ms INTEGER,
    batches INTEGER NOT NULL DEFAULT 0,
    body_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batches (
    node_id TEXT NOT NULL,
    batch_id INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    body_bytes INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    PRIMARY KEY (node_id, batch_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS schemas (
    digest BLOB PRIMARY KEY,
    body BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    node_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    schema_digest BLOB NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    last_ts_ms INTEGER,
    last_seq INTEGER,
    latest BLOB,
    held BLOB NOT NULL,
    frames INTEGER NOT NULL,
    n_values INTEGER NOT NULL,
    wire_bytes INTEGER NOT NULL,
    json_bytes INTEGER NOT NULL,
    PRIMARY KEY (node_id, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (
    node_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    batch_id INTEGER NOT NULL,
    schema_digest BLOB NOT NULL,
    first_ts_ms INTEGER NOT NULL,
    last_ts_ms INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    chain_from INTEGER NOT NULL,
    key_batch INTEGER NOT NULL,
    chain_len INTEGER NOT NULL,
    packed INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (node_id, device_id, batch_id)
);
CREATE INDEX IF NOT EXISTS blocks_by_time ON blocks (node_id, device_id, first_ts_ms);
CREATE TABLE IF NOT EXISTS rollups (
    node_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    res_ms INTEGER NOT NULL,
    bucket_ms INTEGER NOT NULL,
    schema_digest BLOB NOT NULL,
    stats BLOB NOT NULL,
    PRIMARY KEY (node_id, device_id, res_ms, bucket_ms, schema_digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS completeness (
    node_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    day_ms INTEGER NOT NULL,
    live INTEGER NOT NULL DEFAULT 0,
    backfill INTEGER NOT NULL DEFAULT 0,
    evicted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    gaps INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (node_id, device_id, day_ms)
) WITHOUT ROWID;
"""


class _SqliteTx(Tx):
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def claim_batch(
        self, node_id: str, batch_id: int, received_ms: int, body_bytes: int, frames: int
    ) -> bool:
        cur = await self.db.execute(
            "INSERT INTO batches VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (node_id, batch_id, received_ms, body_bytes, frames),
        )
        return cur.rowcount == 1

    async def lock_device(self, node_id: str, device_id: str) -> DeviceRecord | None:
        async with self.db.execute(
            f"SELECT {DEVICE_COLS} FROM devices WHERE node_id = ? AND device_id = ?",
            (node_id, device_id),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else device_from_row(row)

    async def put_device(self, rec: DeviceRecord) -> None:
        await self.db.execute(
            f"INSERT OR REPLACE INTO devices ({DEVICE_COLS}) VALUES"
            " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            device_to_row(rec),
        )

    async def put_schema(self, digest: bytes, schema: DeviceSchema) -> None:
        await self.db.execute(
            "INSERT INTO schemas VALUES (?, ?) ON CONFLICT DO NOTHING",
            (digest, msgspec.json.encode(schema)),
        )

    async def insert_block(self, rec: BlockRecord) -> None:
        await self.db.execute(
            f"INSERT INTO blocks ({BLOCK_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            block_to_row(rec),
        )

    async def get_rollups(  # noqa: PLR0917 - mirrors the rollups key
        self, node_id: str, device_id: str, res_ms: int, digest: bytes, lo_ms: int, hi_ms: int
    ) -> dict[int, bytes]:
        async with self.db.execute(
            "SELECT bucket_ms, stats FROM rollups WHERE node_id = ? AND device_id = ?"
            " AND res_ms = ? AND bucket_ms >= ? AND bucket_ms < ? AND schema_digest = ?",
            (node_id, device_id, res_ms, lo_ms, hi_ms, digest),
        ) as cur:
            return {b: bytes(s) async for b, s in cur}

    async def put_rollups(
        self,
        node_id: str,
        device_id: str,
        res_ms: int,
        digest: bytes,
        rows: Sequence[tuple[int, bytes]],
    ) -> None:
        await self.db.executemany(
            "INSERT OR REPLACE INTO rollups VALUES (?, ?, ?, ?, ?, ?)",
            [(node_id, device_id, res_ms, b, digest, s) for b, s in rows],
        )

    async def add_completeness(
        self, node_id: str, device_id: str, day_ms: int, live: int, backfill: int
    ) -> None:
        await self.db.execute(
            "INSERT INTO completeness (node_id, device_id, day_ms, live, backfill)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET live = live + excluded.live,"
            " backfill = backfill + excluded.backfill",
            (node_id, device_id, day_ms, live, backfill),
        )

    async def report_losses(self, node_id: str, losses: Sequence[Loss]) -> None:
        await self.db.executemany(
            "INSERT INTO completeness (node_id, device_id, day_ms, evicted, rejected, gaps)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
            " evicted = max(evicted, excluded.evicted),"
            " rejected = max(rejected, excluded.rejected), gaps = max(gaps, excluded.gaps)",
            loss_rows(node_id, losses),
        )

    async def touch_node(
        self,
        node_id: str,
        *,
        seen_ms: int,
        batch_id: int,
        body_bytes: int,
        status: NodeStatus | None,
        drift_ms: int,
    ) -> None:
        await self.db.execute(
            "UPDATE nodes SET last_seen_ms = max(coalesce(last_seen_ms, 0), ?),"
            " last_batch_id = max(coalesce(last_batch_id, 0), ?),"
            " status = coalesce(?, status), drift_ms = ?, batches = batches + 1,"
            " body_bytes = body_bytes + ? WHERE node_id = ?",
            (
                seen_ms,
                batch_id,
                None if status is None else msgspec.json.encode(status),
                drift_ms,
                body_bytes,
                node_id,
            ),
        )


class SqliteStorage(SqlStorage):
    """Hub storage in one SQLite file."""

    name = "sqlite"
    placeholder = "?"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._w: aiosqlite.Connection | None = None
        self._r: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        w = await aiosqlite.connect(str(self.path), isolation_level=None)
        try:
            await w.execute("PRAGMA journal_mode=WAL")
            await w.execute("PRAGMA synchronous=FULL")
            await w.execute("PRAGMA busy_timeout=10000")
            await w.executescript(_SCHEMA)
            r = await aiosqlite.connect(str(self.path), isolation_level=None)
            await r.execute("PRAGMA busy_timeout=10000")
            await r.execute("PRAGMA query_only=1")
        except Exception:
            await w.close()
            raise
        self._w, self._r = w, r

    async def close(self) -> None:
        for c in (self._r, self._w):
            if c is not None:
                await c.close()
        self._w = self._r = None

    @property
    def _writer(self) -> aiosqlite.Connection:
        if self._w is None:
            raise StorageError("the hub database is not open")
        return self._w

    @property
    def _reader(self) -> aiosqlite.Connection:
        if self._r is None:
            raise StorageError("the hub database is not open")
        return self._r

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._lock:
            db = self._writer
            try:
                await db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: {exc}") from exc
            try:
                yield _SqliteTx(db)
            except BaseException as exc:
                await asyncio.shield(db.execute("ROLLBACK"))
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"{self.path}: {exc}") from exc
                raise
            try:
                await asyncio.shield(db.execute("COMMIT"))
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: {exc}") from exc

    async def _all(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            async with self._reader.execute(query, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from exc

    async def add_node(self, node_id: str, public_key: bytes, *, replace: bool = False) -> bool:
        async with self.transaction() as tx:
            assert isinstance(tx, _SqliteTx)
            verb = (
                "ON CONFLICT DO UPDATE SET public_key = excluded.public_key"
                if replace
                else ("ON CONFLICT DO NOTHING")
            )
            cur = await tx.db.execute(
                f"INSERT INTO nodes (node_id, public_key, added_ms) VALUES (?, ?, ?) {verb}",
                (node_id, public_key, int(time.time() * 1000)),
            )
            return cur.rowcount == 1

    async def schemas(self, digests: Sequence[bytes]) -> dict[bytes, DeviceSchema]:
        wanted = list(dict.fromkeys(digests))[:500]  # one query; a body names few schemas
        if not wanted:
            return {}
        marks = ", ".join("?" * len(wanted))
        rows = await self._all(
            f"SELECT digest, body FROM schemas WHERE digest IN ({marks})", wanted
        )
        return {bytes(d): msgspec.json.decode(b, type=DeviceSchema) for d, b in rows}

    async def chain(
        self, node_id: str, device_id: str, key_batch: int, upto_batch: int
    ) -> list[BlockRecord]:
        rows = await self._all(
            f"SELECT {BLOCK_COLS} FROM blocks WHERE node_id = ? AND device_id = ?"
            " AND batch_id >= ? AND batch_id <= ? AND key_batch = ? ORDER BY batch_id",
            (node_id, device_id, key_batch, upto_batch, key_batch),
        )
        return [block_from_row(r) for r in rows]

    async def blocks(
        self, node_id: str, device_id: str, start_ms: int, end_ms: int
    ) -> list[BlockRecord]:
        # A block's frames may start before start_ms; blocks are at most a day long.
        rows = await self._all(
            f"SELECT {BLOCK_COLS} FROM blocks WHERE node_id = ? AND device_id = ?"
            " AND first_ts_ms >= ? AND first_ts_ms < ? AND last_ts_ms >= ?",
            (node_id, device_id, start_ms - DAY_MS, end_ms, start_ms),
        )
        hits = [block_from_row(r) for r in rows]
        keys = sorted({b.key_batch for b in hits if not b.packed and b.chain_from})
        have = {b.batch_id for b in hits}
        for key in keys:
            upto = max(b.batch_id for b in hits if b.key_batch == key)
            for b in await self.chain(node_id, device_id, key, upto):
                if b.batch_id not in have:
                    hits.append(b)
                    have.add(b.batch_id)
        hits.sort(key=lambda b: b.batch_id)
        return hits

    async def prune(self, raw_before_ms: int, rollups_before_ms: int) -> int:
        day = raw_before_ms // DAY_MS * DAY_MS  # whole days, so that no chain loses its key
        async with self.transaction() as tx:
            assert isinstance(tx, _SqliteTx)
            cur = await tx.db.execute("DELETE FROM blocks WHERE first_ts_ms < ?", (day,))
            n = cur.rowcount
            await tx.db.execute("DELETE FROM batches WHERE received_ms < ?", (day,))
            await tx.db.execute("DELETE FROM rollups WHERE bucket_ms < ?", (rollups_before_ms,))
        return n

    async def db_bytes(self) -> int:
        rows = await self._all("PRAGMA page_count")
        free = await self._all("PRAGMA freelist_count")
        size = await self._all("PRAGMA page_size")
        return int((rows[0][0] - free[0][0]) * size[0][0])
