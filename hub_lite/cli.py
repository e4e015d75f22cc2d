"""`gridlet hub ...`: serve a hub, register nodes, make admin tokens.

The group is found by the `gridlet` command through the ``gridlet.commands`` entry point, so
the edge's CLI never imports the hub.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import click

from cloud_sync.listen import listen
from cloud_sync.signing import KeyFileError, load_public_key, public_key_text

from .config import HubConfig, HubConfigError, load_hub_config
from .storage import Storage, make_storage

__all__ = ("app_from_env", "hub")

log = logging.getLogger(__name__)

_CONFIG_ENV = "GRIDLET_HUB_CONFIG"


def _load(path: str) -> HubConfig:
    try:
        return load_hub_config(path)
    except HubConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _storage(cfg: HubConfig, config_path: str) -> Storage:
    return make_storage(cfg.storage.url, Path(config_path).resolve().parent)


def app_from_env() -> object:
    """The application for a uvicorn worker process (the config path is in the environment)."""
    from .app import create_app

    path = os.environ[_CONFIG_ENV]
    cfg = load_hub_config(path)
    return create_app(_storage(cfg, path), cfg)


@click.group("hub")
def hub() -> None:
    """Run and manage a hub that mirrors many sites (hub_lite)."""


@hub.command("serve")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--host", help="Listen address (default: hub.host).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: hub.port; 0: free).")
@click.option("--workers", type=click.IntRange(1, 64), help="Processes (default: hub.workers).")
def serve(config: str, host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the hub until Ctrl-C; prints the URL once listening.

    Several workers each listen on the port with SO_REUSEPORT, so the kernel spreads
    connections over them (a shared socket lets the first worker to wake take them all)."""
    cfg = _load(config)
    n = workers or cfg.hub.workers
    if n > 1 and cfg.storage.url.startswith("sqlite"):
        raise click.ClickException("several workers need PostgreSQL (SQLite has one writer)")
    path = str(Path(config).resolve())
    os.environ[_CONFIG_ENV] = path
    where = host or cfg.hub.host
    try:
        if n == 1:
            sock = listen(where, cfg.hub.port if port is None else port, backlog=2048)
        else:
            sock = _reserve(where, cfg.hub.port if port is None else port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    bound = sock.getsockname()
    click.echo(f"gridlet hub listening on http://{bound[0]}:{bound[1]} ({n} worker(s))")
    sys.stdout.flush()
    if n == 1:
        _server().run(sockets=[sock])
    else:
        _supervise(path, where, bound[1], n)
        sock.close()


def _server() -> Any:
    import uvicorn

    return uvicorn.Server(
        uvicorn.Config(
            "hub_lite.cli:app_from_env",
            factory=True,
            log_config=None,
            access_log=False,
            lifespan="on",
            server_header=False,
            timeout_graceful_shutdown=5,
        )
    )


def _reserve(host: str, port: int) -> socket.socket:
    """Hold the port (bound, not listening: it takes no connections) while workers start."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _worker(config_path: str, host: str, port: int) -> None:
    """One hub process: its own listening socket on the shared port."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ[_CONFIG_ENV] = config_path
    _server().run(sockets=[listen(host, port, backlog=2048, reuse_port=True)])


def _supervise(config_path: str, host: str, port: int, n: int) -> None:
    """Run n workers until SIGINT/SIGTERM; a worker that dies is started again."""
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def stop(_signum: int, _frame: object) -> None:
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)

    def start(i: int) -> multiprocessing.process.BaseProcess:
        p = ctx.Process(target=_worker, args=(config_path, host, port), name=f"hub-worker-{i}")
        p.start()
        return p

    procs = [start(i) for i in range(n)]
    while not stopping.wait(0.5):
        for i, p in enumerate(procs):
            if not p.is_alive():
                log.error("hub worker %d exited with %s; starting it again", i, p.exitcode)
                procs[i] = start(i)
    for p in procs:
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()


@hub.command("add-node")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--replace", is_flag=True, help="Replace the key of a node already registered.")
@click.argument("node_id")
@click.argument("public_key")
def add_node(config: str, replace: bool, node_id: str, public_key: str) -> None:
    """Register NODE_ID with the PUBLIC_KEY that `gridlet keygen` printed on it."""
    cfg = _load(config)
    try:
        raw = load_public_key(public_key)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from exc

    async def go() -> bool:
        async with _storage(cfg, config) as st:
            return await st.add_node(node_id, raw, replace=replace)

    if not asyncio.run(go()):
        raise click.ClickException(
            f"node {node_id!r} is registered already (--replace changes its key)"
        )
    click.echo(f"node {node_id} added")


@hub.command("list-nodes")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
def list_nodes(config: str) -> None:
    """List registered nodes: last seen, version, clock drift, backlog."""
    cfg = _load(config)

    async def go() -> None:
        async with _storage(cfg, config) as st:
            nodes = await st.nodes()
        if not nodes:
            click.echo("no nodes")
        for n in nodes:
            seen = "never" if n.last_seen_ms is None else _ago(n.last_seen_ms)
            version = n.status.software_version if n.status else "-"
            backlog = n.status.backlog_frames if n.status else 0
            drift = "-" if n.drift_ms is None else f"{n.drift_ms / 1000:+.1f} s"
            click.echo(
                f"{n.node_id}  last seen {seen}  version {version}  drift {drift}"
                f"  backlog {backlog}  key {public_key_text(n.public_key)}"
            )

    asyncio.run(go())


def _ago(ms: int) -> str:
    import time

    s = time.time() - ms / 1000
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


@hub.command("make-token")
def make_token() -> None:
    """Print a new admin token and the hash to put in hub.toml (`hub.admin_token_hash`)."""
    from .app import hash_token, new_token

    token = new_token()
    click.echo(f"token: {token}")
    click.echo(f'admin_token_hash = "{hash_token(token)}"')
