"""The dashboard against webui/API.md: a real Runtime and Store, served by uvicorn.

HTTP goes through httpx to the real server, the live feed through the ``websockets`` client;
drivers are scripted (conftest), history is written with past timestamps through the bus.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import websockets
from click.testing import CliRunner
from litestar.testing import AsyncTestClient

import webui
from cloud_sync import DeviceSchema, default_field
from edge_runtime.app import run_site
from edge_runtime.cli import main
from edge_runtime.config import HttpConfig, SiteConfig, SiteSection
from edge_runtime.demo import dashboard_port
from edge_runtime.devices.base import now_ms
from edge_runtime.runtime import Polled, Runtime
from edge_runtime.store import HOUR_MS, MINUTE_MS, Store
from edge_runtime.web import ServerReady, create_app, hash_password, serve, verify_password
from edge_runtime.web import api as web_api
from edge_runtime.web.auth import RateLimiter, parse_password_hash
from edge_runtime.web.live import LiveClient

from .conftest import (
    INDEX_HTML,
    SCHEMA,
    PushSource,
    ScriptedDriver,
    StartSite,
    WebSite,
    until,
)

FIELDS = ["power_w", "voltage_v", "energy_kwh"]
SCHEMA4 = DeviceSchema("meter", "Fake SDM", (*SCHEMA.fields, default_field("freq_hz", "Hz", 0.005)))


def client(site: WebSite, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=site.base_url, timeout=10, **kw)


async def recv(ws: websockets.ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        msg = await ws.recv()
    out: dict[str, Any] = json.loads(msg)
    return out


def error(r: httpx.Response, status: int) -> str:
    """The detail of an API error, after checking its status and shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"status_code", "detail"} and body["status_code"] == status
    detail: str = body["detail"]
    return detail


# ---------------------------------------------------------------------- site, pages, devices


async def test_site_pages_and_static_files(site: WebSite) -> None:
    async with client(site) as c:
        r = await c.get("/api/site")
        assert r.status_code == 200
        info = r.json()
        assert info["node_id"] == "test-0" and info["name"] == "gridlet test site"
        assert info["version"] and info["auth"] is False
        assert info["started_ms"] == site.runtime.started_ms
        assert abs(info["now_ms"] - now_ms()) < 5000
        for page in ("/", "/history", "/status"):
            r = await c.get(page)
            assert r.status_code == 200 and r.text == INDEX_HTML
            assert r.headers["content-type"].startswith("text/html")
            assert "attachment" not in r.headers.get("content-disposition", "")
            r = await c.head(page)
            assert r.status_code == 200 and r.content == b""
            assert r.headers["content-type"].startswith("text/html")
        r = await c.get("/static/app.js")
        assert r.status_code == 200 and "gridlet" in r.text
        assert (await c.get("/static/missing.js")).status_code == 404
        assert (await c.get("/login")).status_code == 404  # no password, no login page


async def test_the_packaged_front_end_is_served(start_site: StartSite) -> None:
    site = await start_site(static_dir=webui.STATIC_DIR)
    async with client(site) as c:
        r = await c.get("/static/vendor/uPlot.iife.min.js")
        assert r.status_code == 200 and len(r.content) > 1000


async def test_devices_list_status_schema_and_latest(site: WebSite) -> None:
    site.publish("meter", (1.5, 230.1, None))
    site.publish("meter", (2.5, 230.2, 0.25))
    st = site.runtime.status("meter", "fake")
    st.info.update({"serial": "SN1", "odd": object()})
    st.count("seq_gaps", 2)
    site.runtime.status("silent", "modbus")  # configured, never answered
    await until(lambda: (r := site.hub.latest("meter")) is not None and r.frame.seq == 2)
    async with client(site) as c:
        devices = (await c.get("/api/devices")).json()
        by_id = {d["device_id"]: d for d in devices}
        assert set(by_id) == {"meter", "silent"}
        m = by_id["meter"]
        assert m["kind"] == "fake" and m["model"] == "Fake SDM" and m["online"] is True
        assert m["reads"] == 2 and m["errors"] == 0 and m["timeouts"] == 0
        assert m["last_error"] is None and m["last_seen_ms"] == st.last_seen_ms
        assert m["info"]["serial"] == "SN1" and m["info"]["odd"].startswith("<object")
        assert m["counters"] == {"seq_gaps": 2}
        assert m["fields"] == [
            {"name": "power_w", "unit": "W", "tol": 5.0},
            {"name": "voltage_v", "unit": "V", "tol": 0.1},
            {"name": "energy_kwh", "unit": "kWh", "tol": 0.0005},
        ]
        assert m["latest"]["seq"] == 2 and m["latest"]["values"] == [2.5, 230.2, 0.25]
        s = by_id["silent"]
        assert s["online"] is False and s["latest"] is None and s["fields"] == []

        one = (await c.get("/api/devices/meter")).json()
        assert one == m
        detail = error(await c.get("/api/devices/nope"), 404)
        assert "unknown device 'nope'" in detail


