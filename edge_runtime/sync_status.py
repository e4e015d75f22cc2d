"""`gridlet sync status`: the uploader's figures from the running edge's API, with rich."""

from __future__ import annotations

import contextlib
import time

import click
import httpx
import msgspec
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from .web.api import SyncInfo

__all__ = ("show",)


class _Status(msgspec.Struct):
    sync: SyncInfo


def _fetch(client: httpx.Client) -> SyncInfo:
    try:
        r = client.get("/api/status")
    except httpx.HTTPError as exc:
        raise click.ClickException(f"the edge does not answer at {client.base_url}: {exc}") from exc
    if r.status_code != 200:
        raise click.ClickException(f"{client.base_url}/api/status answered {r.status_code}")
    return msgspec.json.decode(r.content, type=_Status).sync


def _table(s: SyncInfo) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("hub", s.hub_url or "-")
    t.add_row("state", s.state + (f" ({s.last_error})" if s.last_error else ""))
    t.add_row("backlog", f"{s.backlog_frames or 0} frames")
    t.add_row("rate", f"{s.rate_fps or 0:.1f} frames/s")
    t.add_row("eta", "-" if s.eta_s is None else f"{s.eta_s:.0f} s")
    drift = "-" if s.drift_ms is None else f"{s.drift_ms / 1000:+.1f} s"
    t.add_row("clock drift", drift + (" (over 60 s!)" if s.drift_flagged else ""))
    return t


def show(url: str, *, follow: bool) -> None:
    console = Console()
    with httpx.Client(base_url=url, timeout=5) as client:
        s = _fetch(client)
        if not follow:
            console.print(_table(s))
            return
        start = (s.backlog_frames or 0) or 1
        bar = Progress(TextColumn("backlog"), BarColumn(), TextColumn("{task.description}"))
        task = bar.add_task("", total=start)
        grid = Table.grid()
        with (
            contextlib.suppress(KeyboardInterrupt),
            Live(grid, console=console, refresh_per_second=2) as live,
        ):
            while True:  # until Ctrl-C
                start = max(start, s.backlog_frames or 0)
                bar.update(
                    task,
                    total=start,
                    completed=start - (s.backlog_frames or 0),
                    description=f"{s.backlog_frames or 0} left",
                )
                view = Table.grid()
                view.add_row(_table(s))
                view.add_row(bar)
                live.update(view)
                time.sleep(1.0)
                s = _fetch(client)
