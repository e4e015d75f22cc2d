"""Loss window: the runtime killed with SIGKILL at random moments loses nothing it committed."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """
[site]
node_id = "crash-test"

[store]
path = "crash.db"
commit_interval_ms = 50

[[devices]]
id = "a"
kind = "synthetic"
fields = 20
interval_s = 0.004

[[devices]]
id = "b"
kind = "synthetic"
fields = 50
interval_s = 0.01
"""


def committed(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_for(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_sigkill_at_random_moments_loses_no_committed_frame(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(CONFIG)
    log = tmp_path / "commits.jsonl"
    rng = random.Random(20261122)
    exe = Path(sys.executable).with_name("gridlet")
    for run in range(20):
        before = len(committed(log))
        proc = subprocess.Popen(
            [str(exe), "run", "--config", str(cfg), "--commit-log", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(lambda b=before, p=proc: len(committed(log)) > b or p.poll() is not None, 30)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(rng.uniform(0.0, 0.4))  # the random moment of the crash
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            if proc.stderr:
                proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, run

        db = sqlite3.connect(tmp_path / "crash.db")
        try:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            total = 0
            for report in committed(log):
                devices = report["devices"]
                assert isinstance(devices, dict)
                for device, (first, last, n) in devices.items():
                    (count,) = db.execute(
                        "SELECT count(*) FROM frames f JOIN devices d ON d.dev = f.dev"
                        " WHERE d.device_id = ? AND f.seq BETWEEN ? AND ?",
                        (device, first, last),
                    ).fetchone()
                    assert count >= n, (run, device, first, last, n, count)
                total += int(report["frames"])  # type: ignore[call-overload]
            (rows,) = db.execute("SELECT count(*) FROM frames").fetchone()
            assert rows >= total
        finally:
            db.close()
    assert len(committed(log)) >= 20
