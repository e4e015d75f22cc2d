"""The edge's history: SQLite in WAL mode with one writer, a row per frame, batched commits.

Loss window: a frame is durable once its batch commits (at most ``commit_interval_ms`` after
it was read); a process crash (SIGKILL) loses nothing committed, a power cut loses nothing
committed either (``synchronous=FULL`` syncs the WAL at each commit). Rollups (1 min, 1 h:
count/min/avg/max per field) are derived data: the writer builds them as buckets close and
rebuilds the open ones from raw frames after a restart. Retention and the size cap delete
oldest-first; every frame the cap evicts is counted, never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiosqlite
import msgspec

import predictor_ext
from cloud_sync import DeviceSchema, Frame

from .bus import Reading, Subscription

__all__ = ("CommitReport", "Rollup", "Store", "StoreStats", "pack_values", "unpack_values")

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
_MISSING = predictor_ext.MISSING
_MISSING_BITS = predictor_ext.MISSING_BITS

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS devices (
    dev INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schemas (
    id INTEGER PRIMARY KEY,
    dev INTEGER NOT NULL,
    digest BLOB NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (dev, digest)
);
CREATE TABLE IF NOT EXISTS frames (
    dev INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    schema_id INTEGER NOT NULL,
    vals BLOB NOT NULL,
    synced INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dev, ts_ms, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollups (
    dev INTEGER NOT NULL,
    res_ms INTEGER NOT NULL,
    bucket_ms INTEGER NOT NULL,
    schema_id INTEGER NOT NULL,
    stats BLOB NOT NULL,
    PRIMARY KEY (dev, res_ms, bucket_ms, schema_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
);
"""


def pack_values(values: Sequence[float | None]) -> bytes:
    """A frame's values, packed losslessly (small decimals, float32 or float64)."""
    try:
        raw = array("d", cast("Sequence[float]", values))
    except TypeError:
        raw = array("d", [_MISSING if v is None else v for v in values])
    return predictor_ext.pack_values(raw)


def unpack_values(blob: bytes) -> tuple[float | None, ...]:
    return _with_none(predictor_ext.unpack_values(blob))


def _with_none(vals: array[float]) -> tuple[float | None, ...]:
    if not any(v != v for v in vals):  # noqa: PLR0124 - NaN test, the fast common case
        return tuple(vals)
    words = array("Q", vals.tobytes())
    return tuple(None if w == _MISSING_BITS else v for v, w in zip(vals, words, strict=True))


@dataclass(frozen=True)
class Rollup:
    """Per-field statistics of one bucket; None where a field had no finite value."""

    bucket_ms: int
    count: tuple[int, ...]
    min: tuple[float | None, ...]
    avg: tuple[float | None, ...]
    max: tuple[float | None, ...]


@dataclass(frozen=True)
class CommitReport:
    """What one commit made durable: per device (first seq, last seq, frames)."""

    frames: int
    devices: dict[str, tuple[int, int, int]]


@dataclass
class StoreStats:
    committed_frames: int = 0
    commits: int = 0
    evicted_synced: int = 0
    evicted_unsynced: int = 0
    expired_frames: int = 0
    dead_letters: int = 0
    last_commit_ms: int | None = None
    size_bytes: int = 0


@dataclass
class _Bucket:
    dev: int
    res_ms: int
    bucket_ms: int
    schema_id: int
    rows: list[Sequence[float | None]] = field(default_factory=list)


def _stats_blob(rows: Sequence[Sequence[float | None]], nf: int) -> bytes:
    """count, min, avg, max per field (float64 each) over the finite values of rows."""
    out = array("d")
    for col in zip(*rows, strict=True) if rows else [() for _ in range(nf)]:
        good = [v for v in col if v is not None and math.isfinite(v)]
        if good:
            out.extend((len(good), min(good), sum(good) / len(good), max(good)))
        else:
            out.extend((0, _MISSING, _MISSING, _MISSING))
    return out.tobytes()


