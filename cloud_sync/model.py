"""The data model edge and hub share: fields, device schemas and frames."""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import msgspec

__all__ = (
    "DeviceHealth",
    "DeviceSchema",
    "Field",
    "Frame",
    "Loss",
    "Model",
    "NodeStatus",
    "default_field",
)

Model = Literal["level", "trend"]

# Per-unit defaults measured by bench.codec on ../shared/data: a plain deadband (alpha 1) wins
# on step-like power and current, light smoothing wins on smooth, noisy levels, and Holt (level
# and trend) on counters that only grow.
_DEFAULTS: dict[str, tuple[Model, float, float]] = {
    "W": ("level", 1.0, 0.0),
    "kW": ("level", 1.0, 0.0),
    "var": ("level", 1.0, 0.0),
    "kvar": ("level", 1.0, 0.0),
    "VA": ("level", 1.0, 0.0),
    "A": ("level", 1.0, 0.0),
    "V": ("level", 0.25, 0.0),
    "Hz": ("level", 0.25, 0.0),
    "C": ("level", 0.5, 0.0),
    "W/m2": ("level", 1.0, 0.0),
    "%": ("level", 1.0, 0.0),
    "Wh": ("trend", 0.5, 0.125),
    "kWh": ("trend", 0.5, 0.125),
}


class Field(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One measurement of a device: its name carries its unit (``grid_power_w``)."""

    name: str
    unit: str
    tol: float
    """Every value the hub holds is within ``tol`` of the measured one (same unit)."""
    model: Model = "level"
    alpha: float = 1.0
    """Level smoothing factor in (0, 1]; 1 is a plain deadband (hold the last value)."""
    beta: float = 0.0
    """Trend smoothing factor in [0, 1], for ``model="trend"``."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a field needs a name")
        if not (math.isfinite(self.tol) and 1e-12 <= self.tol <= 1e15):
            raise ValueError(f"field {self.name}: tolerance {self.tol!r} is outside [1e-12, 1e15]")
        if not (0.0 < self.alpha <= 1.0) or round(self.alpha * 4096) < 1:
            raise ValueError(f"field {self.name}: alpha {self.alpha!r} must be in (0, 1]")
        if not (0.0 <= self.beta <= 1.0):
            raise ValueError(f"field {self.name}: beta {self.beta!r} must be in [0, 1]")


def default_field(name: str, unit: str, tol: float) -> Field:
    """A field with the predictor that measured best for its unit."""
    model, alpha, beta = _DEFAULTS.get(unit, ("level", 1.0, 0.0))
    return Field(name=name, unit=unit, tol=tol, model=model, alpha=alpha, beta=beta)


class DeviceSchema(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a device's frames hold: the fields, in order, and what the device is."""

    kind: str
    model: str
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"schema {self.model!r} repeats a field name")

    def digest(self) -> bytes:
        """16 bytes that name this schema on the wire once the receiver holds it."""
        return hashlib.sha256(msgspec.json.encode(self)).digest()[:16]


class Frame(msgspec.Struct, frozen=True, array_like=True):
    """One read of one device: values aligned with its schema's fields; None is missing."""

    device_id: str
    ts_ms: int
    seq: int
    values: tuple[float | None, ...]


class DeviceHealth(msgspec.Struct, frozen=True, kw_only=True):
    """A device as the node sees it, carried in every status."""

    device_id: str
    online: bool
    last_seen_ms: int | None = None
    errors: int = 0
    timeouts: int = 0
    last_error: str | None = None


class Loss(msgspec.Struct, frozen=True, kw_only=True):
    """Running totals of one device's frames of one UTC day that never reach the hub."""

    device_id: str
    day_ms: int
    evicted: int = 0
    """Evicted by the node's size cap before they were uploaded."""
    rejected: int = 0
    """Refused by the hub as malformed; the node keeps the batch in its dead letters."""
    gaps: int = 0
    """Sequence numbers the device itself skipped (an ESP32's own losses)."""


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The node's heartbeat: software, clock, backlog and devices (at least every 60 s)."""

    software_version: str
    boot_ms: int | None = None
    started_ms: int | None = None
    backlog_frames: int = 0
    backlog_oldest_ms: int | None = None
    disk_free_bytes: int | None = None
    drift_ms: int | None = None
    """The node's clock minus the hub's, as the node last measured it."""
    devices: tuple[DeviceHealth, ...] = ()
    losses: tuple[Loss, ...] = ()
