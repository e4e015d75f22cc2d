"""Benchmarks of sync to a hub: ingest rate, backfill time, live lag, bytes on the wire and on
disk, edge memory.

``python -m bench.sync [--quick] [--json] [--only ingest,backfill,live,rss]``, run by ``make
bench-sync``. Real processes throughout, on loopback and free ports: `gridlet hub serve` on
SQLite and on a PostgreSQL server the benchmark starts (durable settings, like the hub's
SQLite), `gridlet run` syncing to it. Every figure is printed beside what it is compared with,
measured in the same run, and its target; one table at the end says PASS or FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import msgspec

from bench._procs import (
    ByteCountingProxy,
    Proc,
    cpu_seconds,
    cpu_used,
    free_port,
    rss_bytes,
    tree,
    wait_for,
)
from cloud_sync import DeviceSchema, Frame, encode
from cloud_sync.batch import parse
from cloud_sync.protocol import BATCHES_PATH, CONTENT_TYPE, Ack
from cloud_sync.signing import NodeKey, sign
from edge_runtime.bus import Reading
from edge_runtime.devices.base import field_from_name
from edge_runtime.store import Reader, Store

__all__ = (
    "Figure",
    "Hub",
    "Load",
    "backfill",
    "edge_rss",
    "ingest",
    "json_lines_bytes",
    "live",
    "main",
    "make_load",
    "random_walk",
    "walk_schema",
    "write_backlog",
)

EXE = str(Path(sys.executable).with_name("gridlet"))
TOKEN = "bench-admin-token"
ROWS = 600
"""Rows per device in one batch: the uploader's default ``sync.max_rows``."""
LIVE_WAIT_S = 30.0
"""After the live run, how long the hub may take to hold every frame read until its end;
a frame still missing then counts as missing (and fails the lag target)."""

# ------------------------------------------------------------------ synthetic readings

# (field name suffix, typical level, random-walk step (one sigma a second), resolution the
# device reports): what a meter or inverter's registers give at 1 Hz. The tolerance comes from
# the unit the name carries (edge_runtime's defaults, as a real device gets them).
_KINDS: tuple[tuple[str, float, float, float], ...] = (
    ("active_power_w", 1500.0, 40.0, 1.0),
    ("voltage_v", 230.0, 0.3, 0.1),
    ("current_a", 6.0, 0.15, 0.01),
    ("frequency_hz", 50.0, 0.004, 0.001),
    ("temperature_c", 35.0, 0.02, 0.1),
    ("energy_kwh", 1234.5, 0.0, 0.001),
    ("reactive_power_var", 200.0, 15.0, 1.0),
    ("battery_soc_pct", 60.0, 0.01, 0.1),
)


def walk_schema(fields: int) -> DeviceSchema:
    """``fields`` fields cycling through power, voltage, current, frequency, temperature,
    energy, reactive power and state of charge, each with its unit's default tolerance."""
    names = [f"ch{i // len(_KINDS):02d}_{_KINDS[i % len(_KINDS)][0]}" for i in range(fields)]
    return DeviceSchema("bench", "random-walk", tuple(field_from_name(n) for n in names))


def random_walk(rows: int, fields: int, seed: int) -> list[tuple[float, ...]]:
    """``rows`` frames of random walks at the devices' decimal resolution (energy only
    grows), matching ``walk_schema(fields)``."""
    rng = random.Random(seed)
    cols: list[list[float]] = []
    for j in range(fields):
        _, level, sigma, res = _KINDS[j % len(_KINDS)]
        x = level * (0.5 + rng.random())
        digits = max(0, -math.floor(math.log10(res)))
        col = []
        for _ in range(rows):
            x += rng.random() * 0.0005 if sigma == 0.0 else rng.gauss(0.0, sigma)
            col.append(round(round(x / res) * res, digits))
        cols.append(col)
    return [tuple(r) for r in zip(*cols, strict=True)]


def json_lines_bytes(frames: Sequence[Frame], schema: DeviceSchema) -> int:
    """Bytes of the frames as JSON lines ``{"device_id":..,"ts_ms":..,"seq":..,name:value}``."""
    names = [f.name for f in schema.fields]
    enc = msgspec.json.Encoder()
    return sum(
        len(
            enc.encode(
                {"device_id": f.device_id, "ts_ms": f.ts_ms, "seq": f.seq}
                | dict(zip(names, f.values, strict=True))
            )
        )
        + 1
        for f in frames
    )


def _block_bytes(batch: bytes, schema: DeviceSchema) -> int:
    """Coded bytes of the device blocks of an encoded (unsigned) batch."""
    return sum(len(b.data) for b in parse(batch, {schema.digest(): schema}).blocks)


# ------------------------------------------------------------------ processes


