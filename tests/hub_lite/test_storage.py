"""The storage contract: the same tests on SQLite and on a real PostgreSQL, then what only
PostgreSQL promises (several hub processes on one database, day partitions)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from array import array
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
import pytest

from cloud_sync import DeviceSchema, Field
from cloud_sync.model import Loss, NodeStatus
from cloud_sync.rollup import DAY_MS, HOUR_MS, MINUTE_MS
from hub_lite.storage import (
    BlockRecord,
    CompletenessRecord,
    DeviceRecord,
    NodeRecord,
    Storage,
    StorageError,
)
from hub_lite.storage.postgres import PostgresStorage, partition_name

NODE = "node-a"
KEY = bytes(range(32))
DEV = "meter-1"
D0 = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)
D1, D2 = D0 + DAY_MS, D0 + 2 * DAY_MS
SCHEMA = DeviceSchema(
    kind="meter",
    model="em24",
    fields=(
        Field(name="grid_power_w", unit="W", tol=1.0),
        Field(name="energy_import_kwh", unit="kWh", tol=0.01),
    ),
)
DIGEST = SCHEMA.digest()
OTHER_SCHEMA = DeviceSchema(kind="meter", model="other", fields=SCHEMA.fields[:1])
WAIT_S = 10.0


def block(
    batch_id: int,
    first_ts_ms: int,
    *,
    device_id: str = DEV,
    chain_from: int = 0,
    key_batch: int | None = None,
    chain_len: int = 1,
    packed: bool = False,
    data: bytes | None = None,
) -> BlockRecord:
    """A block of 10 frames over one minute from ``first_ts_ms``."""
    return BlockRecord(
        node_id=NODE,
        device_id=device_id,
        batch_id=batch_id,
        schema_digest=DIGEST,
        first_ts_ms=first_ts_ms,
        last_ts_ms=first_ts_ms + 59_000,
        first_seq=batch_id * 10,
        last_seq=batch_id * 10 + 9,
        frames=10,
        chain_from=chain_from,
        key_batch=batch_id if key_batch is None else key_batch,
        chain_len=chain_len,
        packed=packed,
        data=data if data is not None else f"block {batch_id} of {device_id}".encode(),
    )


def device(device_id: str = DEV, **changes: Any) -> DeviceRecord:
    rec = DeviceRecord(
        node_id=NODE,
        device_id=device_id,
        schema_digest=DIGEST,
        kind="meter",
        model="em24",
        last_ts_ms=D0 + 59_000,
        last_seq=9,
        latest=b"\x00\x01\x02",
        held=array("q", [0, 9]).tobytes(),
        frames=10,
        values=20,
        wire_bytes=123,
        json_bytes=1_234,
    )
    return msgspec.structs.replace(rec, **changes)


async def store_blocks(storage: Storage, *blocks: BlockRecord) -> None:
    """Claim each block's batch and insert the block, all in one transaction."""
    async with storage.transaction() as tx:
        for b in blocks:
            await tx.claim_batch(b.node_id, b.batch_id, b.first_ts_ms, 100, b.frames)
            await tx.insert_block(b)


# ---------------------------------------------------------------------- the contract


async def test_add_node_and_key(storage: Storage) -> None:
    before = int(datetime.now(UTC).timestamp() * 1000)
    assert await storage.add_node(NODE, KEY)
    assert not await storage.add_node(NODE, b"\x01" * 32), "added twice"
    assert await storage.node_key(NODE) == KEY, "replaced without replace=True"
    assert await storage.add_node(NODE, b"\x02" * 32, replace=True)
    assert await storage.node_key(NODE) == b"\x02" * 32
    assert await storage.node_key("nobody") is None
    assert await storage.node("nobody") is None
    assert await storage.add_node("node-0", KEY)

    node = await storage.node(NODE)
    assert node is not None
    assert before <= node.added_ms <= int(datetime.now(UTC).timestamp() * 1000)
    assert node == NodeRecord(node_id=NODE, public_key=b"\x02" * 32, added_ms=node.added_ms)
    assert [n.node_id for n in await storage.nodes()] == ["node-0", NODE]
    # Anyone may send a body naming any node, a NUL included (PostgreSQL text has none).
    assert await storage.node_key("node\x00a") is None
    assert await storage.node("node\x00a") is None
    assert await storage.devices("node\x00a") == []
    assert await storage.block(NODE, "dev\x00", 1) is None
    assert await storage.blocks(NODE, "dev\x00", D0, D1) == []


