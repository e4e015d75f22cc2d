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
