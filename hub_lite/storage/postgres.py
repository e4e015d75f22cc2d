"""The scale-out hub database: PostgreSQL, shared by several stateless hub processes.

The tables are SQLite's with PostgreSQL types, except ``blocks``: partitioned by range on
``first_ts_ms``, one partition per UTC day, so that ``prune`` drops whole days (``DROP
TABLE``: no row is deleted, no vacuum debt). Its primary key must hold the partition key:
(node_id, device_id, batch_id, first_ts_ms); one block per (node, device, batch) is kept by
``claim_batch`` (a batch is stored once) and by the ingest (one block per device a batch).

Everything is safe between processes:

- schema and partitions are created under a transaction-level advisory lock;
- a new day's partition is created as a plain table and then ``ATTACH``ed, on a connection of
  its own and in a short transaction of its own: ``ATTACH`` needs only a SHARE UPDATE
  EXCLUSIVE lock on ``blocks``, which ingest transactions (holding ROW EXCLUSIVE) do not
  block, whereas ``CREATE TABLE ... PARTITION OF`` needs ACCESS EXCLUSIVE and would wait for
  the very transaction that asked for the partition;
- ``claim_batch`` is ``INSERT ... ON CONFLICT DO NOTHING``: of two processes claiming one
  batch, the second waits on the unique index and then gets False;
- ``lock_device`` takes a transaction-level advisory lock on (node, device) before
  ``SELECT ... FOR UPDATE``: a device that has no row yet is serialized too, and the lock
  comes in a statement of its own, so that the SELECT's snapshot is taken after the wait;
- counters are updated in SQL (``batches = batches + 1``, ``GREATEST``), never read and
  written back.

Each process keeps the days whose partition exists. Another process's ``prune`` may drop one
of them: an insert into it then fails (StorageError, the transaction rolled back), the day is
forgotten, and the node's retry creates the partition again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import psycopg
from psycopg import AsyncConnection, AsyncCursor, sql
from psycopg.abc import Params, QueryNoTemplate
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

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
from .base import (
    BlockRecord,
    DeviceRecord,
    StorageError,
    Tx,
)

__all__ = ("PostgresStorage",)

log = logging.getLogger(__name__)

_Conn = AsyncConnection[TupleRow]

_LOCK_CLASS: Final = 0x6772_6964  # "grid": the first key of the hub's two-key advisory locks
_LOCK_SCHEMA: Final = 1
_LOCK_PARTITIONS: Final = 2
_SET_LOCK_TIMEOUT: Final = "SET lock_timeout = '10s'"
_SET_LOCK_TIMEOUT_LOCAL: Final = "SET LOCAL lock_timeout = '10s'"
"""Bound a DDL wait that only a client could resolve (an ingest transaction waiting for the
partition this DDL is creating, while a prune waits for that transaction)."""

_TABLES: Final = ("nodes", "batches", "schemas", "devices", "rollups", "completeness")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id text PRIMARY KEY,
    public_key bytea NOT NULL,
    added_ms bigint NOT NULL,
    last_seen_ms bigint,
    last_batch_id bigint,
    status bytea,
    drift_ms bigint,
    batches bigint NOT NULL DEFAULT 0,
    body_bytes bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batches (
    node_id text NOT NULL,
    batch_id bigint NOT NULL,
    received_ms bigint NOT NULL,
    body_bytes bigint NOT NULL,
    frames bigint NOT NULL,
    PRIMARY KEY (node_id, batch_id)
);
CREATE INDEX IF NOT EXISTS batches_by_time ON batches (received_ms);
CREATE TABLE IF NOT EXISTS schemas (
    digest bytea PRIMARY KEY,
    body bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    node_id text NOT NULL,
    device_id text NOT NULL,
    schema_digest bytea NOT NULL,
    kind text NOT NULL,
    model text NOT NULL,
    last_ts_ms bigint,
    last_seq bigint,
    latest bytea,
    held bytea NOT NULL,
    frames bigint NOT NULL,
    n_values bigint NOT NULL,
    wire_bytes bigint NOT NULL,
    json_bytes bigint NOT NULL,
    PRIMARY KEY (node_id, device_id)
);
CREATE TABLE IF NOT EXISTS blocks (
    node_id text NOT NULL,
    device_id text NOT NULL,
    batch_id bigint NOT NULL,
    schema_digest bytea NOT NULL,
    first_ts_ms bigint NOT NULL,
    last_ts_ms bigint NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    frames bigint NOT NULL,
    chain_from bigint NOT NULL,
    key_batch bigint NOT NULL,
    chain_len bigint NOT NULL,
    packed boolean NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (node_id, device_id, batch_id, first_ts_ms)
) PARTITION BY RANGE (first_ts_ms);
CREATE INDEX IF NOT EXISTS blocks_by_time ON blocks (node_id, device_id, first_ts_ms);
CREATE TABLE IF NOT EXISTS rollups (
    node_id text NOT NULL,
    device_id text NOT NULL,
    res_ms bigint NOT NULL,
    bucket_ms bigint NOT NULL,
    schema_digest bytea NOT NULL,
    stats bytea NOT NULL,
    PRIMARY KEY (node_id, device_id, res_ms, bucket_ms, schema_digest)
);
CREATE INDEX IF NOT EXISTS rollups_by_time ON rollups (bucket_ms);
CREATE TABLE IF NOT EXISTS completeness (
    node_id text NOT NULL,
    device_id text NOT NULL,
    day_ms bigint NOT NULL,
    live bigint NOT NULL DEFAULT 0,
    backfill bigint NOT NULL DEFAULT 0,
    evicted bigint NOT NULL DEFAULT 0,
    rejected bigint NOT NULL DEFAULT 0,
    gaps bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (node_id, device_id, day_ms)
);
"""