async def test_a_transaction_stores_what_it_was_given(storage: Storage) -> None:
    await storage.add_node(NODE, KEY)
    status = NodeStatus(
        software_version="0.1.0",
        backlog_frames=3,
        losses=(Loss(device_id=DEV, day_ms=D0 + 5 * HOUR_MS, evicted=2, gaps=1),),
    )
    dev = device()
    b7 = block(7, D0)
    empty_size = await storage.db_bytes()
    async with storage.transaction() as tx:
        assert await tx.claim_batch(NODE, 7, D0 + 70_000, 456, 10)
        await tx.put_schema(DIGEST, SCHEMA)
        await tx.put_schema(DIGEST, SCHEMA)  # held already: nothing happens
        assert await tx.lock_device(NODE, DEV) is None
        await tx.put_device(dev)
        assert await tx.lock_device(NODE, DEV) == dev, "a transaction reads its own write"
        await tx.insert_block(b7)
        await tx.put_rollups(NODE, DEV, MINUTE_MS, DIGEST, [(D0, b"m0"), (D0 + MINUTE_MS, b"m1")])
        await tx.put_rollups(NODE, DEV, MINUTE_MS, DIGEST, [(D0 + MINUTE_MS, b"m1 again")])
        await tx.put_rollups(NODE, DEV, HOUR_MS, DIGEST, [(D0, b"h0")])
        await tx.put_rollups(NODE, DEV, HOUR_MS, DIGEST, [])
        got = await tx.get_rollups(NODE, DEV, MINUTE_MS, DIGEST, D0, D0 + HOUR_MS)
        assert got == {D0: b"m0", D0 + MINUTE_MS: b"m1 again"}
        got = await tx.get_rollups(NODE, DEV, MINUTE_MS, DIGEST, D0 + MINUTE_MS, D0 + HOUR_MS)
        assert got == {D0 + MINUTE_MS: b"m1 again"}, "[lo, hi)"
        assert await tx.get_rollups(NODE, DEV, MINUTE_MS, DIGEST, D0, D0 + MINUTE_MS) == {D0: b"m0"}
        assert await tx.get_rollups(NODE, DEV, MINUTE_MS, b"\x00" * 16, D0, D1) == {}
        await tx.add_completeness(NODE, DEV, D0, 8, 2)
        await tx.add_completeness(NODE, DEV, D0, 1, 0)
        await tx.report_losses(NODE, status.losses)
        await tx.touch_node(
            NODE, seen_ms=D0 + 70_000, batch_id=7, body_bytes=456, status=status, drift_ms=-40
        )

    node = await storage.node(NODE)
    assert node is not None
    assert node == NodeRecord(
        node_id=NODE,
        public_key=KEY,
        added_ms=node.added_ms,
        last_seen_ms=D0 + 70_000,
        last_batch_id=7,
        status=status,
        drift_ms=-40,
        batches=1,
        body_bytes=456,
    )
    assert await storage.nodes() == [node]
    assert await storage.devices(NODE) == [dev]
    assert await storage.devices("node-b") == []
    assert await storage.block(NODE, DEV, 7) == b7
    assert await storage.block(NODE, DEV, 8) is None
    assert await storage.block(NODE, "meter-2", 7) is None
    assert await storage.schemas([DIGEST, b"\x00" * 16]) == {DIGEST: SCHEMA}
    assert await storage.schemas([]) == {}
    assert await storage.rollups(NODE, DEV, MINUTE_MS, D0, D0 + HOUR_MS) == [
        (D0, DIGEST, b"m0"),
        (D0 + MINUTE_MS, DIGEST, b"m1 again"),
    ]
    assert await storage.rollups(NODE, DEV, MINUTE_MS, D0 + MINUTE_MS, D1) == [
        (D0 + MINUTE_MS, DIGEST, b"m1 again")
    ]
    assert await storage.rollups(NODE, DEV, HOUR_MS, D0, D1) == [(D0, DIGEST, b"h0")]
    assert await storage.completeness(NODE, D0) == [
        CompletenessRecord(device_id=DEV, day_ms=D0, live=9, backfill=2, evicted=2, gaps=1)
    ]
    assert await storage.completeness(NODE, D1) == []
    assert await storage.db_bytes() >= empty_size > 0

    async with storage.transaction() as tx:
        assert await tx.lock_device(NODE, DEV) == dev
        assert not await tx.claim_batch(NODE, 7, D0, 1, 1)
        big = block(8, D0 + HOUR_MS, data=os.urandom(300_000))
        assert await tx.claim_batch(NODE, 8, D0, 1, 1)
        await tx.insert_block(big)
    assert await storage.block(NODE, DEV, 8) == big
    assert await storage.db_bytes() - empty_size >= 250_000  # pages, not bytes


