"""The hub's HTTP application: signed ingest, a small read-only JSON API, /health, /metrics.

Ingest (``POST /api/v1/batches``) is open to nodes (each body is signed); everything under
``/api/v1/nodes`` needs the admin token (``Authorization: Bearer ...``) until users and
roles arrive. The process keeps no state another process would need: several hub processes
may serve one PostgreSQL database behind one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.metadata
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotAuthorizedException, NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.params import Parameter

import predictor_ext
from cloud_sync.protocol import BATCHES_PATH, Ack
from cloud_sync.rollup import DAY_MS

from . import metrics
from .config import HubConfig
from .ingest import IngestError, Ingestor
from .read import read_frames
from .storage import DeviceRecord, NodeRecord, Storage

__all__ = (
    "CompletenessDay",
    "DeviceInfo",
    "FramesResponse",
    "NodeInfo",
    "create_app",
    "hash_token",
    "new_token",
    "prune_once",
    "retention",
)

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return importlib.metadata.version("gridlet")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree
        return "0"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Tokens are long and random: a plain SHA-256 is the right hash (no brute force)."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class FieldInfo(msgspec.Struct):
    name: str
    unit: str
    tolerance: float


class DeviceInfo(msgspec.Struct):
    device_id: str
    kind: str
    model: str
    fields: list[FieldInfo]
    last_ts_ms: int | None
    last_seq: int | None
    latest: list[float | None]
    frames: int
    bits_per_value: float | None
    """Coded bits on the wire per value received (rows x fields)."""
    json_ratio: float | None
    """How many times smaller than the same frames as JSON lines."""


class NodeInfo(msgspec.Struct):
    node_id: str
    online: bool
    last_seen_ms: int | None
    software_version: str | None
    boot_ms: int | None
    drift_ms: int | None
    """The node's clock minus the hub's at its last batch."""
    drift_flagged: bool
    backlog_frames: int | None
    backlog_oldest_ms: int | None
    disk_free_bytes: int | None
    batches: int
    body_bytes: int
    devices: list[dict[str, Any]]
    """Per device as the node reports it: online, last seen, error counters."""
    frames: int
    """Frames the hub holds of this node."""
    bits_per_value: float | None
    """Coded bits on the wire per value, over all the node's devices."""
    json_ratio: float | None
    """How many times smaller than the same frames as JSON lines."""


class CompletenessDay(msgspec.Struct):
    device_id: str
    day: str
    live: int
    backfill: int
    lost_evicted: int
    lost_rejected: int
    lost_gaps: int


class FramesResponse(msgspec.Struct):
    device_id: str
    fields: list[str]
    ts_ms: list[int]
    seq: list[int]
    values: list[list[float | None]]
    """Per frame, the values in field order."""


class HealthResponse(msgspec.Struct):
    status: str
    storage: str
    version: str
    codec: str


def _node_info(
    rec: NodeRecord, devices: Sequence[DeviceRecord], now_ms: int, drift_warn_ms: int
) -> NodeInfo:
    st = rec.status
    values = sum(d.values for d in devices)
    wire = sum(d.wire_bytes for d in devices)
    online = rec.last_seen_ms is not None and now_ms - rec.last_seen_ms < 120_000
    return NodeInfo(
        node_id=rec.node_id,
        online=online,
        last_seen_ms=rec.last_seen_ms,
        software_version=st.software_version if st else None,
        boot_ms=st.boot_ms if st else None,
        drift_ms=rec.drift_ms,
        drift_flagged=rec.drift_ms is not None and abs(rec.drift_ms) > drift_warn_ms,
        backlog_frames=st.backlog_frames if st else None,
        backlog_oldest_ms=st.backlog_oldest_ms if st else None,
        disk_free_bytes=st.disk_free_bytes if st else None,
        batches=rec.batches,
        body_bytes=rec.body_bytes,
        devices=[msgspec.to_builtins(d) for d in st.devices] if st else [],
        frames=sum(d.frames for d in devices),
        bits_per_value=8 * wire / values if values else None,
        json_ratio=sum(d.json_bytes for d in devices) / wire if wire else None,
    )