# ---------------------------------------------------------------------- history


T_STEP = 10_000  # a frame every 10 s
N_FRAMES = 3 * 360  # three hours


def _frame_values(i: int) -> tuple[float | None, ...]:
    return (float(i), None if i % 7 == 0 else 230 + (i % 6) / 10, i / 100)


@pytest.fixture
async def history_site(start_site: StartSite) -> tuple[WebSite, int]:
    """Three hours of frames two days ago, and one more an hour later that closes the last
    minute bucket (so every 1-minute and 1-hour rollup of the three hours is written)."""
    site = await start_site()
    t0 = (now_ms() // HOUR_MS - 48) * HOUR_MS
    for i in range(N_FRAMES):
        site.publish("hist", _frame_values(i), ts_ms=t0 + i * T_STEP)
    site.publish("hist", _frame_values(1440), ts_ms=t0 + 4 * HOUR_MS)
    await until(lambda: site.store.stats.committed_frames >= N_FRAMES + 1)
    return site, t0


async def test_history_raw_frames(history_site: tuple[WebSite, int]) -> None:
    site, t0 = history_site
    end = t0 + 3 * HOUR_MS - 1
    async with client(site) as c:
        r = await c.get("/api/devices/hist/history", params={"range": "1h", "end_ms": end})
        assert r.status_code == 200, r.text
        h = r.json()
    assert h["device_id"] == "hist" and h["range"] == "1h" and h["resolution"] == "raw"
    assert (h["start_ms"], h["end_ms"]) == (end - HOUR_MS, end)
    assert [f["name"] for f in h["fields"]] == FIELDS
    idx = range(720, 1080)  # the third hour
    assert h["t"] == [t0 + i * T_STEP for i in idx]
    for j, name in enumerate(FIELDS):
        want = [_frame_values(i)[j] for i in idx]
        s = h["series"][name]
        assert s["avg"] == s["min"] == s["max"] == pytest.approx(want)
    assert h["series"]["voltage_v"]["avg"][idx.index(721)] is None  # 721 = 7 * 103


async def test_history_thins_too_many_raw_frames(
    history_site: tuple[WebSite, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    site, t0 = history_site
    monkeypatch.setattr(web_api, "MAX_RAW_POINTS", 60)  # a minute per point
    end = t0 + 3 * HOUR_MS - 1
    async with client(site) as c:
        h = (await c.get(f"/api/devices/hist/history?range=1h&end_ms={end}")).json()
    assert h["resolution"] == "raw" and 55 <= len(h["t"]) <= 61
    p = h["series"]["power_w"]
    assert all(lo <= a <= hi for lo, a, hi in zip(p["min"], p["avg"], p["max"], strict=True))
    assert p["min"][0] == 720 and p["max"][-1] == 1079


def _expected_rollup(lo: int, hi: int, j: int) -> tuple[float, float, float]:
    vals = [v for i in range(lo, hi) if (v := _frame_values(i)[j]) is not None]
    return min(vals), sum(vals) / len(vals), max(vals)


@pytest.mark.parametrize(("range_", "res"), [("24h", "1m"), ("7d", "1m")])
async def test_history_minute_rollups(
    history_site: tuple[WebSite, int], range_: str, res: str
) -> None:
    site, t0 = history_site
    end = t0 + 3 * HOUR_MS
    async with client(site) as c:
        h = (await c.get(f"/api/devices/hist/history?range={range_}&end_ms={end}")).json()
    assert h["resolution"] == res
    assert h["t"] == [t0 + k * MINUTE_MS for k in range(180)]
    for k in (0, 1, 100, 179):
        for j, name in enumerate(FIELDS):
            lo, avg, hi = _expected_rollup(6 * k, 6 * k + 6, j)
            s = h["series"][name]
            assert (s["min"][k], s["avg"][k], s["max"][k]) == pytest.approx((lo, avg, hi))


@pytest.mark.parametrize("range_", ["30d", "1y"])
async def test_history_hour_rollups_and_field_choice(
    history_site: tuple[WebSite, int], range_: str
) -> None:
    site, t0 = history_site
    end = t0 + 3 * HOUR_MS
    async with client(site) as c:
        r = await c.get(
            "/api/devices/hist/history",
            params={"range": range_, "end_ms": end, "fields": "energy_kwh,power_w"},
        )
        h = r.json()
    assert h["resolution"] == "1h" and h["t"] == [t0, t0 + HOUR_MS, t0 + 2 * HOUR_MS]
    assert [f["name"] for f in h["fields"]] == ["energy_kwh", "power_w"]
    assert list(h["series"]) == ["energy_kwh", "power_w"]
    for hour in range(3):
        lo, avg, hi = _expected_rollup(360 * hour, 360 * hour + 360, 0)
        s = h["series"]["power_w"]
        assert (s["min"][hour], s["avg"][hour], s["max"][hour]) == pytest.approx((lo, avg, hi))


async def test_history_csv(history_site: tuple[WebSite, int]) -> None:
    site, t0 = history_site
    end = t0 + 3 * HOUR_MS - 1
    async with client(site) as c:
        r = await c.get(f"/api/devices/hist/history.csv?range=1h&end_ms={end}")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert re.fullmatch(
            r'attachment; filename="hist_1h_\d{8}T\d{6}Z\.csv"', r.headers["content-disposition"]
        )
        header, *rows = r.text.splitlines()
        assert header == "ts_ms,power_w,voltage_v,energy_kwh"
        assert len(rows) == 360
        assert rows[1] == f"{t0 + 721 * T_STEP},721.0,,7.21"  # 721 has no voltage
        assert rows[2] == f"{t0 + 722 * T_STEP},722.0,230.2,7.22"

        r = await c.get(f"/api/devices/hist/history.csv?range=30d&end_ms={end + 1}&fields=power_w")
        header, *rows = r.text.splitlines()
        assert header == "ts_ms,power_w_min,power_w_avg,power_w_max"
        assert rows == [
            f"{t0 + h * HOUR_MS},{360 * h:.1f},{360 * h + 179.5},{360 * h + 359:.1f}"
            for h in range(3)
        ]


async def test_history_bad_parameters(history_site: tuple[WebSite, int]) -> None:
    site, _ = history_site
    base = "/api/devices/hist/history"
    async with client(site) as c:
        for suffix in ("", ".csv"):
            d = error(await c.get(f"{base}{suffix}?range=2h"), 400)
            assert d == "unknown range '2h': use one of 1h, 24h, 7d, 30d, 1y"
            d = error(await c.get(f"{base}{suffix}?end_ms=yesterday"), 400)
            assert "end_ms must be Unix time in milliseconds" in d and "yesterday" in d
            assert "end_ms" in error(await c.get(f"{base}{suffix}?end_ms=-5"), 400)
            assert "out of range" in error(await c.get(f"{base}{suffix}?end_ms=9" + "9" * 15), 400)
            d = error(await c.get(f"{base}{suffix}?fields=power_w,bogus_w"), 400)
            assert "unknown field 'bogus_w'" in d and "power_w, voltage_v" in d
            assert "fields is empty" in error(await c.get(f"{base}{suffix}?fields=,"), 400)
            d = error(await c.get(f"/api/devices/ghost/history{suffix}"), 404)
            assert d == "unknown device 'ghost'"


async def test_history_of_a_known_device_without_data_is_empty(site: WebSite) -> None:
    site.runtime.status("fresh", "fake")
    async with client(site) as c:
        h = (await c.get("/api/devices/fresh/history?range=24h")).json()
    assert h["t"] == [] and h["series"] == {} and h["fields"] == []


# ---------------------------------------------------------------------- status, dead letters


async def test_status_and_dead_letters(site: WebSite) -> None:
    site.runtime.dead_letter("mqtt", "gridlet/x/telemetry", b"{not json", "not JSON")
    site.runtime.dead_letter("mqtt", "gridlet/y/telemetry", b"\xff\x00\x01", "not UTF-8")
    site.publish("meter", (1.0, 230.0, 0.1))  # the dead letters go with the next commit
    await until(lambda: site.store.stats.dead_letters == 2)
    async with client(site) as c:
        letters = (await c.get("/api/dead-letters")).json()
        assert [(d["key"], d["reason"]) for d in letters] == [
            ("gridlet/y/telemetry", "not UTF-8"),
            ("gridlet/x/telemetry", "not JSON"),
        ]  # newest first
        assert letters[0]["payload_base64"] is True
        assert base64.b64decode(letters[0]["payload"]) == b"\xff\x00\x01"
        assert letters[1]["payload"] == "{not json" and letters[1]["payload_base64"] is False
        assert letters[0]["source"] == "mqtt" and abs(letters[0]["ts_ms"] - now_ms()) < 60_000
        assert len((await c.get("/api/dead-letters?limit=1")).json()) == 1
        for bad in ("0", "1001", "many"):
            assert "limit" in error(await c.get(f"/api/dead-letters?limit={bad}"), 400)

        st = (await c.get("/api/status")).json()
    assert set(st) == {"devices", "store", "bus", "live", "sync"}
    assert [d["device_id"] for d in st["devices"]] == ["meter"]
    assert "latest" not in st["devices"][0] and st["devices"][0]["reads"] == 1
    store = st["store"]
    assert store["path"] == str(site.store.path)
    assert store["committed_frames"] == 1 and store["dead_letters"] == 2
    assert store["commits"] >= 1 and store["last_commit_ms"] is not None
    assert store["max_size_bytes"] == site.store.max_size_bytes
    assert set(store) >= {"size_bytes", "evicted_synced", "evicted_unsynced", "expired_frames"}
    assert set(st["bus"]) == {"store", "live"}
    assert st["bus"]["store"]["delivered"] == 1 and st["bus"]["live"]["dropped"] == 0
    assert st["live"] == {"clients": 0, "messages": 0, "dropped_updates": 0}
    assert st["sync"] == {
        "state": "not configured",
        "backlog_frames": None,
        "last_upload_ms": None,
        "last_error": None,
        "backlog_oldest_ms": None,
        "rate_fps": None,
        "eta_s": None,
        "drift_ms": None,
        "drift_flagged": False,
        "hub_url": None,
    }


async def test_openapi_documents_every_json_endpoint(site: WebSite) -> None:
    async with client(site) as c:
        doc = (await c.get("/schema/openapi.json")).json()
    paths = doc["paths"]
    for path in (
        "/api/site",
        "/api/devices",
        "/api/devices/{device_id}",
        "/api/devices/{device_id}/history",
        "/api/devices/{device_id}/history.csv",
        "/api/status",
        "/api/dead-letters",
        "/health",
        "/metrics",
    ):
        assert "get" in paths[path], path
    schemas = doc["components"]["schemas"]
    for name in ("SiteInfo", "DeviceInfo", "HistoryResponse", "StatusResponse", "Health"):
        assert any(k.endswith(name) for k in schemas), (name, list(schemas))
    ok = paths["/api/devices/{device_id}/history"]["get"]["responses"]["200"]
    assert "HistoryResponse" in json.dumps(ok)
    params = {p["name"] for p in paths["/api/devices/{device_id}/history"]["get"]["parameters"]}
    assert params >= {"device_id", "range", "end_ms", "fields"}
    assert "/" not in paths and "/static/{file_path:path}" not in paths


# ---------------------------------------------------------------------- health, metrics


async def test_health_ok_then_degraded_when_a_device_goes_offline(start_site: StartSite) -> None:
    drv = ScriptedDriver("meter")
    site = await start_site([Polled(drv, 0.02, 0.5)])
    async with client(site) as c:
        await until(lambda: site.runtime.statuses["meter"].online)
        h = (await c.get("/health")).json()
        assert h["status"] == "ok" and h["uptime_s"] >= 0
        dev = h["components"]["devices"]["meter"]
        assert dev["connected"] is True and dev["messages"] >= 1 and dev["errors"] == 0
        assert h["components"]["store"]["ok"] is True
        drv.mode = "fail"
        await until(lambda: not site.runtime.statuses["meter"].online)
        r = await c.get("/health")
        assert r.status_code == 200  # the body says the state
        h = r.json()
        assert h["status"] == "degraded"
        assert h["components"]["devices"]["meter"]["connected"] is False
        assert h["components"]["devices"]["meter"]["errors"] >= 1


async def test_health_degraded_when_the_store_stops_committing(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite", commit_interval_ms=100)
    try:
        runtime = Runtime(store)  # not running: nothing takes frames off the store's queue
        cfg = SiteConfig(site=SiteSection(node_id="stuck"))
        app = create_app(runtime, cfg)
        runtime.started_ms = now_ms() - 5000  # 50 commit intervals ago
        async with AsyncTestClient(app) as c:
            assert (await c.get("/health")).json()["status"] == "ok"  # idle is fine
            runtime.frame("meter", SCHEMA, (1.0, 2.0, 3.0))
            h = (await c.get("/health")).json()
        assert h["status"] == "degraded" and h["components"]["store"]["ok"] is False
    finally:
        await store.close()


def _metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_metrics(site: WebSite) -> None:
    for n in range(3):
        site.publish("meter", (float(n), 230.0, 0.1))
    st = site.runtime.status("meter", "fake")
    st.errors, st.timeouts = 4, 1
    site.runtime.status("dead", "modbus")
    await until(lambda: site.store.stats.committed_frames == 3)
    async with client(site) as c:
        r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    m = _metrics(r.text)
    assert m['gridlet_device_online{device="meter"}'] == 1
    assert m['gridlet_device_online{device="dead"}'] == 0
    assert m['gridlet_device_reads_total{device="meter"}'] == 3
    assert m['gridlet_device_errors_total{device="meter"}'] == 4
    assert m['gridlet_device_timeouts_total{device="meter"}'] == 1
    assert st.last_seen_ms is not None
    assert m['gridlet_device_last_seen_seconds{device="meter"}'] == st.last_seen_ms / 1000
    assert 'gridlet_device_last_seen_seconds{device="dead"}' not in m  # never seen
    assert m["gridlet_store_committed_frames_total"] == 3
    assert m["gridlet_store_size_bytes"] == site.store.stats.size_bytes
    assert m['gridlet_store_evicted_frames_total{synced="true"}'] == 0
    assert m['gridlet_store_evicted_frames_total{synced="false"}'] == 0
    assert m["gridlet_store_dead_letters_total"] == 0
    assert m["gridlet_bus_published_total"] == 3
    assert m['gridlet_bus_dropped_total{subscriber="store"}'] == 0
    assert m['gridlet_bus_dropped_total{subscriber="live"}'] == 0
    assert m["gridlet_live_clients"] == 0
    assert m["gridlet_live_messages_total"] == 0
    assert m["gridlet_live_dropped_updates_total"] == 0


# ---------------------------------------------------------------------- live


async def test_live_snapshot_then_deltas_of_what_changed(site: WebSite) -> None:
    site.publish("meter", (1.0, 230.0, 0.5))
    await until(lambda: site.hub.latest("meter") is not None)
    async with websockets.connect(site.ws_url + "?rate=50") as ws:
        snap = await recv(ws)
        assert snap["type"] == "snapshot" and abs(snap["now_ms"] - now_ms()) < 5000
        r = site.hub.latest("meter")
        assert r is not None
        assert snap["devices"] == {
            "meter": {
                "online": True,
                "fields": FIELDS,
                "ts_ms": r.frame.ts_ms,
                "seq": 1,
                "values": [1.0, 230.0, 0.5],
            }
        }
        assert site.hub.clients == 1

        site.publish("meter", (1.0, 231.0, 0.5))
        delta = await recv(ws)
        assert delta["type"] == "delta" and set(delta) == {"type", "now_ms", "d"}
        r = site.hub.latest("meter")
        assert r is not None
        assert delta["d"] == {"meter": {"ts": r.frame.ts_ms, "seq": 2, "v": {"1": 231.0}}}

        site.publish("meter", (1.0, 231.0, float("nan")))  # JSON has no NaN: null
        assert (await recv(ws))["d"]["meter"]["v"] == {"2": None}

        site.publish("meter", (1.0, 231.0, 0.5, 50.0), schema=SCHEMA4)  # a field appears
        delta = await recv(ws)
        assert delta["schema"] == {"meter": [*FIELDS, "freq_hz"]}
        assert delta["d"]["meter"]["v"] == {"0": 1.0, "1": 231.0, "2": 0.5, "3": 50.0}

        site.publish("node-7", (5.0, 1.0, 2.0))  # a new device: schema, online, then values
        delta = await recv(ws)
        assert delta["schema"] == {"node-7": FIELDS} and delta["online"] == {"node-7": True}
        assert delta["d"]["node-7"]["v"] == {"0": 5.0, "1": 1.0, "2": 2.0}
        assert "meter" not in delta["d"]

        site.runtime.statuses["meter"].online = False  # the scheduler marks it offline
        delta = await recv(ws)
        assert delta["online"] == {"meter": False} and delta["d"] == {}
    await until(lambda: site.hub.clients == 0)
    assert site.hub.dropped_updates == 0  # every frame got its own message


async def test_live_isolated_frame_goes_out_at_once_and_a_burst_waits(site: WebSite) -> None:
    loop = asyncio.get_running_loop()
    site.publish("meter", (1.0, 230.0, 0.5))
    await until(lambda: site.hub.latest("meter") is not None)
    async with websockets.connect(site.ws_url + "?rate=2") as ws:  # one message per 0.5 s
        await recv(ws)
        await asyncio.sleep(0.6)  # the scenario: a quiet spell longer than 1/rate
        t1 = loop.time()
        site.publish("meter", (2.0, 230.0, 0.5))
        assert (await recv(ws))["d"]["meter"]["v"] == {"0": 2.0}
        t2 = loop.time()
        assert t2 - t1 < 0.25  # not held back to the end of an interval
        site.publish("meter", (3.0, 230.0, 0.5))
        site.publish("meter", (4.0, 230.0, 0.5))
        delta = await recv(ws)
        t3 = loop.time()
        assert t3 - t2 >= 0.45  # the rate holds...
        assert delta["d"]["meter"]["v"] == {"0": 4.0} and delta["d"]["meter"]["seq"] == 4
    assert site.hub.dropped_updates == 1  # ...and frame 3 was merged into 4


async def test_live_coalesces_a_fast_device_to_the_client_rate(start_site: StartSite) -> None:
    src = PushSource("fast", rate_hz=200, count=300)
    src.go.clear()
    site = await start_site(push=[src])
    loop = asyncio.get_running_loop()
    times: list[float] = []
    values: list[float] = []
    async with websockets.connect(site.ws_url + "?rate=10") as ws:
        snap = await recv(ws)
        assert snap["devices"]["fast"]["fields"] == []  # known by status, no reading yet
        src.go.set()
        while not values or values[-1] != 300:
            msg = await recv(ws, timeout=3)
            times.append(loop.time())
            d = msg["d"].get("fast")
            if d is not None:
                assert d["seq"] == d["v"]["0"]  # seq n carries value n here
                values.append(d["v"]["0"])
        async with client(site) as c:
            live = (await c.get("/api/status")).json()["live"]
    assert values == sorted(values) and values[-1] == 300  # always the newest, in order
    # At most ~rate messages a second: any 12 consecutive messages span over a second.
    assert all(b - a >= 1.0 for a, b in zip(times, times[11:], strict=False)), times
    assert len(times) >= 10  # 300 frames at 200/s: about 1.5 s, so 15 messages or so
    # Every frame either had a message or was merged into a newer one, and counted.
    assert site.hub.dropped_updates == 300 - len(values)
    assert live == {"clients": 1, "messages": len(times) + 1, "dropped_updates": 300 - len(values)}


def test_live_rate_limit_catches_up_with_the_read_slots() -> None:
    """Devices make exactly ``rate`` slots a second; one late message must not make every
    later one late too (a fixed ``1/rate`` period would keep the lag for good)."""
    rate = 10
    c = LiveClient(hub=None, rate=rate)  # type: ignore[arg-type]  # the limiter alone

    def send_at(t: float) -> float:
        at = t + c._send_delay(t)
        c._record_send(at)
        return at

    lags = []
    for k in range(40):
        tick = 100.0 + k / rate
        at = send_at(tick + (0.06 if k == 5 else 0.0))  # message 5 goes out 60 ms late
        lags.append(at - tick)
    assert lags[:5] == [0.0] * 5 and lags[5] == pytest.approx(0.06)
    assert all(lag < 0.001 for lag in lags[12:]), lags  # back on the slots within 7 ticks
    # Flooded (a change every millisecond): never closer than 0.9/rate, and the long-run
    # average stays at the rate.
    t, sends = 200.0, []
    while t < 210.0:
        sends.append(send_at(t))
        t = sends[-1] + 0.001
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert min(gaps) >= 0.9 / rate - 1e-9
    assert len(sends) <= 10 * rate + 2


async def test_live_devices_read_on_one_slot_arrive_in_one_message(start_site: StartSite) -> None:
    # connected at different moments: only the slots can bring their reads together
    drivers = [ScriptedDriver(f"m{i}", connect_delay_s=0.017 * i) for i in range(6)]
    site = await start_site([Polled(d, 0.1, 0.5) for d in drivers], live_rate=10)
    await until(lambda: all(d.reads >= 2 for d in drivers))
    sizes = []
    async with websockets.connect(site.ws_url) as ws:
        await recv(ws)  # snapshot
        for _ in range(20):
            sizes.append(len((await recv(ws))["d"]))
    # Reads share the wall clock's 100 ms slots and the client gathers a slot's frames, so
    # nearly every message carries all six devices instead of one and the rest 100 ms later.
    assert sum(n == 6 for n in sizes) >= 16, sizes


def _stalled_client(url: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads again."""
    m = re.fullmatch(r"ws://([^:/]+):(\d+)(/.*)", url)
    assert m is not None
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly
    sock.settimeout(5)
    sock.connect((host, port))
    key = base64.b64encode(b"0123456789abcdef").decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: leave the first messages unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_stalled_client_is_dropped_without_slowing_others_or_the_store(
    start_site: StartSite, caplog: pytest.LogCaptureFixture
) -> None:
    # Big messages (every one of 3,000 fields changes each frame, ~80 kB a message) fill the
    # kernel's socket buffers (up to 4 MB on loopback) in about a second.
    nf = 3000
    big = DeviceSchema("meter", "big", tuple(default_field(f"f{i}_w", "W", 5) for i in range(nf)))
    src = PushSource("big", 50, 100_000, big, lambda n: [n + i / 1000 for i in range(nf)])
    site = await start_site(push=[src], send_timeout_s=0.5)
    await until(lambda: src.sent > 0)
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.WARNING, logger="edge_runtime.web")
    stalled = await asyncio.to_thread(_stalled_client, site.ws_url + "?rate=50")
    try:
        await until(lambda: site.hub.clients == 1)
        committed = site.store.stats.committed_frames
        async with websockets.connect(site.ws_url + "?rate=10", max_size=None) as ws:
            await recv(ws)
            times = [loop.time()]
            seqs = []
            while site.hub.clients > 1:  # until the stalled one is dropped
                msg = await recv(ws, timeout=2)
                times.append(loop.time())
                seqs.append(msg["d"]["big"]["seq"])
            stall_s = times[-1] - times[0]
            # The other client kept its pace the whole time...
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert max(gaps) < 0.35, gaps
            assert seqs == sorted(seqs) and len(seqs) >= 3
            # ...and so did the store.
            assert site.store.stats.committed_frames - committed >= 25 * stall_s  # 50/s sent
            assert now_ms() - (site.store.stats.last_commit_ms or 0) < 1000
            more = await recv(ws)  # still served after the other one left
            assert more["d"]["big"]["seq"] > seqs[-1]
    finally:
        stalled.close()
    assert site.hub.dropped_updates > 0
    assert any("did not take a message for 0.5 s: dropped" in r.message for r in caplog.records)


async def test_live_rejects_a_bad_rate(site: WebSite) -> None:
    for bad in ("0", "51", "fast"):
        with pytest.raises(websockets.InvalidStatus) as exc:
            async with websockets.connect(f"{site.ws_url}?rate={bad}"):
                pass
        assert exc.value.response.status_code == 400
        assert b"rate must be an integer from 1 to 50" in exc.value.response.body


async def test_live_default_rate_comes_from_config(start_site: StartSite) -> None:
    site = await start_site(live_rate=3)
    async with websockets.connect(site.ws_url) as ws:
        await recv(ws)
        assert [c.rate for c in site.hub._clients] == [3]


# ---------------------------------------------------------------------- authentication

PASSWORD = "correct horse"


def _cheap_hash(password: str = PASSWORD) -> str:
    return hash_password(password, n=2**10)  # the format of the real thing, faster


async def test_auth_guards_everything_until_login(start_site: StartSite) -> None:
    site = await start_site(password_hash=_cheap_hash())
    async with client(site) as c:
        for path in (
            "/api/site",
            "/api/devices",
            "/api/status",
            "/metrics",
            "/schema/openapi.json",
        ):
            assert error(await c.get(path), 401) == "login required", path
        for page in ("/", "/history", "/status"):
            r = await c.get(page)
            assert (r.status_code, r.headers["location"]) == (303, "/login")
        assert (await c.get("/health")).status_code == 200  # always open
        assert (await c.get("/static/app.js")).status_code == 200
        r = await c.get("/login")
        assert r.status_code == 200 and 'name="password"' in r.text
        with pytest.raises(websockets.InvalidStatus) as exc:
            async with websockets.connect(site.ws_url):
                pass
        assert exc.value.response.status_code == 401

        r = await c.post("/login", data={"password": "wrong"})
        assert r.status_code == 401 and "Wrong password" in r.text
        assert "set-cookie" not in r.headers
        r = await c.post("/login", data={"password": PASSWORD})
        assert (r.status_code, r.headers["location"]) == (303, "/")
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("gridlet_session=") and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower() and "Path=/" in cookie
        token = r.cookies["gridlet_session"]

        assert (await c.get("/api/site")).json()["auth"] is True
        assert (await c.get("/")).text == INDEX_HTML
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/login")).status_code == 303  # already in
        headers = {"Cookie": f"gridlet_session={token}"}
        async with websockets.connect(site.ws_url, additional_headers=headers) as ws:
            assert (await recv(ws))["type"] == "snapshot"

        r = await c.post("/logout")
        assert (r.status_code, r.headers["location"]) == (303, "/login")
        assert (
            'gridlet_session=""' in r.headers["set-cookie"]
            or "Max-Age=0" in r.headers["set-cookie"]
        )
    async with client(site, cookies={"gridlet_session": token}) as c:
        assert (await c.get("/api/site")).status_code == 401  # the session was revoked
    async with client(site, cookies={"gridlet_session": token[:-2] + "xx"}) as c:
        assert (await c.get("/api/site")).status_code == 401  # a forged signature


async def test_failed_logins_are_rate_limited(start_site: StartSite) -> None:
    site = await start_site(password_hash=_cheap_hash())
    async with client(site) as c:
        for _ in range(5):
            assert (await c.post("/login", data={"password": "guess"})).status_code == 401
        r = await c.post("/login", data={"password": PASSWORD})
        assert r.status_code == 429 and "Too many failed attempts" in r.text
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "set-cookie" not in r.headers


def test_rate_limiter_window_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("edge_runtime.web.auth.time.monotonic", lambda: clock[0])
    rl = RateLimiter(attempts=2, window_s=60, max_keys=2)
    assert rl.hit("a") == 0 and rl.hit("a") == 0
    assert rl.hit("a") == pytest.approx(60)
    clock[0] += 30
    assert rl.hit("a") == pytest.approx(30) and rl.hit("b") == 0
    clock[0] += 31
    assert rl.hit("a") == 0  # the window moved on
    rl.reset("a")
    rl.hit("c")  # a third address: the table stays within max_keys
    assert len(rl._hits) <= 2


def test_password_hash_format_and_verification() -> None:
    h = _cheap_hash("pw")
    assert re.fullmatch(r"scrypt\$1024\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+", h)
    assert verify_password("pw", h) and not verify_password("pW", h)
    assert h != _cheap_hash("pw")  # salted
    for bad, why in [
        ("pw", "not of the form"),
        ("scrypt$1000$8$1$AAAA$AAAAAAAAAAAAAAAAAAAAAA==", "unsupported scrypt parameters"),
        ("scrypt$1024$8$1$!!$AAAA", "malformed"),
        ("scrypt$1024$8$1$AAAA$AAAA", "short hash"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_password_hash(bad)
    with pytest.raises(ValueError, match="empty"):
        hash_password("")
    with pytest.raises(ValueError, match="not of the form"):
        create_app(
            Runtime.__new__(Runtime),
            SiteConfig(site=SiteSection(node_id="x"), http=HttpConfig(password_hash="md5$x")),
        )


def test_hash_password_cli_round_trip() -> None:
    result = CliRunner().invoke(main, ["hash-password"], input="s3cret pw\ns3cret pw\n")
    assert result.exit_code == 0, result.output
    hashed = result.stdout.strip().splitlines()[-1]
    assert hashed.startswith("scrypt$32768$8$1$")
    assert verify_password("s3cret pw", hashed)
    # the printed line is what the configuration takes
    cfg = msgspec.convert({"site": {"node_id": "x"}, "http": {"password_hash": hashed}}, SiteConfig)
    assert cfg.http.password_hash == hashed

    result = CliRunner().invoke(main, ["hash-password"], input="one\ntwo\n")
    assert result.exit_code != 0
    assert "do not match" in result.output


# ---------------------------------------------------------------------- server and wiring


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


async def test_serve_port_zero_busy_port_and_clean_stop(site: WebSite) -> None:
    with _busy_port() as busy, pytest.raises(OSError):
        await serve(site.dashboard.app, "127.0.0.1", busy.getsockname()[1])
    # A second server needs its own app: one Litestar app runs one lifespan at a time.
    app = create_app(site.runtime, site.cfg, hub=site.hub)
    ready = ServerReady()
    task = asyncio.create_task(serve(app, "127.0.0.1", 0, ready=ready))
    async with asyncio.timeout(5):
        await ready.wait()
    assert ready.port not in (0, site.dashboard.ready.port)
    async with httpx.AsyncClient(base_url=ready.url) as c:
        assert (await c.get("/health")).status_code == 200
        async with websockets.connect(ready.url.replace("http", "ws") + "/api/live") as ws:
            await recv(ws)
            task.cancel()  # with a live client connected
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
    with pytest.raises(asyncio.CancelledError):
        await task
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", ready.port))


async def test_run_site_serves_the_dashboard_when_enabled(tmp_path: Path) -> None:
    port = dashboard_port(0, "127.0.0.1")
    cfg = SiteConfig(
        site=SiteSection(node_id="wired"),
        http=HttpConfig(host="127.0.0.1", port=port),
    )
    task = asyncio.create_task(run_site(cfg, tmp_path))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(httpx.ConnectError):
                        r = await c.get("/api/site")
                        break
                    await asyncio.sleep(0.02)
        assert r.json()["node_id"] == "wired"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.done() and (tmp_path / "gridlet.db").exists()


def test_demo_prefers_port_8000_else_a_free_one() -> None:
    with _busy_port() as busy:
        taken = busy.getsockname()[1]
        port = dashboard_port(taken, "127.0.0.1")
        assert port != taken and port > 0
    assert dashboard_port(port, "127.0.0.1") == port  # free now: the preferred one
