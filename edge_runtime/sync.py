"""The edge's side of sync: the store and runtime seen as the uploader's ``SyncSource``.

Reads go through the read-only ``Reader`` on a worker thread; every write (what the hub
acknowledged, rejected batches, the batch id floor) goes through the store's one writer.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cloud_sync import DeviceHealth, DeviceSchema, Frame, Loss, NodeStatus
from cloud_sync.rollup import DAY_MS
from cloud_sync.signing import NodeKey
from cloud_sync.syncstate import Key, SyncState
from cloud_sync.uploader import Uploader, UploaderSettings

from .config import SiteConfig
from .devices.host import boot_time_ms
from .runtime import Runtime
from .store import Reader, Store

if TYPE_CHECKING:
    from .web.api import SyncInfo

_T = TypeVar("_T")

__all__ = ("StoreSource", "key_path", "make_uploader", "run_uploader", "sync_info")


def key_path(cfg: SiteConfig, data_dir: Path) -> Path:
    p = Path(cfg.sync.key_file)
    return p if p.is_absolute() else data_dir / p


def _version() -> str:
    try:
        return importlib.metadata.version("gridlet")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree
        return "0"


class StoreSource:
    """The uploader's view of this node's store and devices."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store: Store = runtime.store
        # One thread with one connection for every read: a thread (and a connection and a
        # malloc arena) per read costs megabytes on a Pi.
        self.reader = Reader(self.store.path, keep_open=True)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sync-read")

    async def _read(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        self._thread.submit(self.reader.close).result()
        self._thread.shutdown()

    def device_ids(self) -> Sequence[str]:
        return self.store.device_ids()

    def state(self, device_id: str) -> SyncState:
        return self.store.sync.get(device_id, SyncState())

    def set_state(self, device_id: str, state: SyncState) -> None:
        self.store.set_sync(device_id, state)

    async def read(
        self, device_id: str, after: Key, upto: Key | None, limit: int
    ) -> list[tuple[Frame, DeviceSchema]]:
        return await self._read(self.reader.frames_after, device_id, after, upto, limit)

    async def newest(self, device_id: str) -> Key | None:
        return await self._read(self.reader.newest_key, device_id)

    async def pending(self, device_id: str, after: Key, upto: Key | None) -> tuple[int, int | None]:
        return await self._read(self.reader.count_after, device_id, after, upto)

    async def status(self) -> NodeStatus:
        rt = self.runtime
        losses = await self._read(self.reader.losses)
        try:
            free = shutil.disk_usage(self.store.path.parent).free
        except OSError:
            free = None
        return NodeStatus(
            software_version=_version(),
            boot_ms=boot_time_ms(),
            started_ms=rt.started_ms,
            disk_free_bytes=free,
            devices=tuple(
                DeviceHealth(
                    device_id=st.device_id,
                    online=st.online,
                    last_seen_ms=st.last_seen_ms,
                    errors=st.errors,
                    timeouts=st.timeouts,
                    last_error=st.last_error,
                )
                for st in sorted(rt.statuses.values(), key=lambda s: s.device_id)
            ),
            losses=tuple(
                Loss(device_id=dev, day_ms=day, evicted=ev, rejected=rej)
                for dev, day, ev, rej in losses
            ),
        )

    def reject(self, frames: Sequence[Frame], body: bytes, reason: str) -> None:
        self.store.dead_letter("sync", "batch", body, reason)
        counts: dict[tuple[str, int], int] = {}
        for f in frames:
            k = (f.device_id, f.ts_ms // DAY_MS * DAY_MS)
            counts[k] = counts.get(k, 0) + 1
        for (dev, day), n in counts.items():
            self.store.add_rejected(dev, day, n)

    def batch_id_floor(self) -> int:
        return self.store.batch_id_floor

    def note_batch_id(self, batch_id: int) -> None:
        self.store.note_batch_id(batch_id)


def make_uploader(runtime: Runtime, cfg: SiteConfig, data_dir: Path) -> Uploader:
    """The uploader for a site with sync enabled; its key must exist (`gridlet keygen`).
    Run it with ``run_uploader``."""
    key = NodeKey.load(key_path(cfg, data_dir))
    s = cfg.sync
    uploader = Uploader(
        StoreSource(runtime),
        key,
        UploaderSettings(
            url=s.hub_url,
            node_id=cfg.site.node_id,
            interval_s=s.interval_s,
            max_rows=s.max_rows,
            jump_rows=max(2 * s.max_rows, int(60 / s.interval_s) * 2),
        ),
    )
    runtime.store.on_commit.append(lambda _report: uploader.poke())
    return uploader


async def run_uploader(uploader: Uploader) -> None:
    """Run the uploader until cancelled, then close its reading thread and connection."""
    try:
        await uploader.run()
    finally:
        source = uploader.source
        if isinstance(source, StoreSource):
            source.close()


def sync_info(uploader: Uploader) -> Callable[[], SyncInfo]:
    """What the status page and /metrics show of the uploader."""
    from .web.api import SyncInfo

    def info() -> SyncInfo:
        st = uploader.stats
        return SyncInfo(
            state=st.state,
            backlog_frames=st.backlog_frames,
            last_upload_ms=st.last_ack_ms,
            last_error=st.last_error,
            backlog_oldest_ms=st.backlog_oldest_ms,
            rate_fps=round(st.rate, 2),
            eta_s=st.eta_s,
            drift_ms=st.drift_ms,
            drift_flagged=st.drift_flagged,
            hub_url=uploader.s.url,
        )

    return info
