"""Signed ingest: check a body, decode it with the codec the edge used, store it once.

Checks run cheapest first and before any decoding: body size, the signed envelope, a known
node, the Ed25519 signature, the node's rate; then the batch is parsed and decoded, its
timestamps and sequence numbers checked, and everything is written in one transaction that
first claims the batch id (a stored id is a duplicate: 200, nothing written). Every refusal
is an ``IngestError`` with an HTTP status and a short code, raised before anything is written.

Chained blocks: a hub process keeps the coder state each device's last block ended with; when
a chained block names a predecessor the process does not hold (another process took it, or
this one restarted), the state is rebuilt by decoding the chain from its keyframe, read back
from the database. A chain the database cannot rebuild is refused (409) and the node sends a
keyframe: no value is ever reconstructed from a state the hub does not hold.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

import predictor_ext
from cloud_sync import MAX_VALUES, BatchError, DeviceSchema
from cloud_sync.batch import (
    BlockHeader,
    Columns,
    Parsed,
    UnknownSchemaError,
    decode_columns,
    parse,
)
from cloud_sync.protocol import MIN_TS_MS, Ack, ErrorBody
from cloud_sync.rollup import DAY_MS, HOUR_MS, MINUTE_MS, bucket_blobs, merge_blobs
from cloud_sync.signing import SignatureError, open_signed, verify

from .blocks import decode_stored, pack_columns
from .config import IngestConfig
from .storage.base import BlockRecord, DeviceRecord, Storage, Tx

__all__ = ("MAX_CHAIN", "MIN_TS_MS", "IngestError", "IngestStats", "Ingestor")

log = logging.getLogger(__name__)

MAX_CHAIN = 4096  # blocks in one chain; the edge starts a keyframe long before
LIVE_MS = 60_000  # a frame sent within a minute of its reading (node clock) arrived live
_STATE_CACHE = 4096  # (node, device) chain states kept per hub process


class IngestError(Exception):
    """A refused body: HTTP status, a short code and a message for the node's log."""

    def __init__(self, status: int, code: str, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra

    def body(self, hub_time_ms: int) -> ErrorBody:
        return ErrorBody(
            error=self.code,
            detail=self.detail,
            hub_time_ms=hub_time_ms,
            unknown_schemas=[h.hex() for h in self.extra.get("hashes", ())],  # type: ignore[attr-defined]
            broken_chains=list(self.extra.get("devices", ())),  # type: ignore[call-overload]
            retry_after_s=self.extra.get("retry_after_s"),  # type: ignore[arg-type]
        )


@dataclass
class _Chain:
    """The state a device's last coded block ended with, as this process holds it."""

    batch_id: int
    key_batch: int
    key_day: int
    chain_len: int
    schema: DeviceSchema
    digest: bytes
    state: bytearray


@dataclass
class IngestStats:
    batches: int = 0
    duplicates: int = 0
    frames: int = 0
    frames_duplicate: int = 0
    bytes: int = 0
    refused: dict[str, int] | None = None
    chain_rebuilds: int = 0


class _Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now


@dataclass
class _Decoded:
    header: BlockHeader
    cols: Columns
    digest: bytes
    chain: _Chain | None
    state: bytearray


class Ingestor:
    """Turns upload bodies into stored frames; one per hub process."""

    def __init__(
        self, storage: Storage, cfg: IngestConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.storage = storage
        self.cfg = cfg
        self.clock = clock
        self.stats = IngestStats(refused={})
        self._keys: dict[str, tuple[float, bytes | None]] = {}
        self._rate: dict[str, _Bucket] = {}
        self._schemas: dict[bytes, DeviceSchema] = {}
        self._chains: OrderedDict[tuple[str, str], _Chain] = OrderedDict()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def ingest(self, body: bytes) -> Ack:
        """Check, decode and store one body; IngestError when refused."""
        try:
            return await self._ingest(body)
        except IngestError as exc:
            assert self.stats.refused is not None
            self.stats.refused[exc.code] = self.stats.refused.get(exc.code, 0) + 1
            raise

    async def _ingest(self, body: bytes) -> Ack:
        received = self.now_ms()
        if len(body) > self.cfg.max_body_bytes:
            raise IngestError(
                413,
                "too_large",
                f"body of {len(body)} bytes, the limit is {self.cfg.max_body_bytes}",
            )
        try:
            node_id, batch_bytes, signature = open_signed(body)
        except SignatureError as exc:
            raise IngestError(400, "malformed", str(exc)) from exc
        key = await self._key(node_id)
        if key is None:
            raise IngestError(403, "unknown_node", f"node {node_id!r} is not registered here")
        try:
            verify(key, batch_bytes, signature)
        except SignatureError as exc:
            raise IngestError(401, "bad_signature", str(exc)) from exc
        self._take_token(node_id)
        parsed = await self._parse(batch_bytes)
        if parsed.node_id != node_id:
            raise IngestError(
                400,
                "node_mismatch",
                f"the batch names node {parsed.node_id!r} but {node_id!r} signed it",
            )
        if parsed.batch_id <= 0:
            raise IngestError(400, "malformed", "batch_id must be positive")
        decoded = await self._decode(node_id, parsed)
        self._check_times(decoded, received)
        drift = parsed.created_ms - received
        ack = await self._store(
            node_id,
            parsed=parsed,
            decoded=decoded,
            received=received,
            body_bytes=len(body),
            drift=drift,
        )
        self.stats.bytes += len(body)
        return ack

    # ------------------------------------------------------------------ checks

    async def _key(self, node_id: str) -> bytes | None:
        now = time.monotonic()
        hit = self._keys.get(node_id)
        if hit is not None and now - hit[0] < 10.0:
            return hit[1]
        key = await self.storage.node_key(node_id)
        if len(self._keys) > 100_000:
            self._keys.clear()
        self._keys[node_id] = (now, key)
        return key

    def forget_keys(self) -> None:
        self._keys.clear()

    def _take_token(self, node_id: str) -> None:
        now = time.monotonic()
        b = self._rate.get(node_id)
        if b is None:
            b = self._rate[node_id] = _Bucket(self.cfg.burst_per_node, now)
        b.tokens = min(self.cfg.burst_per_node, b.tokens + (now - b.stamp) * self.cfg.rate_per_node)
        b.stamp = now
        if b.tokens < 1.0:
            wait = (1.0 - b.tokens) / self.cfg.rate_per_node
            raise IngestError(
                429,
                "rate_limited",
                f"node {node_id!r} is over {self.cfg.rate_per_node:g} batches/s",
                retry_after_s=round(wait, 3),
            )
        b.tokens -= 1.0

    async def _parse(self, batch: bytes) -> Parsed:
        for attempt in (0, 1):
            try:
                return parse(batch, self._schemas, max_bytes=self.cfg.max_body_bytes)
            except UnknownSchemaError as exc:
                if attempt:
                    raise IngestError(422, "unknown_schema", str(exc), hashes=exc.hashes) from exc
                self._schemas.update(await self.storage.schemas(exc.hashes))
            except BatchError as exc:
                raise IngestError(400, "malformed", str(exc)) from exc
        raise AssertionError("unreachable")

    async def _decode(self, node_id: str, parsed: Parsed) -> list[_Decoded]:
        broken: list[str] = []
        plans: list[tuple[BlockHeader, DeviceSchema, bytes, _Chain | None]] = []
        for block in parsed.blocks:
            if block.chain_from:
                chain = await self._chain(node_id, block.device_id, block.chain_from)
                if chain is None or chain.chain_len >= MAX_CHAIN:
                    broken.append(block.device_id)
                    continue
                plans.append((block, chain.schema, chain.digest, chain))
            else:
                assert block.schema is not None and block.schema_digest is not None
                plans.append((block, block.schema, block.schema_digest, None))
        if broken:
            raise IngestError(
                409,
                "chain_broken",
                "no state to continue for device(s) "
                + ", ".join(map(repr, broken))
                + "; send keyframes",
                devices=broken,
            )
        total = parsed.declared_values
        out: list[_Decoded] = []
        for block, schema, digest, chain in plans:
            if chain is not None:
                total += block.frames * (len(schema.fields) + 2)
            if total > MAX_VALUES:
                raise IngestError(400, "malformed", "batch declares too many values")
            state = bytearray(chain.state) if chain else predictor_ext.new_state(len(schema.fields))
            try:
                cols = decode_columns(block, schema, state)
            except BatchError as exc:
                raise IngestError(400, "malformed", str(exc)) from exc
            if chain is not None and cols.ts[0] // DAY_MS * DAY_MS != chain.key_day:
                raise IngestError(
                    409,
                    "chain_broken",
                    f"device {block.device_id!r}: a chain may not cross a UTC day; send a keyframe",
                    devices=[block.device_id],
                )
            out.append(_Decoded(block, cols, digest, chain, state))
        return out

    def _check_times(self, decoded: Sequence[_Decoded], now_ms: int) -> None:
        latest = now_ms + int(self.cfg.max_future_s * 1000)
        for d in decoded:
            ts = d.cols.ts
            lo, hi = min(ts), max(ts)
            if lo < MIN_TS_MS:
                raise IngestError(
                    422,
                    "bad_timestamp",
                    f"device {d.header.device_id!r}: a frame before 2000 ({lo})",
                )
            if hi > latest:
                raise IngestError(
                    422,
                    "bad_timestamp",
                    f"device {d.header.device_id!r}: a frame {(hi - now_ms) / 1000:.0f} s"
                    " ahead of the hub's clock",
                )
            if len(set(d.cols.seqs)) != len(ts):
                raise IngestError(
                    400, "malformed", f"device {d.header.device_id!r}: a sequence number repeats"
                )

    # ------------------------------------------------------------------ chains

    async def _chain(self, node_id: str, device_id: str, batch_id: int) -> _Chain | None:
        held = self._chains.get((node_id, device_id))
        if held is not None and held.batch_id == batch_id:
            return held
        rec = await self.storage.block(node_id, device_id, batch_id)
        if rec is None or rec.packed:
            return None
        blocks = {
            b.batch_id: b
            for b in await self.storage.chain(node_id, device_id, rec.key_batch, batch_id)
        }
        path: list[BlockRecord] = []
        cur: BlockRecord | None = rec
        while cur is not None:
            if cur.packed or cur.schema_digest != rec.schema_digest:
                return None
            path.append(cur)
            if cur.chain_from == 0:
                break
            cur = blocks.get(cur.chain_from)
        if cur is None or cur.batch_id != rec.key_batch:
            return None
        schema = self._schemas.get(rec.schema_digest)
        if schema is None:
            got = await self.storage.schemas([rec.schema_digest])
            self._schemas.update(got)
            schema = got.get(rec.schema_digest)
            if schema is None:
                return None
        state = predictor_ext.new_state(len(schema.fields))
        for b in reversed(path):
            try:
                decode_stored(b, schema, state)
            except BatchError:
                log.exception("%s/%s: stored chain does not decode", node_id, device_id)
                return None
        self.stats.chain_rebuilds += 1
        key = path[-1]
        return _Chain(
            batch_id=batch_id,
            key_batch=rec.key_batch,
            key_day=key.first_ts_ms // DAY_MS * DAY_MS,
            chain_len=rec.chain_len,
            schema=schema,
            digest=rec.schema_digest,
            state=state,
        )

    def _remember(self, node_id: str, device_id: str, chain: _Chain) -> None:
        k = (node_id, device_id)
        self._chains[k] = chain
        self._chains.move_to_end(k)
        while len(self._chains) > _STATE_CACHE:
            self._chains.popitem(last=False)

    # ------------------------------------------------------------------ storing

    async def _store(
        self,
        node_id: str,
        *,
        parsed: Parsed,
        decoded: Sequence[_Decoded],
        received: int,
        body_bytes: int,
        drift: int,
    ) -> Ack:
        frames_total = sum(d.cols.n for d in decoded)
        new_total = 0
        confirmed: dict[str, _Chain] = {}
        async with self.storage.transaction() as tx:
            if not await tx.claim_batch(
                node_id, parsed.batch_id, received, body_bytes, frames_total
            ):
                duplicate = True
            else:
                duplicate = False
                # Devices in one order in every transaction: two batches of one node never
                # wait on each other's device locks in a cycle (a deadlock on PostgreSQL).
                for d in sorted(decoded, key=lambda d: d.header.device_id):
                    new, chain = await self._store_block(tx, node_id, parsed, d)
                    new_total += new
                    if chain is not None:
                        confirmed[d.header.device_id] = chain
                if parsed.status is not None and parsed.status.losses:
                    await tx.report_losses(node_id, parsed.status.losses)
                await tx.touch_node(
                    node_id,
                    seen_ms=received,
                    batch_id=parsed.batch_id,
                    body_bytes=body_bytes,
                    status=parsed.status,
                    drift_ms=drift,
                )
        if duplicate:
            self.stats.duplicates += 1
            return Ack(
                result="duplicate",
                batch_id=parsed.batch_id,
                hub_time_ms=self.now_ms(),
                frames_new=0,
                frames_duplicate=frames_total,
            )
        for device_id, chain in confirmed.items():
            self._remember(node_id, device_id, chain)
        self.stats.batches += 1
        self.stats.frames += new_total
        self.stats.frames_duplicate += frames_total - new_total
        return Ack(
            result="stored",
            batch_id=parsed.batch_id,
            hub_time_ms=self.now_ms(),
            frames_new=new_total,
            frames_duplicate=frames_total - new_total,
            chain=dict.fromkeys(confirmed, parsed.batch_id),
        )

    async def _store_block(
        self, tx: Tx, node_id: str, parsed: Parsed, d: _Decoded
    ) -> tuple[int, _Chain | None]:
        cols = d.cols
        schema = cols.schema
        nf = len(schema.fields)
        device_id = d.header.device_id
        await tx.put_schema(d.digest, schema)
        dev = await tx.lock_device(node_id, device_id)
        if dev is None or dev.schema_digest != d.digest:
            base = dev or DeviceRecord(
                node_id=node_id, device_id=device_id, schema_digest=d.digest, kind="", model=""
            )
            dev = msgspec.structs.replace(
                base, schema_digest=d.digest, kind=schema.kind, model=schema.model
            )
        held = _Intervals.from_bytes(dev.held)
        if held.overlaps(min(cols.seqs), max(cols.seqs)):
            keep = [i for i, s in enumerate(cols.seqs) if not held.contains(s)]
        else:  # the usual case: nothing of this block is held yet
            keep = list(range(cols.n))
        if not keep:
            return 0, None
        n = cols.n
        chain: _Chain | None = None
        key_batch, chain_from, length = parsed.batch_id, 0, 1
        if len(keep) == n:  # stored as it arrived: the coded bytes, in their chain
            ts, seqs, values = cols.ts, cols.seqs, cols.values
            key_day = ts[0] // DAY_MS * DAY_MS
            if d.chain is not None:
                key_batch, key_day = d.chain.key_batch, d.chain.key_day
                chain_from, length = d.header.chain_from, d.chain.chain_len + 1
            chain = _Chain(parsed.batch_id, key_batch, key_day, length, schema, d.digest, d.state)
            data = d.header.data
        else:  # trimmed of frames held already: packed losslessly, ending its chain
            ts = array("q", [cols.ts[i] for i in keep])
            seqs = array("q", [cols.seqs[i] for i in keep])
            values = array("d")
            for j in range(nf):
                col = cols.values[j * n : (j + 1) * n]
                values.extend(col[i] for i in keep)
            data = pack_columns(ts, seqs, values)
        rec = BlockRecord(
            node_id=node_id,
            device_id=device_id,
            batch_id=parsed.batch_id,
            schema_digest=d.digest,
            first_ts_ms=ts[0],
            last_ts_ms=max(ts),
            first_seq=seqs[0],
            last_seq=seqs[-1],
            frames=len(ts),
            chain_from=chain_from,
            key_batch=key_batch,
            chain_len=length,
            packed=chain is None,
            data=data,
        )
        await tx.insert_block(rec)
        await _rollups(
            tx, node_id, device_id=device_id, digest=d.digest, ts=ts, values=values, nf=nf
        )
        k = len(ts)
        live = backfill = 0
        by_day: dict[int, list[int]] = {}
        for t in ts:
            day = by_day.setdefault(t // DAY_MS * DAY_MS, [0, 0])
            if parsed.created_ms - t <= LIVE_MS:
                day[0] += 1
            else:
                day[1] += 1
        for day_ms, (lv, bf) in sorted(by_day.items()):
            await tx.add_completeness(node_id, device_id, day_ms, lv, bf)
            live += lv
            backfill += bf
        held.add_all(seqs)
        newest = max(range(k), key=lambda i: (ts[i], seqs[i]))
        if dev.last_ts_ms is None or (ts[newest], seqs[newest]) > (
            dev.last_ts_ms,
            dev.last_seq or 0,
        ):
            latest = predictor_ext.pack_values(array("d", values[newest::k]))
            dev = msgspec.structs.replace(
                dev, last_ts_ms=ts[newest], last_seq=seqs[newest], latest=latest
            )
        wire = len(d.header.data) if not rec.packed else 0
        await tx.put_device(
            msgspec.structs.replace(
                dev,
                held=held.to_bytes(),
                frames=dev.frames + k,
                values=dev.values + k * nf,
                wire_bytes=dev.wire_bytes + wire,
                json_bytes=dev.json_bytes + json_size(schema, device_id, ts, values),
            )
        )
        return k, chain


async def _rollups(
    tx: Tx,
    node_id: str,
    *,
    device_id: str,
    digest: bytes,
    ts: array[int],
    values: array[float],
    nf: int,
) -> None:
    """Merge the new frames into their minute buckets, then recompute the hours touched from
    their minutes, as the edge does."""
    fresh = bucket_blobs(ts, values, nf, MINUTE_MS)
    lo, hi = fresh[0][0], fresh[-1][0] + MINUTE_MS
    old = await tx.get_rollups(node_id, device_id, MINUTE_MS, digest, lo, hi)
    rows = [(b, merge_blobs([old[b], blob], nf) if b in old else blob) for b, blob in fresh]
    await tx.put_rollups(node_id, device_id, MINUTE_MS, digest, rows)
    hours = sorted({b // HOUR_MS * HOUR_MS for b, _ in fresh})
    out: list[tuple[int, bytes]] = []
    for h in hours:
        minutes = await tx.get_rollups(node_id, device_id, MINUTE_MS, digest, h, h + HOUR_MS)
        out.append((h, merge_blobs([minutes[m] for m in sorted(minutes)], nf)))
    await tx.put_rollups(node_id, device_id, HOUR_MS, digest, out)


def json_size(schema: DeviceSchema, device_id: str, ts: array[int], values: array[float]) -> int:
    """Bytes of the same frames as JSON lines ``{"device_id":..,"ts_ms":..,"seq":..,name:v}``:
    the value text exactly (msgspec's float formatting), the keys and framing counted."""
    n = len(ts)
    text = len(msgspec.json.encode(values.tolist()))  # NaN and inf are written as null
    per_row = len(device_id) + 40 + sum(len(f.name) + 4 for f in schema.fields)
    ts_text = len(msgspec.json.encode(ts.tolist())) * 2  # ts and seq, about the same width
    return n * per_row + text - 2 + ts_text


class _Intervals:
    """A set of integers as sorted disjoint [lo, hi] ranges (sequence numbers held)."""

    __slots__ = ("r",)

    def __init__(self, r: list[list[int]]) -> None:
        self.r = r

    @classmethod
    def from_bytes(cls, data: bytes) -> _Intervals:
        a = array("q", data)
        return cls([[a[i], a[i + 1]] for i in range(0, len(a), 2)])

    def to_bytes(self) -> bytes:
        return array("q", [x for pair in self.r for x in pair]).tobytes()

    def _find(self, v: int) -> int:
        """Index of the first range whose hi >= v - 1."""
        lo, hi = 0, len(self.r)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.r[mid][1] < v - 1:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether any of lo..hi is held."""
        i = self._find(lo + 1)
        return i < len(self.r) and self.r[i][0] <= hi

    def add_all(self, values: array[int]) -> None:
        """Add many values: their runs merged with the ranges held, in one sort."""
        runs: list[list[int]] = []
        for v in sorted(values):
            if runs and runs[-1][1] >= v - 1:
                runs[-1][1] = max(runs[-1][1], v)
            else:
                runs.append([v, v])
        merged: list[list[int]] = []
        for lo, hi in sorted(self.r + runs):
            if merged and merged[-1][1] >= lo - 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.r = merged

    def contains(self, v: int) -> bool:
        i = self._find(v + 1)
        return i < len(self.r) and self.r[i][0] <= v <= self.r[i][1]
