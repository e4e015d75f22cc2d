"""The edge's uploader against a real hub process: a node the hub does not know is reported
and retried, never hammered; a batch the hub refuses for good goes to the dead letters, its
frames are counted lost, and the frames after it still go."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from cloud_sync import DeviceSchema, Frame, default_field
from cloud_sync.signing import NodeKey
from cloud_sync.uploader import Uploader, UploaderSettings
from edge_runtime.bus import Reading
from edge_runtime.runtime import Runtime
from edge_runtime.store import Reader, Store
from edge_runtime.sync import StoreSource, run_uploader
from hub_lite.storage import make_storage
from tests.hub_lite.test_sync_e2e import Hub, run

SCHEMA = DeviceSchema(
    "meter", "sim", (default_field("power_w", "W", 5.0), default_field("voltage_v", "V", 0.5))
)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    cfg = tmp_path / "hub.toml"
    cfg.write_text('[storage]\nurl = "sqlite:///hub.db"\n')
    with Hub(cfg).running() as h:
        yield h


@contextlib.asynccontextmanager
async def uploading(up: Uploader) -> AsyncIterator[Uploader]:
    """The uploader running (as `gridlet run` runs it) for the block's duration."""
    task = asyncio.create_task(run_uploader(up))
    try:
        yield up
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def registered(hub: Hub, cwd: Path, node: str = "e1") -> NodeKey:
    """A new node key, registered with the hub."""
    key = NodeKey.generate()
    run("hub", "add-node", "--config", str(hub.config), node, key.public_text, cwd=cwd)
    return key


