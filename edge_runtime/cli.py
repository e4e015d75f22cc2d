"""The `gridlet` command line: one entry point for the edge runtime's commands."""

from __future__ import annotations

import asyncio
import csv
import importlib.metadata
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

import predictor_ext

from .config import ConfigError, SiteConfig, load_config

__all__ = ("main",)


def _load(path: str) -> SiteConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _time(value: str | None) -> int | None:
    """ISO 8601 (UTC unless it says otherwise) or Unix milliseconds."""
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is neither ISO 8601 nor Unix ms") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


class _Commands(click.Group):
    """Commands of other gridlet packages (``gridlet hub`` from hub_lite) come through the
    ``gridlet.commands`` entry points and are imported only when asked for: `gridlet run`
    never loads the hub."""

    @staticmethod
    def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group="gridlet.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None:
            ep = self._plugins().get(cmd_name)
            if ep is not None:
                loaded = ep.load()
                if isinstance(loaded, click.Command):
                    cmd = loaded
        return cmd


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gridlet")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """gridlet: edge runtime for energy sites (inverters, meters, ESP32 nodes)."""
    level = logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: noise in a command's output and on an SD card.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


@main.command("codec-info")
def codec_info() -> None:
    """Say which predictor codec implementation is loaded (compiled or pure)."""
    impl = "compiled (Cython extension)" if predictor_ext.compiled else "pure Python twin"
    click.echo(f"predictor_ext: {impl}")


@main.command("check-config")
@click.argument("config", type=click.Path(dir_okay=False))
def check_config(config: str) -> None:
    """Validate a site configuration without starting anything."""
    cfg = _load(config)
    kinds = ", ".join(f"{d.id} ({d.kind})" for d in cfg.devices) or "none"
    click.echo(f"{config}: ok: site {cfg.site.node_id}; devices: {kinds}")


@main.command("run")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--commit-log",
    type=click.Path(dir_okay=False, writable=True),
    help="Append a JSON line per store commit (what crash tests check).",
)
def run(config: str, commit_log: str | None) -> None:
    """Run the edge runtime until Ctrl-C."""
    from .app import run_site

    cfg = _load(config)
    base = Path(config).resolve().parent
    if commit_log:
        with open(commit_log, "a", encoding="utf-8") as out:
            asyncio.run(run_site(cfg, base, commit_log=out))
    else:
        asyncio.run(run_site(cfg, base))


@main.command("demo")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default="demo-data",
    show_default=True,
    help="Where the generated site.toml and the history go.",
)
@click.option("--duration", type=float, help="Stop after this many seconds (default: Ctrl-C).")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Dashboard port (default: 8000 when free, else a free one).",
)
@click.option(
    "--host",
    default="0.0.0.0",
    show_default=True,
    help="Address the dashboard listens on (127.0.0.1 keeps it to this machine).",
)
def demo(data_dir: str, duration: float | None, port: int | None, host: str) -> None:
    """Run the whole edge on simulated devices that speak the real protocols."""
    from .demo import run_demo

    asyncio.run(
        run_demo(Path(data_dir).resolve(), duration_s=duration, http_host=host, http_port=port)
    )


@main.command("hash-password")
def hash_password_cmd() -> None:
    """Ask for a dashboard password (twice) and print the hash for `http.password_hash`."""
    from .web.auth import hash_password

    password = click.prompt(
        "Dashboard password", hide_input=True, confirmation_prompt=True, err=True
    )
    click.echo(hash_password(password))


@main.command("keygen")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--force", is_flag=True, help="Replace an existing key (the hub must learn the new one)."
)
def keygen(config: str, force: bool) -> None:
    """Make this node's signing key (mode 0600) and print its public key for the hub."""
    from cloud_sync.signing import KeyFileError, NodeKey

    from .app import store_path
    from .sync import key_path

    cfg = _load(config)
    path = key_path(cfg, store_path(cfg, Path(config).resolve().parent).parent)
    key = NodeKey.generate()
    try:
        key.save(path, overwrite=force)
    except KeyFileError as exc:
        raise click.ClickException(f"{exc} (--force replaces it)") from exc
    click.echo(f"wrote {path}")
    click.echo(f"public key: {key.public_text}")
    click.echo(f"on the hub: gridlet hub add-node {cfg.site.node_id} {key.public_text}")


@main.group("sync")
def sync_group() -> None:
    """Uploading to a hub."""


@sync_group.command("status")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--follow", is_flag=True, help="Keep showing progress until Ctrl-C.")
@click.option("--url", help="The dashboard's URL (default: from the configuration).")
def sync_status(config: str, follow: bool, url: str | None) -> None:
    """Backlog, rate and ETA of the upload to the hub, from the running edge."""
    from .sync_status import show

    cfg = _load(config)
    if not cfg.sync.enabled:
        raise click.ClickException(f"{config}: sync is not enabled ([sync] enabled = true)")
    if url is None:
        if not cfg.http.enabled:
            raise click.ClickException("the dashboard is off: its API is where the figures are")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.http.host, cfg.http.host)
        url = f"http://{host}:{cfg.http.port}"
    show(url, follow=follow)


@main.command("export")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--device", required=True, help="Device id.")
@click.option("--from", "start", help="Start time: ISO 8601 (UTC by default) or Unix ms.")
@click.option("--to", "end", help="End time (exclusive).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv")
def export(config: str, device: str, start: str | None, end: str | None, fmt: str) -> None:
    """Write a device's stored frames to stdout."""
    from .app import store_path
    from .store import Reader

    cfg = _load(config)
    reader = Reader(store_path(cfg, Path(config).resolve().parent))
    try:
        known = {dev for dev, _ in reader.schemas().values()}
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    if device not in known:
        raise click.ClickException(
            f"no frames for device {device!r}; stored devices: {', '.join(sorted(known)) or 'none'}"
        )
    out = sys.stdout
    writer = csv.writer(out) if fmt == "csv" else None
    header: tuple[str, ...] | None = None
    for frame, schema in reader.frames(device, _time(start), _time(end)):
        names = tuple(f.name for f in schema.fields)
        if writer is not None:
            if names != header:
                writer.writerow(("ts_ms", "seq", *names))
                header = names
            writer.writerow(
                (frame.ts_ms, frame.seq, *("" if v is None else v for v in frame.values))
            )
        else:
            record = {
                "ts_ms": frame.ts_ms,
                "seq": frame.seq,
                **dict(zip(names, frame.values, strict=True)),
            }
            out.write(json.dumps(record, allow_nan=True) + "\n")
