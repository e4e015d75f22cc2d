"""uvicorn inside the runtime's event loop: the only module that imports uvicorn.

We bind the listening socket ourselves: a busy port is then an ``OSError`` the caller can
handle (uvicorn would call ``sys.exit``), port 0 works, and the bound address is known
before the first request. uvicorn's signal handling is switched off because the runtime owns
SIGINT/SIGTERM; cancelling ``serve()`` is how the server is stopped, gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn
from litestar import Litestar

from cloud_sync.listen import listen

__all__ = ("ServerReady", "serve")

log = logging.getLogger(__name__)


class ServerReady(asyncio.Event):
    """An ``asyncio.Event`` set once the server accepts connections, carrying the bound
    address (port 0 resolved). Pass one as ``serve(..., ready=...)`` to learn the port."""

    def __init__(self) -> None:
        super().__init__()
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL for a client on this machine (wildcard hosts become loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: asyncio.Event | None) -> None:
        super().__init__(config)
        self._ready = ready

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The runtime handles signals and stops us by cancellation.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit as exc:  # uvicorn exits the process when the app fails to start
            raise RuntimeError("the web application failed to start") from exc
        if self.started and self._ready is not None:
            self._ready.set()


class _DenialIsAHandshake(logging.Filter):
    """uvicorn 0.54's websockets-sansio protocol logs an error after an app refuses a
    WebSocket with an HTTP response (ASGI's websocket.http.response), although that is a
    complete handshake. Our auth and parameter checks do exactly that on purpose, so the
    message would flood the log whenever a logged-out browser tab retries."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


_denial_filter = _DenialIsAHandshake()


async def serve(
    app: Litestar,
    host: str,
    port: int,
    *,
    ready: asyncio.Event | None = None,
    shutdown_timeout_s: int = 3,
) -> None:
    """Serve ``app`` until cancelled, then shut down gracefully (open connections get up to
    ``shutdown_timeout_s`` to finish). ``ready`` is set once listening; a ``ServerReady``
    also receives the bound host and port. Raises ``OSError`` when the address is taken."""
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    if isinstance(ready, ServerReady):
        ready.host, ready.port = host, bound_port
    config = uvicorn.Config(
        app,
        log_config=None,  # keep the application's logging setup
        access_log=False,  # a request log would wear out an SD card
        lifespan="on",
        ws="websockets-sansio",
        timeout_graceful_shutdown=shutdown_timeout_s,
        server_header=False,
    )
    server = _Server(config, ready)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _denial_filter not in uvicorn_log.filters:
        uvicorn_log.addFilter(_denial_filter)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
    log.info("dashboard listening on %s:%d", bound_host, bound_port)
    try:
        # wait() rather than awaiting the task: our cancellation must not cut uvicorn off
        # mid-request, it must make it shut down.
        await asyncio.wait({task})
    except asyncio.CancelledError:
        server.should_exit = True
        try:
            await asyncio.wait({task}, timeout=shutdown_timeout_s + 2)
        finally:
            if not task.done():  # cancelled twice, or a shutdown that hangs
                server.force_exit = True
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        raise
    finally:
        sock.close()
        if ready is not None:
            ready.clear()
    task.result()  # uvicorn stopped on its own: say why
