"""The hub's storage: one base class, a backend per database (SQLite, PostgreSQL).

What is stored, and how compactly: a device block is kept as the coded bytes it arrived in
(one row per block, not per value: about the wire size), with its place in a chain of blocks
(``key_batch``: the keyframe's batch, ``chain_from``: the predecessor's) so that any hub process
can rebuild the state a chained block needs. Frames whose sequence numbers the hub already
holds are dropped before storing (a block then keeps only its new frames, packed losslessly,
and ends its chain). Rollups (1 min, 1 h) are computed by cloud_sync.rollup, the code the edge
uses. Completeness counts frames per device and UTC day: live, backfilled, and what the node
reports lost.

Every backend implements the primitives of ``Tx`` inside one transaction; the one ingest
algorithm (``hub_lite.ingest.Ingestor``) runs over them, so both backends store alike by
construction.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

import msgspec

from cloud_sync import DeviceSchema, Loss, NodeStatus

__all__ = (
    "BlockRecord",
    "CompletenessRecord",
    "DeviceRecord",
    "NodeRecord",
    "Storage",
    "StorageError",
    "Tx",
)


class StorageError(RuntimeError):
    """The database failed or refused an operation (not the client's fault)."""


class NodeRecord(msgspec.Struct, kw_only=True):
    node_id: str
    public_key: bytes
    added_ms: int
    last_seen_ms: int | None = None
    last_batch_id: int | None = None
    status: NodeStatus | None = None
    drift_ms: int | None = None
    """The node's clock minus the hub's at its last batch."""
    batches: int = 0
    body_bytes: int = 0


class DeviceRecord(msgspec.Struct, kw_only=True):
    node_id: str
    device_id: str
    schema_digest: bytes
    kind: str
    model: str
    last_ts_ms: int | None = None
    last_seq: int | None = None
    latest: bytes | None = None
    """The newest frame's values, packed (predictor_ext.pack_values)."""
    held: bytes = b""
    """Sequence numbers held, as sorted disjoint [lo, hi] int64 pairs."""
    frames: int = 0
    values: int = 0
    """Values received (rows x fields), for bits per value."""
    wire_bytes: int = 0
    """Coded bytes of this device's blocks as they arrived."""
    json_bytes: int = 0
    """What the same frames cost as JSON lines, for the compression ratio."""


class BlockRecord(msgspec.Struct, kw_only=True):
    node_id: str
    device_id: str
    batch_id: int
    schema_digest: bytes
    first_ts_ms: int
    last_ts_ms: int
    first_seq: int
    last_seq: int
    frames: int
    chain_from: int
    """0 for a keyframe, else the batch whose block of this device this continues."""
    key_batch: int
    """The batch of the chain's keyframe (this batch for a keyframe)."""
    chain_len: int
    packed: bool
    """True: ``data`` holds frames packed losslessly (a block trimmed of frames the hub held);
    such a block ends its chain. False: the coded bytes as they arrived."""
    data: bytes


class CompletenessRecord(msgspec.Struct, kw_only=True):
    device_id: str
    day_ms: int
    live: int = 0
    backfill: int = 0
    evicted: int = 0
    rejected: int = 0
    gaps: int = 0


class Tx(abc.ABC):
    """The primitives of one ingest transaction."""

    @abc.abstractmethod
    async def claim_batch(
        self, node_id: str, batch_id: int, received_ms: int, body_bytes: int, frames: int
    ) -> bool:
        """Record the batch id; False when it is stored already (then write nothing)."""

    @abc.abstractmethod
    async def lock_device(self, node_id: str, device_id: str) -> DeviceRecord | None:
        """The device's row, locked until the transaction ends (None: a new device)."""

    @abc.abstractmethod
    async def put_device(self, rec: DeviceRecord) -> None: ...

    @abc.abstractmethod
    async def put_schema(self, digest: bytes, schema: DeviceSchema) -> None:
        """Store a schema by its digest (nothing when held)."""

    @abc.abstractmethod
    async def insert_block(self, rec: BlockRecord) -> None: ...

    @abc.abstractmethod
    async def get_rollups(  # noqa: PLR0917 - mirrors the rollups key
        self, node_id: str, device_id: str, res_ms: int, digest: bytes, lo_ms: int, hi_ms: int
    ) -> dict[int, bytes]:
        """Stats blobs of buckets in [lo_ms, hi_ms) by bucket start."""

    @abc.abstractmethod
    async def put_rollups(
        self,
        node_id: str,
        device_id: str,
        res_ms: int,
        digest: bytes,
        rows: Sequence[tuple[int, bytes]],
    ) -> None:
        """Insert or replace (bucket start, stats blob) rows."""

    @abc.abstractmethod
    async def add_completeness(
        self, node_id: str, device_id: str, day_ms: int, live: int, backfill: int
    ) -> None: ...

    @abc.abstractmethod
    async def report_losses(self, node_id: str, losses: Sequence[Loss]) -> None:
        """Keep, per device and day, the largest running totals the node has reported."""

    @abc.abstractmethod
    async def touch_node(
        self,
        node_id: str,
        *,
        seen_ms: int,
        batch_id: int,
        body_bytes: int,
        status: NodeStatus | None,
        drift_ms: int,
    ) -> None: ...


class Storage(abc.ABC):
    """A hub database. Open with ``await backend.open()``, close with ``await close()``."""

    name: str = "?"

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """One write transaction: committed when the block ends, rolled back on error."""

    # ------------------------------------------------------------------ nodes

    @abc.abstractmethod
    async def add_node(self, node_id: str, public_key: bytes, *, replace: bool = False) -> bool:
        """Register a node's public key; False when the node exists and not ``replace``."""

    @abc.abstractmethod
    async def node_key(self, node_id: str) -> bytes | None: ...

    @abc.abstractmethod
    async def nodes(self) -> list[NodeRecord]: ...

    @abc.abstractmethod
    async def node(self, node_id: str) -> NodeRecord | None: ...

    # ------------------------------------------------------------------ reads

    @abc.abstractmethod
    async def schemas(self, digests: Sequence[bytes]) -> dict[bytes, DeviceSchema]: ...

    @abc.abstractmethod
    async def devices(self, node_id: str) -> list[DeviceRecord]: ...

    @abc.abstractmethod
    async def block(self, node_id: str, device_id: str, batch_id: int) -> BlockRecord | None: ...

    @abc.abstractmethod
    async def chain(
        self, node_id: str, device_id: str, key_batch: int, upto_batch: int
    ) -> list[BlockRecord]:
        """The blocks of a chain with batch ids in [key_batch, upto_batch]."""

    @abc.abstractmethod
    async def blocks(
        self, node_id: str, device_id: str, start_ms: int, end_ms: int
    ) -> list[BlockRecord]:
        """Blocks holding frames in [start_ms, end_ms), and the earlier blocks of their
        chains, in batch order."""

    @abc.abstractmethod
    async def rollups(
        self, node_id: str, device_id: str, res_ms: int, start_ms: int, end_ms: int
    ) -> list[tuple[int, bytes, bytes]]:
        """(bucket start, schema digest, stats blob) in [start_ms, end_ms), oldest first."""

    @abc.abstractmethod
    async def completeness(self, node_id: str, day_ms: int) -> list[CompletenessRecord]: ...

    @abc.abstractmethod
    async def prune(self, raw_before_ms: int, rollups_before_ms: int) -> int:
        """Drop raw blocks (whole days on PostgreSQL) and rollups older than the cuts; the
        number of blocks dropped."""

    @abc.abstractmethod
    async def db_bytes(self) -> int:
        """Bytes the hub's data take in the database (tables and indexes)."""

    async def __aenter__(self) -> Storage:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
