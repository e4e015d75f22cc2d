"""A device that makes up smooth, noisy waveforms: for benchmarks, soak and crash tests."""

from __future__ import annotations

import math
import random

from cloud_sync import DeviceSchema

from ..config import SyntheticDevice
from .base import Values, field_from_name

__all__ = ("SyntheticDriver",)

_UNITS = ("w", "v", "a", "hz", "c", "kwh")


class SyntheticDriver:
    """``fields`` values per read: sines of different periods plus noise, one counter."""

    kind = "synthetic"

    def __init__(self, cfg: SyntheticDevice) -> None:
        self.device_id = cfg.id
        self.n = cfg.fields
        self.info: dict[str, object] = {"model": "synthetic"}
        self._t = 0
        self._rng = random.Random(cfg.id)
        self._energy = 0.0

    async def connect(self) -> DeviceSchema:
        names = [f"signal_{i:03d}_{_UNITS[i % len(_UNITS)]}" for i in range(self.n)]
        return DeviceSchema("synthetic", "synthetic", tuple(field_from_name(n) for n in names))

    async def read(self) -> Values:
        self._t += 1
        t = self._t
        rnd = self._rng.random
        out: list[float | None] = []
        for i in range(self.n):
            if i % len(_UNITS) == 5:
                self._energy += 0.001 * (1 + rnd())
                out.append(round(self._energy, 4))
            else:
                out.append(100.0 * math.sin(t / (10.0 + i)) + 5.0 * rnd() + 10.0 * i)
        return out

    async def recover(self) -> None:
        return None

    async def close(self) -> None:
        return None
