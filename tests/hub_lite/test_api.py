"""The hub's HTTP API on a real server: ingest answers, the admin token, nodes with status and
clock drift, devices with latest values and compression figures, frames, completeness,
/health, /metrics and OpenAPI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud_sync import DeviceHealth, DeviceSchema, Frame, NodeStatus, default_field, encode
from cloud_sync.protocol import BATCHES_PATH, CONTENT_TYPE
from cloud_sync.signing import NodeKey, sign
from hub_lite.app import hash_token

from .test_sync_e2e import Hub, run

TOKEN = "api-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCHEMA = DeviceSchema(
    "meter", "sim", (default_field("power_w", "W", 5.0), default_field("voltage_v", "V", 0.5))
)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    cfg = tmp_path / "hub.toml"
    cfg.write_text(
        f'[hub]\nadmin_token_hash = "{hash_token(TOKEN)}"\n'
        '[storage]\nurl = "sqlite:///hub.db"\n[ingest]\nmax_body_bytes = 65536\n'
    )
    with Hub(cfg).running() as h:
        yield h


def post(hub: Hub, body: bytes) -> httpx.Response:
    return httpx.post(
        hub.url + BATCHES_PATH, content=body, headers={"content-type": CONTENT_TYPE}, timeout=10
    )


def test_api(tmp_path: Path, hub: Hub) -> None:
    key = NodeKey.generate()
    run("hub", "add-node", "--config", str(hub.config), "n1", key.public_text, cwd=tmp_path)
    now = int(time.time() * 1000) + 120_000  # the node's clock runs 2 minutes fast
    rows = [Frame("m", now - 60_000 + i * 1000, i + 1, (100.0 + i, 230.0)) for i in range(60)]
    status = NodeStatus(
        software_version="9.9.9",
        backlog_frames=7,
        devices=(DeviceHealth(device_id="m", online=True, last_seen_ms=now),),
    )
    raw = encode(rows, {"m": SCHEMA}, node_id="n1", batch_id=1, created_ms=now, status=status)
    r = post(hub, sign(key, "n1", raw))
    assert r.status_code == 200 and r.json()["result"] == "stored"
    ack = r.json()
    assert ack["frames_new"] == 60 and ack["chain"] == {"m": 1}
    assert abs(ack["hub_time_ms"] - (now - 120_000)) < 5000
    assert post(hub, sign(key, "n1", raw)).json()["result"] == "duplicate"
    # Refusals are JSON with a code.
    bad = post(hub, sign(NodeKey.generate(), "n1", raw))
    assert bad.status_code == 401 and bad.json()["error"] == "bad_signature"
    assert post(hub, b"x" * 70_000).status_code == 413

    assert httpx.get(f"{hub.url}/api/v1/nodes", timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{hub.url}/api/v1/nodes", headers=wrong, timeout=5).status_code == 401
    nodes = httpx.get(f"{hub.url}/api/v1/nodes", headers=AUTH, timeout=5).json()
    assert [n["node_id"] for n in nodes] == ["n1"]
    n = nodes[0]
    assert n["online"] and n["software_version"] == "9.9.9" and n["backlog_frames"] == 7
    assert 110_000 < n["drift_ms"] < 130_000 and n["drift_flagged"]
    assert n["devices"][0]["device_id"] == "m"
    assert n["frames"] == 60 and 0 < n["bits_per_value"] < 16 and n["json_ratio"] > 5

    devices = httpx.get(f"{hub.url}/api/v1/nodes/n1/devices", headers=AUTH, timeout=5).json()
    (d,) = devices
    assert d["frames"] == 60 and d["last_seq"] == 60
    assert abs(d["latest"][0] - 159.0) <= 5.0 and abs(d["latest"][1] - 230.0) <= 0.5
    assert [f["name"] for f in d["fields"]] == ["power_w", "voltage_v"]
    assert 0 < d["bits_per_value"] < 16 and d["json_ratio"] > 5

    frames = httpx.get(
        f"{hub.url}/api/v1/nodes/n1/devices/m/frames",
        params={"from": now - 30_000, "to": now},
        headers=AUTH,
        timeout=5,
    ).json()
    assert frames["seq"] == list(range(31, 61))
    assert all(
        abs(v[0] - (100.0 + s - 1)) <= 5.0
        for v, s in zip(frames["values"], frames["seq"], strict=True)
    )
    bad_range = httpx.get(
        f"{hub.url}/api/v1/nodes/n1/devices/m/frames",
        params={"from": now, "to": now - 1},
        headers=AUTH,
        timeout=5,
    )
    assert bad_range.status_code == 400
    assert (
        httpx.get(f"{hub.url}/api/v1/nodes/nx/devices", headers=AUTH, timeout=5).status_code == 404
    )
    day = time.strftime("%Y-%m-%d", time.gmtime(now / 1000))
    comp = httpx.get(
        f"{hub.url}/api/v1/nodes/n1/completeness", params={"day": day}, headers=AUTH, timeout=5
    )
    today = now // 86_400_000 * 86_400_000
    (c,) = comp.json()
    # Sent within a minute of their reading, by the node's own clock: all arrived live.
    assert c["live"] == sum(1 for f in rows if f.ts_ms >= today) and c["backfill"] == 0
    assert (
        httpx.get(
            f"{hub.url}/api/v1/nodes/n1/completeness",
            params={"day": "yesterday"},
            headers=AUTH,
            timeout=5,
        ).status_code
        == 400
    )

    health = httpx.get(f"{hub.url}/health", timeout=5).json()
    assert health["status"] == "ok" and health["storage"] == "sqlite"
    metrics = httpx.get(f"{hub.url}/metrics", timeout=5).text
    assert "gridlet_hub_batches_total 1.0" in metrics
    assert "gridlet_hub_duplicate_batches_total 1.0" in metrics
    assert 'gridlet_hub_refused_batches_total{reason="bad_signature"} 1.0' in metrics
    assert 'gridlet_hub_node_clock_drift_flagged{node="n1"} 1.0' in metrics
    spec = httpx.get(f"{hub.url}/schema/openapi.json", timeout=5).json()
    assert {BATCHES_PATH, "/api/v1/nodes", "/api/v1/nodes/{node_id}/completeness"} <= set(
        spec["paths"]
    )
