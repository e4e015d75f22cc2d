"""The dashboard's JSON API (webui/API.md): response Structs, routes and the history reader.

Every response type is a msgspec Struct, so the OpenAPI document at ``/schema/openapi.json``
describes exactly what is sent. History is read on a worker thread through the read-only
``Reader`` (never the writer's connection), at a resolution chosen by the range so that the
answer stays bounded: raw frames for an hour, 1-minute rollups up to a week, 1-hour rollups
up to a year (8,760 points).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Response, WebSocket, get, websocket
from litestar.exceptions import (
    ClientException,
    NotFoundException,
    ValidationException,
    WebSocketDisconnect,
)
from litestar.handlers import HTTPRouteHandler, WebsocketRouteHandler
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Stream

from cloud_sync import DeviceSchema, Field

from ..config import SiteConfig
from ..devices.base import DeviceStatus, now_ms
from ..runtime import Runtime
from ..store import DAY_MS, HOUR_MS, MINUTE_MS, Reader
from .auth import deny_websocket
from .live import LiveClient, LiveHub

__all__ = (
    "MAX_RAW_POINTS",
    "RANGES",
    "BusSubscriber",
    "DeadLetter",
    "DeviceHealth",
    "DeviceInfo",
    "DeviceStatusInfo",
    "FieldInfo",
    "Health",
    "HealthComponents",
    "HistoryResponse",
    "Latest",
    "LiveStats",
    "SeriesStats",
    "SiteInfo",
    "StatusResponse",
    "StoreHealth",
    "StoreInfo",
    "SyncInfo",
    "WebContext",
    "api_routes",
    "validation_error_handler",
)

log = logging.getLogger(__name__)

RANGES: dict[str, tuple[int, int]] = {
    "1h": (HOUR_MS, 0),
    "24h": (DAY_MS, MINUTE_MS),
    "7d": (7 * DAY_MS, MINUTE_MS),
    "30d": (30 * DAY_MS, HOUR_MS),
    "1y": (365 * DAY_MS, HOUR_MS),
}
"""range -> (span, resolution in ms; 0 is raw frames)."""
_RESOLUTION_NAMES = {0: "raw", MINUTE_MS: "1m", HOUR_MS: "1h"}

MAX_RAW_POINTS = 20_000
"""An hour of raw frames from a device faster than ~5 Hz is thinned to this many
min/avg/max buckets, so one request cannot ask for millions of points."""

_CSV_WINDOW_MS = 10 * MINUTE_MS  # raw CSV is read and sent in slices of this span
_MAX_END_MS = 2**53  # JavaScript's exact integers


# ---------------------------------------------------------------------- response types


class FieldInfo(msgspec.Struct):
    name: str
    unit: str
    tol: float


class Latest(msgspec.Struct):
    ts_ms: int
    seq: int
    values: list[float | None]


class DeviceStatusInfo(msgspec.Struct):
    device_id: str
    kind: str
    model: str
    online: bool
    last_seen_ms: int | None
    reads: int
    errors: int
    timeouts: int
    last_error: str | None
    info: dict[str, Any]
    counters: dict[str, int]
    fields: list[FieldInfo]


class DeviceInfo(DeviceStatusInfo):
    latest: Latest | None
    """null before the first reading."""


class SiteInfo(msgspec.Struct):
    node_id: str
    name: str
    version: str
    started_ms: int | None
    now_ms: int
    auth: bool


class SeriesStats(msgspec.Struct):
    avg: list[float | None]
    min: list[float | None]
    max: list[float | None]


class HistoryResponse(msgspec.Struct):
    device_id: str
    range: str
    resolution: Literal["raw", "1m", "1h"]
    start_ms: int
    end_ms: int
    fields: list[FieldInfo]
    t: list[int]
    series: dict[str, SeriesStats]


class StoreInfo(msgspec.Struct):
    path: str
    size_bytes: int
    max_size_bytes: int
    committed_frames: int
    commits: int
    last_commit_ms: int | None
    evicted_synced: int
    evicted_unsynced: int
    expired_frames: int
    dead_letters: int


class BusSubscriber(msgspec.Struct):
    queued: int
    delivered: int
    dropped: int


class LiveStats(msgspec.Struct):
    clients: int
    messages: int
    dropped_updates: int


class SyncInfo(msgspec.Struct):
    state: str
    """not configured, starting, ok, offline (the hub does not answer), refused."""
    backlog_frames: int | None
    last_upload_ms: int | None
    last_error: str | None
    backlog_oldest_ms: int | None = None
    rate_fps: float | None = None
    """Frames acknowledged per second over the last minute."""
    eta_s: float | None = None
    drift_ms: int | None = None
    """This node's clock minus the hub's."""
    drift_flagged: bool = False
    """The clocks are more than 60 s apart."""
    hub_url: str | None = None


class StatusResponse(msgspec.Struct):
    devices: list[DeviceStatusInfo]
    store: StoreInfo
    bus: dict[str, BusSubscriber]
    live: LiveStats
    sync: SyncInfo


class DeadLetter(msgspec.Struct):
    ts_ms: int
    source: str
    key: str
    reason: str
    payload: str
    payload_base64: bool


class StoreHealth(msgspec.Struct):
    ok: bool
    last_commit_ms: int | None
    committed_frames: int
    errors: int
    """Readings the store lost because its queue overflowed."""


class DeviceHealth(msgspec.Struct):
    connected: bool
    last_message_ms: int | None
    messages: int
    errors: int


class HealthComponents(msgspec.Struct):
    store: StoreHealth
    devices: dict[str, DeviceHealth]


class Health(msgspec.Struct):
    status: Literal["ok", "degraded"]
    uptime_s: float
    components: HealthComponents


# ---------------------------------------------------------------------- context


_NOT_CONFIGURED = SyncInfo("not configured", None, None, None)


@dataclass
class WebContext:
    """What the routes read: the running edge and the dashboard's settings."""

    runtime: Runtime
    cfg: SiteConfig
    hub: LiveHub
    version: str
    auth: bool
    send_timeout_s: float = 5.0
    """A live client whose send blocks this long is dropped."""
    sync_status: Callable[[], SyncInfo] | None = None
    """The uploader's state, once one is wired in."""
    created_ms: int = 0

    @property
    def reader(self) -> Reader:
        return Reader(self.runtime.store.path)


