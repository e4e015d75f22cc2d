"""End to end: `gridlet run` on simulated devices syncing into `gridlet hub serve`, with the hub
stopped, SIGKILLed and restarted and the edge SIGKILLed mid-upload; afterwards the hub holds
exactly the edge's frames (same count, each value within tolerance), with no duplicates."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_sync import DeviceSchema, Frame
from edge_runtime.store import Reader
from hub_lite.read import read_frames
from hub_lite.storage import make_storage

EXE = str(Path(sys.executable).with_name("gridlet"))
TOKEN = "test-admin-token"

SITE = """
[site]
node_id = "site-e2e"

[store]
path = "edge.db"
commit_interval_ms = 200

[http]
enabled = false

[sync]
enabled = true
hub_url = "{url}"
interval_s = 0.5
max_rows = 200

[[devices]]
id = "a"
kind = "synthetic"
fields = 12
interval_s = 0.05

[[devices]]
id = "b"
kind = "synthetic"
fields = 40
interval_s = 0.1
"""


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


class Hub:
    """`gridlet hub serve` as a real process on a free port (the same port after restarts)."""

    def __init__(self, config: Path, workers: int = 1) -> None:
        self.config = config
        self.workers = workers
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.url_db = ""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                EXE,
                "hub",
                "serve",
                "--config",
                str(self.config),
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its worker processes die with it
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        assert m, f"hub did not start: {line!r}"
        self.port = int(m.group(1))
        wait_for(self._healthy, 20, "hub answers /health")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def running(self) -> Iterator[Hub]:
        """Started for the block; killed at its end, whatever happened (workers too)."""
        try:
            self.start()
            yield self
        finally:
            self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self.proc = None

    def frames(self, node: str) -> int:
        r = httpx.get(
            f"{self.url}/api/v1/nodes/{node}/devices",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )
        r.raise_for_status()
        return sum(d["frames"] for d in r.json())


@pytest.fixture
def hub(tmp_path: Path, storage_url: str) -> Iterator[Hub]:
    """A hub on each backend; on PostgreSQL with two worker processes, so that consecutive
    batches land on different processes (chains rebuilt from the database)."""
    from hub_lite.app import hash_token

    cfg = tmp_path / "hub.toml"
    cfg.write_text(
        f'[hub]\nadmin_token_hash = "{hash_token(TOKEN)}"\n[storage]\nurl = "{storage_url}"\n'
    )
    h = Hub(cfg, workers=1 if storage_url.startswith("sqlite") else 2)
    h.url_db = storage_url
    try:
        yield h
    finally:
        h.stop(signal.SIGKILL)


def run(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        [EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def edge_frames(db: Path) -> dict[str, list[tuple[Frame, DeviceSchema]]]:
    reader = Reader(db)
    return {d: list(reader.frames(d)) for d in ("a", "b")}


async def hub_frames(url: str, node: str, device: str) -> list[Frame]:
    async with make_storage(url) as st:
        return await read_frames(st, node, device, 0, 2**62)


def test_outages_and_kills_end_with_the_hub_holding_exactly_the_edge_frames(
    tmp_path: Path, hub: Hub
) -> None:
    hub.start()
    site = tmp_path / "site.toml"
    site.write_text(SITE.format(url=hub.url))
    out = run("keygen", "--config", str(site), cwd=tmp_path)
    public = out.split("public key: ")[1].split()[0]
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600
    run("hub", "add-node", "--config", str(hub.config), "site-e2e", public, cwd=tmp_path)

    def start_edge() -> subprocess.Popen[bytes]:
        return subprocess.Popen([EXE, "run", "--config", str(site)], cwd=tmp_path)

    edge = start_edge()
    try:
        wait_for(lambda: hub.frames("site-e2e") > 100, 30, "live frames reach the hub")
        # The hub away for a while (readings go on), then back.
        hub.stop()
        time.sleep(3)
        hub.start()
        wait_for(lambda: hub.frames("site-e2e") > 400, 30, "backlog drains")
        # The hub killed in the middle of work, the edge killed in the middle of an upload.
        hub.stop(signal.SIGKILL)
        time.sleep(1)
        hub.start()
        time.sleep(1.0)
        edge.send_signal(signal.SIGKILL)
        edge.wait(timeout=10)
        edge = start_edge()
        time.sleep(2)
        edge.send_signal(signal.SIGINT)
        assert edge.wait(timeout=30) == 0
        edge = start_edge()
        time.sleep(1.5)
        edge.send_signal(signal.SIGINT)
        assert edge.wait(timeout=30) == 0
        # Everything the edge stored reaches the hub once it runs on with its devices off.
        site.write_text(
            SITE.format(url=hub.url).replace("[[devices]]", "[[devices]]\nenabled = false")
        )
        stored = edge_frames(tmp_path / "edge.db")
        total = sum(len(v) for v in stored.values())
        edge = start_edge()
        wait_for(lambda: hub.frames("site-e2e") >= total, 60, "the hub catches up")
        edge.send_signal(signal.SIGINT)
        assert edge.wait(timeout=30) == 0
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.wait()
    hub.stop()

    stored = edge_frames(tmp_path / "edge.db")
    for device, rows in stored.items():
        got = asyncio.run(hub_frames(hub.url_db, "site-e2e", device))
        seqs = [f.seq for f in got]
        assert len(seqs) == len(set(seqs)), f"{device}: duplicates at the hub"
        assert len(got) == len(rows), f"{device}: edge {len(rows)} frames, hub {len(got)}"
        for (want, schema), have in zip(rows, got, strict=True):
            assert (want.ts_ms, want.seq) == (have.ts_ms, have.seq)
            for f, x, y in zip(schema.fields, want.values, have.values, strict=True):
                if x is None or (isinstance(x, float) and not math.isfinite(x)):
                    assert (y is None) == (x is None)
                    continue
                assert y is not None and abs(x - y) <= f.tol, (device, want.seq, f.name, x, y)


def test_frames_evicted_while_the_hub_was_away_are_lost_in_the_hubs_completeness(
    tmp_path: Path, hub: Hub
) -> None:
    from cloud_sync import default_field
    from edge_runtime.bus import Reading
    from edge_runtime.store import Store

    schema = DeviceSchema(
        "meter", "sim", (default_field("p_w", "W", 5.0), default_field("u_v", "V", 0.5))
    )
    day = int(time.time() * 1000) // 86_400_000 * 86_400_000
    t0 = day + 60_000  # all frames within today (UTC), a minute past midnight

    async def fill_and_evict() -> tuple[int, int]:
        store = await Store.open(tmp_path / "edge.db", max_size_bytes=10**9)
        try:
            await store.write(
                [
                    Reading(Frame("m1", t0 + i * 100, i + 1, (float(i % 3000), 230.0)), schema)
                    for i in range(20_000)
                ]
            )
            store.max_size_bytes = await store._size() * 3 // 4  # the card fills up
            await store.maintain(now_ms=t0 + 3_600_000)
            return store.stats.evicted_unsynced, store.stats.committed_frames
        finally:
            await store.close()

    # The hub is away while the cap is reached: nothing was uploaded, so all evicted are lost.
    evicted, written = asyncio.run(fill_and_evict())
    assert evicted > 0
    hub.start()
    site = tmp_path / "site.toml"
    site.write_text(
        f'[site]\nnode_id = "capped"\n[store]\npath = "edge.db"\n[http]\nenabled = false\n'
        f'[sync]\nenabled = true\nhub_url = "{hub.url}"\ninterval_s = 0.5\n'
    )
    out = run("keygen", "--config", str(site), cwd=tmp_path)
    public = out.split("public key: ")[1].split()[0]
    run("hub", "add-node", "--config", str(hub.config), "capped", public, cwd=tmp_path)
    edge = subprocess.Popen([EXE, "run", "--config", str(site)], cwd=tmp_path)
    try:
        left = written - evicted
        wait_for(lambda: hub.frames("capped") >= left, 60, "the rest reaches the hub")

        def completeness() -> dict[str, Any]:
            r = httpx.get(
                f"{hub.url}/api/v1/nodes/capped/completeness",
                params={"day": time.strftime("%Y-%m-%d", time.gmtime(day / 1000))},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=5,
            )
            r.raise_for_status()
            rows = r.json()
            return rows[0] if rows else {}

        wait_for(lambda: completeness().get("lost_evicted") == evicted, 60, "losses reported")
        c = completeness()
        assert c["device_id"] == "m1"
        assert c["live"] + c["backfill"] == left
        assert c["lost_evicted"] + c["live"] + c["backfill"] == written
    finally:
        edge.send_signal(signal.SIGINT)
        assert edge.wait(timeout=30) == 0
