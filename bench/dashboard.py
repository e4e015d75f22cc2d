"""Benchmark of the live dashboard: frame-to-browser latency, runtime CPU, page load time.

``python -m bench.dashboard [--devices 20] [--fields 50] [--hz 10] [--clients 5]
[--seconds 20] [--rate 10 --rate 50] [--json]``, run by ``make bench-dashboard``. A real
`gridlet run` serves the dashboard; headless Debian chromium opens the live page in several
tabs; an init script timestamps every live message where the page's own handler receives
it, against each device's frame timestamp (taken when the driver handed the frame to the
bus; browser and runtime share this machine's clock).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ("main",)

CHROMIUM = "/usr/lib/chromium/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Wraps WebSocket before the page's scripts run: each live message's arrival is recorded as
# [now, now - frame ts] for every device the message carries, just before the page handles it.
_PROBE = """
(() => {
  window.__lat = [];
  const Native = window.WebSocket;
  window.WebSocket = function (url, protocols) {
    const ws = protocols === undefined ? new Native(url) : new Native(url, protocols);
    ws.addEventListener("message", (ev) => {
      const now = Date.now();
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (msg.type !== "delta" || !msg.d) return;
      for (const id in msg.d) {
        const ts = msg.d[id].ts;
        if (typeof ts === "number") window.__lat.push([now, now - ts]);
      }
    });
    return ws;
  };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, Native);
})();
"""


WARMUP_S = 3.0
"""Seconds after the last tab loaded before measuring starts."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _config(port: int, devices: int, fields: int, hz: float, rate: int) -> str:
    lines = [
        f'[site]\nnode_id = "bench"\n[store]\npath = "bench.db"\n'
        f'[http]\nhost = "127.0.0.1"\nport = {port}\nlive_rate = {rate}\n'
    ]
    for i in range(devices):
        lines.append(
            f'[[devices]]\nid = "dev{i:02d}"\nkind = "synthetic"\nfields = {fields}\n'
            f"interval_s = {1 / hz}\n"
        )
    return "\n".join(lines)


def _wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def run_once(
    *, devices: int, fields: int, hz: float, clients: int, seconds: float, rate: int
) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "site.toml"
        cfg.write_text(_config(port, devices, fields, hz, rate))
        exe = Path(sys.executable).with_name("gridlet")
        run = subprocess.Popen(
            [str(exe), "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_http(base + "/health")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    pages = []
                    load_ms: list[float] = []
                    for _ in range(clients):
                        page = browser.new_context().new_page()
                        page.add_init_script(_PROBE)
                        page.goto(base + "/", wait_until="load")
                        load_ms.append(
                            page.evaluate(
                                "() => { const n = performance.getEntriesByType('navigation')[0];"
                                " return n.loadEventEnd - n.startTime; }"
                            )
                        )
                        pages.append(page)
                    time.sleep(WARMUP_S)  # the last tab settles (first layouts, JIT)
                    # The window is cut by wall clock (the pages' Date.now() is the same
                    # clock): collecting from one tab after another must not count the load
                    # that collecting itself puts on the tabs still running.
                    cpu0 = _cpu_seconds(run.pid)
                    t0 = time.monotonic()
                    start_ms = time.time() * 1000
                    time.sleep(seconds)
                    end_ms = time.time() * 1000
                    cpu = _cpu_seconds(run.pid) - cpu0
                    elapsed = time.monotonic() - t0
                    lat: list[float] = []
                    for page in pages:
                        samples = page.evaluate("() => window.__lat")
                        lat += [d for at, d in samples if start_ms <= at < end_ms]
                finally:
                    browser.close()
        finally:
            run.terminate()
            run.wait(timeout=30)
    lat.sort()
    if not lat:
        raise RuntimeError("no live messages reached the pages")
    return {
        "rate": rate,
        "devices": devices,
        "fields": fields,
        "hz": hz,
        "clients": clients,
        "frames_per_s": devices * hz,
        "samples": len(lat),
        "latency_p50_ms": lat[len(lat) // 2],
        "latency_p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "latency_max_ms": lat[-1],
        "runtime_cpu_share": cpu / elapsed,
        "page_load_ms_median": statistics.median(load_ms),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.dashboard", description=__doc__.split("\n")[0]
    )
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--fields", type=int, default=50)
    p.add_argument("--hz", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rate", type=int, action="append", help="live updates/s per client (repeat)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rates = args.rate or [10, 50]
    results = [
        run_once(
            devices=args.devices,
            fields=args.fields,
            hz=args.hz,
            clients=args.clients,
            seconds=args.seconds,
            rate=rate,
        )
        for rate in rates
    ]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(
            f"{r['devices']} devices x {r['fields']} fields x {r['hz']:g} Hz"
            f" ({r['frames_per_s']:.0f} frames/s), {r['clients']} chromium clients,"
            f" live rate {r['rate']}/s per client:"
        )
        ok = r["latency_p99_ms"] < 50
        print(
            f"  frame -> page handler: p50 {r['latency_p50_ms']:.1f} ms, p99"
            f" {r['latency_p99_ms']:.1f} ms, max {r['latency_max_ms']:.1f} ms over"
            f" {r['samples']} updates  (target p99 < 50 ms: {'PASS' if ok else 'FAIL'})"
        )
        print(
            f"  runtime CPU {100 * r['runtime_cpu_share']:.1f}% of one core;"
            f" page load {r['page_load_ms_median']:.0f} ms (median, loopback)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