def _clean_info(value: object) -> Any:
    """Device-reported facts as JSON: anything exotic becomes its text."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _clean_info(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean_info(v) for v in value]
    return str(value)


def _fields(schema: DeviceSchema | None) -> list[FieldInfo]:
    return [] if schema is None else [FieldInfo(f.name, f.unit, f.tol) for f in schema.fields]


def _device_kwargs(ctx: WebContext, device_id: str) -> dict[str, Any]:
    st: DeviceStatus | None = ctx.runtime.statuses.get(device_id)
    schema = ctx.hub.schema(device_id)
    info = dict(st.info) if st is not None else {}
    model = schema.model if schema is not None else str(info.get("model", ""))
    kind = st.kind if st is not None else (schema.kind if schema is not None else "")
    return {
        "device_id": device_id,
        "kind": kind,
        "model": model,
        "online": ctx.hub.online(device_id),
        "last_seen_ms": st.last_seen_ms if st is not None else None,
        "reads": st.reads if st is not None else 0,
        "errors": st.errors if st is not None else 0,
        "timeouts": st.timeouts if st is not None else 0,
        "last_error": st.last_error if st is not None else None,
        "info": _clean_info(info),
        "counters": dict(st.counters) if st is not None else {},
        "fields": _fields(schema),
    }


def _device(ctx: WebContext, device_id: str) -> DeviceInfo:
    r = ctx.hub.latest(device_id)
    latest = None if r is None else Latest(r.frame.ts_ms, r.frame.seq, list(r.frame.values))
    return DeviceInfo(**_device_kwargs(ctx, device_id), latest=latest)


def _known(ctx: WebContext, device_id: str) -> bool:
    return device_id in ctx.runtime.statuses or ctx.hub.schema(device_id) is not None


# ---------------------------------------------------------------------- history


@dataclass(frozen=True)
class _Plan:
    device_id: str
    range: str
    res_ms: int
    start_ms: int
    end_ms: int
    fields: list[Field]


def _parse_end(end_ms: str | None) -> int:
    if end_ms is None or end_ms == "":
        return now_ms()
    if not re.fullmatch(r"\d{1,16}", end_ms.strip()):
        raise ClientException(f"end_ms must be Unix time in milliseconds, got {end_ms!r}")
    end = int(end_ms)
    if end > _MAX_END_MS:
        raise ClientException(f"end_ms {end} is out of range")
    return end


def _check_params(range_: str, end_ms: str | None, fields: str | None) -> int:
    """Check the parameters that need no database; return the end of the range."""
    if range_ not in RANGES:
        raise ClientException(f"unknown range {range_!r}: use one of {', '.join(RANGES)}")
    end = _parse_end(end_ms)
    if fields is not None and not [n for n in fields.split(",") if n.strip()]:
        raise ClientException("fields is empty: leave it out for every field")
    return end


def _resolve_fields(
    device_id: str,
    stored: Sequence[DeviceSchema],
    live: DeviceSchema | None,
    wanted: str | None,
) -> list[Field]:
    """The requested fields (default: those of the current schema), described by the newest
    schema that has them."""
    schemas = [*stored, *([live] if live is not None else [])]
    by_name: dict[str, Field] = {}
    for sch in schemas:  # oldest first: the newest description wins
        for f in sch.fields:
            by_name[f.name] = f
    if wanted is None:
        return list(schemas[-1].fields) if schemas else []
    names = list(dict.fromkeys(n.strip() for n in wanted.split(",") if n.strip()))
    unknown = [n for n in names if n not in by_name]
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        raise ClientException(
            f"unknown field {', '.join(map(repr, unknown))} for device {device_id!r};"
            f" its fields: {known}"
        )
    return [by_name[n] for n in names]


@dataclass(frozen=True)
class _Request:
    """A history request, with what the event loop knows of the device (taken there: the
    live state is not for worker threads to read)."""

    device_id: str
    range: str
    end_ms: int
    fields: str | None
    known: bool
    live_schema: DeviceSchema | None


def _request(
    ctx: WebContext, device_id: str, range_: str, end_ms: str | None, fields: str | None
) -> _Request:
    """Check the parameters that need no database."""
    end = _check_params(range_, end_ms, fields)
    return _Request(
        device_id, range_, end, fields, _known(ctx, device_id), ctx.hub.schema(device_id)
    )


def _load_plan(reader: Reader, req: _Request) -> _Plan:
    """On a worker thread: the device's stored schemas decide 404 and the field list."""
    try:
        schemas = reader.schemas()
    except FileNotFoundError:
        schemas = {}
    stored = [sch for _sid, (dev, sch) in sorted(schemas.items()) if dev == req.device_id]
    if not stored and not req.known:
        raise NotFoundException(f"unknown device {req.device_id!r}")
    span, res = RANGES[req.range]
    fields = _resolve_fields(req.device_id, stored, req.live_schema, req.fields)
    return _Plan(req.device_id, req.range, res, req.end_ms - span, req.end_ms, fields)