def _merge_blobs(blobs: Sequence[bytes], nf: int) -> bytes:
    """Combine per-minute stats into one coarser bucket."""
    out = array("d")
    parts = [array("d", b) for b in blobs]
    for j in range(nf):
        n = 0.0
        total = 0.0
        lo = math.inf
        hi = -math.inf
        for p in parts:
            c = p[4 * j]
            if c > 0:
                n += c
                total += p[4 * j + 2] * c
                lo = min(lo, p[4 * j + 1])
                hi = max(hi, p[4 * j + 3])
        out.extend((n, lo, total / n, hi) if n else (0, _MISSING, _MISSING, _MISSING))
    return out.tobytes()


def _rollup_from_blob(bucket_ms: int, blob: bytes) -> Rollup:
    a = array("d", blob)
    vals = _with_none(a)
    nf = len(a) // 4
    return Rollup(
        bucket_ms,
        tuple(int(a[4 * j]) for j in range(nf)),
        tuple(vals[4 * j + 1] for j in range(nf)),
        tuple(vals[4 * j + 2] for j in range(nf)),
        tuple(vals[4 * j + 3] for j in range(nf)),
    )


class Store:
    """Owns the database: the only writer. Create with ``await Store.open(...)``."""

    def __init__(
        self,
        path: Path,
        db: aiosqlite.Connection,
        *,
        commit_interval_ms: int,
        raw_retention_days: float,
        rollup_retention_days: float,
        max_size_bytes: int,
    ) -> None:
        self.path = path
        self._db = db
        self.commit_interval = commit_interval_ms / 1000
        self.raw_retention_ms = int(raw_retention_days * DAY_MS)
        self.rollup_retention_ms = int(rollup_retention_days * DAY_MS)
        self.max_size_bytes = max_size_bytes
        self.stats = StoreStats()
        self._devs: dict[str, int] = {}
        self._schemas: dict[tuple[int, bytes], int] = {}
        self._schema_by_id: dict[int, DeviceSchema] = {}
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._dead: list[tuple[int, str, str, str, bytes]] = []
        self._last_commit = 0.0
        self.on_commit: list[Callable[[CommitReport], None]] = []

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        commit_interval_ms: int = 1000,
        raw_retention_days: float = 7,
        rollup_retention_days: float = 365,
        max_size_bytes: int = 1024 * 1024 * 1024,
    ) -> Store:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(p), isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.executescript(_SCHEMA_SQL)
        except Exception:
            await db.close()
            raise
        store = cls(
            p,
            db,
            commit_interval_ms=commit_interval_ms,
            raw_retention_days=raw_retention_days,
            rollup_retention_days=rollup_retention_days,
            max_size_bytes=max_size_bytes,
        )
        await store._load()
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _load(self) -> None:
        async with self._db.execute("SELECT dev, device_id FROM devices") as cur:
            self._devs = {device_id: dev async for dev, device_id in cur}
        async with self._db.execute("SELECT id, dev, digest, body FROM schemas") as cur:
            async for sid, dev, digest, body in cur:
                self._schemas[(dev, bytes(digest))] = sid
                self._schema_by_id[sid] = msgspec.json.decode(body, type=DeviceSchema)
        async with self._db.execute("SELECT name, value FROM counters") as cur:
            async for name, value in cur:
                if hasattr(self.stats, name):
                    setattr(self.stats, name, value)
        await self._rebuild_open_rollups()
        self.stats.size_bytes = await self._size()

    # ------------------------------------------------------------------ writing

    def dead_letter(self, source: str, key: str, payload: bytes, reason: str) -> None:
        """Queue a message that could not be used; written with the next commit."""
        self._dead.append((int(time.time() * 1000), source, key, reason, bytes(payload[:65536])))

    async def run(self, sub: Subscription, *, maintenance_every_s: float = 60.0) -> None:
        """The writer loop: at most one commit per commit interval, until cancelled; what
        was received before cancellation is committed first."""
        next_maintenance = time.monotonic() + maintenance_every_s
        pending: list[Reading] = []
        inflight: asyncio.Future[CommitReport] | None = None
        try:
            while True:
                pending = await sub.get_batch(1_000_000, timeout=maintenance_every_s)
                wait = self._last_commit + self.commit_interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                pending += await sub.get_batch(1_000_000, timeout=0)
                if pending or self._dead:
                    # A cancellation must not cut a commit in half: let it finish.
                    inflight = asyncio.ensure_future(self.write(pending))
                    await asyncio.shield(inflight)
                    inflight = None
                pending = []
                if time.monotonic() >= next_maintenance:
                    await self.maintain()
                    next_maintenance = time.monotonic() + maintenance_every_s
        except asyncio.CancelledError:
            if inflight is not None:
                await inflight
                pending = []
            pending += await sub.get_batch(1_000_000, timeout=0)
            if pending or self._dead:
                await self.write(pending)
            raise

    async def write(self, readings: Sequence[Reading]) -> CommitReport:
        """Write readings and their rollups in one transaction."""
        rows: list[tuple[int, int, int, int, bytes]] = []
        seen: dict[str, list[int]] = {}
        finished: list[_Bucket] = []
        new_devices: list[tuple[int, str, str]] = []
        new_schemas: list[tuple[int, int, bytes, bytes]] = []
        for r in readings:
            f = r.frame
            dev = self._devs.get(f.device_id)
            if dev is None:
                dev = len(self._devs) + 1
                while dev in self._devs.values():
                    dev += 1
                self._devs[f.device_id] = dev
                new_devices.append((dev, f.device_id, r.schema.kind))
            digest = r.schema.digest()
            sid = self._schemas.get((dev, digest))
            if sid is None:
                sid = max(self._schema_by_id, default=0) + 1
                self._schemas[(dev, digest)] = sid
                self._schema_by_id[sid] = r.schema
                new_schemas.append((sid, dev, digest, msgspec.json.encode(r.schema)))
            rows.append((dev, f.ts_ms, f.seq, sid, pack_values(f.values)))
            s = seen.setdefault(f.device_id, [f.seq, f.seq, 0])
            s[0] = min(s[0], f.seq)
            s[1] = max(s[1], f.seq)
            s[2] += 1
            self._add_to_bucket(dev, sid, f, finished)
        dead, self._dead = self._dead, []
        hour_keys = {(b.dev, b.bucket_ms // HOUR_MS * HOUR_MS) for b in finished}

        async with self._transaction() as db:
            await db.executemany("INSERT INTO devices VALUES (?, ?, ?)", new_devices)
            await db.executemany("INSERT INTO schemas VALUES (?, ?, ?, ?)", new_schemas)
            await db.executemany(
                "INSERT OR REPLACE INTO frames (dev, ts_ms, seq, schema_id, vals)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            await db.executemany(
                "INSERT OR REPLACE INTO rollups VALUES (?, ?, ?, ?, ?)",
                [(b.dev, b.res_ms, b.bucket_ms, b.schema_id, self._blob(b)) for b in finished],
            )
            for dev, hour in hour_keys:
                await self._rollup_hour(dev, hour)
            await db.executemany(
                "INSERT INTO dead_letters (ts_ms, source, key, reason, payload)"
                " VALUES (?, ?, ?, ?, ?)",
                dead,
            )
            await _bump(db, "dead_letters", len(dead))
        self._last_commit = time.monotonic()
        self.stats.size_bytes = await self._size()
        self.stats.committed_frames += len(rows)
        self.stats.dead_letters += len(dead)
        self.stats.commits += 1
        self.stats.last_commit_ms = int(time.time() * 1000)
        report = CommitReport(len(rows), {k: (v[0], v[1], v[2]) for k, v in seen.items()})
        for cb in self.on_commit:
            cb(report)
        return report

    def _blob(self, b: _Bucket) -> bytes:
        return _stats_blob(b.rows, len(self._schema_by_id[b.schema_id].fields))

    def _add_to_bucket(self, dev: int, sid: int, f: Frame, finished: list[_Bucket]) -> None:
        start = f.ts_ms // MINUTE_MS * MINUTE_MS
        key = (dev, MINUTE_MS)
        b = self._buckets.get(key)
        if b is not None and (b.bucket_ms != start or b.schema_id != sid):
            if start < b.bucket_ms:
                return  # a late frame for a closed minute: raw keeps it, the rollup stays
            finished.append(b)
            b = None
        if b is None:
            b = self._buckets[key] = _Bucket(dev, MINUTE_MS, start, sid)
        b.rows.append(f.values)

    async def _rebuild_open_rollups(self) -> None:
        """After a restart: reload raw frames of each device's newest minute into memory."""
        query = "SELECT schema_id, vals FROM frames WHERE dev = ? AND ts_ms >= ? ORDER BY ts_ms"
        for dev in self._devs.values():
            async with self._db.execute("SELECT max(ts_ms) FROM frames WHERE dev = ?", (dev,)) as c:
                row = await c.fetchone()
            if row is None or row[0] is None:
                continue
            start = row[0] // MINUTE_MS * MINUTE_MS
            async with self._db.execute(query, (dev, start)) as cur:
                async for sid, vals in cur:
                    b = self._buckets.get((dev, MINUTE_MS))
                    if b is None or b.schema_id != sid:
                        b = self._buckets[(dev, MINUTE_MS)] = _Bucket(dev, MINUTE_MS, start, sid)
                    b.rows.append(unpack_values(vals))

    # ------------------------------------------------------------------ upkeep

    async def _size(self) -> int:
        async with self._db.execute("PRAGMA page_count") as c:
            pages = (await c.fetchone() or (0,))[0]
        async with self._db.execute("PRAGMA freelist_count") as c:
            free = (await c.fetchone() or (0,))[0]
        async with self._db.execute("PRAGMA page_size") as c:
            size = (await c.fetchone() or (4096,))[0]
        return int((pages - free) * size)

    async def maintain(self, now_ms: int | None = None) -> None:
        """Retention, then the size cap: oldest synced frames go first, every one counted."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        raw_cut = now - self.raw_retention_ms
        roll_cut = now - self.rollup_retention_ms

        async with self._transaction() as db:
            cur = await db.execute("DELETE FROM frames WHERE ts_ms < ?", (raw_cut,))
            expired = cur.rowcount
            await db.execute("DELETE FROM rollups WHERE bucket_ms < ?", (roll_cut,))
            await _bump(db, "expired_frames", expired)
        self.stats.expired_frames += expired
        size = await self._size()
        while size > self.max_size_bytes:
            evicted = await self._evict_oldest(max(100, self.stats.committed_frames // 100))
            if evicted == 0:
                break
            size = await self._size()
        self.stats.size_bytes = size

    async def _evict_oldest(self, n: int) -> int:
        total = 0
        async with self._transaction() as db:
            for synced, counter in ((1, "evicted_synced"), (0, "evicted_unsynced")):
                left = n - total
                if left <= 0:
                    break
                cur = await db.execute(
                    "DELETE FROM frames WHERE (dev, ts_ms, seq) IN (SELECT dev, ts_ms, seq"
                    " FROM frames WHERE synced = ? ORDER BY ts_ms LIMIT ?)",
                    (synced, left),
                )
                got = cur.rowcount
                await _bump(db, counter, got)
                setattr(self.stats, counter, getattr(self.stats, counter) + got)
                total += got
        if total:
            log.warning("store over its size cap: evicted %d oldest frames", total)
        return total

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (cancellation included)."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            await asyncio.shield(self._db.execute("ROLLBACK"))
            raise
        await asyncio.shield(self._db.execute("COMMIT"))

    async def _rollup_hour(self, dev: int, hour_ms: int) -> None:
        """Recompute one hour bucket from its minute buckets (inside the write transaction)."""
        async with self._db.execute(
            "SELECT schema_id, stats FROM rollups WHERE dev = ? AND res_ms = ? AND bucket_ms >= ?"
            " AND bucket_ms < ?",
            (dev, MINUTE_MS, hour_ms, hour_ms + HOUR_MS),
        ) as cur:
            rows = await cur.fetchall()
        by_schema: dict[int, list[bytes]] = {}
        for sid, blob in rows:
            by_schema.setdefault(sid, []).append(blob)
        for sid, blobs in by_schema.items():
            merged = _merge_blobs(blobs, len(self._schema_by_id[sid].fields))
            await self._db.execute(
                "INSERT OR REPLACE INTO rollups VALUES (?, ?, ?, ?, ?)",
                (dev, HOUR_MS, hour_ms, sid, merged),
            )

    async def mark_synced(self, device_id: str, upto_seq: int) -> None:
        dev = self._devs.get(device_id)
        if dev is None:
            return
        await self._db.execute(
            "UPDATE frames SET synced = 1 WHERE dev = ? AND seq <= ? AND synced = 0",
            (dev, upto_seq),
        )

    # ------------------------------------------------------------------ reading

    def device_ids(self) -> list[str]:
        return sorted(self._devs)

    async def last_seq(self) -> dict[str, int]:
        """The highest stored sequence number per device (seq numbering resumes after it)."""
        out: dict[str, int] = {}
        for device_id, dev in self._devs.items():
            async with self._db.execute("SELECT max(seq) FROM frames WHERE dev = ?", (dev,)) as c:
                row = await c.fetchone()
            if row is not None and row[0] is not None:
                out[device_id] = int(row[0])
        return out


async def _bump(db: aiosqlite.Connection, name: str, n: int) -> None:
    if n:
        await db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, n, n),
        )


class Reader:
    """Read-only access for export, the dashboard and the uploader (separate connections)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise FileNotFoundError(f"no database at {self.path}")
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)

    def schemas(self) -> dict[int, tuple[str, DeviceSchema]]:
        with contextlib.closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT s.id, d.device_id, s.body FROM schemas s JOIN devices d ON d.dev = s.dev"
            ).fetchall()
        return {sid: (dev, msgspec.json.decode(body, type=DeviceSchema)) for sid, dev, body in rows}

    def frames(
        self, device_id: str, start_ms: int | None = None, end_ms: int | None = None
    ) -> Iterator[tuple[Frame, DeviceSchema]]:
        """Stored frames of a device in time order, with the schema each follows."""
        schemas = self.schemas()
        lo = -(2**62) if start_ms is None else start_ms
        hi = 2**62 if end_ms is None else end_ms
        conn = self._connect()
        try:
            cur = conn.execute(
                "SELECT f.ts_ms, f.seq, f.schema_id, f.vals FROM frames f JOIN devices d"
                " ON d.dev = f.dev WHERE d.device_id = ? AND f.ts_ms >= ? AND f.ts_ms < ?"
                " ORDER BY f.ts_ms, f.seq",
                (device_id, lo, hi),
            )
            for ts, seq, sid, vals in cur:
                yield Frame(device_id, ts, seq, unpack_values(vals)), schemas[sid][1]
        finally:
            conn.close()

    def rollups(
        self, device_id: str, res_ms: int, start_ms: int | None = None, end_ms: int | None = None
    ) -> list[tuple[Rollup, DeviceSchema]]:
        schemas = self.schemas()
        lo = -(2**62) if start_ms is None else start_ms
        hi = 2**62 if end_ms is None else end_ms
        with contextlib.closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT r.bucket_ms, r.schema_id, r.stats FROM rollups r JOIN devices d"
                " ON d.dev = r.dev WHERE d.device_id = ? AND r.res_ms = ? AND r.bucket_ms >= ?"
                " AND r.bucket_ms < ? ORDER BY r.bucket_ms",
                (device_id, res_ms, lo, hi),
            ).fetchall()
        return [(_rollup_from_blob(b, blob), schemas[sid][1]) for b, sid, blob in rows]

    def counters(self) -> dict[str, int]:
        with contextlib.closing(self._connect()) as conn:
            return dict(conn.execute("SELECT name, value FROM counters").fetchall())

    def dead_letters(self, limit: int = 100) -> list[tuple[int, str, str, str, bytes]]:
        with contextlib.closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT ts_ms, source, key, reason, payload FROM dead_letters"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [(ts, s, k, r, bytes(p)) for ts, s, k, r, p in rows]