async def test_a_batch_is_claimed_once(storage: Storage) -> None:
    async with storage.transaction() as tx:
        assert await tx.claim_batch(NODE, 1, D0, 10, 1)
        assert not await tx.claim_batch(NODE, 1, D0, 10, 1), "claimed twice in one transaction"
        assert await tx.claim_batch("node-b", 1, D0, 10, 1), "batch ids are per node"
    async with storage.transaction() as tx:
        assert not await tx.claim_batch(NODE, 1, D0 + 1, 11, 2)
        assert await tx.claim_batch(NODE, 2, D0, 10, 1)


async def _everything(storage: Storage) -> tuple[Any, ...]:
    """All a node's data that the read methods show."""
    return (
        await storage.nodes(),
        await storage.devices(NODE),
        await storage.blocks(NODE, DEV, D0 - DAY_MS, D2),
        await storage.rollups(NODE, DEV, MINUTE_MS, D0 - DAY_MS, D2),
        await storage.rollups(NODE, DEV, HOUR_MS, D0 - DAY_MS, D2),
        await storage.completeness(NODE, D0),
        await storage.completeness(NODE, D1),
        await storage.schemas([DIGEST, OTHER_SCHEMA.digest()]),
    )


async def test_an_error_rolls_back_everything(storage: Storage) -> None:
    await storage.add_node(NODE, KEY)
    async with storage.transaction() as tx:
        await tx.claim_batch(NODE, 1, D0, 100, 10)
        await tx.put_schema(DIGEST, SCHEMA)
        await tx.put_device(device())
        await tx.insert_block(block(1, D0))
        await tx.put_rollups(NODE, DEV, MINUTE_MS, DIGEST, [(D0, b"m0")])
        await tx.add_completeness(NODE, DEV, D0, 10, 0)
        await tx.touch_node(NODE, seen_ms=D0, batch_id=1, body_bytes=100, status=None, drift_ms=0)
    before = await _everything(storage)

    with pytest.raises(RuntimeError, match="the ingest failed"):
        async with storage.transaction() as tx:
            assert await tx.claim_batch(NODE, 2, D1, 100, 10)
            await tx.put_schema(OTHER_SCHEMA.digest(), OTHER_SCHEMA)
            assert await tx.lock_device(NODE, DEV) == device()
            await tx.put_device(device(frames=20))
            await tx.put_device(device("meter-2"))
            await tx.insert_block(block(2, D0 + MINUTE_MS, chain_from=1, key_batch=1))
            await tx.insert_block(block(2, D1, device_id="meter-2"))  # a new day, too
            await tx.put_rollups(NODE, DEV, MINUTE_MS, DIGEST, [(D0, b"m0 changed"), (D1, b"n")])
            await tx.put_rollups(NODE, DEV, HOUR_MS, DIGEST, [(D0, b"h0")])
            await tx.add_completeness(NODE, DEV, D0, 10, 0)
            await tx.report_losses(NODE, [Loss(device_id=DEV, day_ms=D1, evicted=5)])
            await tx.touch_node(
                NODE, seen_ms=D1, batch_id=2, body_bytes=100, status=None, drift_ms=5
            )
            raise RuntimeError("the ingest failed")

    assert await _everything(storage) == before
    async with storage.transaction() as tx:
        assert await tx.claim_batch(NODE, 2, D1, 100, 10), "the rolled back claim stayed"
        await tx.put_schema(OTHER_SCHEMA.digest(), OTHER_SCHEMA)
    assert await storage.schemas([OTHER_SCHEMA.digest()]) == {
        OTHER_SCHEMA.digest(): OTHER_SCHEMA
    }, "a schema rolled back once is stored when written again"


