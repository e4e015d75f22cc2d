"""The live fan-out: one bus subscription, the newest reading per device, coalesced deltas.

The hub is the only consumer of the ``live`` bus subscription. It keeps the latest reading of
every device (what ``/api/devices`` shows as ``latest``) and a frame counter per device, and it
never queues anything per client: each client remembers only what it last sent. When a
client may send again (its rate allows), it compares the hub's current state with what it
sent and builds a delta of just the differences, so a slow client naturally skips
intermediate frames (counted in ``dropped_updates``) and always gets the newest values.

Message shapes (webui/API.md, ``WS /api/live``)::

    {"type": "snapshot", "now_ms": ..., "devices": {id: {"online", "fields", "ts_ms", "seq",
                                                         "values"}}}
    {"type": "delta", "now_ms": ..., "d": {id: {"ts", "seq", "v": {"<index>": value}}},
     "online": {id: bool}, "schema": {id: [field names]}}   # online/schema only when non-empty
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from cloud_sync import DeviceSchema

from ..bus import Reading
from ..devices.base import now_ms
from ..runtime import Runtime
from ..store import Reader

__all__ = ("LiveClient", "LiveHub")

log = logging.getLogger(__name__)

GATHER_S = 0.005
"""How long a change waits for the rest of its read slot: devices with one interval are read
together (``runtime.Cadence``) and finish within milliseconds of each other, so they go out in
one message instead of the first alone and the rest a whole interval later."""

SPACING = 0.9
"""Messages to one client are at least ``SPACING / rate`` seconds apart (``_send_delay``)."""

BURST = 2.0
"""Tokens a client's rate limiter holds at most (``LiveClient._send_delay``)."""

_UNSENT: Any = object()
"""Marks a value slot a client has not sent yet (differs from every value, None included)."""


def _norm(x: float | None) -> float | None:
    """JSON has no NaN or infinity: the client sees null, so compare what it sees."""
    return x if x is None or math.isfinite(x) else None


@dataclass(slots=True)
class _Device:
    """The hub's view of one device."""

    schema: DeviceSchema | None = None
    fields: tuple[str, ...] = ()
    reading: Reading | None = None
    frames: int = 0
    """Frames the hub received for this device since it started (skips are counted from it)."""


@dataclass(slots=True)
class _Sent:
    """What one client last sent for one device."""

    fields: tuple[str, ...]
    values: list[Any]
    frames: int
    online: bool