class _Index:
    """Maps a stored schema's value positions onto the requested fields."""

    def __init__(self, fields: Sequence[Field]) -> None:
        self.names = [f.name for f in fields]
        self._maps: dict[int, list[int | None]] = {}

    def of(self, schema: DeviceSchema) -> list[int | None]:
        # Reader hands out one schema object per stored schema for a whole read: id() is a
        # safe key while the read lasts.
        m = self._maps.get(id(schema))
        if m is None:
            pos = {f.name: i for i, f in enumerate(schema.fields)}
            m = self._maps[id(schema)] = [pos.get(n) for n in self.names]
        return m


def _pick(values: Sequence[float | None], m: Sequence[int | None]) -> list[float | None]:
    n = len(values)
    return [values[i] if i is not None and i < n else None for i in m]


def _read_raw(
    reader: Reader, plan: _Plan, start: int, end: int
) -> list[tuple[int, list[float | None]]]:
    index = _Index(plan.fields)
    return [
        (frame.ts_ms, _pick(frame.values, index.of(schema)))
        for frame, schema in reader.frames(plan.device_id, start, end)
    ]


@dataclass
class _Bucket:
    t: int
    count: list[int]
    min: list[float | None]
    avg: list[float | None]
    max: list[float | None]

    def merge(
        self,
        count: Sequence[int],
        lo: Sequence[float | None],
        avg: Sequence[float | None],
        hi: Sequence[float | None],
    ) -> None:
        """A bucket stored twice (the device's schema changed within it): combine both."""
        for j, c in enumerate(count):
            a = avg[j]
            if not c or a is None:
                continue
            c0, a0 = self.count[j], self.avg[j]
            self.avg[j] = a if not c0 or a0 is None else (a0 * c0 + a * c) / (c0 + c)
            self.count[j] = c0 + c
            self.min[j] = _opt(min, self.min[j], lo[j])
            self.max[j] = _opt(max, self.max[j], hi[j])


