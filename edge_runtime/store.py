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
import sqlite3
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite
import msgspec

from cloud_sync import DeviceSchema, Frame
from cloud_sync.rollup import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    Rollup,
    merge_blobs,
    pack_values,
    rollup_from_blob,
    stats_blob,
    unpack_values,
)
from cloud_sync.syncstate import NO_KEY, Key, SyncState

from .bus import Reading, Subscription

__all__ = (
    "DAY_MS",
    "HOUR_MS",
    "MINUTE_MS",
    "NO_KEY",
    "CommitReport",
    "Key",
    "Reader",
    "Rollup",
    "Store",
    "StoreStats",
    "SyncState",
    "pack_values",
    "unpack_values",
)

log = logging.getLogger(__name__)


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
CREATE INDEX IF NOT EXISTS frames_by_seq ON frames (dev, seq);
CREATE TABLE IF NOT EXISTS seq_floor (
    dev INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL
);
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
CREATE TABLE IF NOT EXISTS sync_state (
    dev INTEGER PRIMARY KEY,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS losses (
    dev INTEGER NOT NULL,
    day_ms INTEGER NOT NULL,
    evicted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dev, day_ms)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
);
"""


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
        self.sync: dict[str, SyncState] = {}
        """Per device, what the hub holds (the uploader's view, written by this writer)."""
        self._sync_dirty: set[str] = set()
        self._rejected: dict[tuple[str, int], int] = {}
        self.batch_id_floor = 0
        """The highest upload batch id used so far (persisted: ids are never reused)."""
        self._batch_id_dirty = False
        self._sub: Subscription | None = None
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
        by_dev = {dev: device_id for device_id, dev in self._devs.items()}
        async with self._db.execute("SELECT dev, state FROM sync_state") as cur:
            async for dev, blob in cur:
                if dev in by_dev:
                    self.sync[by_dev[dev]] = _unpack_sync(blob)
        async with self._db.execute("SELECT name, value FROM counters") as cur:
            async for name, value in cur:
                if name == "sync_batch_id":
                    self.batch_id_floor = value
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
        self._sub = sub
        pending: list[Reading] = []
        inflight: asyncio.Future[CommitReport] | None = None
        try:
            while True:
                pending = await sub.get_batch(1_000_000, timeout=maintenance_every_s)
                wait = self._last_commit + self.commit_interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                pending += await sub.get_batch(1_000_000, timeout=0)
                if pending or self._dead or self._sync_dirty or self._rejected:
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
            if pending or self._dead or self._sync_dirty or self._rejected:
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
        sync_rows = [(self._dev_of(d), _pack_sync(self.sync[d])) for d in sorted(self._sync_dirty)]
        self._sync_dirty.clear()
        rejected, self._rejected = self._rejected, {}
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
            await db.executemany("INSERT OR REPLACE INTO sync_state VALUES (?, ?)", sync_rows)
            if self._batch_id_dirty:
                self._batch_id_dirty = False
                await db.execute(
                    "INSERT OR REPLACE INTO counters VALUES ('sync_batch_id', ?)",
                    (self.batch_id_floor,),
                )
            await db.executemany(
                "INSERT INTO losses (dev, day_ms, rejected) VALUES (?, ?, ?) ON CONFLICT"
                " DO UPDATE SET rejected = rejected + excluded.rejected",
                [(self._dev_of(d), day, n) for (d, day), n in rejected.items()],
            )
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
        return stats_blob(b.rows, len(self._schema_by_id[b.schema_id].fields))

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
            # Sequence numbers go on after the frames that held them are deleted: the hub
            # takes a sequence number it holds for a frame it has (see last_seq).
            await db.execute(
                "INSERT INTO seq_floor SELECT dev, max(seq) FROM frames WHERE true GROUP BY dev"
                " ON CONFLICT(dev) DO UPDATE SET seq = max(seq, excluded.seq)"
            )
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
        """Delete about n of the oldest frames: synced ones first, then the oldest of the
        rest, counting every unsynced one per device and day (the hub is told of them)."""
        total = 0
        async with self._transaction() as db:
            for device_id, st in self.sync.items():
                if total >= n or st.acked == NO_KEY:
                    continue
                cur = await db.execute(
                    "DELETE FROM frames WHERE (dev, ts_ms, seq) IN (SELECT dev, ts_ms, seq"
                    " FROM frames WHERE dev = ? AND seq <= ? ORDER BY ts_ms LIMIT ?)",
                    (self._devs[device_id], st.acked, n - total),
                )
                total += cur.rowcount
            synced = total
            await _bump(db, "evicted_synced", synced)
            unsynced = 0
            if total < n:
                by_dev = {dev: device_id for device_id, dev in self._devs.items()}
                async with db.execute(
                    "SELECT dev, ts_ms, seq FROM frames ORDER BY ts_ms LIMIT ?", (n - total,)
                ) as cur:
                    victims = list(await cur.fetchall())
                lost: dict[tuple[int, int], int] = {}
                for dev, ts, seq in victims:
                    state = self.sync.get(by_dev.get(dev, ""))
                    if state is not None and state.synced(seq):
                        synced += 1
                    else:
                        k = (dev, ts // DAY_MS * DAY_MS)
                        lost[k] = lost.get(k, 0) + 1
                        unsynced += 1
                await db.executemany(
                    "DELETE FROM frames WHERE dev = ? AND ts_ms = ? AND seq = ?", victims
                )
                await db.executemany(
                    "INSERT INTO losses (dev, day_ms, evicted) VALUES (?, ?, ?) ON CONFLICT"
                    " DO UPDATE SET evicted = evicted + excluded.evicted",
                    [(dev, day, k) for (dev, day), k in lost.items()],
                )
                await _bump(db, "evicted_synced", synced - total)
                await _bump(db, "evicted_unsynced", unsynced)
                total += len(victims)
        self.stats.evicted_synced += synced
        self.stats.evicted_unsynced += unsynced
        if total:
            log.warning(
                "store over its size cap: evicted %d oldest frames (%d not yet uploaded)",
                total,
                unsynced,
            )
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
            merged = merge_blobs(blobs, len(self._schema_by_id[sid].fields))
            await self._db.execute(
                "INSERT OR REPLACE INTO rollups VALUES (?, ?, ?, ?, ?)",
                (dev, HOUR_MS, hour_ms, sid, merged),
            )

    def _dev_of(self, device_id: str) -> int:
        dev = self._devs.get(device_id)
        if dev is None:
            raise KeyError(f"unknown device {device_id!r}")
        return dev

    def set_sync(self, device_id: str, state: SyncState) -> None:
        """Record what the hub holds of a device; written (and durable) with the next commit,
        which this call brings forward."""
        self._dev_of(device_id)
        self.sync[device_id] = state
        self._sync_dirty.add(device_id)
        self._wake()

    def add_rejected(self, device_id: str, day_ms: int, frames: int) -> None:
        """Count frames the hub refused for good (their batch is kept as a dead letter)."""
        key = (device_id, day_ms // DAY_MS * DAY_MS)
        self._rejected[key] = self._rejected.get(key, 0) + frames
        self._wake()

    def note_batch_id(self, batch_id: int) -> None:
        """An upload batch id in use: persisted with the next commit (ids never repeat)."""
        if batch_id > self.batch_id_floor:
            self.batch_id_floor = batch_id
            self._batch_id_dirty = True

    def _wake(self) -> None:
        if self._sub is not None:
            self._sub.wake()

    # ------------------------------------------------------------------ reading

    def device_ids(self) -> list[str]:
        return sorted(self._devs)

    async def last_seq(self) -> dict[str, int]:
        """The highest sequence number each device has used, stored or since deleted
        (numbering resumes after it, so no number is ever used twice)."""
        out: dict[str, int] = {}
        for device_id, dev in self._devs.items():
            async with self._db.execute(
                "SELECT max(coalesce((SELECT max(seq) FROM frames WHERE dev = ?), 0),"
                " coalesce((SELECT seq FROM seq_floor WHERE dev = ?), 0))",
                (dev, dev),
            ) as c:
                row = await c.fetchone()
            if row is not None and row[0]:
                out[device_id] = int(row[0])
        return out


def _pack_sync(st: SyncState) -> bytes:
    return array("q", [st.acked, st.live_from, st.live_acked]).tobytes()


def _unpack_sync(blob: bytes) -> SyncState:
    a = array("q", blob)
    return SyncState(a[0], a[1], a[2])


async def _bump(db: aiosqlite.Connection, name: str, n: int) -> None:
    if n:
        await db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, n, n),
        )


class Reader:
    """Read-only access for export, the dashboard and the uploader (separate connections).

    ``keep_open``: one connection kept for every read, for a caller that reads often from
    one thread (the uploader); otherwise each read opens and closes its own."""

    def __init__(self, path: str | Path, *, keep_open: bool = False) -> None:
        self.path = Path(path)
        self._schemas: dict[int, tuple[str, DeviceSchema]] = {}
        self._keep_open = keep_open
        self._kept: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise FileNotFoundError(f"no database at {self.path}")
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        if not self._keep_open:
            with contextlib.closing(self._connect()) as conn:
                yield conn
            return
        if self._kept is None:
            self._kept = self._connect()
            self._kept.execute("PRAGMA cache_size = -512")  # 512 KB: reads are sequential
        yield self._kept

    def close(self) -> None:
        if self._kept is not None:
            self._kept.close()
            self._kept = None

    def schemas(self) -> dict[int, tuple[str, DeviceSchema]]:
        """Every schema by id (kept: a schema row never changes, new ones are read when
        a frame names an id not seen yet)."""
        with self._conn() as conn:
            count = conn.execute("SELECT count(*) FROM schemas").fetchone()[0]
            if count != len(self._schemas):
                rows = conn.execute(
                    "SELECT s.id, d.device_id, s.body FROM schemas s JOIN devices d"
                    " ON d.dev = s.dev"
                ).fetchall()
                self._schemas = {
                    sid: (dev, msgspec.json.decode(body, type=DeviceSchema))
                    for sid, dev, body in rows
                }
        return self._schemas

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
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT r.bucket_ms, r.schema_id, r.stats FROM rollups r JOIN devices d"
                " ON d.dev = r.dev WHERE d.device_id = ? AND r.res_ms = ? AND r.bucket_ms >= ?"
                " AND r.bucket_ms < ? ORDER BY r.bucket_ms",
                (device_id, res_ms, lo, hi),
            ).fetchall()
        return [(rollup_from_blob(b, blob), schemas[sid][1]) for b, sid, blob in rows]

    def frames_after(
        self, device_id: str, after: Key, upto: Key | None, limit: int
    ) -> list[tuple[Frame, DeviceSchema]]:
        """Up to ``limit`` frames of a device with after < seq <= upto, in seq order."""
        schemas = self.schemas()
        hi = upto if upto is not None else 2**62
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT f.ts_ms, f.seq, f.schema_id, f.vals FROM frames f JOIN devices d"
                " ON d.dev = f.dev WHERE d.device_id = ? AND f.seq > ? AND f.seq <= ?"
                " ORDER BY f.seq LIMIT ?",
                (device_id, after, hi, limit),
            ).fetchall()
        return [
            (Frame(device_id, t, q, unpack_values(v)), schemas[sid][1]) for t, q, sid, v in rows
        ]

    def count_after(
        self, device_id: str, after: Key, upto: Key | None = None
    ) -> tuple[int, int | None]:
        """(frames, oldest ts) of a device with after < seq <= upto."""
        hi = upto if upto is not None else 2**62
        with self._conn() as conn:
            row = conn.execute(
                "SELECT count(*), min(f.ts_ms) FROM frames f JOIN devices d ON d.dev = f.dev"
                " WHERE d.device_id = ? AND f.seq > ? AND f.seq <= ?",
                (device_id, after, hi),
            ).fetchone()
        return (int(row[0]), row[1]) if row else (0, None)

    def newest_key(self, device_id: str) -> Key | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT max(f.seq) FROM frames f JOIN devices d ON d.dev = f.dev"
                " WHERE d.device_id = ?",
                (device_id,),
            ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def losses(self) -> list[tuple[str, int, int, int]]:
        """(device id, day, evicted, rejected) running totals."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT d.device_id, l.day_ms, l.evicted, l.rejected FROM losses l"
                " JOIN devices d ON d.dev = l.dev ORDER BY l.day_ms, d.device_id"
            ).fetchall()
        return [(a, b, c, e) for a, b, c, e in rows]

    def counters(self) -> dict[str, int]:
        with self._conn() as conn:
            return dict(conn.execute("SELECT name, value FROM counters").fetchall())

    def dead_letters(self, limit: int = 100) -> list[tuple[int, str, str, str, bytes]]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT ts_ms, source, key, reason, payload FROM dead_letters"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [(ts, s, k, r, bytes(p)) for ts, s, k, r, p in rows]