# ------------------------------------------------------------------ ingest statements

_CLAIM_BATCH: Final = (
    "INSERT INTO batches (node_id, batch_id, received_ms, body_bytes, frames)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)
_LOCK_DEVICE_KEY: Final = "SELECT pg_advisory_xact_lock(%s::bigint)"
_LOCK_DEVICE_ROW: Final = (
    f"SELECT {DEVICE_COLS} FROM devices WHERE node_id = %s AND device_id = %s FOR UPDATE"
)
_PUT_DEVICE: Final = (
    f"INSERT INTO devices ({DEVICE_COLS}) VALUES"
    " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (node_id, device_id) DO UPDATE SET schema_digest = excluded.schema_digest,"
    " kind = excluded.kind, model = excluded.model, last_ts_ms = excluded.last_ts_ms,"
    " last_seq = excluded.last_seq, latest = excluded.latest, held = excluded.held,"
    " frames = excluded.frames, n_values = excluded.n_values,"
    " wire_bytes = excluded.wire_bytes, json_bytes = excluded.json_bytes"
)
_PUT_SCHEMA: Final = "INSERT INTO schemas (digest, body) VALUES (%s, %s) ON CONFLICT DO NOTHING"
_INSERT_BLOCK: Final = (
    f"INSERT INTO blocks ({BLOCK_COLS}) VALUES"
    " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_GET_ROLLUPS: Final = (
    "SELECT bucket_ms, stats FROM rollups WHERE node_id = %s AND device_id = %s"
    " AND res_ms = %s AND bucket_ms >= %s AND bucket_ms < %s AND schema_digest = %s"
)
_PUT_ROLLUP: Final = (
    "INSERT INTO rollups (node_id, device_id, res_ms, bucket_ms, schema_digest, stats)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (node_id, device_id, res_ms, bucket_ms, schema_digest)"
    " DO UPDATE SET stats = excluded.stats"
)
_ADD_COMPLETENESS: Final = (
    "INSERT INTO completeness (node_id, device_id, day_ms, live, backfill)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (node_id, device_id, day_ms) DO UPDATE SET"
    " live = completeness.live + excluded.live,"
    " backfill = completeness.backfill + excluded.backfill"
)
_REPORT_LOSS: Final = (
    "INSERT INTO completeness (node_id, device_id, day_ms, evicted, rejected, gaps)"
    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (node_id, device_id, day_ms) DO UPDATE SET"
    " evicted = GREATEST(completeness.evicted, excluded.evicted),"
    " rejected = GREATEST(completeness.rejected, excluded.rejected),"
    " gaps = GREATEST(completeness.gaps, excluded.gaps)"
)
_TOUCH_NODE: Final = (
    "UPDATE nodes SET last_seen_ms = GREATEST(coalesce(last_seen_ms, 0), %s::bigint),"
    " last_batch_id = GREATEST(coalesce(last_batch_id, 0), %s::bigint),"
    " status = coalesce(%s::bytea, status), drift_ms = %s, batches = batches + 1,"
    " body_bytes = body_bytes + %s::bigint WHERE node_id = %s"
)

# ------------------------------------------------------------------ reads

_CHAIN: Final = (
    f"SELECT {BLOCK_COLS} FROM blocks WHERE node_id = %s AND device_id = %s"
    " AND batch_id >= %s AND batch_id <= %s AND key_batch = %s ORDER BY batch_id"
)
# The blocks holding frames in [start, end) (a block's frames may start before start_ms;
# blocks are at most a day long), then the earlier blocks of the chains of the chained ones
# among them, from the keyframe up to the latest hit: one round trip.
_BLOCKS: Final = f"""
WITH hits AS MATERIALIZED (
    SELECT {BLOCK_COLS} FROM blocks
    WHERE node_id = %(node)s AND device_id = %(device)s
      AND first_ts_ms >= %(start)s::bigint - {DAY_MS} AND first_ts_ms < %(end)s::bigint
      AND last_ts_ms >= %(start)s::bigint
), spans AS (
    SELECT key_batch, max(batch_id) AS upto FROM hits
    WHERE key_batch IN (SELECT key_batch FROM hits WHERE NOT packed AND chain_from <> 0)
    GROUP BY key_batch
)
SELECT {BLOCK_COLS} FROM hits
UNION ALL
SELECT c.* FROM spans s CROSS JOIN LATERAL (
    SELECT {BLOCK_COLS} FROM blocks
    WHERE node_id = %(node)s AND device_id = %(device)s
      AND batch_id >= s.key_batch AND batch_id <= s.upto AND key_batch = s.key_batch
    OFFSET 0  -- not flattened: a range scan of the primary key for each chain
) AS c
WHERE c.batch_id NOT IN (SELECT batch_id FROM hits)
ORDER BY batch_id
"""
_PARTITIONS: Final = (
    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
    " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'blocks'::regclass"
)
_BOUND = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")
_DB_BYTES: Final = (
    "SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint FROM ("
    " SELECT relid FROM pg_partition_tree('blocks') WHERE isleaf"
    " UNION ALL SELECT unnest(%s::text[])::regclass) AS t"
)


def partition_name(day_ms: int) -> str:
    """``blocks_YYYYMMDD``: the partition of the UTC day starting at ``day_ms``."""
    try:
        return "blocks_" + datetime.fromtimestamp(day_ms / 1000, UTC).strftime("%Y%m%d")
    except (OverflowError, OSError, ValueError):
        return f"blocks_day_{day_ms // DAY_MS}".replace("-", "m")


def _device_key(node_id: str, device_id: str) -> int:
    """A 64-bit advisory lock key for one device, the same in every hub process."""
    h = hashlib.blake2b(f"{node_id}\x00{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big", signed=True)


async def _finish(aw: Awaitable[None]) -> None:
    """Run a commit or rollback to its end even when the caller is cancelled meanwhile (the
    cancellation is raised once it is done): a commit is never cut in half, and the
    connection goes back to the pool idle."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.warning("finishing a cancelled transaction failed: %s", task.exception())
        raise


class _PostgresTx(Tx):
    """The primitives on one pooled connection; BEGIN rides with the first statement."""

    def __init__(self, storage: PostgresStorage, conn: _Conn) -> None:
        self.storage = storage
        self.conn = conn
        self.begun = False
        self.new_schemas: set[bytes] = set()
        self.days_locked: set[int] = set()
        """Days whose partition this transaction has locked."""

    async def run(self, *stmts: tuple[QueryNoTemplate, Params]) -> AsyncCursor[TupleRow]:
        """Run statements in one round trip (after BEGIN, the first time); the last cursor."""
        conn = self.conn
        if self.begun and len(stmts) == 1:
            return await conn.execute(*stmts[0])
        async with conn.pipeline():
            if not self.begun:
                self.begun = True
                await conn.execute("BEGIN")
            for query, params in stmts:
                cur = await conn.execute(query, params)
        return cur

    async def run_many(self, query: QueryNoTemplate, rows: Sequence[Params]) -> None:
        if not rows:
            return
        if not self.begun:
            self.begun = True
            await self.conn.execute("BEGIN")
        async with self.conn.cursor() as cur:
            await cur.executemany(query, rows)

    async def claim_batch(
        self, node_id: str, batch_id: int, received_ms: int, body_bytes: int, frames: int
    ) -> bool:
        cur = await self.run((_CLAIM_BATCH, (node_id, batch_id, received_ms, body_bytes, frames)))
        return cur.rowcount == 1

    async def lock_device(self, node_id: str, device_id: str) -> DeviceRecord | None:
        cur = await self.run(
            (_LOCK_DEVICE_KEY, (_device_key(node_id, device_id),)),
            (_LOCK_DEVICE_ROW, (node_id, device_id)),
        )
        row = await cur.fetchone()
        return None if row is None else device_from_row(row)

    async def put_device(self, rec: DeviceRecord) -> None:
        await self.run((_PUT_DEVICE, device_to_row(rec)))

    async def put_schema(self, digest: bytes, schema: DeviceSchema) -> None:
        # Schemas are immutable by digest and never deleted: once one is committed, this
        # process need not write it again.
        if digest in self.storage.schemas_held or digest in self.new_schemas:
            return
        await self.run((_PUT_SCHEMA, (digest, msgspec.json.encode(schema))))
        self.new_schemas.add(digest)

    async def insert_block(self, rec: BlockRecord) -> None:
        day = rec.first_ts_ms // DAY_MS * DAY_MS
        if day not in self.storage.days:
            await self.storage.ensure_partition(day)
        stmts: list[tuple[QueryNoTemplate, Params]] = [(_INSERT_BLOCK, block_to_row(rec))]
        if day not in self.days_locked:
            # A server session reads catalog changes only when it takes a lock it does not
            # hold yet. Locking the day's partition first makes the INSERT see a partition
            # attached after this transaction locked `blocks`: a prepared INSERT would route
            # the row with the partitions it knew then. Same round trip.
            lock = sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE")
            stmts.insert(0, (lock.format(sql.Identifier(partition_name(day))), ()))
        try:
            await self.run(*stmts)
        except (psycopg.errors.UndefinedTable, psycopg.errors.CheckViolation) as exc:
            # The day's partition is gone: another process pruned it meanwhile.
            self.storage.days.discard(day)
            raise StorageError(
                f"partition {partition_name(day)} was dropped (pruned by another process); retry"
            ) from exc
        self.days_locked.add(day)

    async def get_rollups(  # noqa: PLR0917 - Tx's signature
        self, node_id: str, device_id: str, res_ms: int, digest: bytes, lo_ms: int, hi_ms: int
    ) -> dict[int, bytes]:
        cur = await self.run((_GET_ROLLUPS, (node_id, device_id, res_ms, lo_ms, hi_ms, digest)))
        return dict(await cur.fetchall())

    async def put_rollups(
        self,
        node_id: str,
        device_id: str,
        res_ms: int,
        digest: bytes,
        rows: Sequence[tuple[int, bytes]],
    ) -> None:
        await self.run_many(
            _PUT_ROLLUP, [(node_id, device_id, res_ms, b, digest, s) for b, s in rows]
        )

    async def add_completeness(
        self, node_id: str, device_id: str, day_ms: int, live: int, backfill: int
    ) -> None:
        await self.run((_ADD_COMPLETENESS, (node_id, device_id, day_ms, live, backfill)))

    async def report_losses(self, node_id: str, losses: Sequence[Loss]) -> None:
        await self.run_many(_REPORT_LOSS, loss_rows(node_id, losses))

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
        encoded = None if status is None else msgspec.json.encode(status)
        await self.run((_TOUCH_NODE, (seen_ms, batch_id, encoded, drift_ms, body_bytes, node_id)))


class PostgresStorage(SqlStorage):
    """Hub storage in a PostgreSQL database, shared by any number of hub processes."""

    name = "postgresql"
    placeholder = "%s"

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 30.0
    ) -> None:
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self.timeout_s = timeout_s
        self.days: set[int] = set()
        """Days whose partition of ``blocks`` exists, as this process last knew."""
        self.schemas_held: set[bytes] = set()
        """Digests of schemas committed to the database."""
        self._pool: AsyncConnectionPool[_Conn] | None = None
        self._ddl: _Conn | None = None
        self._ddl_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        pool: AsyncConnectionPool[_Conn] = AsyncConnectionPool(
            self.url,
            min_size=self.min_size,
            max_size=self.max_size,
            timeout=self.timeout_s,
            kwargs={"autocommit": True},
            open=False,
            name="gridlet-hub",
        )
        try:
            await pool.open(wait=True, timeout=self.timeout_s)
        except psycopg.Error as exc:
            await pool.close()
            raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
        self._pool = pool
        try:
            async with self._ddl_lock, self._errors():
                conn = await self._ddl_conn()
                async with conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _LOCK_SCHEMA)
                    )
                    await conn.execute(_SCHEMA)
                await self._load_days(conn)
            today = int(time.time() * 1000) // DAY_MS * DAY_MS
            for day in (today, today + DAY_MS):  # off the ingest path, most of the time
                await self.ensure_partition(day)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        ddl, self._ddl = self._ddl, None
        if ddl is not None:
            await ddl.close()
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> AsyncConnectionPool[_Conn]:
        if self._pool is None:
            raise StorageError("the hub database is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        """psycopg's errors as StorageError (the cause kept)."""
        try:
            yield
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: {exc}") from exc

    async def _ddl_conn(self) -> _Conn:
        """The connection for DDL, apart from the pool: an ingest transaction may wait for a
        partition while it holds a pooled connection, and all of them could."""
        if self._pool is None:
            raise StorageError("the hub database is not open")
        if self._ddl is None or self._ddl.closed or self._ddl.broken:
            self._ddl = await AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(self.timeout_s))
            )
            await self._ddl.execute(_SET_LOCK_TIMEOUT)
        return self._ddl

    async def _load_days(self, conn: _Conn) -> None:
        cur = await conn.execute(_PARTITIONS)
        self.days = {lo for _, lo, _ in _bounds(await cur.fetchall())}

    async def ensure_partition(self, day_ms: int) -> None:
        """Create the partition of ``blocks`` for one UTC day unless it exists."""
        async with self._ddl_lock, self._errors():
            if day_ms in self.days:
                return
            conn = await self._ddl_conn()
            name = sql.Identifier(partition_name(day_ms))
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _LOCK_PARTITIONS)
                )
                cur = await conn.execute(
                    "SELECT 1 FROM pg_inherits WHERE inhparent = 'blocks'::regclass"
                    " AND inhrelid = to_regclass(%s)",
                    (partition_name(day_ms),),
                )
                if await cur.fetchone() is None:
                    await conn.execute(
                        sql.SQL(
                            "CREATE TABLE IF NOT EXISTS {} (LIKE blocks INCLUDING DEFAULTS)"
                        ).format(name)
                    )
                    await conn.execute(
                        sql.SQL(
                            "ALTER TABLE blocks ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})"
                        ).format(name, sql.Literal(day_ms), sql.Literal(day_ms + DAY_MS))
                    )
                    log.info("created partition %s", name.as_string(None))
            self.days.add(day_ms)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._errors(), self.pool.connection() as conn:
            tx = _PostgresTx(self, conn)
            try:
                yield tx
            except BaseException:
                try:
                    await _finish(conn.rollback())
                except psycopg.Error as exc:  # the pool discards a broken connection
                    log.warning("rollback failed: %s", exc)
                raise
            await _finish(conn.commit())
            self.schemas_held |= tx.new_schemas

    async def _all(self, query: QueryNoTemplate, params: Params = ()) -> list[Any]:
        values = params.values() if isinstance(params, Mapping) else params
        if any(isinstance(v, str) and "\x00" in v for v in values):
            # PostgreSQL text cannot hold NUL, so no row has such a key (SQLite's answer
            # too); an unauthenticated body may name such a node.
            return []
        async with self._errors(), self.pool.connection() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    # ------------------------------------------------------------------ nodes

    async def add_node(self, node_id: str, public_key: bytes, *, replace: bool = False) -> bool:
        verb = (
            "ON CONFLICT (node_id) DO UPDATE SET public_key = excluded.public_key"
            if replace
            else "ON CONFLICT DO NOTHING"
        )
        async with self._errors(), self.pool.connection() as conn:
            cur = await conn.execute(
                f"INSERT INTO nodes (node_id, public_key, added_ms) VALUES (%s, %s, %s) {verb}",
                (node_id, public_key, int(time.time() * 1000)),
            )
            return cur.rowcount == 1

    # ------------------------------------------------------------------ reads

    async def schemas(self, digests: Sequence[bytes]) -> dict[bytes, DeviceSchema]:
        if not digests:
            return {}
        rows = await self._all(
            "SELECT digest, body FROM schemas WHERE digest = ANY(%s)", (list(digests),)
        )
        return {bytes(d): msgspec.json.decode(b, type=DeviceSchema) for d, b in rows}

    async def chain(
        self, node_id: str, device_id: str, key_batch: int, upto_batch: int
    ) -> list[BlockRecord]:
        rows = await self._all(_CHAIN, (node_id, device_id, key_batch, upto_batch, key_batch))
        return [block_from_row(r) for r in rows]

    async def blocks(
        self, node_id: str, device_id: str, start_ms: int, end_ms: int
    ) -> list[BlockRecord]:
        rows = await self._all(
            _BLOCKS, {"node": node_id, "device": device_id, "start": start_ms, "end": end_ms}
        )
        return [block_from_row(r) for r in rows]

    async def prune(self, raw_before_ms: int, rollups_before_ms: int) -> int:
        """Drop the partitions of the days before ``raw_before_ms``'s day (counting their
        blocks first, under lock), then delete batches and rollups older than their cuts (a
        second transaction: the partition locks are not held while rows are deleted)."""
        cut = raw_before_ms // DAY_MS * DAY_MS  # whole days, so that no chain loses its key
        dropped = 0
        gone: list[int] = []
        async with self.transaction() as tx:
            assert isinstance(tx, _PostgresTx)
            cur = await tx.run((_SET_LOCK_TIMEOUT_LOCAL, ()), (_PARTITIONS, ()))
            old = [(name, lo) for name, lo, hi in _bounds(await cur.fetchall()) if hi <= cut]
            for name, lo in old:
                table = sql.Identifier(name)
                # The partition first: its count is exact, and inserts into other days go on.
                await tx.run((sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table), ()))
                cur = await tx.run((sql.SQL("SELECT count(*) FROM {}").format(table), ()))
                row = await cur.fetchone()
                dropped += int(row[0]) if row else 0
                await tx.run((sql.SQL("DROP TABLE {}").format(table), ()))
                gone.append(lo)
        self.days.difference_update(gone)
        if gone:
            log.info("pruned %d day(s) of blocks (%d blocks)", len(gone), dropped)
        async with self.transaction() as tx:
            assert isinstance(tx, _PostgresTx)
            await tx.run(("DELETE FROM batches WHERE received_ms < %s", (cut,)))
            await tx.run(("DELETE FROM rollups WHERE bucket_ms < %s", (rollups_before_ms,)))
        return dropped

    async def db_bytes(self) -> int:
        """Heap, TOAST and indexes of the hub's tables and of every partition of ``blocks``
        (``pg_total_relation_size``), free space inside their pages included; not the
        catalog or the WAL."""
        rows = await self._all(_DB_BYTES, (list(_TABLES),))
        return int(rows[0][0])


def _bounds(rows: Sequence[TupleRow]) -> list[tuple[str, int, int]]:
    """(name, lo, hi) of the day partitions among (name, partition bound) rows."""
    out: list[tuple[str, int, int]] = []
    for name, bound in rows:
        m = _BOUND.search(bound or "")
        if m is not None:
            out.append((name, int(m.group(1)), int(m.group(2))))
    return out