def _opt(fn: Callable[[float, float], float], a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return fn(a, b)


def _read_rollups(reader: Reader, plan: _Plan) -> list[_Bucket]:
    index = _Index(plan.fields)
    out: list[_Bucket] = []
    for r, schema in reader.rollups(plan.device_id, plan.res_ms, plan.start_ms, plan.end_ms + 1):
        m = index.of(schema)
        count = [r.count[i] if i is not None and i < len(r.count) else 0 for i in m]
        lo, avg, hi = _pick(r.min, m), _pick(r.avg, m), _pick(r.max, m)
        if out and out[-1].t == r.bucket_ms:
            out[-1].merge(count, lo, avg, hi)
        else:
            out.append(_Bucket(r.bucket_ms, count, lo, avg, hi))
    return out


def _thin(rows: list[tuple[int, list[float | None]]], plan: _Plan) -> list[_Bucket]:
    """Raw frames into at most MAX_RAW_POINTS time buckets of min/avg/max."""
    width = math.ceil((plan.end_ms - plan.start_ms + 1) / MAX_RAW_POINTS)
    out: list[_Bucket] = []
    for ts, vals in rows:
        t = plan.start_ms + (ts - plan.start_ms) // width * width
        ones = [0 if v is None or not math.isfinite(v) else 1 for v in vals]
        clean = [v if c else None for v, c in zip(vals, ones, strict=True)]
        if out and out[-1].t == t:
            out[-1].merge(ones, clean, clean, clean)
        else:
            out.append(_Bucket(t, ones, clean, list(clean), list(clean)))
    return out


def _history(reader: Reader, plan: _Plan) -> HistoryResponse:
    """On a worker thread: the JSON history of a plan."""
    names = [f.name for f in plan.fields]
    t: list[int]
    if plan.res_ms == 0:
        rows = _read_raw(reader, plan, plan.start_ms, plan.end_ms + 1)
        if len(rows) <= MAX_RAW_POINTS:
            t = [ts for ts, _ in rows]
            cols = [list(c) for c in zip(*(v for _, v in rows), strict=True)] if rows else []
            if not cols:
                cols = [[] for _ in names]
            series = {n: SeriesStats(c, c, c) for n, c in zip(names, cols, strict=True)}
            return _response(plan, t, series)
        buckets = _thin(rows, plan)
    else:
        buckets = _read_rollups(reader, plan)
    t = [b.t for b in buckets]
    series = {
        n: SeriesStats(
            [b.avg[j] for b in buckets], [b.min[j] for b in buckets], [b.max[j] for b in buckets]
        )
        for j, n in enumerate(names)
    }
    return _response(plan, t, series)


def _response(plan: _Plan, t: list[int], series: dict[str, SeriesStats]) -> HistoryResponse:
    return HistoryResponse(
        device_id=plan.device_id,
        range=plan.range,
        resolution=_RESOLUTION_NAMES[plan.res_ms],  # type: ignore[arg-type]
        start_ms=plan.start_ms,
        end_ms=plan.end_ms,
        fields=[FieldInfo(f.name, f.unit, f.tol) for f in plan.fields],
        t=t,
        series=series,
    )


def _csv_text(rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows(("" if v is None else v for v in row) for row in rows)
    return buf.getvalue()


async def _csv_chunks(reader: Reader, plan: _Plan) -> AsyncIterator[str]:
    """The CSV in pieces, each read on a worker thread, so a long hour of a fast device is
    never held in memory at once."""
    names = [f.name for f in plan.fields]
    if plan.res_ms == 0:
        yield _csv_text([("ts_ms", *names)])
        lo = plan.start_ms
        while lo <= plan.end_ms:
            hi = min(lo + _CSV_WINDOW_MS, plan.end_ms + 1)
            rows = await asyncio.to_thread(_read_raw, reader, plan, lo, hi)
            if rows:
                yield _csv_text((ts, *vals) for ts, vals in rows)
            lo = hi
    else:
        header = ["ts_ms"]
        for n in names:
            header += [f"{n}_min", f"{n}_avg", f"{n}_max"]
        yield _csv_text([header])
        buckets = await asyncio.to_thread(_read_rollups, reader, plan)
        yield _csv_text(
            (b.t, *(x for j in range(len(names)) for x in (b.min[j], b.avg[j], b.max[j])))
            for b in buckets
        )


def _csv_filename(plan: _Plan) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", plan.device_id) or "device"
    end = datetime.fromtimestamp(plan.end_ms / 1000, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{safe}_{plan.range}_{end}.csv"


# ---------------------------------------------------------------------- status, health


def _health(ctx: WebContext) -> Health:
    rt = ctx.runtime
    now = now_ms()
    stats = rt.store.stats
    sub = rt.bus.stats().get("store", {})
    # Stale: readings are waiting while the last commit (or the start) is older than ten
    # commit intervals. An idle site with nothing to commit is not stale.
    since = stats.last_commit_ms or rt.started_ms or ctx.created_ms
    stale = sub.get("queued", 0) > 0 and now - since > 10 * rt.store.commit_interval * 1000
    devices = {
        device_id: DeviceHealth(st.online, st.last_seen_ms, st.reads, st.errors)
        for device_id, st in sorted(rt.statuses.items())
    }
    ok = not stale and all(d.connected for d in devices.values())
    started = rt.started_ms or ctx.created_ms
    return Health(
        status="ok" if ok else "degraded",
        uptime_s=round(max(0, now - started) / 1000, 3),
        components=HealthComponents(
            store=StoreHealth(
                ok=not stale,
                last_commit_ms=stats.last_commit_ms,
                committed_frames=stats.committed_frames,
                errors=sub.get("dropped", 0),
            ),
            devices=devices,
        ),
    )


def _status(ctx: WebContext) -> StatusResponse:
    rt = ctx.runtime
    s = rt.store.stats
    return StatusResponse(
        devices=[DeviceStatusInfo(**_device_kwargs(ctx, d)) for d in _device_ids(ctx)],
        store=StoreInfo(
            path=str(rt.store.path),
            size_bytes=s.size_bytes,
            max_size_bytes=rt.store.max_size_bytes,
            committed_frames=s.committed_frames,
            commits=s.commits,
            last_commit_ms=s.last_commit_ms,
            evicted_synced=s.evicted_synced,
            evicted_unsynced=s.evicted_unsynced,
            expired_frames=s.expired_frames,
            dead_letters=s.dead_letters,
        ),
        bus={name: BusSubscriber(**st) for name, st in rt.bus.stats().items()},
        live=LiveStats(**ctx.hub.stats()),
        sync=ctx.sync_status() if ctx.sync_status is not None else _NOT_CONFIGURED,
    )


def _device_ids(ctx: WebContext) -> list[str]:
    return sorted(ctx.hub.device_ids())


def _dead_letters(reader: Reader, limit: int) -> list[DeadLetter]:
    try:
        rows = reader.dead_letters(limit)
    except FileNotFoundError:
        return []
    out = []
    for ts, source, key, reason, payload in rows:
        try:
            text, b64 = payload.decode("utf-8"), False
        except UnicodeDecodeError:
            text, b64 = base64.b64encode(payload).decode("ascii"), True
        out.append(DeadLetter(ts, source, key, reason, text, b64))
    return out


# ---------------------------------------------------------------------- live socket


async def _pump(socket: WebSocket[Any, Any, Any], client: LiveClient, timeout_s: float) -> bool:
    """Send messages until the peer leaves (False) or stalls (True)."""
    while True:
        msg = await client.next_message()
        try:
            async with asyncio.timeout(timeout_s):
                await socket.send_data(msg.decode("utf-8"))
        except TimeoutError:
            return True
        except (OSError, WebSocketDisconnect):  # the peer went away mid-send
            return False
        except RuntimeError:  # uvicorn closed the socket first (shutting down)
            return False


async def _watch(socket: WebSocket[Any, Any, Any]) -> None:
    """Read (and ignore) what the client sends, until it disconnects."""
    try:
        while True:
            await socket.receive_data("text")
    except WebSocketDisconnect:
        return


async def _serve_live(
    socket: WebSocket[Any, Any, Any], hub: LiveHub, rate: int, timeout_s: float
) -> None:
    where = f"{socket.client.host}:{socket.client.port}" if socket.client else "?"
    await socket.accept()
    stalled = False
    async with hub.client(rate) as client:
        log.debug("live client %s connected (rate %d/s)", where, rate)
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(_pump(socket, client, timeout_s), name=f"live-send:{where}")
            watch = tg.create_task(_watch(socket), name=f"live-recv:{where}")
            # Whichever ends first (peer gone, or too slow) ends the other.
            pump.add_done_callback(lambda _: watch.cancel())
            watch.add_done_callback(lambda _: pump.cancel())
        stalled = pump.done() and not pump.cancelled() and pump.result()
    if stalled:
        # No close frame: it would wait behind the same full buffer. Returning lets the
        # server drop the connection.
        log.warning("live client %s did not take a message for %g s: dropped", where, timeout_s)
    else:
        log.debug("live client %s left", where)


# ---------------------------------------------------------------------- routes


def validation_error_handler(_request: Any, exc: ValidationException) -> Response[dict[str, Any]]:
    """Litestar's parameter errors as ``{"status_code": 400, "detail": "<param>: <why>"}``."""
    parts = []
    for e in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(e, dict):
            key = e.get("key")
            parts.append(f"{key}: {e.get('message')}" if key else str(e.get("message")))
    detail = "bad parameter " + "; ".join(parts) if parts else exc.detail
    return Response({"status_code": 400, "detail": detail}, status_code=400)


# Module level: Litestar resolves handler annotations in the module's namespace.
_RANGE_PARAM = QueryParameter(
    name="range",
    description="1h (raw frames), 24h or 7d (1-minute rollups), 30d or 1y (1-hour rollups)",
    schema_extra={"enum": list(RANGES)},
)
_END_PARAM = QueryParameter(
    name="end_ms",
    description="End of the range, Unix ms (default: now)",
    schema_extra={"type": "integer"},
    required=False,
)
_FIELDS_PARAM = QueryParameter(
    name="fields",
    description="Comma-separated field names (default: all)",
    required=False,
)


def api_routes(ctx: WebContext) -> list[HTTPRouteHandler | WebsocketRouteHandler]:
    """The JSON API, ``WS /api/live`` and ``/health``, bound to one runtime."""

    @get("/api/site", sync_to_thread=False, tags=["site"])
    def site() -> SiteInfo:
        """This site: id, name, software version, start time, clock, whether login is on."""
        return SiteInfo(
            node_id=ctx.cfg.site.node_id,
            name=ctx.cfg.site.name,
            version=ctx.version,
            started_ms=ctx.runtime.started_ms,
            now_ms=now_ms(),
            auth=ctx.auth,
        )

    @get("/api/devices", sync_to_thread=False, tags=["devices"])
    def devices() -> list[DeviceInfo]:
        """Every device: status, schema and latest values (null before the first reading)."""
        return [_device(ctx, d) for d in _device_ids(ctx)]

    @get("/api/devices/{device_id:str}", sync_to_thread=False, tags=["devices"])
    def device(device_id: FromPath[str]) -> DeviceInfo:
        """One device; 404 for an unknown id."""
        if not _known(ctx, device_id):
            raise NotFoundException(f"unknown device {device_id!r}")
        return _device(ctx, device_id)

    @get("/api/devices/{device_id:str}/history", tags=["history"])
    async def history(
        device_id: FromPath[str],
        range_: Annotated[str, _RANGE_PARAM] = "1h",
        end_ms: Annotated[str | None, _END_PARAM] = None,
        fields: Annotated[str | None, _FIELDS_PARAM] = None,
    ) -> HistoryResponse:
        """A device's history: raw frames, or min/avg/max per 1-minute or 1-hour bucket."""
        req = _request(ctx, device_id, range_, end_ms, fields)
        reader = ctx.reader
        plan = await asyncio.to_thread(_load_plan, reader, req)
        return await asyncio.to_thread(_history, reader, plan)

    @get(
        "/api/devices/{device_id:str}/history.csv",
        tags=["history"],
        media_type="text/csv",
        response_description="ts_ms, then per field its value (raw) or _min,_avg,_max",
    )
    async def history_csv(
        device_id: FromPath[str],
        range_: Annotated[str, _RANGE_PARAM] = "1h",
        end_ms: Annotated[str | None, _END_PARAM] = None,
        fields: Annotated[str | None, _FIELDS_PARAM] = None,
    ) -> Stream:
        """The same history as CSV, as a download."""
        req = _request(ctx, device_id, range_, end_ms, fields)
        reader = ctx.reader
        plan = await asyncio.to_thread(_load_plan, reader, req)
        return Stream(
            _csv_chunks(reader, plan),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{_csv_filename(plan)}"'},
        )

    @get("/api/status", sync_to_thread=False, tags=["site"])
    def status() -> StatusResponse:
        """Devices, store, bus queues, live clients and upload state."""
        return _status(ctx)

    @get("/api/dead-letters", tags=["site"])
    async def dead_letters(
        limit: Annotated[int, QueryParameter(ge=1, le=1000, description="At most this many")] = 50,
    ) -> list[DeadLetter]:
        """Messages that could not be used, newest first."""
        return await asyncio.to_thread(_dead_letters, ctx.reader, limit)

    @get("/health", sync_to_thread=False, tags=["site"])
    def health() -> Health:
        """ok, or degraded when a device is offline or the store stopped committing.
        Always 200."""
        return _health(ctx)

    @websocket("/api/live")
    async def live(socket: WebSocket[Any, Any, Any], rate: FromQuery[str | None] = None) -> None:
        """Snapshot, then coalesced deltas at most ``rate`` a second (1..50)."""
        if rate is None or rate == "":
            r = ctx.cfg.http.live_rate
        elif rate.isdigit() and 1 <= int(rate) <= 50:
            r = int(rate)
        else:
            await deny_websocket(
                socket.scope,
                socket.send,
                400,
                f"rate must be an integer from 1 to 50, got {rate!r}",
            )
            return
        await _serve_live(socket, ctx.hub, r, ctx.send_timeout_s)

    return [site, devices, device, history, history_csv, status, dead_letters, health, live]