async def test_a_cancellation_rolls_back(storage: Storage) -> None:
    await storage.add_node(NODE, KEY)
    written = asyncio.Event()

    async def ingest() -> None:
        async with storage.transaction() as tx:
            await tx.claim_batch(NODE, 3, D0, 100, 10)
            await tx.put_device(device())
            await tx.insert_block(block(3, D0))
            await tx.touch_node(
                NODE, seen_ms=D0, batch_id=3, body_bytes=100, status=None, drift_ms=0
            )
            written.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(ingest())
    await asyncio.wait_for(written.wait(), WAIT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    node = await storage.node(NODE)
    assert node is not None and node.batches == 0
    assert await storage.devices(NODE) == []
    assert await storage.block(NODE, DEV, 3) is None
    async with storage.transaction() as tx:
        assert await tx.claim_batch(NODE, 3, D0, 100, 10)


# Chains of meter-1: 10 <- 11 <- 12 (keyframe 10), 13 packed, 20 <- 21 <- 22, and on the next
# day 30 <- 31. meter-2 has a block in batch 11 as well. Block n covers one minute.
CHAINS = {
    10: block(10, D0),
    11: block(11, D0 + MINUTE_MS, chain_from=10, key_batch=10, chain_len=2),
    12: block(12, D0 + 2 * MINUTE_MS, chain_from=11, key_batch=10, chain_len=3),
    13: block(13, D0 + 3 * MINUTE_MS, packed=True),
    20: block(20, D0 + 10 * MINUTE_MS),
    21: block(21, D0 + 11 * MINUTE_MS, chain_from=20, key_batch=20, chain_len=2),
    22: block(22, D0 + 12 * MINUTE_MS, chain_from=21, key_batch=20, chain_len=3),
    30: block(30, D1),
    31: block(31, D1 + MINUTE_MS, chain_from=30, key_batch=30, chain_len=2),
}
OTHER_DEVICE = block(11, D0 + MINUTE_MS, device_id="meter-2")


async def test_chain_and_blocks(storage: Storage) -> None:
    # Reversed: storage order must not matter; two days in one transaction.
    async with storage.transaction() as tx:
        for b in [*reversed(CHAINS.values()), OTHER_DEVICE]:
            await tx.claim_batch(NODE, b.batch_id, b.first_ts_ms, 100, 10)
            await tx.insert_block(b)

    def ids(blocks: list[BlockRecord]) -> list[int]:
        assert all(b == CHAINS[b.batch_id] for b in blocks)
        return [b.batch_id for b in blocks]

    assert ids(await storage.chain(NODE, DEV, 10, 11)) == [10, 11]
    assert ids(await storage.chain(NODE, DEV, 10, 13)) == [10, 11, 12]
    assert ids(await storage.chain(NODE, DEV, 20, 21)) == [20, 21]
    assert ids(await storage.chain(NODE, DEV, 30, 99)) == [30, 31]
    assert await storage.chain(NODE, DEV, 10, 9) == []
    assert await storage.chain(NODE, "meter-2", 10, 12) == []

    async def blocks(start_ms: int, end_ms: int) -> list[int]:
        return ids(await storage.blocks(NODE, DEV, start_ms, end_ms))

    # A chained block comes with the earlier blocks of its chain, not the later ones.
    assert await blocks(D0 + 2 * MINUTE_MS, D0 + 3 * MINUTE_MS) == [10, 11, 12]
    assert await blocks(D0 + 11 * MINUTE_MS, D0 + 12 * MINUTE_MS) == [20, 21]
    # A block whose frames start before start_ms but reach into the range is in it.
    assert await blocks(D0 + 150_000, D0 + 210_000) == [10, 11, 12, 13]
    assert await blocks(D0 + 3 * MINUTE_MS, D0 + 4 * MINUTE_MS) == [13]
    assert await blocks(D0 + MINUTE_MS, D0 + 12 * MINUTE_MS) == [10, 11, 12, 13, 20, 21]
    assert await blocks(D0, D2) == [10, 11, 12, 13, 20, 21, 22, 30, 31]
    assert await blocks(D1 + MINUTE_MS, D2) == [30, 31]
    assert await blocks(D0 + 4 * MINUTE_MS, D0 + 10 * MINUTE_MS) == []
    assert await blocks(D0 - DAY_MS, D0) == [], "end_ms is excluded"
    assert await storage.blocks(NODE, "meter-2", D0, D1) == [OTHER_DEVICE]


def _url(storage: Storage) -> str:
    assert isinstance(storage, PostgresStorage)
    return storage.url


async def _partitions(storage: Storage) -> set[str]:
    """The partitions of ``blocks`` (PostgreSQL)."""
    async with await psycopg.AsyncConnection.connect(_url(storage)) as conn:
        cur = await conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'blocks'::regclass"
        )
        return {r[0] for r in await cur.fetchall()}


