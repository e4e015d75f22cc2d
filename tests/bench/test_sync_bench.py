"""bench.sync on tiny sizes: the readings it makes, the loads it sends, and each part run once
against real hub and edge processes (SQLite), so that `make bench-sync` cannot rot."""

from __future__ import annotations

import http.server
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from bench import sync as bs
from bench._procs import ByteCountingProxy
from cloud_sync import Frame, decode
from cloud_sync.signing import open_signed


def test_random_walks_keep_the_devices_resolution_and_fit_the_schema() -> None:
    schema = bs.walk_schema(16)
    rows = bs.random_walk(200, 16, seed=1)
    assert len(rows) == 200 and all(len(r) == 16 for r in rows)
    units = [f.unit for f in schema.fields]
    assert units[:8] == ["W", "V", "A", "Hz", "C", "kWh", "var", "%"]
    for j, f in enumerate(schema.fields):
        col = [r[j] for r in rows]
        step = {"W": 1.0, "V": 0.1, "A": 0.01, "Hz": 0.001, "C": 0.1, "kWh": 0.001}.get(f.unit)
        if step is not None:
            assert all(abs(v / step - round(v / step)) < 1e-6 for v in col), f.name
        if f.unit == "kWh":
            assert col == sorted(col)  # an energy counter only grows
        else:
            assert len(set(col)) > 1


def test_json_lines_bytes_counts_the_lines_exactly() -> None:
    schema = bs.walk_schema(3)
    frames = [Frame("dev0", 1_700_000_000_000 + i, i + 1, (1.5, 230.1, 0.25)) for i in range(4)]
    lines = [
        msgspec.json.encode(
            {"device_id": "dev0", "ts_ms": f.ts_ms, "seq": f.seq}
            | {fl.name: v for fl, v in zip(schema.fields, f.values, strict=True)}
        )
        + b"\n"
        for f in frames
    ]
    assert bs.json_lines_bytes(frames, schema) == sum(len(x) for x in lines)


def test_a_load_is_signed_keyframe_batches_schemas_whole_only_in_the_warmup() -> None:
    load = bs.make_load(nodes=2, devices=2, batches=5, rows=30, fields=8)
    assert len(load.warmup) == 2 and len(load.bodies) == 5
    schema = bs.walk_schema(8)
    seen: set[tuple[str, int]] = set()
    for i, body in enumerate(load.warmup + load.bodies):
        node, batch, _sig = open_signed(body)
        got = decode(batch, {schema.digest(): schema})
        assert got.node_id == node and len(got.frames) == 30
        assert (node, got.batch_id) not in seen
        seen.add((node, got.batch_id))
        if i >= 2:  # after the warm-up the schema travels by reference
            assert len(batch) < len(load.warmup[0]) - 100
    assert 0 < load.block_bytes < load.body_bytes
    assert load.json_bytes_per_frame > 8 * 4


@pytest.fixture
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the hub

        def do_POST(self) -> None:
            n = int(self.headers["content-length"])
            self.rfile.read(n)
            self.send_response(200)
            self.send_header("content-length", "5")
            self.end_headers()
            self.wfile.write(b"thank")

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_the_proxy_counts_whole_requests_and_answers(http_server: int) -> None:
    with ByteCountingProxy(http_server) as proxy, httpx.Client() as client:
        for _ in range(3):
            r = client.post(f"http://127.0.0.1:{proxy.port}/x", content=b"a" * 1000)
            assert r.content == b"thank"
    assert proxy.connections == 1  # keep-alive, as the uploader's client
    assert 3 * 1000 + 3 * 60 < proxy.up < 3 * 1000 + 3 * 400  # bodies and headers
    assert 3 * 5 < proxy.down < 3 * 300


def test_ingest_into_a_real_sqlite_hub(tmp_path: Path) -> None:
    load = bs.make_load(nodes=2, devices=1, batches=4, rows=50, fields=20)
    r = bs.ingest(load, tmp_path, "sqlite:///hub.db", connections=2, max_s=30)
    assert r["batches"] == 4 and r["frames"] == 4 * 50
    assert r["frames_stored"] == 6 * 50  # the warm-up batches too
    assert r["statuses"] == {200: 4}
    assert r["db_bytes"] > 0 and r["wire_bytes_per_frame"] > r["block_bytes_per_frame"] > 0
    assert r["hub_bits_per_value"] == pytest.approx(8 * r["block_bytes_per_frame"] / 20, rel=0.05)
    rows = bs.figures({"ingest": [r]})
    assert [f.target for f in rows] == [">= 50,000", "<= 4x wire"]


def test_backfill_then_the_live_figures_of_its_databases(tmp_path: Path) -> None:
    r = bs.backfill(tmp_path, hours=0.05, devices=2, fields=10, timeout_s=60)
    assert r["frames"] == 2 * 180
    assert r["edge_exit"] == 0
    assert 0 < r["seconds"] < 60 and r["batches"] >= 1
    # The same analysis as after a live run: every frame found at the hub, the backlog's
    # 600-row blocks re-encoded in 600-row blocks cost exactly what they did.
    live = bs._live_figures(
        tmp_path / "hub" / "hub.db",
        tmp_path / "edge.db",
        "backfill",
        ["dev0", "dev1"],
        api=[],
        ended_ms=2**62,
        http_up=10_000,
        http_down=100,
        seconds=1,
        fields=10,
    )
    assert live["frames_judged"] == 360 and live["frames_missing"] == 0
    assert live["lag_p50_s"] > 0 and live["lag_p99_s"] <= live["lag_max_s"]
    assert live["live_over_600"] == pytest.approx(1.0)
    assert math.isnan(live["steady_body_over_coded"])  # every batch of a backfill is keyframes
    rows = bs.figures({"backfill": [r], "live": live})
    assert [f.ok for f in rows][:3] == [True, live["lag_p99_s"] <= 10, True]


def test_edge_memory_run(tmp_path: Path) -> None:
    r = bs.edge_rss(tmp_path, seconds=1, devices=2, fields=5, sync=False)
    assert 10e6 < r["rss_bytes_max"] < 500e6
    assert r["rss_bytes_median"] <= r["rss_bytes_max"]
    [row] = bs.figures({"rss": [r]})
    assert row.ok is None  # without the uploader: reported beside, not judged
    bs.print_table(bs.figures({"rss": [r | {"sync": True}]}))
