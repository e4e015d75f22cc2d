"""Jittered exponential backoff, for every reconnect and retry on edge and hub."""

from __future__ import annotations

import random

__all__ = ("Backoff",)


class Backoff:
    """Jittered exponential delays: ``initial * 2**n`` capped at ``maximum``, each drawn
    uniformly from its upper half so that many devices failing together spread out."""

    def __init__(self, initial: float, maximum: float = 60.0) -> None:
        self.initial = initial
        self.maximum = max(maximum, initial)
        self._n = 0

    def next(self) -> float:
        top = min(self.maximum, self.initial * 2**self._n)
        self._n = min(self._n + 1, 32)
        return random.uniform(top / 2, top)  # jitter, not secrecy

    def reset(self) -> None:
        self._n = 0