async def _forbid_deletes(storage: Storage) -> None:
    """Make any DELETE on ``blocks`` or its partitions fail (PostgreSQL)."""
    async with await psycopg.AsyncConnection.connect(_url(storage), autocommit=True) as conn:
        await conn.execute(
            "CREATE FUNCTION forbid_delete() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'DELETE on %', TG_TABLE_NAME; END $$"
        )
        for each in ("ROW", "STATEMENT"):
            await conn.execute(
                f"CREATE TRIGGER no_{each.lower()}_delete BEFORE DELETE ON blocks"
                f" FOR EACH {each} EXECUTE FUNCTION forbid_delete()"
            )


async def test_prune_drops_old_days(storage: Storage) -> None:
    pg = storage.name == "postgresql"
    old = [block(1, D0), block(1, D0 + HOUR_MS, device_id="meter-2"), block(2, D1 + 5)]
    new = [block(3, D2), block(4, D2 + 20 * HOUR_MS)]
    await store_blocks(storage, *old, *new)
    async with storage.transaction() as tx:
        for bucket in (D0, D1, D1 + HOUR_MS, D2):
            await tx.put_rollups(NODE, DEV, MINUTE_MS, DIGEST, [(bucket, b"m")])
    if pg:
        assert {partition_name(d) for d in (D0, D1, D2)} <= await _partitions(storage)
        await _forbid_deletes(storage)

    assert await storage.prune(D2 + 5 * HOUR_MS, D1 + HOUR_MS) == len(old)

    for b in old:
        assert await storage.block(NODE, b.device_id, b.batch_id) is None
    for b in new:
        assert await storage.block(NODE, b.device_id, b.batch_id) == b
    assert await storage.blocks(NODE, DEV, D0, D2 + DAY_MS) == new
    assert [r[0] for r in await storage.rollups(NODE, DEV, MINUTE_MS, 0, D2 + DAY_MS)] == [
        D1 + HOUR_MS,
        D2,
    ]
    async with storage.transaction() as tx:
        assert await tx.claim_batch(NODE, 1, D0, 1, 1), "an old batch id was kept"
        assert not await tx.claim_batch(NODE, 3, D2, 1, 1), "a new batch id was dropped"
    if pg:
        names = await _partitions(storage)
        assert partition_name(D0) not in names and partition_name(D1) not in names
        assert partition_name(D2) in names
        async with await psycopg.AsyncConnection.connect(_url(storage)) as conn:
            cur = await conn.execute(
                "SELECT to_regclass(%s), to_regclass(%s)", (partition_name(D0), partition_name(D1))
            )
            assert await cur.fetchone() == (None, None), "the old tables are still there"

    assert await storage.prune(D2 + 5 * HOUR_MS, D1 + HOUR_MS) == 0
    # A late block of a pruned day is stored again (its partition made anew).
    late = block(5, D0 + 7)
    await store_blocks(storage, late)
    assert await storage.block(NODE, DEV, 5) == late


async def test_report_losses_keeps_the_largest_totals(storage: Storage) -> None:
    async with storage.transaction() as tx:
        await tx.add_completeness(NODE, DEV, D0, 7, 3)
        await tx.report_losses(
            NODE,
            [
                Loss(device_id=DEV, day_ms=D0 + 3 * HOUR_MS, evicted=5, rejected=1, gaps=3),
                Loss(device_id="meter-2", day_ms=D0, gaps=4),
            ],
        )
    async with storage.transaction() as tx:
        await tx.report_losses(
            NODE, [Loss(device_id=DEV, day_ms=D0, evicted=3, rejected=2, gaps=3)]
        )
        await tx.add_completeness(NODE, DEV, D0, 1, 1)
    assert await storage.completeness(NODE, D0) == [
        CompletenessRecord(
            device_id=DEV, day_ms=D0, live=8, backfill=4, evicted=5, rejected=2, gaps=3
        ),
        CompletenessRecord(device_id="meter-2", day_ms=D0, gaps=4),
    ]