def _day(value: str) -> int:
    try:
        d = date.fromisoformat(value)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=f"day {value!r} is not YYYY-MM-DD") from exc
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)


async def prune_once(storage: Storage, cfg: HubConfig, now_ms: int) -> int:
    """Drop raw data and rollups past their retention; the number of blocks dropped."""
    r = cfg.retention
    return await storage.prune(
        now_ms - int(r.raw_days * DAY_MS), now_ms - int(r.rollup_days * DAY_MS)
    )


async def retention(storage: Storage, cfg: HubConfig, every_s: float = 3600.0) -> None:
    """Prune at start and then hourly. Every hub process does it: pruning is idempotent."""
    while True:
        try:
            dropped = await prune_once(storage, cfg, int(time.time() * 1000))
            if dropped:
                log.info("retention: dropped %d blocks of raw data", dropped)
        except Exception:  # the database may be briefly away: the next hour tries again
            log.exception("retention failed")
        await asyncio.sleep(every_s)


def create_app(storage: Storage, cfg: HubConfig, *, open_storage: bool = True) -> Litestar:
    """The hub application over ``storage`` (opened and closed with the app when
    ``open_storage``)."""
    ingestor = Ingestor(storage, cfg.ingest)
    token_hash = cfg.hub.admin_token_hash
    drift_warn_ms = int(cfg.ingest.drift_warn_s * 1000)

    def admin(request: Request[Any, Any, Any]) -> None:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not token_hash or not token or not hmac.compare_digest(hash_token(token), token_hash):
            raise NotAuthorizedException("an admin token is needed (Authorization: Bearer ...)")

    @post(BATCHES_PATH, tags=["ingest"], status_code=200, summary="Upload a signed batch")
    async def upload(request: Request[Any, Any, Any]) -> Response[Any]:
        """A SignedBatch (application/x-protobuf). 200 with an Ack, or 4xx with an
        ErrorBody; nothing is stored unless the answer is 200 "stored"."""
        body = await request.body()
        try:
            ack: Ack = await ingestor.ingest(body)
        except IngestError as exc:
            headers = {}
            if exc.status == 429 and exc.extra.get("retry_after_s") is not None:
                headers["Retry-After"] = str(max(1, round(float(exc.extra["retry_after_s"]))))  # type: ignore[arg-type]
            log.info("refused a batch: %s %s: %s", exc.status, exc.code, exc.detail)
            return Response(exc.body(ingestor.now_ms()), status_code=exc.status, headers=headers)
        return Response(ack, status_code=200)

    @get("/api/v1/nodes", tags=["nodes"], before_request=admin)
    async def list_nodes() -> list[NodeInfo]:
        now = ingestor.now_ms()
        return [
            _node_info(n, await storage.devices(n.node_id), now, drift_warn_ms)
            for n in await storage.nodes()
        ]

    async def _node(node_id: str) -> NodeRecord:
        rec = await storage.node(node_id)
        if rec is None:
            raise NotFoundException(f"no node {node_id!r}")
        return rec

    @get("/api/v1/nodes/{node_id:str}", tags=["nodes"], before_request=admin)
    async def one_node(node_id: str) -> NodeInfo:
        rec = await _node(node_id)
        devices = await storage.devices(node_id)
        return _node_info(rec, devices, ingestor.now_ms(), drift_warn_ms)

    @get("/api/v1/nodes/{node_id:str}/devices", tags=["nodes"], before_request=admin)
    async def node_devices(node_id: str) -> list[DeviceInfo]:
        await _node(node_id)
        devices = await storage.devices(node_id)
        schemas = await storage.schemas(sorted({d.schema_digest for d in devices}))
        out = []
        for d in devices:
            schema = schemas[d.schema_digest]
            latest = list(predictor_ext.unpack_values(d.latest)) if d.latest is not None else []
            out.append(
                DeviceInfo(
                    device_id=d.device_id,
                    kind=d.kind,
                    model=d.model,
                    fields=[FieldInfo(f.name, f.unit, f.tol) for f in schema.fields],
                    last_ts_ms=d.last_ts_ms,
                    last_seq=d.last_seq,
                    latest=[None if v != v else v for v in latest],  # noqa: PLR0124
                    frames=d.frames,
                    bits_per_value=8 * d.wire_bytes / d.values if d.values else None,
                    json_ratio=d.json_bytes / d.wire_bytes if d.wire_bytes else None,
                )
            )
        return out

    @get(
        "/api/v1/nodes/{node_id:str}/devices/{device_id:str}/frames",
        tags=["nodes"],
        before_request=admin,
    )
    async def device_frames(
        node_id: str,
        device_id: str,
        start: Annotated[int, Parameter(query="from", description="Unix ms, inclusive")],
        end: Annotated[int, Parameter(query="to", description="Unix ms, exclusive")],
    ) -> FramesResponse:
        if end <= start or end - start > 7 * DAY_MS:
            raise HTTPException(status_code=400, detail="need from < to, at most 7 days apart")
        devices = {d.device_id: d for d in await storage.devices(node_id)}
        if device_id not in devices:
            raise NotFoundException(f"no device {device_id!r} on node {node_id!r}")
        schema = (await storage.schemas([devices[device_id].schema_digest]))[
            devices[device_id].schema_digest
        ]
        frames = await read_frames(storage, node_id, device_id, start, end)
        return FramesResponse(
            device_id=device_id,
            fields=[f.name for f in schema.fields],
            ts_ms=[f.ts_ms for f in frames],
            seq=[f.seq for f in frames],
            values=[
                [None if (v is not None and v != v) else v for v in f.values]  # noqa: PLR0124
                for f in frames
            ],
        )

    @get("/api/v1/nodes/{node_id:str}/completeness", tags=["nodes"], before_request=admin)
    async def completeness(node_id: str, day: str) -> list[CompletenessDay]:
        await _node(node_id)
        day_ms = _day(day)
        return [
            CompletenessDay(
                device_id=c.device_id,
                day=day,
                live=c.live,
                backfill=c.backfill,
                lost_evicted=c.evicted,
                lost_rejected=c.rejected,
                lost_gaps=c.gaps,
            )
            for c in await storage.completeness(node_id, day_ms)
        ]

    @get("/health", tags=["ops"])
    async def health() -> HealthResponse:
        try:
            await storage.nodes()
            ok = "ok"
        except Exception as exc:  # the database is down: say so, do not raise a 500
            log.warning("health: storage failed: %s", exc)
            ok = "degraded"
        return HealthResponse(
            status=ok,
            storage=storage.name,
            version=_version(),
            codec="compiled" if predictor_ext.compiled else "pure",
        )

    @get("/metrics", tags=["ops"], media_type=metrics.CONTENT_TYPE)
    async def metrics_text() -> Response[bytes]:
        nodes = await storage.nodes()
        return Response(
            metrics.render(ingestor, nodes, ingestor.now_ms(), drift_warn_ms),
            media_type=metrics.CONTENT_TYPE,
        )

    @asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        if open_storage:
            await storage.open()
        keeper = asyncio.create_task(retention(storage, cfg), name="hub-retention")
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if open_storage:
                await storage.close()

    return Litestar(
        route_handlers=[
            upload,
            list_nodes,
            one_node,
            node_devices,
            device_frames,
            completeness,
            health,
            metrics_text,
        ],
        lifespan=[lifespan],
        request_max_body_size=cfg.ingest.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="gridlet hub",
            version=_version(),
            description="Signed ingest from edge nodes and a read-only view of what they sent.",
            path="/schema",
            render_plugins=[JsonRenderPlugin()],
        ),
        logging_config=None,
        state=State({"ingestor": ingestor, "storage": storage}),
        debug=False,
    )
