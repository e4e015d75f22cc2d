"""Benchmarks of the edge runtime: store throughput, disk bytes per frame, memory, cadence.

``python -m bench.edge [--frames N] [--json]``, run by ``make bench-edge``. Every figure is
printed beside what it is compared with, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cloud_sync import DeviceSchema, Frame, default_field
from edge_runtime.bus import Bus, Reading
from edge_runtime.store import Store, pack_values

__all__ = ("main",)

T0 = 1_800_000_000_000


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


async def store_throughput(frames: int, nf: int = 50, devices: int = 20) -> dict[str, float]:
    """Frames/s through bus and store (publish -> committed), and bytes written per frame."""
    sch = schema(nf)
    rows = [tuple(float((i * 7919 + j * 31) % 5000) / 10 for j in range(nf)) for i in range(997)]
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
    packed = len(pack_values(rows[0]))
    return {
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
    packed = len(pack_values(values))
    return {
        "fields": nf,
        "written_bytes_per_frame": per_frame,
        "packed_bytes_per_frame": packed,
        "written_over_packed": per_frame / packed,
        "bytes_per_day": per_frame * 86400,
    }


def rss_of_runtime(devices: int = 20, seconds: float = 15.0) -> dict[str, float]:
    """Resident memory of `gridlet run` with ``devices`` devices read once a second."""
    lines = ['[site]\nnode_id = "bench"\n[store]\npath = "bench.db"\n']
    for i in range(devices):
        lines.append(
            f'[[devices]]\nid = "dev{i}"\nkind = "synthetic"\nfields = 50\ninterval_s = 1.0\n'
        )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "site.toml"
        cfg.write_text("\n".join(lines))
        exe = Path(sys.executable).with_name("gridlet")
        proc = subprocess.Popen(
            [str(exe), "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        samples: list[int] = []
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(0.5)
                with open(f"/proc/{proc.pid}/status", encoding="ascii") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            samples.append(int(line.split()[1]) * 1024)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {
        "devices": devices,
        "rss_bytes_max": max(samples),
        "rss_bytes_median": statistics.median(samples),
    }


def _mb(x: float) -> str:
    return f"{x / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=100_000, help="frames for the throughput run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    results = {
        "store": asyncio.run(store_throughput(args.frames)),
        "wear_1hz_100_fields": asyncio.run(wear_at_1hz()),
        "memory": rss_of_runtime(),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    s, w, m = results["store"], results["wear_1hz_100_fields"], results["memory"]
    print(f"bus + store, {s['fields']:.0f} fields per frame, {s['frames']:.0f} frames:")
    print(
        f"  {s['frames_per_s']:,.0f} frames/s wall, {s['frames_per_cpu_s']:,.0f} frames per CPU-s"
        f"  (target >= 20,000: {'PASS' if s['frames_per_s'] >= 20000 else 'FAIL'})"
    )
    print(
        f"  disk written {s['written_bytes_per_frame']:.0f} B/frame = "
        f"{s['written_over_packed']:.2f}x the packed values ({s['packed_bytes_per_frame']:.0f} B); "
        f"database file {s['db_bytes_per_frame']:.0f} B/frame = {s['db_over_packed']:.2f}x"
        f"  (target <= 2x: {'PASS' if s['written_over_packed'] <= 2 else 'FAIL'})"
    )
    print("SD-card wear at 1 Hz x 100 fields, one commit a second:")
    print(
        f"  {w['written_bytes_per_frame']:.0f} B written per frame ="
        f" {w['written_over_packed']:.2f}x the packed values; {_mb(w['bytes_per_day'])} per day"
    )
    print(f"memory of `gridlet run` with {m['devices']:.0f} devices at 1 Hz:")
    print(
        f"  RSS max {_mb(m['rss_bytes_max'])}, median {_mb(m['rss_bytes_median'])}"
        f"  (target <= 60 MB: {'PASS' if m['rss_bytes_max'] <= 60e6 else 'FAIL'})"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
