"""The dashboard application: Litestar routes, pages, OpenAPI, metrics and login, and the
``Dashboard`` that wires them to a runtime as two services (live fan-out, web server)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from litestar import Litestar, Response, get, head
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.response import File
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, ControllerRouterHandler, Middleware

import webui

from ..config import SiteConfig
from ..devices.base import now_ms
from ..runtime import Backoff, Runtime
from . import metrics
from .api import SyncInfo, WebContext, api_routes, validation_error_handler
from .auth import Auth, AuthMiddleware, auth_routes
from .live import LiveHub
from .server import ServerReady, serve

__all__ = ("Dashboard", "create_app")

log = logging.getLogger(__name__)

_PAGES = ("/", "/history", "/status")


def _version() -> str:
    try:
        return importlib.metadata.version("gridlet")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def _page_routes(static_dir: Path) -> list[HTTPRouteHandler]:
    index = static_dir / "index.html"

    def index_file() -> File:
        # One index.html switches view by path; no-cache so an upgrade shows at once.
        if not index.is_file():
            raise NotFoundException(f"the dashboard page is missing: {index}")
        return File(
            index,
            media_type="text/html",
            content_disposition_type="inline",  # Litestar's default would download it
            headers={"Cache-Control": "no-cache"},
        )

    page = get(list(_PAGES), include_in_schema=False, sync_to_thread=False)(index_file)
    page_head = head(list(_PAGES), include_in_schema=False, sync_to_thread=False)(index_file)
    return [page, page_head]


def _metrics_route(
    runtime: Runtime, hub: LiveHub, sync: Callable[[], SyncInfo] | None
) -> HTTPRouteHandler:
    registry = metrics.make_registry(runtime, hub, sync)

    @get("/metrics", sync_to_thread=False, tags=["site"], media_type=metrics.CONTENT_TYPE)
    def metrics_text() -> Response[bytes]:
        """Prometheus text format (device, store, bus and live counters)."""
        return Response(metrics.render(registry), media_type=metrics.CONTENT_TYPE)

    return metrics_text


async def _log_exception(exc: Exception, _scope: Any) -> None:
    # Litestar's own logging is off (see create_app): report unexpected errors here.
    if not isinstance(exc, HTTPException):
        log.error("dashboard request failed", exc_info=exc)


def create_app(
    runtime: Runtime,
    cfg: SiteConfig,
    *,
    static_dir: Path = webui.STATIC_DIR,
    hub: LiveHub | None = None,
    send_timeout_s: float = 5.0,
    sync_status: Callable[[], SyncInfo] | None = None,
) -> Litestar:
    """The dashboard for ``runtime``. Without ``hub`` a new LiveHub is made; either way its
    ``run()`` must run as a runtime service (``Dashboard`` does that) for live data to flow.
    The hub is also at ``app.state.hub``."""
    auth = Auth(cfg.http.password_hash) if cfg.http.password_hash else None  # checks it first
    hub = hub if hub is not None else LiveHub(runtime)
    ctx = WebContext(
        runtime=runtime,
        cfg=cfg,
        hub=hub,
        version=_version(),
        auth=auth is not None,
        send_timeout_s=send_timeout_s,
        sync_status=sync_status,
        created_ms=now_ms(),
    )
    handlers: list[ControllerRouterHandler] = [
        *api_routes(ctx),
        _metrics_route(runtime, hub, sync_status),
        *_page_routes(static_dir),
        create_static_files_router(path="/static", directories=[static_dir], name="static"),
    ]
    middleware: list[Middleware] = []
    if auth is not None:
        handlers.extend(auth_routes(auth))

        def guard(app: ASGIApp) -> ASGIApp:
            return AuthMiddleware(app, auth)

        middleware.append(DefineMiddleware(guard))
    return Litestar(
        route_handlers=handlers,
        middleware=middleware,
        openapi_config=OpenAPIConfig(
            title="gridlet edge dashboard",
            version=ctx.version,
            description="The JSON API the dashboard in webui/ reads (webui/API.md).",
            path="/schema",
            render_plugins=[JsonRenderPlugin()],  # no UI that would fetch from a CDN
        ),
        exception_handlers={ValidationException: validation_error_handler},
        after_exception=[_log_exception],
        logging_config=None,  # Litestar's default would reconfigure the root logger
        state=State({"hub": hub, "context": ctx}),
        debug=False,
    )


ServiceFactory = Callable[[], Coroutine[Any, Any, None]]


class Dashboard:
    """The dashboard wired to a runtime: add ``services()`` to ``runtime.services``.

    ``port`` 0 picks a free port; ``ready`` is set (with the bound port) once listening."""

    def __init__(
        self,
        runtime: Runtime,
        cfg: SiteConfig,
        *,
        static_dir: Path = webui.STATIC_DIR,
        host: str | None = None,
        port: int | None = None,
        send_timeout_s: float = 5.0,
        retry_max_s: float = 60.0,
        sync_status: Callable[[], SyncInfo] | None = None,
    ) -> None:
        self.runtime = runtime
        self.host = cfg.http.host if host is None else host
        self.port = cfg.http.port if port is None else port
        self.hub = LiveHub(runtime)
        self.app = create_app(
            runtime,
            cfg,
            static_dir=static_dir,
            hub=self.hub,
            send_timeout_s=send_timeout_s,
            sync_status=sync_status,
        )
        self.ready = ServerReady()
        self._retry_max_s = retry_max_s

    @property
    def url(self) -> str:
        """The dashboard's base URL once ``ready`` is set."""
        return self.ready.url

    def services(self) -> list[tuple[str, ServiceFactory]]:
        return [("web-live", self.hub.run), ("web-server", self.serve)]

    async def serve(self) -> None:
        """Serve until cancelled. A busy address is retried with backoff rather than
        stopping the runtime: recording data matters more than showing it."""
        backoff = Backoff(2.0, self._retry_max_s)
        while True:
            try:
                await serve(self.app, self.host, self.port, ready=self.ready)
                return
            except OSError as exc:
                delay = backoff.next()
                log.error(
                    "dashboard cannot listen on %s:%d: %s (retrying in %.0f s)",
                    self.host,
                    self.port,
                    exc.strerror or exc,
                    delay,
                )
                await asyncio.sleep(delay)
