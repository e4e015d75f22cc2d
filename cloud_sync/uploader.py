"""The edge's uploader: stored frames to the hub, oldest first, signed, acknowledged.

Two lanes run as named tasks. The live lane sends each device's newest frames every
``interval_s`` (a few seconds of rows, chained on the coder state the hub confirmed it holds,
so a short batch costs about what a long one does). The backlog lane drains what the live
lane left behind (after an outage, or at start) oldest first, in full batches back to back.
What the hub holds of a device is a ``SyncState`` the node persists through its store's
writer: everything up to ``acked``, plus the live lane's range; a frame counts as synced only
once the batch that carried it was acknowledged.

When the live lane finds more than ``jump_rows`` frames waiting (the hub was away) and no
backlog is being drained, it leaves them to the backlog lane and goes on with new frames, so
the hub never falls further behind than that while it is reachable.

Answers: network errors and 5xx are retried with the same body (same batch id: the hub answers
a stored one "duplicate") under jittered exponential backoff; 409 and 422 unknown_schema make
the batch again as keyframes / with whole schemas; 429 waits; 401/403 are reported and retried
slowly, never hammered; other 4xx (a malformed batch, a clock far off) move the batch to the
node's dead letters and count its frames as rejected, so one bad batch never stops the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx
import msgspec

from .backoff import Backoff
from .batch import encode
from .model import DeviceSchema, Frame, NodeStatus
from .protocol import BATCHES_PATH, CONTENT_TYPE, MIN_TS_MS, Ack, ErrorBody
from .rollup import DAY_MS
from .signing import NodeKey, sign
from .syncstate import NO_KEY, Key, SyncState

__all__ = (
    "NO_KEY",
    "Key",
    "SyncSource",
    "SyncState",
    "SyncStats",
    "Uploader",
    "UploaderSettings",
)

log = logging.getLogger(__name__)


class SyncSource(Protocol):
    """What the uploader needs from the node's store (edge_runtime implements it)."""

    def device_ids(self) -> Sequence[str]: ...

    def state(self, device_id: str) -> SyncState: ...

    def set_state(self, device_id: str, state: SyncState) -> None:
        """Persist (through the store's one writer) what the hub now holds."""

    async def read(
        self, device_id: str, after: Key, upto: Key | None, limit: int
    ) -> list[tuple[Frame, DeviceSchema]]:
        """Up to ``limit`` stored frames with after < key <= upto, oldest first."""

    async def newest(self, device_id: str) -> Key | None: ...

    async def pending(self, device_id: str, after: Key, upto: Key | None) -> tuple[int, int | None]:
        """(frames, oldest ts) stored with after < key <= upto."""

    async def status(self) -> NodeStatus:
        """The node's status; the uploader fills in backlog and drift."""

    def reject(self, frames: Sequence[Frame], body: bytes, reason: str) -> None:
        """The hub refused these frames for good: keep the body as a dead letter and count
        the frames as lost."""

    def batch_id_floor(self) -> int:
        """The highest batch id this node has used (persisted)."""

    def note_batch_id(self, batch_id: int) -> None: ...


@dataclass(frozen=True)
class UploaderSettings:
    url: str
    """The hub's base URL (https://..., or http:// to loopback or when allowed)."""
    node_id: str
    interval_s: float = 5.0
    """The live lane sends this often: the hub lags the site by about this much."""
    max_rows: int = 600
    """Rows per device in one batch."""
    jump_rows: int = 1200
    """Frames waiting for the live lane beyond which they go to the backlog lane."""
    chain_rows: int = 720
    """A live chain starts again from a keyframe after this many chained blocks."""
    heartbeat_s: float = 30.0
    """The node's status rides along at least this often (an empty batch if need be)."""
    timeout_s: float = 30.0
    max_backoff_s: float = 60.0
    refused_retry_s: float = 60.0
    """How often to try again while the hub refuses this node (unknown node, wrong key)."""
    drift_warn_ms: int = 60_000


