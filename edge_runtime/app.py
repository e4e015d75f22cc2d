"""Wiring: the one module that knows every part, turning a SiteConfig into a running edge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import msgspec

from .config import (
    DsmrDevice,
    GoodweDevice,
    HostDevice,
    ModbusDevice,
    SiteConfig,
    SyntheticDevice,
)
from .devices.base import PolledDriver, PushDriver
from .runtime import Polled, Runtime
from .store import CommitReport, Store

__all__ = ("build_drivers", "open_store", "run_site", "store_path")

log = logging.getLogger(__name__)


def store_path(cfg: SiteConfig, base_dir: Path) -> Path:
    p = Path(cfg.store.path)
    return p if p.is_absolute() else base_dir / p


async def open_store(cfg: SiteConfig, base_dir: Path) -> Store:
    s = cfg.store
    return await Store.open(
        store_path(cfg, base_dir),
        commit_interval_ms=s.commit_interval_ms,
        raw_retention_days=s.raw_retention_days,
        rollup_retention_days=s.rollup_retention_days,
        max_size_bytes=int(s.max_size_mb * 1024 * 1024),
    )


def build_drivers(cfg: SiteConfig, base_dir: Path) -> tuple[list[Polled], list[PushDriver]]:
    """One driver per enabled device; libraries are imported only for kinds in use."""
    polled: list[Polled] = []
    push: list[PushDriver] = []
    devices = [d for d in cfg.devices if d.enabled]

    def add(
        drv: PolledDriver, dev: GoodweDevice | ModbusDevice | HostDevice | SyntheticDevice
    ) -> None:
        wake = dev.wake_after_failures if isinstance(dev, GoodweDevice) else 3
        polled.append(Polled(drv, dev.interval_s, dev.timeout_s, wake))

    modbus = [_resolve_profile(d, base_dir) for d in devices if isinstance(d, ModbusDevice)]
    if modbus:
        from .devices.modbus import make_drivers

        for mdrv, mdev in zip(make_drivers(modbus), modbus, strict=True):
            add(mdrv, mdev)
    for dev in devices:
        if isinstance(dev, GoodweDevice):
            from .devices.goodwe import GoodweDriver

            add(GoodweDriver(dev), dev)
        elif isinstance(dev, HostDevice):
            from .devices.host import HostDriver

            add(HostDriver(dev, data_dir=str(store_path(cfg, base_dir).parent)), dev)
        elif isinstance(dev, SyntheticDevice):
            from .devices.synthetic import SyntheticDriver

            add(SyntheticDriver(dev), dev)
        elif isinstance(dev, DsmrDevice):
            from .devices.dsmr import DsmrDriver

            push.append(DsmrDriver(dev))
    if cfg.mqtt.enabled:
        from .devices.mqtt import MqttNodes

        push.append(MqttNodes(cfg.mqtt, cfg.site.node_id))
    return polled, push


def _resolve_profile(dev: ModbusDevice, base_dir: Path) -> ModbusDevice:
    """A profile given as a path is relative to the configuration file's folder."""
    if dev.profile.endswith(".toml") and not Path(dev.profile).is_absolute():
        return msgspec.structs.replace(dev, profile=str(base_dir / dev.profile))
    return dev


async def run_site(
    cfg: SiteConfig,
    base_dir: Path,
    *,
    commit_log: IO[str] | None = None,
    extra_polled: Sequence[Polled] = (),
) -> None:
    """Run the edge until SIGINT/SIGTERM or cancellation; the store commits before exit."""
    store = await open_store(cfg, base_dir)
    try:
        polled, push = build_drivers(cfg, base_dir)
        runtime = Runtime(store, [*polled, *extra_polled], push)
        sync_status = None
        if cfg.sync.enabled:
            from .sync import make_uploader, run_uploader, sync_info

            uploader = make_uploader(runtime, cfg, store.path.parent)
            runtime.services.append(("sync", lambda: run_uploader(uploader)))
            sync_status = sync_info(uploader)
        if cfg.http.enabled:
            # Imported only when used: a headless site never loads the web stack.
            from .web import Dashboard

            dashboard = Dashboard(runtime, cfg, sync_status=sync_status)
            runtime.services.extend(dashboard.services())
        # pymodbus logs every failed connect as a warning; the scheduler already reports
        # the first failure of a streak, so keep its chatter for debugging.
        logging.getLogger("pymodbus").setLevel(max(logging.ERROR, log.getEffectiveLevel()))
        if commit_log is not None:
            store.on_commit.append(lambda r: _log_commit(commit_log, r))
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel if task else lambda: None)
        log.info(
            "gridlet %s: %d polled devices, %d push sources, store %s",
            cfg.site.node_id,
            len(runtime.polled),
            len(runtime.push),
            store.path,
        )
        with contextlib.suppress(asyncio.CancelledError):
            await runtime.run()
    finally:
        await store.close()


def _log_commit(out: IO[str], report: CommitReport) -> None:
    """One JSON line per commit, flushed: what a crash test may hold the store to."""
    out.write(json.dumps({"frames": report.frames, "devices": report.devices}) + "\n")
    out.flush()
