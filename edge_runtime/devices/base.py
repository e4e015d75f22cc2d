"""What every device driver is and returns: the two driver shapes, errors, status, units.

A *polled* driver (GoodWe, Modbus meters, the host itself) is read by the scheduler at its
interval; a *push* driver (DSMR P1 telegrams, MQTT nodes) runs its own loop and hands each
reading to a ``Sink``. Drivers turn their library's exceptions into the few classes below at
the boundary (``raise DeviceTimeoutError(...) from exc``); the scheduler does timeouts, backoff and
online/offline bookkeeping, so drivers stay small.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cloud_sync import DeviceSchema, Field, default_field

__all__ = (
    "DeviceError",
    "DeviceGoneError",
    "DeviceStatus",
    "DeviceTimeoutError",
    "PolledDriver",
    "ProtocolError",
    "PushDriver",
    "Sink",
    "Values",
    "field_from_name",
    "now_ms",
    "unit_of",
)

Values = Sequence[float | None]
"""One reading, aligned with the device schema's fields; None is a missing value."""


class DeviceError(Exception):
    """A device could not be read; the scheduler backs off and tries again."""


class DeviceTimeoutError(DeviceError):
    """The device did not answer in time."""


class DeviceGoneError(DeviceError):
    """The connection was refused, dropped or the device vanished."""


class ProtocolError(DeviceError):
    """The device answered with something malformed (bad CRC, bad frame, wrong length)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class DeviceStatus:
    """Health of one device, shown on the dashboard and the hub, and kept current by the
    scheduler (polled drivers) or the driver itself (push drivers)."""

    device_id: str
    kind: str
    online: bool = False
    last_seen_ms: int | None = None
    reads: int = 0
    errors: int = 0
    timeouts: int = 0
    last_error: str | None = None
    info: dict[str, object] = field(default_factory=dict)
    """Device-reported facts: model, serial, firmware version, RSSI, free memory, ..."""
    counters: dict[str, int] = field(default_factory=dict)
    """Protocol counters: seq gaps, duplicates, malformed messages, CRC errors, ..."""

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def seen(self, ts_ms: int | None = None) -> None:
        self.online = True
        self.last_seen_ms = now_ms() if ts_ms is None else ts_ms
        self.reads += 1


class Sink(Protocol):
    """Where push drivers hand what they receive."""

    def frame(
        self, device_id: str, schema: DeviceSchema, values: Values, ts_ms: int | None = None
    ) -> None:
        """One reading of ``device_id`` (timestamp: now when None). The schema may change
        between calls (a node that adds a field); the runtime records each version."""

    def status(self, device_id: str, kind: str) -> DeviceStatus:
        """The status record of a device, created on first use."""

    def dead_letter(self, source: str, key: str, payload: bytes, reason: str) -> None:
        """Keep a message that could not be used, for inspection; never raises."""


class PolledDriver(Protocol):
    """A device the scheduler reads at an interval."""

    device_id: str
    kind: str

    async def connect(self) -> DeviceSchema:
        """Open the connection and say what each read returns. Raises DeviceError."""

    async def read(self) -> Values:
        """One reading aligned with the schema from connect(). Raises DeviceError."""

    async def recover(self) -> None:
        """Called after several failed reads in a row: a last resort such as the GoodWe
        discovery broadcast that wakes a stuck LAN module. May do nothing."""

    async def close(self) -> None:
        """Release the connection; must not raise."""


class PushDriver(Protocol):
    """A source that delivers readings by itself (serial telegrams, MQTT messages)."""

    device_id: str
    kind: str

    async def run(self, sink: Sink) -> None:
        """Deliver readings until cancelled; raise DeviceError when the source is lost
        (the scheduler restarts it with backoff)."""


# Unit suffixes of field names (STYLE: names carry units), longest first.
_SUFFIX_UNITS: tuple[tuple[str, str], ...] = (
    ("_kwh", "kWh"),
    ("_wh", "Wh"),
    ("_kvarh", "kvarh"),
    ("_kvar", "kvar"),
    ("_var", "var"),
    ("_kva", "kVA"),
    ("_va", "VA"),
    ("_kw", "kW"),
    ("_w", "W"),
    ("_mv", "mV"),
    ("_v", "V"),
    ("_ma", "mA"),
    ("_a", "A"),
    ("_hz", "Hz"),
    ("_c", "C"),
    ("_pct", "%"),
    ("_dbm", "dBm"),
    ("_s", "s"),
    ("_ms", "ms"),
    ("_bytes", "B"),
    ("_m3", "m3"),
    ("_wm2", "W/m2"),
)

# Default tolerance per unit: what a site owner would not see on a dashboard.
_UNIT_TOLERANCE: dict[str, float] = {
    "W": 5.0,
    "kW": 0.005,
    "var": 5.0,
    "kvar": 0.005,
    "VA": 5.0,
    "kVA": 0.005,
    "Wh": 0.5,
    "kWh": 0.0005,
    "kvarh": 0.0005,
    "V": 0.1,
    "mV": 1.0,
    "A": 0.01,
    "mA": 1.0,
    "Hz": 0.005,
    "C": 0.05,
    "%": 0.5,
    "dBm": 0.5,
    "s": 0.5,
    "ms": 0.5,
    "B": 512.0,
    "m3": 0.0005,
    "W/m2": 1.0,
}


def unit_of(name: str) -> str:
    """The unit a field name's suffix names (``grid_power_w`` -> ``W``), or ``""``."""
    lower = name.lower()
    for suffix, unit in _SUFFIX_UNITS:
        if lower.endswith(suffix):
            return unit
    return ""


def field_from_name(name: str, unit: str | None = None, tol: float | None = None) -> Field:
    """A field with the unit its name carries and the usual tolerance for that unit."""
    u = unit_of(name) if unit is None else unit
    t = _UNIT_TOLERANCE.get(u, 0.01) if tol is None else tol
    return default_field(name, u, t)