@dataclass
class SyncStats:
    """What the status page, /metrics and `gridlet sync status` show."""

    state: str = "starting"
    """ok, offline (the hub does not answer), refused (the hub refuses this node)."""
    last_error: str | None = None
    last_ack_ms: int | None = None
    drift_ms: int | None = None
    """This node's clock minus the hub's, from the last acknowledgement."""
    backlog_frames: int = 0
    backlog_oldest_ms: int | None = None
    batches: int = 0
    frames: int = 0
    body_bytes: int = 0
    coded_bytes: int = 0
    values: int = 0
    duplicates: int = 0
    rejected_frames: int = 0
    keyframes: int = 0
    chained: int = 0
    chains_refused: int = 0
    """Chained batches the hub could not continue (sent again as keyframes)."""
    lag_ms: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))
    """Per acknowledged live frame: acknowledgement time minus reading time."""
    _rate: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=120))

    @property
    def drift_flagged(self) -> bool:
        return self.drift_ms is not None and abs(self.drift_ms) > 60_000

    def note_frames(self, n: int) -> None:
        self._rate.append((time.monotonic(), n))

    @property
    def rate(self) -> float:
        """Frames acknowledged per second over the last minute."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t <= 60]
        if not recent:
            return 0.0
        span = max(1.0, now - recent[0][0])
        return sum(n for _, n in recent) / span

    @property
    def eta_s(self) -> float | None:
        r = self.rate
        return self.backlog_frames / r if r > 0 and self.backlog_frames else None


@dataclass
class _Chain:
    batch_id: int
    state: bytearray
    digest: bytes
    day: int
    length: int


class _Retry(Exception):  # noqa: N818 - control flow, not an error
    """Send again after ``delay`` seconds (the same body when ``same``)."""

    def __init__(self, delay: float, same: bool, why: str) -> None:
        super().__init__(why)
        self.delay = delay
        self.same = same


class Uploader:
    """Runs the two lanes until cancelled: ``await uploader.run()``."""

    def __init__(
        self,
        source: SyncSource,
        key: NodeKey,
        settings: UploaderSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.key = key
        self.s = settings
        self.clock = clock
        self.stats = SyncStats()
        self._transport = transport
        self._known: set[bytes] = set()
        self._chains: dict[str, _Chain] = {}
        self._last_id = 0
        self._last_status = 0.0
        self._wake = asyncio.Event()
        self._max_rows = {"live": settings.max_rows, "backlog": settings.max_rows}

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def poke(self) -> None:
        """New frames were committed: the live lane may go now rather than at its tick."""
        self._wake.set()

    def _next_id(self) -> int:
        # Time-based, above anything used before (persisted): a restarted node never reuses
        # an id, which the hub would take for a duplicate.
        self._last_id = max(
            self._last_id + 1, self.source.batch_id_floor() + 1, self.now_ms() * 1000
        )
        self.source.note_batch_id(self._last_id)
        return self._last_id

    async def run(self) -> None:
        base = self.s.url.rstrip("/")
        async with (
            httpx.AsyncClient(
                base_url=base,
                timeout=self.s.timeout_s,
                transport=self._transport,
                # Plain http needs no certificates: loading the bundle costs 3 MB on a Pi.
                verify=base.startswith("https:"),
            ) as client,
            asyncio.TaskGroup() as tg,
        ):
            tg.create_task(self._lane(client, "live"), name="sync-live")
            tg.create_task(self._lane(client, "backlog"), name="sync-backlog")
            tg.create_task(self._measure(), name="sync-backlog-count")

    # ------------------------------------------------------------------ lanes

    async def _lane(self, client: httpx.AsyncClient, lane: str) -> None:
        backoff = Backoff(1.0, self.s.max_backoff_s)
        while True:
            try:
                sent = await self._round(client, lane)
                backoff.reset()
            except _Retry as exc:
                delay = backoff.next() if exc.delay < 0 else exc.delay
                log.debug("sync %s: %s; again in %.1f s", lane, exc, delay)
                await asyncio.sleep(delay)
                continue
            if lane == "live":
                try:
                    async with asyncio.timeout(self.s.interval_s):
                        await self._wake.wait()
                    # A commit woke us: let the interval pass anyway, unless we are behind.
                    await asyncio.sleep(0 if sent >= self._max_rows[lane] else self.s.interval_s)
                except TimeoutError:
                    pass
                self._wake.clear()
            elif sent == 0:
                await asyncio.sleep(min(1.0, self.s.interval_s))

    async def _round(self, client: httpx.AsyncClient, lane: str) -> int:
        """Make and send one batch of the lane; the number of frames it carried."""
        rows: dict[str, list[tuple[Frame, DeviceSchema]]] = {}
        starts: dict[str, Key] = {}
        limit = self._max_rows[lane]
        for dev in self.source.device_ids():
            st = self.source.state(dev)
            if lane == "live":
                if not st.has_backlog:
                    waiting, _ = await self.source.pending(dev, st.live_acked, None)
                    if waiting > self.s.jump_rows:
                        newest = await self.source.newest(dev)
                        if newest is not None:
                            st = SyncState(st.acked, newest, newest)
                            self.source.set_state(dev, st)
                            log.info("sync %s: %d frames left to the backlog lane", dev, waiting)
                got = await self.source.read(dev, st.live_acked, None, limit)
            else:
                if not st.has_backlog:
                    continue
                got = await self.source.read(dev, st.acked, st.live_from, limit)
                starts[dev] = st.acked
                if not got:  # evicted before upload: the backlog is gone
                    self._ack_backlog(dev, st.acked, st.live_from)
                    continue
            if got:
                rows[dev] = got
        heartbeat = lane == "live" and self.clock() - self._last_status >= self.s.heartbeat_s
        if not rows and not heartbeat:
            return 0
        await self._send(client, lane, rows, heartbeat, starts)
        return sum(len(v) for v in rows.values())

    async def _send(
        self,
        client: httpx.AsyncClient,
        lane: str,
        rows: dict[str, list[tuple[Frame, DeviceSchema]]],
        with_status: bool,
        starts: dict[str, Key],
    ) -> None:
        status = await self._status() if with_status else None
        frames = [f for got in rows.values() for f, _ in got]
        schemas = {dev: got[-1][1] for dev, got in rows.items()}
        # A device whose schema changed within the rows sends up to the change now.
        for dev, got in list(rows.items()):
            cut = next((i for i, (_, s) in enumerate(got) if s != got[0][1]), len(got))
            if cut < len(got):
                rows[dev] = got[:cut]
                schemas[dev] = got[0][1]
        # A clock that was never set stamps frames in 1970: no hub takes them, and one of
        # them must not make a whole batch fail. They are counted lost here.
        unset = [f for got in rows.values() for f, _ in got if f.ts_ms < MIN_TS_MS]
        if unset:
            self.source.reject(unset, b"", "stamped before 2000: the clock was not set")
            self.stats.rejected_frames += len(unset)
        send = {
            dev: kept
            for dev, got in rows.items()
            if (kept := [(f, s) for f, s in got if f.ts_ms >= MIN_TS_MS])
        }
        frames = [f for got in send.values() for f, _ in got]
        if not frames and status is None:
            self._advance(lane, rows, starts)
            return
        while True:
            batch_id = self._next_id()
            chains = self._chains_for(send, schemas) if lane == "live" else {}
            states: dict[str, bytearray] = {}
            created = self.now_ms()
            batch = encode(
                frames,
                schemas,
                node_id=self.s.node_id,
                batch_id=batch_id,
                created_ms=created,
                known_schemas=self._known,
                chains={d: (c.batch_id, c.state) for d, c in chains.items()},
                states_out=states,
                status=status,
            )
            body = sign(self.key, self.s.node_id, batch)
            try:
                ack = await self._post(client, body, lane)
            except _Rebuild as exc:
                if exc.devices:
                    self.stats.chains_refused += 1
                for dev in exc.devices:
                    self._chains.pop(dev, None)
                if exc.schemas:
                    self._known.clear()
                if exc.smaller:
                    self._max_rows[lane] = max(1, self._max_rows[lane] // 2)
                    raise _Retry(0, False, "batch too large: fewer rows") from None
                continue
            except _Rejected as exc:
                self.source.reject(frames, body, exc.reason)
                self.stats.rejected_frames += len(frames)
                self._advance(lane, rows, starts)
                return
            break
        self._acked(
            lane,
            rows=send,
            schemas=schemas,
            chains=chains,
            states=states,
            ack=ack,
            body=body,
            batch_id=batch_id,
            created=created,
        )
        self._advance(lane, rows, starts)
        if status is not None:
            self._last_status = self.clock()

    def _chains_for(
        self, rows: dict[str, list[tuple[Frame, DeviceSchema]]], schemas: dict[str, DeviceSchema]
    ) -> dict[str, _Chain]:
        out: dict[str, _Chain] = {}
        for dev, got in rows.items():
            c = self._chains.get(dev)
            if c is None:
                continue
            first = got[0][0]
            if (
                c.digest != schemas[dev].digest()
                or first.ts_ms // DAY_MS * DAY_MS != c.day
                or c.length >= self.s.chain_rows
            ):
                self._chains.pop(dev, None)
                continue
            out[dev] = c
        return out

    async def _post(self, client: httpx.AsyncClient, body: bytes, lane: str) -> Ack:
        """POST until the hub answers something definite; _Retry for what time may fix."""
        try:
            r = await client.post(
                BATCHES_PATH, content=body, headers={"content-type": CONTENT_TYPE}
            )
        except httpx.HTTPError as exc:
            self._offline(f"{type(exc).__name__}: {exc}")
            raise _Retry(-1, True, str(exc)) from exc
        if r.status_code == 200:
            try:
                return msgspec.json.decode(r.content, type=Ack)
            except msgspec.DecodeError as exc:
                self._offline(f"unreadable acknowledgement: {exc}")
                raise _Retry(-1, True, "bad ack") from exc
        try:
            err = msgspec.json.decode(r.content, type=ErrorBody)
        except msgspec.DecodeError:
            err = ErrorBody(error=f"http_{r.status_code}", detail=r.text[:200], hub_time_ms=0)
        why = f"{r.status_code} {err.error}: {err.detail}"
        if r.status_code >= 500:
            self._offline(why)
            raise _Retry(-1, True, why)
        if r.status_code == 409:
            log.info("sync: %s", why)
            raise _Rebuild(devices=err.broken_chains or list(self._chains))
        if r.status_code == 422 and err.error == "unknown_schema":
            raise _Rebuild(schemas=True)
        if r.status_code == 413:
            raise _Rebuild(smaller=True)
        if r.status_code == 429:
            raise _Retry(err.retry_after_s or 1.0, True, why)
        if r.status_code in (401, 403):
            if self.stats.state != "refused":
                log.error("sync: the hub refuses this node: %s", why)
            self.stats.state = "refused"
            self.stats.last_error = why
            raise _Retry(self.s.refused_retry_s, True, why)
        log.error("sync: the hub refused a %s batch for good: %s", lane, why)
        raise _Rejected(why)

    def _offline(self, why: str) -> None:
        if self.stats.state != "offline":
            log.warning("sync: hub unreachable: %s", why)
        self.stats.state = "offline"
        self.stats.last_error = why

    # ------------------------------------------------------------------ bookkeeping

    def _acked(
        self,
        lane: str,
        *,
        rows: dict[str, list[tuple[Frame, DeviceSchema]]],
        schemas: dict[str, DeviceSchema],
        chains: dict[str, _Chain],
        states: dict[str, bytearray],
        ack: Ack,
        body: bytes,
        batch_id: int,
        created: int,
    ) -> None:
        now = self.now_ms()
        st = self.stats
        if st.state != "ok":
            log.info("sync: the hub answers again")
        st.state = "ok"
        st.last_error = None
        st.last_ack_ms = now
        # Half the round trip either way: the hub's clock at our `now` is about hub_time.
        st.drift_ms = now - ack.hub_time_ms - (now - created) // 2
        st.batches += 1
        st.body_bytes += len(body)
        st.duplicates += ack.frames_duplicate
        n = sum(len(v) for v in rows.values())
        st.frames += n
        st.note_frames(n)
        for dev, got in rows.items():
            schema = schemas[dev]
            self._known.add(schema.digest())
            st.values += len(got) * len(schema.fields)
            if dev in chains:
                st.chained += 1
            else:
                st.keyframes += 1
            if lane == "live":
                st.lag_ms.extend(now - f.ts_ms for f, _ in got)
                if ack.chain.get(dev) == batch_id and dev in states:
                    prev = chains.get(dev)
                    self._chains[dev] = _Chain(
                        batch_id=batch_id,
                        state=states[dev],
                        digest=schema.digest(),
                        day=(prev.day if prev else got[0][0].ts_ms // DAY_MS * DAY_MS),
                        length=(prev.length + 1 if prev else 1),
                    )
                else:
                    self._chains.pop(dev, None)

    def _advance(
        self,
        lane: str,
        rows: dict[str, list[tuple[Frame, DeviceSchema]]],
        starts: dict[str, Key],
    ) -> None:
        for dev, got in rows.items():
            last = max(f.seq for f, _ in got)
            st = self.source.state(dev)
            if lane == "live":
                st = SyncState(st.acked, st.live_from, max(st.live_acked, last))
                if not st.has_backlog:
                    st = SyncState(st.live_acked, st.live_acked, st.live_acked)
                self.source.set_state(dev, st)
            else:
                self._ack_backlog(dev, starts[dev], last)

    def _ack_backlog(self, dev: str, start: Key, last: Key) -> None:
        """The hub holds the backlog from ``start`` up to ``last``; unless a frame arrived
        below ``start`` meanwhile (the store moved the watermark back: it goes next)."""
        st = self.source.state(dev)
        if st.acked != start:
            return
        acked = max(st.acked, last)
        if acked >= st.live_from:
            top = max(acked, st.live_acked)
            st = SyncState(top, top, top)
        else:
            st = SyncState(acked, st.live_from, st.live_acked)
        self.source.set_state(dev, st)

    async def _status(self) -> NodeStatus:
        base = await self.source.status()
        await self._count_backlog()
        return msgspec.structs.replace(
            base,
            backlog_frames=self.stats.backlog_frames,
            backlog_oldest_ms=self.stats.backlog_oldest_ms,
            drift_ms=self.stats.drift_ms,
        )

    async def _count_backlog(self) -> None:
        total = 0
        oldest: int | None = None
        for dev in self.source.device_ids():
            st = self.source.state(dev)
            a, oa = await self.source.pending(dev, st.acked, st.live_from)
            b, ob = await self.source.pending(dev, st.live_acked, None)
            total += a + b
            for o in (oa, ob):
                if o is not None and (oldest is None or o < oldest):
                    oldest = o
        self.stats.backlog_frames = total
        self.stats.backlog_oldest_ms = oldest

    async def _measure(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._count_backlog()
            except Exception:  # a locked or vanished database: the next count may work
                log.debug("sync: counting the backlog failed", exc_info=True)
            # Counting a week of backlog walks millions of index entries: on a Pi, count
            # less often the longer it takes (at most 5% of the time).
            await asyncio.sleep(max(2.0, 20 * (time.monotonic() - started)))


class _Rebuild(Exception):  # noqa: N818 - control flow, not an error
    def __init__(
        self, *, devices: Sequence[str] = (), schemas: bool = False, smaller: bool = False
    ) -> None:
        super().__init__("rebuild")
        self.devices = list(devices)
        self.schemas = schemas
        self.smaller = smaller


class _Rejected(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