async def test_touch_node_counts_and_keeps_the_latest_batch(storage: Storage) -> None:
    await storage.add_node(NODE, KEY)
    status = NodeStatus(software_version="1.2.3", backlog_frames=9)
    async with storage.transaction() as tx:
        await tx.touch_node(NODE, seen_ms=D0, batch_id=5, body_bytes=100, status=status, drift_ms=7)
    async with storage.transaction() as tx:
        await tx.touch_node(
            NODE, seen_ms=D0 + 1, batch_id=3, body_bytes=50, status=None, drift_ms=-2
        )
        await tx.touch_node(
            "unknown", seen_ms=D0, batch_id=1, body_bytes=1, status=None, drift_ms=0
        )
    node = await storage.node(NODE)
    assert node is not None
    assert (node.last_seen_ms, node.last_batch_id, node.status, node.drift_ms) == (
        D0 + 1,
        5,
        status,
        -2,
    )
    assert (node.batches, node.body_bytes) == (2, 150)
    assert await storage.node("unknown") is None


# ---------------------------------------------------------------------- PostgreSQL only


@contextlib.asynccontextmanager
async def two_hubs(url: str) -> AsyncIterator[tuple[PostgresStorage, PostgresStorage]]:
    """Two hub processes' storages on one database, opened at the same time."""
    a, b = PostgresStorage(url), PostgresStorage(url)
    try:
        await asyncio.gather(a.open(), b.open())
        yield a, b
    finally:
        await asyncio.gather(a.close(), b.close())


