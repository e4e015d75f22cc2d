"""The Pi itself as a polled device: CPU temperature, load, memory, disk, uptime, clock sync.

Everything comes from /proc, /sys and the standard library, so the runtime reports its own
health on any Linux box; a source the machine lacks (no thermal zone in a container, no
systemd) gives None rather than an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from cloud_sync import DeviceSchema, Field

from ..config import HostDevice
from .base import Values, field_from_name

__all__ = ("FIELDS", "HostDriver")

_log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_PROC = Path("/proc")
_THERMAL = Path("/sys/class/thermal")
_TIMESYNC = Path("/run/systemd/timesync")
_MODEL_FILES = (Path("/proc/device-tree/model"), Path("/sys/devices/virtual/dmi/id/product_name"))
# Sensor types that measure the CPU/SoC rather than, say, a battery or a Wi-Fi chip.
_CPU_ZONE_TYPES = ("cpu", "soc", "x86_pkg_temp", "coretemp", "k10temp")
_TIMEDATECTL_TIMEOUT_S = 2.0
_CLOCK_CHECK_EVERY_S = 60.0
"""Clock sync changes rarely; asking systemd over D-Bus at every read would cost more than
the rest of the read together."""

FIELDS: tuple[Field, ...] = (
    field_from_name("cpu_temp_c"),
    field_from_name("load_1m", unit="", tol=0.01),
    field_from_name("load_5m", unit="", tol=0.01),
    field_from_name("load_15m", unit="", tol=0.01),
    field_from_name("mem_used_pct"),
    # Free bytes wobble by pages all the time; a MiB is below what anyone acts on.
    field_from_name("mem_available_bytes", tol=_MIB),
    field_from_name("disk_free_bytes", tol=_MIB),
    # Uptime grows like a counter: the trend predictor follows it without sending anything.
    msgspec.structs.replace(
        field_from_name("uptime_s", tol=1.0), model="trend", alpha=0.5, beta=0.125
    ),
    field_from_name("clock_synced", unit="", tol=0.01),
)
"""One read of the host, in this order; ``clock_synced`` is 1, 0 or None (unknown)."""


class HostDriver:
    """The machine the runtime runs on; ``info`` holds what does not change between reads
    (hostname, OS, kernel, model, last reboot)."""

    kind = "host"

    def __init__(self, cfg: HostDevice, data_dir: str = ".") -> None:
        self.device_id = cfg.id
        self.data_dir = data_dir
        """Whose file system ``disk_free_bytes`` measures: where the database lives."""
        self.info: dict[str, object] = {}
        self._thermal: Path | None = None
        self._clock: float | None = None
        self._clock_checked: float | None = None

    async def connect(self) -> DeviceSchema:
        self.info, self._thermal = await asyncio.to_thread(_static_info)
        self._clock_checked = None
        return DeviceSchema(kind="host", model=str(self.info["model"]), fields=FIELDS)

    async def read(self) -> Values:
        clock = await self._clock_synced()
        # /proc and /sys reads are cheap but still file I/O: keep them off the event loop.
        values = await asyncio.to_thread(self._read_files)
        return (*values, clock)

    async def recover(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _read_files(self) -> list[float | None]:
        try:
            # The kernel keeps load in 11-bit fixed point; /proc/loadavg shows 2 decimals.
            loads: tuple[float | None, ...] = tuple(round(x, 2) for x in os.getloadavg())
        except OSError:
            loads = (None, None, None)
        total, available = _meminfo()
        used_pct = (
            round((total - available) * 100 / total, 2) if total and available is not None else None
        )
        try:
            disk_free: float | None = float(shutil.disk_usage(self.data_dir).free)
        except OSError:
            disk_free = None
        return [
            _cpu_temp(self._thermal),
            *loads,
            used_pct,
            None if available is None else float(available),
            disk_free,
            _uptime_s(),
        ]

    async def _clock_synced(self) -> float | None:
        now = time.monotonic()
        if self._clock_checked is None or now - self._clock_checked >= _CLOCK_CHECK_EVERY_S:
            self._clock = await _query_clock_synced()
            self._clock_checked = now
        return self._clock


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _meminfo() -> tuple[int | None, int | None]:
    """MemTotal and MemAvailable in bytes."""
    text = _read_text(_PROC / "meminfo")
    if text is None:
        return None, None
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in ("MemTotal", "MemAvailable") and parts and parts[0].isdigit():
            kib[key] = int(parts[0])
    total, available = kib.get("MemTotal"), kib.get("MemAvailable")
    return (
        None if total is None else total * 1024,
        None if available is None else available * 1024,
    )


def _uptime_s() -> float | None:
    text = _read_text(_PROC / "uptime")
    try:
        return float(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None


def _cpu_temp(path: Path | None) -> float | None:
    text = None if path is None else _read_text(path)
    try:
        return int(text) / 1000 if text else None  # millidegrees Celsius
    except ValueError:
        return None


def _find_cpu_thermal() -> Path | None:
    """The CPU's thermal zone ``temp`` file (``cpu-thermal`` on a Pi); None when there is none."""
    zones = []
    for zone in sorted(_THERMAL.glob("thermal_zone*")):
        temp = zone / "temp"
        if _cpu_temp(temp) is None:
            continue
        kind = (_read_text(zone / "type") or "").strip().lower()
        zones.append((not any(t in kind for t in _CPU_ZONE_TYPES), temp))
    return min(zones)[1] if zones else None


