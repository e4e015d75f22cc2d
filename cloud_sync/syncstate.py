"""What the hub holds of a device, as the node records it (light: the store imports it
whether or not sync is on)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("NO_KEY", "Key", "SyncState")

Key = int
"""A frame's place in a device's upload order: its sequence number. Sequence numbers only
grow (the node numbers frames as it records them), so a clock that steps back or a frame
stamped in the future never hides frames from the uploader, as timestamps would."""
NO_KEY: Key = 0


@dataclass(frozen=True)
class SyncState:
    """What the hub holds of one device: every frame with key <= ``acked``, and those with
    ``live_from`` < key <= ``live_acked`` (the live lane, which runs ahead of a backlog).
    The backlog is ``acked`` < key <= ``live_from``; with no backlog the three are equal."""

    acked: Key = NO_KEY
    live_from: Key = NO_KEY
    live_acked: Key = NO_KEY

    def synced(self, key: Key) -> bool:
        return key <= self.acked or self.live_from < key <= self.live_acked

    @property
    def has_backlog(self) -> bool:
        return self.acked < self.live_from