async def until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def _hub_seqs(db: Path) -> list[int]:
    """Sequence numbers the hub holds (its own database, read-only)."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT held FROM devices WHERE node_id = 'e1'").fetchall()
    out: list[int] = []
    for (held,) in rows:
        a = array("q", held)
        for i in range(0, len(a), 2):
            out.extend(range(a[i], a[i + 1] + 1))
    return out


def readings(seqs: range, t0: int) -> list[Reading]:
    return [Reading(Frame("m", t0 + s * 1000, s, (float(s), 230.0)), SCHEMA) for s in seqs]


async def test_unknown_node_then_registered_and_a_rejected_batch(tmp_path: Path, hub: Hub) -> None:
    store = await Store.open(tmp_path / "edge.db")
    key = NodeKey.generate()
    try:
        now = int(time.time() * 1000)
        await store.write(readings(range(1, 101), now - 200_000))
        runtime = Runtime(store)
        settings = UploaderSettings(
            url=hub.url, node_id="e1", interval_s=0.2, max_rows=50, refused_retry_s=0.5
        )
        up = Uploader(StoreSource(runtime), key, settings)
        expected = [*range(1, 101), *range(121, 161)]

        def hub_seqs() -> list[int]:
            return _hub_seqs(tmp_path / "hub.db")

        async with uploading(up):
            await until(lambda: up.stats.state == "refused", 20, "refused as unknown")
            assert "unknown_node" in (up.stats.last_error or "")
            assert up.stats.batches == 0
            run("hub", "add-node", "--config", str(hub.config), "e1", key.public_text, cwd=tmp_path)
            await until(lambda: up.stats.frames >= 100, 30, "uploads once registered")
            assert up.stats.state == "ok"
            # Frames stamped before 2000 (a clock never set) are not sent; counted lost.
            await store.write(readings(range(101, 111), 100_000))
            await until(lambda: up.stats.rejected_frames == 10, 30, "unset clock counted")
            # Frames two days ahead are refused by the hub for good: dead-lettered, counted.
            await store.write(readings(range(111, 121), now + 2 * 86_400_000))
            await until(lambda: up.stats.rejected_frames == 20, 30, "the bad batch dead-lettered")
            # The clock steps back a day: those frames sort below the watermark, and go all
            # the same; so do the frames after them.
            await store.write(readings(range(121, 141), now - 86_400_000))
            await store.write(readings(range(141, 161), now + 10_000))
            await until(lambda: hub_seqs() == expected, 30, "every good frame at the hub")
        await store.write([])  # the writer's queued counts
        reader = Reader(tmp_path / "edge.db")
        assert sum(rej for _, _, _, rej in reader.losses()) == 20
        reasons = sorted(r for _, source, _, r, _ in reader.dead_letters() if source == "sync")
        assert len(reasons) == 2
        assert "bad_timestamp" in reasons[0] and "clock was not set" in reasons[1]
        st = store.sync["m"]
        assert st.acked == st.live_from == st.live_acked  # no backlog left
    finally:
        await store.close()


async def test_live_batches_chain_on_the_state_the_hub_confirmed(tmp_path: Path, hub: Hub) -> None:
    store = await Store.open(tmp_path / "edge.db")
    key = registered(hub, tmp_path)
    try:
        settings = UploaderSettings(url=hub.url, node_id="e1", interval_s=0.1)
        up = Uploader(StoreSource(Runtime(store)), key, settings)
        async with uploading(up):
            now = int(time.time() * 1000)
            for i in range(30):
                await store.write(readings(range(5 * i + 1, 5 * i + 6), now - 10_000 + 200 * i))
                up.poke()
                target = 5 * i + 5
                await until(lambda t=target: up.stats.frames >= t, 10, "each write uploaded")
        # One keyframe, then every live batch continues the one before.
        assert up.stats.keyframes == 1, (up.stats.keyframes, up.stats.chained)
        assert up.stats.chained >= 25
        assert _hub_seqs(tmp_path / "hub.db") == list(range(1, 151))
    finally:
        await store.close()


async def test_heartbeat_without_frames_and_clock_drift_flagged(tmp_path: Path, hub: Hub) -> None:
    store = await Store.open(tmp_path / "edge.db")
    key = registered(hub, tmp_path)
    try:
        settings = UploaderSettings(url=hub.url, node_id="e1", interval_s=0.1, heartbeat_s=0.5)
        # This node's clock runs 2 minutes fast.
        up = Uploader(StoreSource(Runtime(store)), key, settings, clock=lambda: time.time() + 120)
        async with uploading(up):
            await until(lambda: up.stats.batches >= 3, 20, "heartbeats with no frames")
        assert up.stats.frames == 0
        assert up.stats.drift_ms is not None and 115_000 < up.stats.drift_ms < 125_000
        assert up.stats.drift_flagged
        r = httpx.get(f"{hub.url}/health", timeout=5)
        assert r.status_code == 200
    finally:
        await store.close()

    async def node() -> tuple[int, int | None, str | None]:
        async with make_storage(f"sqlite:///{tmp_path / 'hub.db'}") as st:
            rec = await st.node("e1")
            assert rec is not None
            return rec.batches, rec.drift_ms, rec.status.software_version if rec.status else None

    batches, drift, version = await node()
    assert batches >= 3 and version  # the status rode along
    assert drift is not None and drift > 60_000


def test_gridlet_sync_status_reads_the_running_edge(tmp_path: Path, hub: Hub) -> None:
    import socket
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("gridlet"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = tmp_path / "site.toml"
    site.write_text(
        f'[site]\nnode_id = "st1"\n[store]\npath = "edge.db"\n'
        f'[http]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[sync]\nenabled = true\nhub_url = "{hub.url}"\ninterval_s = 0.5\n'
        '[[devices]]\nid = "a"\nkind = "synthetic"\nfields = 5\ninterval_s = 0.2\n'
    )
    out = subprocess.run(
        [exe, "keygen", "--config", str(site)], capture_output=True, text=True, check=True
    ).stdout
    public = out.split("public key: ")[1].split()[0]
    run("hub", "add-node", "--config", str(hub.config), "st1", public, cwd=tmp_path)
    edge = subprocess.Popen([exe, "run", "--config", str(site)], cwd=tmp_path)
    try:

        def status() -> str:
            r = subprocess.run(
                [exe, "sync", "status", "--config", str(site)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            return r.stdout + r.stderr if r.returncode == 0 else ""

        deadline = time.monotonic() + 30
        text = status()
        while "ok" not in text.split("state", 1)[-1].split("\n", 1)[0]:
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
            text = status()
        assert hub.url in text and "backlog" in text and "frames/s" in text
        assert "HTTP Request" not in text  # httpx's request log stays out of the output
        follow = subprocess.Popen(
            [exe, "sync", "status", "--config", str(site), "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(2.5)  # a few refreshes of a display meant for a person
        follow.send_signal(signal.SIGINT)
        shown, _ = follow.communicate(timeout=10)
        assert follow.returncode == 0, shown
        assert "backlog" in shown and "left" in shown and "Traceback" not in shown
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "gridlet_sync_up 1.0" in metrics
        assert "gridlet_sync_backlog_frames" in metrics
        assert "gridlet_sync_clock_drift_flagged 0.0" in metrics
    finally:
        edge.send_signal(signal.SIGINT)
        assert edge.wait(timeout=30) == 0
    off = tmp_path / "off.toml"
    off.write_text('[site]\nnode_id = "x"\n')
    r = subprocess.run(
        [exe, "sync", "status", "--config", str(off)], capture_output=True, text=True, check=False
    )
    assert r.returncode != 0 and "sync is not enabled" in r.stderr


async def test_live_frames_flow_while_a_backlog_drains_oldest_first(
    tmp_path: Path, hub: Hub
) -> None:
    store = await Store.open(tmp_path / "edge.db")
    key = registered(hub, tmp_path)
    try:
        now = int(time.time() * 1000)
        # An outage's worth of frames, stored while no hub was there.
        await store.write(readings(range(1, 30_001), now - 40_000_000))
        settings = UploaderSettings(url=hub.url, node_id="e1", interval_s=0.2, max_rows=50)
        up = Uploader(StoreSource(Runtime(store)), key, settings)
        async with uploading(up):
            # What was stored before the uploader started is the backlog.
            await until(
                lambda: "m" in store.sync and store.sync["m"].live_from == 30_000,
                10,
                "backlog set aside",
            )
            seq = 30_000
            behind: list[int] = []  # backlog frames not at the hub when a live frame got there
            for _ in range(3):  # new readings keep coming, and reach the hub at once
                await store.write(readings(range(seq + 1, seq + 3), now - 30_000_000))
                seq += 2
                up.poke()
                await until(
                    lambda s=seq: s in set(_hub_seqs(tmp_path / "hub.db")), 10, "live frame"
                )
                held = _hub_seqs(tmp_path / "hub.db")
                backlog = [s for s in held if s <= 30_000]
                assert backlog == list(range(1, len(backlog) + 1)), "the backlog goes oldest first"
                behind.append(30_000 - len(backlog))
            assert behind[0] > 0, "the first live frame waited for the whole backlog"
            await until(lambda: len(_hub_seqs(tmp_path / "hub.db")) == seq, 120, "all drained")
            await until(lambda: store.sync["m"].acked == seq, 10, "the node knows")
        st = store.sync["m"]
        assert st.acked == st.live_from == st.live_acked == seq
    finally:
        await store.close()


async def test_a_chain_the_hub_cannot_continue_falls_back_to_a_keyframe(
    tmp_path: Path, hub: Hub
) -> None:
    store = await Store.open(tmp_path / "edge.db")
    key = registered(hub, tmp_path)
    try:
        up = Uploader(
            StoreSource(Runtime(store)),
            key,
            UploaderSettings(url=hub.url, node_id="e1", interval_s=0.1),
        )
        async with uploading(up):
            now = int(time.time() * 1000)
            seq = 0
            for _ in range(5):
                await store.write(readings(range(seq + 1, seq + 6), now - 60_000))
                seq += 5
                up.poke()
                await until(lambda s=seq: up.stats.frames >= s, 10, "uploaded")
            assert up.stats.chained >= 3
            # The hub loses its copy of the last blocks (restored from an older backup, say)
            # and restarts: it holds no state to continue from.
            hub.stop()
            with sqlite3.connect(tmp_path / "hub.db") as conn:
                conn.execute(
                    "DELETE FROM blocks WHERE batch_id = (SELECT max(batch_id) FROM blocks)"
                )
            hub.start()
            for _ in range(3):
                await store.write(readings(range(seq + 1, seq + 6), now - 30_000))
                seq += 5
                up.poke()
                await until(lambda s=seq: up.stats.frames >= s, 30, "uploaded after the restart")
        assert up.stats.chains_refused >= 1
        assert set(range(26, seq + 1)) <= set(_hub_seqs(tmp_path / "hub.db"))
    finally:
        await store.close()