async def lock_waiters(url: str, count: int = 1) -> None:
    """Return once ``count`` sessions of the database wait on a lock."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            row = await cur.fetchone()
            if row is not None and row[0] >= count:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{count} session(s) never waited on a lock")
            await asyncio.sleep(0.005)  # the polling interval, not a wait for the condition


async def test_two_hubs_start_at_once_and_again(pg_url: str) -> None:
    async with two_hubs(pg_url) as (a, b):
        assert await a.add_node(NODE, KEY)
        assert await b.node_key(NODE) == KEY
    async with two_hubs(pg_url) as (a, _):
        assert await a.node_key(NODE) == KEY


async def _claim(hub: Storage, batch_id: int) -> bool:
    async with hub.transaction() as tx:
        return await tx.claim_batch(NODE, batch_id, D0, 100, 10)


class _RollbackError(Exception):
    """Raised to end a transaction by rolling it back."""


async def _claim_race(
    a: Storage, b: Storage, url: str, batch_id: int, *, rollback: bool
) -> tuple[bool, bool]:
    """``a`` claims a batch and holds it until ``b``'s claim waits on it, then commits or
    rolls back; what each claim returned."""
    a_claimed = asyncio.Event()
    a_got = False

    async def first() -> None:
        nonlocal a_got
        with contextlib.suppress(_RollbackError):
            async with a.transaction() as tx:
                a_got = await tx.claim_batch(NODE, batch_id, D0, 100, 10)
                a_claimed.set()
                await lock_waiters(url)
                if rollback:
                    raise _RollbackError

    async def second() -> bool:
        await a_claimed.wait()
        return await _claim(b, batch_id)

    _, b_got = await asyncio.gather(first(), second())
    return a_got, b_got


async def test_two_hubs_claim_one_batch(pg_url: str) -> None:
    async with two_hubs(pg_url) as (a, b):
        assert sorted(await asyncio.gather(_claim(a, 1), _claim(b, 1))) == [False, True]
        # The second waits on the first's uncommitted row, then gets False (or True when the
        # first rolls back).
        assert await _claim_race(a, b, pg_url, 2, rollback=False) == (True, False)
        assert await _claim_race(a, b, pg_url, 3, rollback=True) == (True, True)
        assert not await _claim(a, 3)


async def _add_frames(
    hub: PostgresStorage, batch_id: int, frames: int, *, device_id: str, day_ms: int
) -> DeviceRecord | None:
    """What the ingest does for one block of a device: the device as it was before."""
    async with hub.transaction() as tx:
        assert await tx.claim_batch(NODE, batch_id, day_ms, 100, frames)
        dev = await tx.lock_device(NODE, device_id)
        base = dev or device(device_id, frames=0, values=0, wire_bytes=0, json_bytes=0)
        await tx.insert_block(block(batch_id, day_ms + batch_id, device_id=device_id))
        await tx.add_completeness(NODE, device_id, day_ms, frames, 0)
        await tx.put_device(msgspec.structs.replace(base, frames=base.frames + frames))
        await tx.touch_node(
            NODE, seen_ms=day_ms, batch_id=batch_id, body_bytes=100, status=None, drift_ms=0
        )
    return dev


async def test_two_hubs_add_a_new_device_at_once(pg_url: str) -> None:
    """A device without a row yet is serialized too: no unique violation, no lost update."""
    async with two_hubs(pg_url) as (a, b):
        await a.add_node(NODE, KEY)
        # Forced overlap: b's lock_device waits while a holds the new device.
        a_locked = asyncio.Event()

        async def first() -> DeviceRecord | None:
            async with a.transaction() as tx:
                assert await tx.claim_batch(NODE, 1, D0, 100, 3)
                dev = await tx.lock_device(NODE, "new-1")
                a_locked.set()
                await lock_waiters(pg_url)
                await tx.put_device(device("new-1", frames=3))
                await tx.add_completeness(NODE, "new-1", D0, 3, 0)
            return dev

        async def second() -> DeviceRecord | None:
            await a_locked.wait()
            return await _add_frames(b, 2, 5, device_id="new-1", day_ms=D0)

        seen_first, seen_second = await asyncio.gather(first(), second())
        assert seen_first is None
        assert seen_second == device("new-1", frames=3), "b did not wait for a's commit"
        assert [d.frames for d in await a.devices(NODE)] == [8]
        assert (await a.completeness(NODE, D0))[0].live == 8

        # A burst from both hubs on another new device, on a day no partition exists for.
        day = D0 + 30 * DAY_MS
        frames = [1, 2, 3, 4, 5, 6, 7, 8]
        await asyncio.gather(
            *(
                _add_frames(hub, 10 + i, n, device_id="new-2", day_ms=day)
                for i, n in enumerate(frames)
                for hub in [(a, b)[i % 2]]
            )
        )
        devices = {d.device_id: d for d in await b.devices(NODE)}
        assert devices["new-2"].frames == sum(frames)
        assert [c.live for c in await b.completeness(NODE, day)] == [sum(frames)]
        assert len(await b.blocks(NODE, "new-2", day, day + DAY_MS)) == len(frames)
        node = await a.node(NODE)
        assert node is not None and node.batches == 1 + len(frames)


async def test_a_day_pruned_by_another_hub(pg_url: str) -> None:
    async with two_hubs(pg_url) as (a, b):
        await store_blocks(a, block(1, D0))
        assert await b.prune(D1, 0) == 1
        with pytest.raises(StorageError, match="pruned by another process"):
            await store_blocks(a, block(2, D0 + 1))
        await store_blocks(a, block(2, D0 + 1))  # the retry makes the day again
        assert await b.block(NODE, DEV, 2) == block(2, D0 + 1)


async def test_cancelled_while_waiting_on_a_lock(pg_url: str) -> None:
    async with two_hubs(pg_url) as (a, b):
        async with a.transaction() as tx:
            assert await tx.claim_batch(NODE, 5, D0, 100, 10)
            waiting = asyncio.create_task(_claim(b, 5))
            await lock_waiters(pg_url)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        # b's connections are back in its pool and usable.
        for _ in range(b.max_size + 1):
            assert not await _claim(b, 5)
        assert await _claim(b, 6)


async def test_a_day_made_while_a_transaction_holds_blocks(pg_url: str) -> None:
    """A partition attached after a transaction locked ``blocks`` is used by that
    transaction, even through a prepared INSERT (which does not look at the catalog again)."""
    hub = PostgresStorage(pg_url, min_size=1, max_size=1)  # one connection: the same session
    async with hub:
        for i in range(8):  # psycopg prepares a statement on its 5th run
            await store_blocks(hub, block(1 + i, D0 + i))
        async with hub.transaction() as tx:
            assert await tx.claim_batch(NODE, 100, D0, 100, 10)
            await tx.insert_block(block(100, D0 + MINUTE_MS))
            await hub.ensure_partition(D1)  # as this process's next request would
            await tx.insert_block(block(100, D1, device_id="meter-2"))
        assert await hub.block(NODE, "meter-2", 100) == block(100, D1, device_id="meter-2")
