"""The in-process bus: drivers publish readings, the store, dashboard and uploader subscribe.

Publishing never blocks and never fails: each subscriber has its own bounded queue, and a
subscriber that falls behind loses its oldest items, counted in ``dropped``, so a slow
consumer can never stall a driver.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from cloud_sync import DeviceSchema, Frame

__all__ = ("Bus", "Reading", "Subscription")


@dataclass(frozen=True, slots=True)
class Reading:
    """A frame and the schema its values follow (shared, never copied)."""

    frame: Frame
    schema: DeviceSchema


class Subscription:
    """One subscriber's bounded queue."""

    def __init__(self, name: str, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("a subscription holds at least one item")
        self.name = name
        self.maxsize = maxsize
        self.delivered = 0
        self.dropped = 0
        self._items: deque[Reading] = deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def _put(self, item: Reading) -> None:
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    def wake(self) -> None:
        """Make a waiting ``get_batch`` return now, with what is queued (perhaps nothing)."""
        self._ready.set()

    async def get(self) -> Reading:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        self.delivered += 1
        return self._items.popleft()

    async def get_batch(self, max_items: int, timeout: float | None = None) -> list[Reading]:
        """Up to max_items readings: waits for the first (at most ``timeout`` seconds, then
        returns what there is, possibly nothing), then takes what is queued without waiting."""
        if not self._items and not self._ready.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return []
        self._ready.clear()
        n = min(max_items, len(self._items))
        out = [self._items.popleft() for _ in range(n)]
        self.delivered += n
        return out


class Bus:
    """Fan-out of readings to every subscriber."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self.published = 0

    def subscribe(self, name: str, maxsize: int = 100_000) -> Subscription:
        sub = Subscription(name, maxsize)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.remove(sub)

    def publish(self, reading: Reading) -> None:
        self.published += 1
        for sub in self._subs:
            sub._put(reading)

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            s.name: {"queued": len(s), "delivered": s.delivered, "dropped": s.dropped}
            for s in self._subs
        }