def gridlet(*args: str, cwd: Path) -> str:
    """Run a `gridlet` command to its end; its stdout."""
    out = subprocess.run(
        [EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"gridlet {' '.join(args)} failed: {out.stderr.strip()[-2000:]}")
    return out.stdout


class Hub:
    """`gridlet hub serve` on a free loopback port, with an admin token for its API."""

    def __init__(self, folder: Path, storage_url: str, *, workers: int = 1) -> None:
        from hub_lite.app import hash_token

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.storage_url = storage_url
        self.workers = workers
        self.config = folder / "hub.toml"
        self.config.write_text(
            f'[hub]\nadmin_token_hash = "{hash_token(TOKEN)}"\n[storage]\nurl = "{storage_url}"\n'
        )
        self.proc: Proc | None = None
        self.port = 0
        self._client = httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Hub:
        argv = [EXE, "hub", "serve", "--config", str(self.config), "--port", "0"]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        self.proc = Proc(argv, self.folder / "hub.log", cwd=self.folder, stdout_pipe=True)
        line = self.proc.first_line(timeout_s)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if not m:
            raise RuntimeError(f"the hub did not start: {line!r}\n{self.proc.tail()}")
        self.port = int(m.group(1))
        wait_for(self._healthy, timeout_s, f"the hub answers /health ({self.proc.tail(5)})")
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and not self.proc.alive():
            raise RuntimeError(f"the hub exited:\n{self.proc.tail()}")
        try:
            return self._client.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def serving_processes(self) -> int:
        """Processes that answer requests (workers, or the one process)."""
        assert self.proc is not None
        return max(1, len(tree(self.proc.pid)) - (1 if self.workers > 1 else 0))

    def cpu(self) -> dict[int, float]:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def api(self, path: str) -> Any:
        r = self._client.get(f"{self.url}{path}")
        r.raise_for_status()
        return r.json()

    def devices(self, node_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.api(f"/api/v1/nodes/{node_id}/devices")
        return out

    def frames(self, node_id: str) -> int:
        try:
            return sum(d["frames"] for d in self.devices(node_id))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:  # no batch yet
                return 0
            raise

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def close(self) -> None:
        self.stop()
        self._client.close()

    def __enter__(self) -> Hub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def register(hub: Hub, site: Path, node_id: str) -> None:
    """`gridlet keygen` for the site and `gridlet hub add-node` on the hub, as a user does."""
    out = gridlet("keygen", "--config", str(site), cwd=site.parent)
    public = out.split("public key: ", 1)[1].split()[0]
    gridlet("hub", "add-node", "--config", str(hub.config), node_id, public, cwd=hub.folder)


def site_toml(
    node_id: str,
    hub_url: str,
    *,
    devices: Sequence[str] = (),
    fields: int = 50,
    enabled: bool = True,
    sync: bool = True,
    http_port: int | None = None,
    retention_days: float = 7,
) -> str:
    lines = [
        f'[site]\nnode_id = "{node_id}"\n',
        f'[store]\npath = "edge.db"\nraw_retention_days = {retention_days}\nmax_size_mb = 16384\n',
        "[http]\nenabled = false\n"
        if http_port is None
        else f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n',
        f'[sync]\nenabled = {"true" if sync else "false"}\nhub_url = "{hub_url}"\n',
    ]
    for dev in devices:
        lines.append(
            f'[[devices]]\nid = "{dev}"\nkind = "synthetic"\nfields = {fields}\n'
            f"interval_s = 1\nenabled = {'true' if enabled else 'false'}\n"
        )
    return "\n".join(lines)


async def _storage_bytes(url: str, base: Path) -> int:
    from hub_lite.storage import make_storage

    async with make_storage(url, base) as st:
        return await st.db_bytes()


# ------------------------------------------------------------------ 1. ingest


@dataclass
class Load:
    """Signed upload bodies made before the clock starts: ``warmup`` (each node's first
    batch, carrying the schema whole) and ``bodies`` (by schema digest), nodes interleaved."""

    nodes: list[tuple[str, bytes]]
    warmup: list[bytes]
    bodies: list[bytes]
    frames_per_body: int
    fields: int
    body_bytes: int
    block_bytes: int
    json_bytes_per_frame: float


def make_load(
    nodes: int = 8, devices: int = 2, batches: int = 1000, rows: int = ROWS, fields: int = 100
) -> Load:
    """``batches`` bodies of ``rows`` x ``fields`` keyframe blocks (one device each, as the
    backlog lane sends them) from ``nodes`` nodes of ``devices`` devices, the day before now."""
    schema = walk_schema(fields)
    digest = schema.digest()
    pool = [random_walk(rows, fields, seed) for seed in range(8)]
    per_series = max(1, math.ceil((batches + nodes) / (nodes * devices)))
    t0 = (int(time.time()) - 86_400) * 1000
    keys = [NodeKey.generate() for _ in range(nodes)]
    names = [f"ingest-{i:02d}" for i in range(nodes)]
    warmup: list[bytes] = []
    bodies: list[bytes] = []
    body_bytes = block_bytes = 0
    for n in range(per_series):
        for d in range(devices):
            for i in range(nodes):
                first = n == 0 and d == 0
                if not first and len(bodies) >= batches:
                    continue
                dev = f"dev{d}"
                values = pool[(i * devices + d + n) % len(pool)]
                frames = [
                    Frame(dev, t0 + (n * rows + r) * 1000, n * rows + r + 1, values[r])
                    for r in range(rows)
                ]
                batch = encode(
                    frames,
                    {dev: schema},
                    node_id=names[i],
                    batch_id=n * devices + d + 1,
                    created_ms=int(time.time() * 1000),
                    known_schemas=() if first else {digest},
                )
                body = sign(keys[i], names[i], batch)
                body_bytes += len(body)
                block_bytes += _block_bytes(batch, schema)
                (warmup if first else bodies).append(body)
    json_per_frame = statistics.fmean(
        json_lines_bytes(
            [Frame("dev0", t0 + r * 1000, 10_000 + r, v[r]) for r in range(rows)], schema
        )
        / rows
        for v in pool
    )
    return Load(
        nodes=[(names[i], keys[i].public_bytes) for i in range(nodes)],
        warmup=warmup,
        bodies=bodies,
        frames_per_body=rows,
        fields=fields,
        body_bytes=body_bytes,
        block_bytes=block_bytes,
        json_bytes_per_frame=json_per_frame,
    )


@dataclass
class _Posted:
    batches: int = 0
    frames: int = 0
    retries: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


async def _post(url: str, bodies: Sequence[bytes], connections: int, max_s: float) -> _Posted:
    """POST every body over ``connections`` keep-alive connections; stop taking new ones
    after ``max_s``. A 429 is waited out and sent again; anything else but 200 is an error."""
    out = _Posted()
    todo = iter(bodies)
    deadline = time.monotonic() + max_s
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"content-type": CONTENT_TYPE}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def worker() -> None:
            for body in todo:  # one iterator shared by the workers: each body goes once
                if time.monotonic() > deadline:
                    return
                while True:
                    r = await client.post(BATCHES_PATH, content=body, headers=headers)
                    out.statuses[r.status_code] = out.statuses.get(r.status_code, 0) + 1
                    if r.status_code == 429:
                        out.retries += 1
                        await asyncio.sleep(float(r.json().get("retry_after_s") or 0.05))
                        continue
                    if r.status_code != 200:
                        raise RuntimeError(f"the hub answered {r.status_code}: {r.text[:300]}")
                    ack = msgspec.json.decode(r.content, type=Ack)
                    out.batches += 1
                    out.frames += ack.frames_new
                    break

        async with asyncio.TaskGroup() as tg:
            for i in range(connections):
                tg.create_task(worker(), name=f"post-{i}")
    return out


def _postgres_cpu(pg: Any) -> dict[int, float]:
    pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    return cpu_seconds(pid)


def ingest(
    load: Load,
    folder: Path,
    storage_url: str,
    *,
    workers: int = 1,
    connections: int = 4,
    max_s: float = 60.0,
    pg: Any = None,
) -> dict[str, Any]:
    """POST the load into a fresh hub: frames/s acknowledged, the hub's CPU (and the
    database server's), then the database's bytes per frame."""
    backend = storage_url.split(":", 1)[0]
    with Hub(folder, storage_url, workers=workers) as hub:
        asyncio.run(_register_nodes(storage_url, folder, load.nodes))
        warm = asyncio.run(_post(hub.url, load.warmup, connections, max_s))
        hub_cpu0, db_cpu0 = hub.cpu(), _postgres_cpu(pg) if pg else {}
        me0, t0 = time.process_time(), time.perf_counter()
        posted = asyncio.run(_post(hub.url, load.bodies, connections, max_s))
        wall = time.perf_counter() - t0
        me = time.process_time() - me0
        hub_cpu1 = hub.cpu()
        hub_cpu = cpu_used(hub_cpu0, hub_cpu1)
        by_process = sorted(
            (t - hub_cpu0.get(pid, 0.0) for pid, t in hub_cpu1.items()), reverse=True
        )
        db_cpu = cpu_used(db_cpu0, _postgres_cpu(pg)) if pg else None
        serving = hub.serving_processes()
        devices = [d for name, _ in load.nodes for d in hub.devices(name)]
    frames = warm.frames + posted.frames
    db_bytes = asyncio.run(_storage_bytes(storage_url, folder))
    sent = len(load.warmup) + posted.batches
    total_bodies = len(load.warmup) + len(load.bodies)
    wire = load.body_bytes * sent / total_bodies / frames
    blocks = load.block_bytes * sent / total_bodies / frames
    stored = sum(d["frames"] for d in devices)
    return {
        "backend": backend,
        "workers": workers,
        "serving_processes": serving,
        "connections": connections,
        "frames": posted.frames,
        "batches": posted.batches,
        "frames_per_batch": load.frames_per_body,
        "fields": load.fields,
        "seconds": wall,
        "frames_per_s": posted.frames / wall,
        "hub_cpu_s": hub_cpu,
        "hub_cores": hub_cpu / wall,
        "hub_cpu_s_by_process": by_process,
        "frames_per_hub_cpu_s": posted.frames / hub_cpu if hub_cpu else None,
        "db_server_cpu_s": db_cpu,
        "client_cpu_s": me,
        "retries_429": posted.retries,
        "statuses": posted.statuses,
        "frames_stored": stored,
        "db_bytes": db_bytes,
        "db_bytes_per_frame": db_bytes / frames,
        "wire_bytes_per_frame": wire,
        "block_bytes_per_frame": blocks,
        "json_bytes_per_frame": load.json_bytes_per_frame,
        "db_over_wire": db_bytes / frames / wire,
        "hub_bits_per_value": _weighted(devices, "bits_per_value"),
        "hub_json_ratio": _weighted(devices, "json_ratio"),
    }


def _weighted(devices: Sequence[dict[str, Any]], key: str) -> float | None:
    got = [(d[key], d["frames"]) for d in devices if d.get(key) is not None]
    total = sum(n for _, n in got)
    return sum(v * n for v, n in got) / total if total else None


async def _register_nodes(url: str, base: Path, nodes: Sequence[tuple[str, bytes]]) -> None:
    from hub_lite.storage import make_storage

    async with make_storage(url, base) as st:
        for name, key in nodes:
            await st.add_node(name, key, replace=True)


# ------------------------------------------------------------------ 2. backfill


async def write_backlog(
    path: Path, *, devices: int, fields: int, seconds: int, end_ms: int, chunk_s: int = 600
) -> int:
    """An edge store holding ``seconds`` of 1 Hz frames of ``devices`` devices up to
    ``end_ms``, written through ``Store.write`` in chunks; the number of frames."""
    schema = walk_schema(fields)
    pools = [random_walk(3600, fields, seed=100 + d) for d in range(devices)]
    t0 = (end_ms // 1000 - seconds) * 1000
    store = await Store.open(path, raw_retention_days=3650, max_size_bytes=1 << 40)
    try:
        for start in range(0, seconds, chunk_s):
            await store.write(
                [
                    Reading(Frame(f"dev{d}", t0 + s * 1000, s + 1, pools[d][s % 3600]), schema)
                    for s in range(start, min(seconds, start + chunk_s))
                    for d in range(devices)
                ]
            )
    finally:
        await store.close()
    return seconds * devices


def backfill(
    folder: Path, *, hours: float, devices: int = 5, fields: int = 50, timeout_s: float = 900
) -> dict[str, Any]:
    """A real edge store holding ``hours`` at 1 Hz, then `gridlet run` (devices disabled,
    sync on) until the hub holds every frame: seconds from start."""
    folder.mkdir(parents=True, exist_ok=True)
    seconds = int(hours * 3600)
    node = "backfill"
    ids = [f"dev{d}" for d in range(devices)]
    with Hub(folder / "hub", "sqlite:///hub.db") as hub:
        site = folder / "site.toml"
        site.write_text(
            site_toml(
                node,
                hub.url,
                devices=ids,
                fields=fields,
                enabled=False,
                retention_days=hours / 24 + 2,
            )
        )
        register(hub, site, node)
        t = time.perf_counter()
        total = asyncio.run(
            write_backlog(
                folder / "edge.db",
                devices=devices,
                fields=fields,
                seconds=seconds,
                end_ms=int(time.time() * 1000),
            )
        )
        build_s = time.perf_counter() - t
        hub_cpu0 = hub.cpu()
        start = time.perf_counter()
        with Proc([EXE, "run", "--config", str(site)], folder / "edge.log", cwd=folder) as edge:
            edge_cpu0 = cpu_seconds(edge.pid)
            first: list[float] = []

            def done() -> bool:
                if not edge.alive():
                    raise RuntimeError(f"`gridlet run` exited:\n{edge.tail()}")
                n = hub.frames(node)
                if n and not first:
                    first.append(time.perf_counter() - start)
                return n >= total

            wait_for(done, timeout_s, f"the hub holds all {total} frames", every_s=0.1)
            elapsed = time.perf_counter() - start
            edge_cpu = cpu_used(edge_cpu0, cpu_seconds(edge.pid))
            hub_cpu = cpu_used(hub_cpu0, hub.cpu())
            info = hub.api(f"/api/v1/nodes/{node}")
            stop_code = edge.stop(signal.SIGINT)
    return {
        "hours": hours,
        "devices": devices,
        "fields": fields,
        "frames": total,
        "build_s": build_s,
        "seconds": elapsed,
        "first_frames_s": first[0] if first else None,
        "frames_per_s": total / elapsed,
        "edge_cpu_s": edge_cpu,
        "hub_cpu_s": hub_cpu,
        "batches": info["batches"],
        "body_bytes": info["body_bytes"],
        "edge_exit": stop_code,
    }


# ------------------------------------------------------------------ 3. live


def live(folder: Path, *, seconds: float, devices: int = 3, fields: int = 50) -> dict[str, Any]:
    """`gridlet run` with synthetic devices at 1 Hz and the uploader at its defaults, through
    a byte-counting proxy to a hub: lag from read to the hub's receipt, bits per value live
    and re-encoded in 600-row keyframes, HTTP bytes against coded bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    node = "live"
    ids = [f"dev{d}" for d in range(devices)]
    with Hub(folder / "hub", "sqlite:///hub.db") as hub, ByteCountingProxy(hub.port) as proxy:
        site = folder / "site.toml"
        site.write_text(
            site_toml(node, f"http://127.0.0.1:{proxy.port}", devices=ids, fields=fields)
        )
        register(hub, site, node)
        with Proc([EXE, "run", "--config", str(site)], folder / "edge.log", cwd=folder) as edge:
            started = time.time()
            wait_for(lambda: hub.frames(node) > 0, 60, "the first live frames reach the hub")
            while time.time() - started < seconds:  # the run's length, not a condition
                if not edge.alive():
                    raise RuntimeError(f"`gridlet run` exited:\n{edge.tail()}")
                time.sleep(0.5)
            ended_ms = int(time.time() * 1000)
            # Every frame read until now is judged: wait (bounded) until the hub holds them.
            with contextlib.suppress(TimeoutError):
                wait_for(
                    lambda: _holds_until(hub.devices(node), ids, ended_ms),
                    LIVE_WAIT_S,
                    "the hub holds the frames read until the end of the run",
                    every_s=0.1,
                )
            api = hub.devices(node)
            edge.stop(signal.SIGINT)
        up, down = proxy.up, proxy.down
    return _live_figures(
        folder / "hub" / "hub.db",
        folder / "edge.db",
        node,
        ids,
        api=api,
        ended_ms=ended_ms,
        http_up=up,
        http_down=down,
        seconds=seconds,
        fields=fields,
    )


def _live_figures(
    hub_db: Path,
    edge_db: Path,
    node: str,
    ids: Sequence[str],
    *,
    api: Sequence[dict[str, Any]],
    ended_ms: int,
    http_up: int,
    http_down: int,
    seconds: float,
    fields: int,
) -> dict[str, Any]:
    """Lag, bits per value and HTTP bytes of a live run, from the hub's database (when each
    batch was received, which sequence numbers each block holds) and the edge's (when each
    frame was read)."""
    with contextlib.closing(sqlite3.connect(f"file:{hub_db}?mode=ro", uri=True)) as db:
        blocks: list[tuple[str, int, int, int, int, int, bool, int]] = db.execute(
            "SELECT b.device_id, b.batch_id, b.first_seq, b.last_seq, b.frames,"
            " length(b.data), b.chain_from = 0, b.packed FROM blocks b WHERE b.node_id = ?",
            (node,),
        ).fetchall()
        batches = dict(
            db.execute(
                "SELECT batch_id, received_ms FROM batches WHERE node_id = ? ORDER BY batch_id",
                (node,),
            ).fetchall()
        )
        bodies = dict(
            db.execute("SELECT batch_id, body_bytes FROM batches WHERE node_id = ?", (node,))
        )
    if any(packed for *_, packed in blocks):
        raise RuntimeError("the hub trimmed a live block (frames sent twice): not a clean run")
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for dev, batch_id, lo, hi, n, _size, _key, _packed in blocks:
        if hi - lo + 1 != n:
            raise RuntimeError(f"{dev}: a block of {n} frames spans seq {lo}..{hi}")
        spans.setdefault(dev, []).append((lo, hi, batches[batch_id]))
    reader = Reader(edge_db)
    lags: list[float] = []
    missing = 0
    reencoded = 0
    for dev in ids:
        got = list(reader.frames(dev))
        held: list[Frame] = []
        for f, _ in got:
            rec = next((r for lo, hi, r in spans.get(dev, ()) if lo <= f.seq <= hi), None)
            if rec is not None:
                held.append(f)
            if f.ts_ms <= ended_ms:
                if rec is None:
                    missing += 1
                else:
                    lags.append((rec - f.ts_ms) / 1000)
        schema = got[0][1]
        for i in range(0, len(held), ROWS):
            batch = encode(
                held[i : i + ROWS], {dev: schema}, node_id=node, batch_id=i + 1, created_ms=1
            )
            reencoded += _block_bytes(batch, schema)
    lags.sort()
    coded = sum(b[5] for b in blocks)
    values = sum(b[4] for b in blocks) * fields
    live_bpv = 8 * coded / values if values else math.nan
    key_bpv = 8 * reencoded / values if values else math.nan
    requests = len(bodies)
    body_total = sum(bodies.values())
    headers = (http_up - body_total) / requests if requests else math.nan
    # Steady state: batches with no keyframe (those carry the schemas whole, and start the
    # run or a chain), heartbeats included.
    keyed = {b[1] for b in blocks if b[6]}
    steady = [i for i in bodies if i not in keyed]
    steady_coded = sum(b[5] for b in blocks if b[1] not in keyed)
    steady_body = sum(bodies[i] for i in steady)
    return {
        "seconds": seconds,
        "devices": len(ids),
        "fields": fields,
        "frames_judged": len(lags) + missing,
        "frames_missing": missing,
        "lag_p50_s": _pct(lags, 0.50),
        "lag_p99_s": _pct(lags, 0.99),
        "lag_max_s": lags[-1] if lags else math.nan,
        "blocks": len(blocks),
        "keyframe_blocks": sum(1 for b in blocks if b[6]),
        "live_bits_per_value": live_bpv,
        "hub_api_bits_per_value": _weighted(api, "bits_per_value"),
        "keyframe_600_bits_per_value": key_bpv,
        "live_over_600": live_bpv / key_bpv if key_bpv else math.nan,
        "requests": requests,
        "http_request_bytes": http_up,
        "http_response_bytes": http_down,
        "http_header_bytes_per_request": headers,
        "signed_body_bytes": body_total,
        "coded_block_bytes": coded,
        "request_over_coded": http_up / coded if coded else math.nan,
        "body_over_coded": body_total / coded if coded else math.nan,
        "steady_request_over_coded": (
            (steady_body + headers * len(steady)) / steady_coded if steady_coded else math.nan
        ),
        "steady_body_over_coded": steady_body / steady_coded if steady_coded else math.nan,
    }


def _holds_until(devices: Sequence[dict[str, Any]], ids: Sequence[str], ms: int) -> bool:
    last = {d["device_id"]: d["last_ts_ms"] or 0 for d in devices}
    return all(last.get(dev, 0) >= ms for dev in ids)


def _pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]


# ------------------------------------------------------------------ 5. edge memory


def edge_rss(
    folder: Path, *, seconds: float, devices: int = 20, fields: int = 50, sync: bool = True
) -> dict[str, Any]:
    """`gridlet run` with ``devices`` synthetic devices at 1 Hz, its dashboard on, syncing to
    a hub (or not): resident memory sampled twice a second, and CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    node = "rss"
    ids = [f"dev{d:02d}" for d in range(devices)]
    with Hub(folder / "hub", "sqlite:///hub.db") as hub:
        site = folder / "site.toml"
        port = free_port()
        site.write_text(
            site_toml(node, hub.url, devices=ids, fields=fields, sync=sync, http_port=port)
        )
        if sync:
            register(hub, site, node)
        with Proc([EXE, "run", "--config", str(site)], folder / "edge.log", cwd=folder) as edge:
            if sync:
                wait_for(lambda: hub.frames(node) > 0, 60, "frames reach the hub")
            wait_for(lambda: _answers(f"http://127.0.0.1:{port}/"), 60, "the dashboard answers")
            samples: list[int] = []
            cpu0 = cpu_seconds(edge.pid)
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:  # the run's length, not a condition
                if not edge.alive():
                    raise RuntimeError(f"`gridlet run` exited:\n{edge.tail()}")
                samples.append(rss_bytes(edge.pid))
                time.sleep(0.5)
            cpu = cpu_used(cpu0, cpu_seconds(edge.pid))
            synced = hub.frames(node) if sync else 0
            edge.stop(signal.SIGINT)
    return {
        "sync": sync,
        "dashboard": True,
        "devices": devices,
        "fields": fields,
        "seconds": seconds,
        "rss_bytes_max": max(samples),
        "rss_bytes_median": statistics.median(samples),
        "cpu_share": cpu / seconds,
        "frames_at_hub": synced,
    }


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------------ report


