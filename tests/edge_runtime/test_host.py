"""The host device: its schema, and reads on the machine the tests run on."""

from __future__ import annotations

import math
import os
import shutil
import socket
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_runtime.config import HostDevice
from edge_runtime.devices import host
from edge_runtime.devices.base import PolledDriver
from edge_runtime.devices.host import FIELDS, HostDriver

NAMES = [f.name for f in FIELDS]


def has_cpu_thermal_zone() -> bool:
    for temp in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            int(temp.read_text())
        except (OSError, ValueError):
            continue
        return True
    return False


def _conforms(driver: HostDriver) -> PolledDriver:
    return driver  # mypy checks HostDriver against the PolledDriver protocol


async def read_once(driver: HostDriver) -> dict[str, float | None]:
    await driver.connect()
    values = await driver.read()
    await driver.close()
    assert len(values) == len(FIELDS)
    return dict(zip(NAMES, values, strict=True))


async def test_schema() -> None:
    driver = HostDriver(HostDevice(id="pi"))
    assert (driver.device_id, driver.kind) == ("pi", "host")
    schema = await driver.connect()
    assert schema.kind == "host"
    assert schema.model == driver.info["model"]
    units = {f.name: f.unit for f in schema.fields}
    assert units == {
        "cpu_temp_c": "C",
        "load_1m": "",
        "load_5m": "",
        "load_15m": "",
        "mem_used_pct": "%",
        "mem_available_bytes": "B",
        "disk_free_bytes": "B",
        "uptime_s": "s",
        "clock_synced": "",
    }
    tol = {f.name: f.tol for f in schema.fields}
    assert tol["load_1m"] == tol["load_15m"] == 0.01
    assert {f.name: f.model for f in schema.fields}["uptime_s"] == "trend"


async def test_read_on_this_machine(tmp_path: Path) -> None:
    driver = HostDriver(HostDevice(id="pi"), data_dir=str(tmp_path))
    v = await read_once(driver)

    if has_cpu_thermal_zone():
        assert v["cpu_temp_c"] is not None and -20 < v["cpu_temp_c"] < 120
    else:  # a container or a VM without sensors
        assert v["cpu_temp_c"] is None
    for name in ("load_1m", "load_5m", "load_15m"):
        load = v[name]
        assert load is not None and 0 <= load < 10 * (os.cpu_count() or 1)
    assert v["mem_used_pct"] is not None and 0 < v["mem_used_pct"] < 100
    assert v["mem_available_bytes"] is not None and v["mem_available_bytes"] > 1024 * 1024
    free = shutil.disk_usage(tmp_path).free
    assert v["disk_free_bytes"] is not None
    assert math.isclose(v["disk_free_bytes"], free, rel_tol=0.05, abs_tol=256 * 1024 * 1024)
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert v["uptime_s"] is not None and 0 < v["uptime_s"] <= uptime + 1
    assert v["clock_synced"] in (0.0, 1.0, None)

    info = driver.info
    assert info["hostname"] == socket.gethostname()
    assert info["kernel"] == os.uname().release
    assert isinstance(info["os"], str) and info["os"]
    assert isinstance(info["last_reboot"], str)
    boot = datetime.fromisoformat(info["last_reboot"])
    assert abs(boot.timestamp() + uptime - time.time()) < 60
    assert boot.tzinfo == UTC


async def test_missing_data_dir_gives_none(tmp_path: Path) -> None:
    v = await read_once(HostDriver(HostDevice(id="pi"), data_dir=str(tmp_path / "gone")))
    assert v["disk_free_bytes"] is None
    assert v["load_1m"] is not None


async def test_cpu_zone_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, kind, milli in [
        ("thermal_zone0", "acpitz", "27800"),
        ("thermal_zone1", "cpu-thermal", "48686"),
        ("thermal_zone2", "cpu-broken", "n/a"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(kind + "\n")
        (tmp_path / name / "temp").write_text(milli + "\n")
    monkeypatch.setattr(host, "_THERMAL", tmp_path)
    driver = HostDriver(HostDevice(id="pi"))
    v = await read_once(driver)
    assert v["cpu_temp_c"] == 48.686
    assert driver.info["cpu_thermal_zone"] == "thermal_zone1"


def fake_timedatectl(folder: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = folder / "timedatectl"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.parametrize(("answer", "synced"), [("yes", 1.0), ("no", 0.0)])
async def test_clock_synced_from_timedatectl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str, synced: float
) -> None:
    fake_timedatectl(tmp_path, f"echo {answer}", monkeypatch)
    v = await read_once(HostDriver(HostDevice(id="pi")))
    assert v["clock_synced"] == synced


async def test_clock_check_does_not_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timedatectl(tmp_path, "exec sleep 30", monkeypatch)
    monkeypatch.setattr(host, "_TIMEDATECTL_TIMEOUT_S", 0.2)
    timesync = tmp_path / "timesync"
    timesync.mkdir()
    monkeypatch.setattr(host, "_TIMESYNC", timesync)
    started = time.monotonic()
    v = await read_once(HostDriver(HostDevice(id="pi")))
    assert time.monotonic() - started < 2
    # timedatectl gave up; the timesyncd folder without its flag file says "not synced".
    assert v["clock_synced"] == 0.0
    (timesync / "synchronized").touch()
    v = await read_once(HostDriver(HostDevice(id="pi")))
    assert v["clock_synced"] == 1.0