@dataclass(eq=False)
class LiveClient:
    """One WebSocket client's state: what it sent, when, and whether anything changed since.

    Nothing is queued: ``next_message()`` builds a message from the hub's current state when
    the client's rate allows one."""

    hub: LiveHub
    rate: int
    """Messages per second at most, on average (see ``_send_delay``)."""
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _sent: dict[str, _Sent] = field(default_factory=dict)
    _tokens: float = BURST
    _tokens_at: float = -math.inf
    _last_send: float = -math.inf
    _snapshot_sent: bool = False

    def _refill(self, now: float) -> None:
        self._tokens = min(BURST, self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now

    def _send_delay(self, now: float) -> float:
        """Seconds until the rate allows the next message.

        Two limits: messages at least ``SPACING / rate`` apart, and a token bucket of
        ``rate`` tokens a second holding at most ``BURST``, one per message, so that over
        time they average at most ``rate`` a second. The slack between the two lets a client
        whose message went out late (a busy moment) catch up with the devices' read slots;
        a limiter with none (each message exactly ``1 / rate`` after the last) stays late
        for good when the devices make exactly ``rate`` slots a second, adding up to a whole
        interval to every update.
        """
        self._refill(now)
        return max(
            0.0,
            self._last_send + SPACING / self.rate - now,
            (1.0 - self._tokens) / self.rate,
        )

    def _record_send(self, at: float) -> None:
        self._last_send = at
        self._refill(at)
        self._tokens -= 1.0

    async def next_message(self) -> bytes:
        """Wait until something changed and the rate allows a message; return it (JSON).

        A change after a quiet period waits ``GATHER_S`` for the rest of its read slot;
        changes that arrive while the rate holds messages back are merged into one."""
        loop = asyncio.get_running_loop()
        gather = min(GATHER_S, 0.1 / self.rate)
        while True:
            await self._wake.wait()
            await asyncio.sleep(max(self._send_delay(loop.time()), gather))
            # Clear before building, with no await in between: a change that lands while the
            # message is on its way wakes the next round and is never lost.
            self._wake.clear()
            if self._snapshot_sent:
                msg = self.hub._delta(self)
            else:
                msg = self.hub._snapshot(self)
                self._snapshot_sent = True
            if msg is not None:
                self._record_send(loop.time())
                self.hub.messages += 1
                return msg


class LiveHub:
    """Fans the bus out to WebSocket clients; run ``run()`` as a runtime service."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        queue_size: int = 10_000,
        status_poll_s: float = 0.25,
    ) -> None:
        self.runtime = runtime
        self.status_poll_s = status_poll_s
        """How often device status (online/offline) is compared when no frame arrives."""
        self.messages = 0
        """Messages sent to clients, snapshots included."""
        self.dropped_updates = 0
        """Frames a client never saw on their own because a newer one replaced them."""
        self._sub = runtime.bus.subscribe("live", maxsize=queue_size)
        self._devices: dict[str, _Device] = {}
        self._online: dict[str, bool] = {}
        self._clients: set[LiveClient] = set()

    # ------------------------------------------------------------------ state

    @property
    def clients(self) -> int:
        return len(self._clients)

    def stats(self) -> dict[str, int]:
        return {
            "clients": len(self._clients),
            "messages": self.messages,
            "dropped_updates": self.dropped_updates,
        }

    def device_ids(self) -> list[str]:
        """Devices with a reading or a known schema, then those with only a status."""
        ids = list(self._devices)
        ids.extend(d for d in self.runtime.statuses if d not in self._devices)
        return ids

    def latest(self, device_id: str) -> Reading | None:
        dev = self._devices.get(device_id)
        return None if dev is None else dev.reading

    def schema(self, device_id: str) -> DeviceSchema | None:
        """The device's current schema: of its latest reading, else the newest stored one."""
        dev = self._devices.get(device_id)
        return None if dev is None else dev.schema

    def online(self, device_id: str) -> bool:
        st = self.runtime.statuses.get(device_id)
        if st is not None:
            return st.online
        # A source without a status record (a push driver's sub-device) is online once it
        # delivered a reading in this process.
        dev = self._devices.get(device_id)
        return dev is not None and dev.reading is not None

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Consume the bus until cancelled, waking clients when something changed."""
        await self._seed_from_store()
        sub = self._sub
        while True:
            batch = await sub.get_batch(100_000, timeout=self.status_poll_s)
            changed = self._ingest(batch)
            if self._poll_online() or changed:
                for client in self._clients:
                    client._wake.set()

    async def _seed_from_store(self) -> None:
        """Know the fields of devices with history but no reading yet (after a restart, or
        a device that is offline), so the dashboard can list them and chart their history."""
        try:
            schemas = await asyncio.to_thread(Reader(self.runtime.store.path).schemas)
        except Exception:  # the dashboard works without it; the store reports its own errors
            log.warning("could not read stored schemas", exc_info=True)
            return
        for _sid, (device_id, schema) in sorted(schemas.items()):
            dev = self._devices.setdefault(device_id, _Device())
            if dev.reading is None:  # newer ids are newer schemas; a live reading wins
                dev.schema = schema
                dev.fields = tuple(f.name for f in schema.fields)

    def _ingest(self, batch: Sequence[Reading]) -> bool:
        devices = self._devices
        for r in batch:
            dev = devices.get(r.frame.device_id)
            if dev is None:
                dev = devices[r.frame.device_id] = _Device()
            if r.schema is not dev.schema:  # drivers reuse one schema object: cheap test first
                dev.schema = r.schema
                dev.fields = tuple(f.name for f in r.schema.fields)
            dev.reading = r
            dev.frames += 1
        return bool(batch)

    def _poll_online(self) -> bool:
        changed = False
        for device_id in self.device_ids():
            on = self.online(device_id)
            if self._online.get(device_id) != on:
                self._online[device_id] = on
                changed = True
        return changed

    @contextlib.asynccontextmanager
    async def client(self, rate: int) -> AsyncIterator[LiveClient]:
        """Register a client for the duration of the block."""
        if not rate > 0:
            raise ValueError("rate must be positive")
        c = LiveClient(self, rate)
        c._wake.set()  # the snapshot is due at once
        self._clients.add(c)
        try:
            yield c
        finally:
            self._clients.discard(c)

    # ------------------------------------------------------------------ messages

    def _snapshot(self, c: LiveClient) -> bytes:
        devices: dict[str, dict[str, Any]] = {}
        for device_id in self.device_ids():
            dev = self._devices.get(device_id)
            on = self.online(device_id)
            fields = dev.fields if dev is not None else ()
            r = dev.reading if dev is not None else None
            values = [None] * len(fields) if r is None else [_norm(x) for x in r.frame.values]
            devices[device_id] = {
                "online": on,
                "fields": list(fields),
                "ts_ms": None if r is None else r.frame.ts_ms,
                "seq": None if r is None else r.frame.seq,
                "values": values,
            }
            c._sent[device_id] = _Sent(
                fields, list(values), dev.frames if dev is not None else 0, on
            )
        return msgspec.json.encode({"type": "snapshot", "now_ms": now_ms(), "devices": devices})

    def _delta(self, c: LiveClient) -> bytes | None:
        d: dict[str, dict[str, Any]] = {}
        online: dict[str, bool] = {}
        schema: dict[str, list[str]] = {}
        for device_id in self.device_ids():
            dev = self._devices.get(device_id)
            on = self.online(device_id)
            fields = dev.fields if dev is not None else ()
            s = c._sent.get(device_id)
            if s is None:  # a new device arrives by its schema (possibly empty), then d
                s = c._sent[device_id] = _Sent(fields, [_UNSENT] * len(fields), 0, on)
                schema[device_id] = list(fields)
                online[device_id] = on
            else:
                if s.fields != fields:
                    schema[device_id] = list(fields)
                    s.fields = fields
                    s.values = [_UNSENT] * len(fields)
                if s.online != on:
                    online[device_id] = on
                    s.online = on
            if dev is None or dev.reading is None or dev.frames == s.frames:
                continue
            f = dev.reading.frame
            if len(s.values) != len(f.values):  # a driver out of step with its schema
                s.values = [_UNSENT] * len(f.values)
            v: dict[str, float | None] = {}
            sent = s.values
            for i, x in enumerate(f.values):
                x = _norm(x)  # noqa: PLW2901 - compare what the client will see
                old = sent[i]
                if old is _UNSENT or old != x:
                    v[str(i)] = x
                    sent[i] = x
            skipped = dev.frames - s.frames - 1
            if skipped > 0:
                self.dropped_updates += skipped
            s.frames = dev.frames
            d[device_id] = {"ts": f.ts_ms, "seq": f.seq, "v": v}
        if not (d or online or schema):
            return None
        msg: dict[str, Any] = {"type": "delta", "now_ms": now_ms(), "d": d}
        if online:
            msg["online"] = online
        if schema:
            msg["schema"] = schema
        return msgspec.json.encode(msg)