@dataclass
class Figure:
    """One line of the final table."""

    what: str
    measured: str
    compared: str
    target: str
    ok: bool | None
    """None: reported, no target."""

    @property
    def verdict(self) -> str:
        return "-" if self.ok is None else ("PASS" if self.ok else "FAIL")


def _n(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None or x != x else f"{x:,.{digits}f}"  # noqa: PLR0124 - NaN


def _ingest_lines(r: dict[str, Any]) -> list[str]:
    what = f"{r['backend']}, {r['workers']} worker(s)"
    db = "" if r["db_server_cpu_s"] is None else f", PostgreSQL server {r['db_server_cpu_s']:.1f} s"
    procs = r["hub_cpu_s_by_process"]
    split = "" if len(procs) < 2 else " (by process: " + ", ".join(f"{x:.1f}" for x in procs) + ")"
    return [
        f"  {what}: {_n(r['frames_per_s'])} frames/s acknowledged ({r['batches']} batches of"
        f" {r['frames_per_batch']} x {r['fields']} in {r['seconds']:.1f} s, {r['connections']}"
        f" connections, {r['retries_429']} 429s)",
        f"    hub CPU {r['hub_cpu_s']:.1f} s{split} = {r['hub_cores']:.2f} cores busy ->"
        f" {_n(r['frames_per_hub_cpu_s'])} frames per hub CPU-second{db};"
        f" load generator {r['client_cpu_s']:.1f} CPU-s",
        f"    on disk {r['db_bytes_per_frame']:.0f} B/frame = {r['db_over_wire']:.2f}x the wire"
        f" ({r['wire_bytes_per_frame']:.1f} B/frame signed bodies, of which"
        f" {r['block_bytes_per_frame']:.1f} coded);"
        f" JSON lines {r['json_bytes_per_frame']:.0f} B/frame",
    ]


def figures(results: dict[str, Any]) -> list[Figure]:
    out: list[Figure] = []
    small = results.get("ingest_small")
    if small is not None:
        out.append(
            Figure(
                "ingest of live-sized batches (25 x 50), SQLite, batches/s",
                _n(small["batches_per_s"]),
                f"{_n(small['batches_per_hub_cpu_s'])}/hub CPU-s"
                f" = {_n(5 * (small['batches_per_hub_cpu_s'] or 0))} nodes at one per 5 s",
                "reported",
                None,
            )
        )
    for r in results.get("ingest", []):
        if "error" in r:
            out.append(
                Figure(
                    f"ingest {r['backend']} {r['workers']}w", "not measured", r["error"], "", None
                )
            )
            continue
        name = f"ingest into {r['backend']}, {r['workers']} worker(s), frames/s"
        per_core = f"{_n(r['frames_per_hub_cpu_s'])}/hub CPU-s ({r['hub_cores']:.2f} cores)"
        if r["workers"] > 1:  # the kernel may hand every connection to one worker
            top = r["hub_cpu_s_by_process"][: r["workers"]]
            per_core += ", CPU-s by worker " + "/".join(f"{x:.1f}" for x in top)
        if r["backend"] == "sqlite":
            out.append(
                Figure(
                    name, _n(r["frames_per_s"]), per_core, ">= 50,000", r["frames_per_s"] >= 50_000
                )
            )
        else:
            out.append(Figure(name, _n(r["frames_per_s"]), per_core, "reported", None))
        out.append(
            Figure(
                f"hub on disk, {r['backend']} {r['workers']}w, B/frame",
                f"{r['db_bytes_per_frame']:.0f} = {r['db_over_wire']:.2f}x wire",
                f"wire {r['wire_bytes_per_frame']:.0f}, JSON {r['json_bytes_per_frame']:.0f}",
                "<= 4x wire",
                r["db_over_wire"] <= 4,
            )
        )
    for r in results.get("backfill", []):
        days = r["hours"] / 24
        name = f"backfill {r['hours']:g} h x {r['devices']} dev x {r['fields']} fields, s"
        rate = f"{_n(r['frames_per_s'])} frames/s, {r['frames']:,} frames"
        if days <= 1:
            out.append(Figure(name, f"{r['seconds']:.1f}", rate, "<= 20 s", r["seconds"] <= 20))
        else:
            out.append(
                Figure(
                    name,
                    f"{r['seconds']:.1f}",
                    rate,
                    f"reported ({days:g} x 20 s = {20 * days:g} s pro rata)",
                    None,
                )
            )
    if "live" in results:
        r = results["live"]
        out.append(
            Figure(
                "live lag read -> hub, p99 s",
                f"{r['lag_p99_s']:.2f}",
                f"p50 {r['lag_p50_s']:.2f}, max {r['lag_max_s']:.2f},"
                f" missing {r['frames_missing']}",
                "<= 10 s",
                r["lag_p99_s"] <= 10 and r["frames_missing"] == 0,
            )
        )
        out.append(
            Figure(
                "live bits/value vs 600-row keyframes",
                f"{r['live_bits_per_value']:.2f} = {r['live_over_600']:.2f}x",
                f"600-row keyframes {r['keyframe_600_bits_per_value']:.2f}",
                "<= 1.5x",
                r["live_over_600"] <= 1.5,
            )
        )
        out.append(
            Figure(
                "live HTTP request bytes / coded bytes",
                f"{r['request_over_coded']:.2f}x",
                f"signed bodies {r['body_over_coded']:.2f}x; no-keyframe batches"
                f" {r['steady_request_over_coded']:.2f}x; {r['requests']} requests",
                "reported",
                None,
            )
        )
    for r in results.get("rss", []):
        name = (
            f"edge RSS, {r['devices']} dev, dashboard on, sync {'on' if r['sync'] else 'off'}, MB"
        )
        judged = r["sync"]
        out.append(
            Figure(
                name,
                f"{r['rss_bytes_max'] / 1e6:.1f}",
                f"median {r['rss_bytes_median'] / 1e6:.1f}, CPU {100 * r['cpu_share']:.1f}%",
                "<= 60 MB" if judged else "reported (the same without the uploader)",
                r["rss_bytes_max"] <= 60e6 if judged else None,
            )
        )
    return out


def print_table(rows: Sequence[Figure]) -> None:
    heads = ("figure", "measured", "compared with", "target", "")
    cells = [heads, *[(r.what, r.measured, r.compared, r.target, r.verdict) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(heads))]
    for i, c in enumerate(cells):
        print("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ------------------------------------------------------------------ main


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def _postgres() -> Iterator[Any]:
    try:
        from tests.hub_lite.pg import PostgresServer  # the tests' runner: no pytest needed
    except ImportError as exc:
        raise RuntimeError(
            "the PostgreSQL runner lives in tests/hub_lite/pg.py: run `python -m bench.sync`"
            " from the repository's root (as `make bench-sync` does)"
        ) from exc

    # Durable, like the hub's SQLite (synchronous=FULL): a benchmark, not a test database.
    durable = {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "shared_buffers": "128MB",
    }
    with PostgresServer(settings=durable) as pg:
        yield pg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller run (under ~2 minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--only",
        default="ingest,backfill,live,rss",
        help="comma-separated parts: ingest, backfill, live, rss",
    )
    p.add_argument("--batches", type=int, help="ingest: batches per backend (default 1000)")
    p.add_argument("--ingest-max-s", type=float, default=60.0, help="ingest: time cap per run")
    p.add_argument("--connections", type=int, default=4, help="ingest: HTTP connections")
    p.add_argument("--no-postgres", action="store_true", help="ingest: SQLite only")
    p.add_argument("--skip-7d", action="store_true", help="backfill: 24 h only")
    p.add_argument("--live-seconds", type=float, help="live run length (default 60)")
    p.add_argument("--rss-seconds", type=float, help="memory run length each (default 30)")
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.only.split(",") if x.strip()}
    batches = args.batches or (150 if args.quick else 1000)
    live_s = args.live_seconds or (30.0 if args.quick else 60.0)
    rss_s = args.rss_seconds or (10.0 if args.quick else 30.0)
    say = (lambda *a: None) if args.json else print
    _stop_on_sigterm()
    results: dict[str, Any] = {"quick": args.quick, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="gridlet-bench-sync-") as tmp_s:
        tmp = Path(tmp_s)
        if "ingest" in parts:
            say(f"1. ingest over HTTP: making {batches} signed batches of {ROWS} x 100 ...")
            load = make_load(batches=batches)
            results["ingest"] = []
            runs: list[tuple[str, int]] = [("sqlite", 1)]
            if not args.no_postgres:
                runs += [("postgresql", 1), ("postgresql", 2)]
            with contextlib.ExitStack() as stack:
                pg = None
                for backend, workers in runs:
                    folder = tmp / f"ingest-{backend}-{workers}"
                    if backend == "sqlite":
                        url = "sqlite:///hub.db"
                    else:
                        if pg is None:
                            pg = stack.enter_context(_postgres())
                        url = pg.create_database(f"hub_w{workers}")
                    try:
                        r = ingest(
                            load,
                            folder,
                            url,
                            workers=workers,
                            connections=args.connections,
                            max_s=args.ingest_max_s,
                            pg=pg,
                        )
                    except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
                        log = (folder / "hub.log").read_text(errors="replace")[-1500:]
                        r = {"backend": backend, "workers": workers, "error": str(exc)[:300]}
                        say(f"  {backend}, {workers} worker(s): FAILED: {exc}\n{log}")
                    else:
                        say("\n".join(_ingest_lines(r)))
                    results["ingest"].append(r)
            # Live uploads are small: what bounds a hub there is batches a second.
            small = make_load(nodes=50, devices=1, batches=batches * 3, rows=25, fields=50)
            say(f"1b. ingest of {len(small.bodies)} live-sized batches of 25 x 50 into SQLite ...")
            r = ingest(small, tmp / "ingest-small", "sqlite:///hub.db", connections=8)
            r["batches_per_s"] = r["batches"] / r["seconds"]
            r["batches_per_hub_cpu_s"] = r["batches"] / r["hub_cpu_s"] if r["hub_cpu_s"] else None
            results["ingest_small"] = r
            say(
                f"  {r['batches_per_s']:,.0f} batches/s ({_n(r['frames_per_s'])} frames/s),"
                f" {_n(r['batches_per_hub_cpu_s'])} batches per hub CPU-second: at one batch"
                f" every 5 s, about {_n(5 * (r['batches_per_hub_cpu_s'] or 0))} live nodes a core"
            )
        if "backfill" in parts:
            results["backfill"] = []
            for hours in (24,) if args.quick or args.skip_7d else (24, 168):
                say(f"2. backfill: {hours} h at 1 Hz, 5 devices x 50 fields ...")
                r = backfill(tmp / f"backfill-{hours}", hours=hours)
                results["backfill"].append(r)
                say(
                    f"  {r['seconds']:.1f} s until the hub held all {r['frames']:,} frames"
                    f" ({_n(r['frames_per_s'])} frames/s; first frames after"
                    f" {_n(r['first_frames_s'], 1)} s; {r['batches']} batches); edge CPU"
                    f" {r['edge_cpu_s']:.1f} s, hub CPU {r['hub_cpu_s']:.1f} s; the store took"
                    f" {r['build_s']:.1f} s to write"
                )
        if "live" in parts:
            say(f"3. live: 3 synthetic devices x 50 fields at 1 Hz for {live_s:g} s ...")
            r = results["live"] = live(tmp / "live", seconds=live_s)
            say(
                f"  lag read -> hub: p50 {r['lag_p50_s']:.2f} s, p99 {r['lag_p99_s']:.2f} s,"
                f" max {r['lag_max_s']:.2f} s over {r['frames_judged']} frames"
                f" ({r['frames_missing']} missing); uploader interval 5 s (the default)"
            )
            say(
                f"  bits per value: live {r['live_bits_per_value']:.2f} (hub API"
                f" {_n(r['hub_api_bits_per_value'], 2)}; {r['blocks']} blocks,"
                f" {r['keyframe_blocks']} keyframes) vs the same frames in 600-row keyframes"
                f" {r['keyframe_600_bits_per_value']:.2f} = {r['live_over_600']:.2f}x"
            )
            per = max(1, r["requests"])
            say(
                f"  per request: {r['http_request_bytes'] / per:,.0f} B of HTTP request ="
                f" {r['http_header_bytes_per_request']:,.0f} B request line and headers +"
                f" {r['signed_body_bytes'] / per:,.0f} B signed body, of which"
                f" {r['coded_block_bytes'] / per:,.0f} B coded blocks: request/coded"
                f" {r['request_over_coded']:.2f}x, body/coded {r['body_over_coded']:.2f}x"
                f" (batches without keyframes, i.e. without schemas:"
                f" {r['steady_request_over_coded']:.2f}x and {r['steady_body_over_coded']:.2f}x);"
                f" answers {r['http_response_bytes'] / per:,.0f} B"
            )
        if "rss" in parts:
            results["rss"] = []
            for sync in (True, False):
                say(
                    f"5. edge memory: 20 synthetic devices x 50 fields at 1 Hz, dashboard on,"
                    f" sync {'on' if sync else 'off'}, {rss_s:g} s ..."
                )
                r = edge_rss(tmp / f"rss-{sync}", seconds=rss_s, sync=sync)
                results["rss"].append(r)
                say(
                    f"  RSS max {r['rss_bytes_max'] / 1e6:.1f} MB, median"
                    f" {r['rss_bytes_median'] / 1e6:.1f} MB, CPU {100 * r['cpu_share']:.1f}%"
                )
    table = figures(results)
    results["table"] = [asdict(f) | {"verdict": f.verdict} for f in table]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print()
        print_table(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
