"""Benchmarks of the edge runtime: store throughput, disk bytes per frame, memory, cadence.

``python -m bench.edge [--frames N] [--json]``, run by ``make bench-edge``. Every figure is
printed beside what it is compared with, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cloud_sync import DeviceSchema, Frame, default_field
from edge_runtime.bus import Bus, Reading
from edge_runtime.store import Store, pack_values

__all__ = ("main",)

T0 = 1_800_000_000_000
VALUE_KINDS = ("decimal", "float32", "float64")


def _io_written() -> int:
    """Bytes this process caused to be written to storage (page cache dirtying included)."""
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "write_bytes":
                return int(value)
    return 0


def schema(nf: int) -> DeviceSchema:
    return DeviceSchema(
        "synthetic", "bench", tuple(default_field(f"f{i}_w", "W", 5) for i in range(nf))
    )


def sample_rows(kind: str, nf: int) -> list[tuple[float, ...]]:
    """997 distinct frames of values as devices deliver them: ``decimal`` (scaled registers,
    JSON numbers: 123.4), ``float32`` (float registers such as the SDM630's) or ``float64``
    (arbitrary doubles, the worst case for packing)."""
    rng = random.Random(7)
    out = []
    for i in range(997):
        base = [float((i * 7919 + j * 31) % 5000) / 10 for j in range(nf)]
        if kind == "float32":
            base = [struct.unpack("f", struct.pack("f", v + rng.random()))[0] for v in base]
        elif kind == "float64":
            base = [v + rng.random() for v in base]
        out.append(tuple(base))
    return out


async def store_throughput(
    frames: int, kind: str = "decimal", nf: int = 50, devices: int = 20
) -> dict[str, float | str]:
    """Frames/s through bus and store (publish -> committed), and bytes written per frame."""
    sch = schema(nf)
    rows = sample_rows(kind, nf)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        store = await Store.open(path, commit_interval_ms=1000)
        bus = Bus()
        sub = bus.subscribe("store", maxsize=frames + 1)
        written0 = _io_written()
        cpu0 = time.process_time()
        start = time.perf_counter()
        task = asyncio.create_task(store.run(sub))
        for i in range(frames):
            seq, dev = divmod(i, devices)
            bus.publish(Reading(Frame(f"dev{dev}", T0 + seq * 100, seq + 1, rows[i % 997]), sch))
            if i % 5000 == 0:
                await asyncio.sleep(0)
        while store.stats.committed_frames < frames:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
        written = _io_written() - written0
        db_bytes = sum(p.stat().st_size for p in Path(tmp).glob("bench.db*"))
    raw = 8 * nf  # the frame's values as float64: what the ratios compare with
    stored = len(pack_values(rows[0]))
    packed = raw
    return {
        "values": kind,
        "stored_blob_bytes": stored,
        "frames": frames,
        "fields": nf,
        "frames_per_s": frames / elapsed,
        "frames_per_cpu_s": frames / cpu,
        "packed_bytes_per_frame": packed,
        "written_bytes_per_frame": written / frames,
        "written_over_packed": written / frames / packed,
        "db_bytes_per_frame": db_bytes / frames,
        "db_over_packed": db_bytes / frames / packed,
    }


async def wear_at_1hz(nf: int = 100, commits: int = 600) -> dict[str, float]:
    """1 Hz x ``nf`` fields with one commit per second: bytes written per commit, per day."""
    sch = schema(nf)
    values = tuple(230.0 + j for j in range(nf))
    with tempfile.TemporaryDirectory() as tmp:
        store = await Store.open(Path(tmp) / "wear.db", commit_interval_ms=1000)
        # warm up past the file's first growth so that steady state is measured
        for i in range(60):
            await store.write([Reading(Frame("dev", T0 + i * 1000, i + 1, values), sch)])
        written0 = _io_written()
        for i in range(60, 60 + commits):
            await store.write([Reading(Frame("dev", T0 + i * 1000, i + 1, values), sch)])
        written = _io_written() - written0
        await store.close()
    per_frame = written / commits
    packed = 8 * nf
    return {
        "fields": nf,
        "written_bytes_per_frame": per_frame,
        "packed_bytes_per_frame": packed,
        "written_over_packed": per_frame / packed,
        "bytes_per_day": per_frame * 86400,
    }


def _start(
    cmd: list[str], ready: str, timeout_s: float = 30.0
) -> tuple[subprocess.Popen[str], str]:
    """Start a simulator and return it with the first stdout line containing ``ready``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if ready in line:
            return proc, line.strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not start")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def site_on_simulators(
    seconds: float = 30.0, inverters: int = 10, meters: int = 10, *, dashboard: bool = True
) -> dict[str, float]:
    """`gridlet run` reading 20 simulated devices at 1 Hz over their real protocols (GoodWe
    UDP inverters and SDM630 units behind one Modbus TCP gateway), with its dashboard (the
    default) or without: its resident memory, and how steadily each inverter was read once a
    second."""
    py = sys.executable
    procs: list[subprocess.Popen[str]] = []
    base = 60 + os.getpid() % 100  # a loopback /24 of our own, so runs do not collide
    try:
        hosts = []
        for i in range(inverters):
            host = f"127.{base}.{i // 250}.{i % 250 + 2}"
            cmd = [
                py,
                "-m",
                "edge_runtime.simulators.goodwe",
                "--host",
                host,
                "--day-seconds",
                "600",
            ]
            procs.append(_start(cmd, "ready")[0])
            hosts.append(host)
        units = [f"--unit={u}" for u in range(1, meters + 1)]
        sdm, line = _start(
            [py, "-m", "edge_runtime.simulators.sdm", "--tcp-port", "0", *units], "tcp:"
        )
        procs.append(sdm)
        port = int(line.rsplit(":", 1)[1])
        lines = ['[site]\nnode_id = "bench"\n[store]\npath = "bench.db"\n']
        if dashboard:
            lines.append(f'[http]\nhost = "127.0.0.1"\nport = {_free_port()}\n')
        else:
            lines.append("[http]\nenabled = false\n")
        for i, host in enumerate(hosts):
            lines.append(f'[[devices]]\nid = "inverter{i}"\nkind = "goodwe"\nhost = "{host}"\n')
        for u in range(1, meters + 1):
            lines.append(
                f'[[devices]]\nid = "meter{u}"\nkind = "modbus"\nprofile = "sdm630"\n'
                f'host = "127.0.0.1"\nport = {port}\nunit_id = {u}\n'
            )
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "site.toml"
            cfg.write_text("\n".join(lines))
            exe = Path(sys.executable).with_name("gridlet")
            run = subprocess.Popen(
                [str(exe), "run", "--config", str(cfg)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            samples: list[int] = []
            cpu0 = _cpu_seconds(run.pid)
            try:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    time.sleep(0.5)
                    samples.append(_rss(run.pid))
                cpu = _cpu_seconds(run.pid) - cpu0
            finally:
                run.terminate()
                run.wait(timeout=30)
            intervals = _intervals(
                Path(tmp) / "bench.db", [f"inverter{i}" for i in range(inverters)]
            )
            per_device = _frames(Path(tmp) / "bench.db")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    steady = intervals or [0.0]
    return {
        "dashboard": dashboard,
        "devices": inverters + meters,
        "seconds": seconds,
        "rss_bytes_max": max(samples),
        "rss_bytes_median": statistics.median(samples),
        "cpu_share": cpu / seconds,
        "frames_min_per_device": min(per_device.values()) if per_device else 0,
        "goodwe_interval_mean_s": statistics.fmean(steady),
        "goodwe_interval_p99_s": sorted(steady)[int(0.99 * (len(steady) - 1))],
        "goodwe_interval_max_s": max(steady),
        "goodwe_reads": len(intervals) + 2 * inverters,
    }


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _intervals(db: Path, devices: list[str]) -> list[float]:
    out: list[float] = []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for dev in devices:
            ts = [
                t
                for (t,) in conn.execute(
                    "SELECT f.ts_ms FROM frames f JOIN devices d ON d.dev = f.dev"
                    " WHERE d.device_id = ? ORDER BY f.ts_ms",
                    (dev,),
                )
            ]
            # from the second read: the first comes on connect, off the wall-clock slots
            out += [(b - a) / 1000 for a, b in itertools.pairwise(ts[1:])]
    return out


def _frames(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT d.device_id, count(*) FROM frames f JOIN devices d ON d.dev = f.dev GROUP BY 1"
        ).fetchall()
    return {d: int(n) for d, n in rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mb(x: float) -> str:
    return f"{x / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=100_000, help="frames for the throughput run")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the simulator run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    results: dict[str, Any] = {
        "store": [asyncio.run(store_throughput(args.frames, kind)) for kind in VALUE_KINDS],
        "wear_1hz_100_fields": asyncio.run(wear_at_1hz()),
        "site": site_on_simulators(args.seconds),
        "site_no_dashboard": site_on_simulators(args.seconds, dashboard=False),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    w, m, bare = results["wear_1hz_100_fields"], results["site"], results["site_no_dashboard"]
    for s in results["store"]:
        print(
            f"bus + store, {s['fields']:.0f} {s['values']} values per frame, {s['frames']:.0f}"
            " frames:"
        )
        print(
            f"  {s['frames_per_s']:,.0f} frames/s wall, {s['frames_per_cpu_s']:,.0f} frames per"
            f" CPU-s  (target >= 20,000: {'PASS' if s['frames_per_s'] >= 20000 else 'FAIL'})"
        )
        print(
            f"  disk written {s['written_bytes_per_frame']:.0f} B/frame ="
            f" {s['written_over_packed']:.2f}x the frame's float64 values"
            f" ({s['packed_bytes_per_frame']:.0f} B, stored packed in"
            f" {s['stored_blob_bytes']:.0f} B); database file {s['db_bytes_per_frame']:.0f}"
            f" B/frame = {s['db_over_packed']:.2f}x  (target <= 2x: file size"
            f" {'PASS' if s['db_over_packed'] <= 2 else 'FAIL'}, bytes written incl. the WAL"
            f" {'PASS' if s['written_over_packed'] <= 2 else 'FAIL'})"
        )
    print("SD-card wear at 1 Hz x 100 fields, one commit a second:")
    print(
        f"  {w['written_bytes_per_frame']:.0f} B written per frame ="
        f" {w['written_over_packed']:.2f}x the float64 values; {_mb(w['bytes_per_day'])} per day"
    )
    print(
        f"`gridlet run` on {m['devices']:.0f} simulated devices at 1 Hz (10 GoodWe over UDP,"
        f" 10 SDM630 over Modbus TCP), {m['seconds']:.0f} s:"
    )
    for r, what in ((m, "with its dashboard (the default)"), (bare, "without the dashboard")):
        print(
            f"  {what}: RSS max {_mb(r['rss_bytes_max'])}, median"
            f" {_mb(r['rss_bytes_median'])}"
            f"  (target <= 60 MB: {'PASS' if r['rss_bytes_max'] <= 60e6 else 'FAIL'});"
            f" CPU {100 * r['cpu_share']:.1f}% of one core"
        )
    steady = abs(m["goodwe_interval_mean_s"] - 1.0) < 0.02 and m["goodwe_interval_p99_s"] < 1.1
    print(
        f"  GoodWe cadence over {m['goodwe_reads']:.0f} reads:"
        f" mean {m['goodwe_interval_mean_s']:.3f} s,"
        f" p99 {m['goodwe_interval_p99_s']:.3f} s, max {m['goodwe_interval_max_s']:.3f} s"
        f"  (target one read per second, steady: {'PASS' if steady else 'FAIL'})"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