def _boot_time() -> datetime | None:
    text = _read_text(_PROC / "stat") or ""
    for line in text.splitlines():
        if line.startswith("btime "):
            return datetime.fromtimestamp(int(line.split()[1]), UTC)
    return None


def boot_time_ms() -> int | None:
    """When the operating system booted, in Unix ms (None where /proc does not say)."""
    boot = _boot_time()
    return int(boot.timestamp() * 1000) if boot else None


def _model() -> str:
    for path in _MODEL_FILES:
        text = (_read_text(path) or "").strip("\x00 \n")
        if text:
            return text
    return platform.machine() or "unknown"


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME") or platform.platform()
    except OSError:
        return platform.platform()


def _static_info() -> tuple[dict[str, object], Path | None]:
    boot = _boot_time()
    thermal = _find_cpu_thermal()
    info: dict[str, object] = {
        "model": _model(),
        "hostname": socket.gethostname(),
        "os": _os_name(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "last_reboot": boot.isoformat(timespec="seconds") if boot else None,
        "cpu_thermal_zone": str(thermal.parent.name) if thermal else None,
    }
    return info, thermal


async def _query_clock_synced() -> float | None:
    """1.0 when the system clock is NTP-synchronized, 0.0 when not, None when unknown."""
    exe = shutil.which("timedatectl")
    if exe is not None:
        answer = await _run_quietly(exe, "show", "-p", "NTPSynchronized", "--value")
        if answer in ("yes", "no"):
            return 1.0 if answer == "yes" else 0.0
    # systemd-timesyncd touches this file once it has synchronized; without the folder no
    # timesyncd runs, and absence would prove nothing.
    if _TIMESYNC.is_dir():
        return 1.0 if (_TIMESYNC / "synchronized").exists() else 0.0
    return None


async def _run_quietly(*argv: str) -> str | None:
    """A command's stripped stdout, or None when it fails or takes too long."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        _log.debug("cannot run %s: %s", argv[0], exc)
        return None
    try:
        async with asyncio.timeout(_TIMEDATECTL_TIMEOUT_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        _log.warning("%s did not answer within %g s", argv[0], _TIMEDATECTL_TIMEOUT_S)
        return None
    finally:
        if proc.returncode is None:  # timed out or cancelled: leave no child behind
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace").strip() if proc.returncode == 0 else None
