"""The hub configuration: one TOML file (hub.toml) decoded into strict msgspec Structs.

Unknown keys are errors, and every error names the file, the line and the key path
(``hub.toml:7: storage.url: ...``), as for the site configuration. Every key is documented in
the README's hub configuration reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from cloud_sync.tomlerrors import decode_toml, read_text

__all__ = (
    "HubConfig",
    "HubConfigError",
    "HubSection",
    "IngestConfig",
    "RetentionConfig",
    "StorageConfig",
    "load_hub_config",
    "parse_hub_config",
)

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class HubConfigError(ValueError):
    """The hub configuration is missing, not TOML, or does not fit the schema."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class HubSection(_Strict, frozen=True):
    host: str = "127.0.0.1"
    """Address to listen on; put a TLS-terminating proxy in front for the internet."""
    port: Port = 8100
    admin_token_hash: str | None = None
    """Made by `gridlet hub hash-token`; the API (not ingest) needs `Authorization: Bearer`.
    None leaves the read API closed to everyone."""
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    """Processes serving on the same port (PostgreSQL only: SQLite has one writer)."""


class StorageConfig(_Strict, frozen=True):
    url: str = "sqlite:///hub.db"
    """`sqlite:///PATH` (relative to this file's folder) or `postgresql://...` (libpq URL)."""


class IngestConfig(_Strict, frozen=True):
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 4 * 1024 * 1024
    """Bodies over this are refused (413) before anything else is read."""
    rate_per_node: Annotated[float, msgspec.Meta(gt=0)] = 50.0
    """Batches a second one node may send, on average (token bucket)."""
    burst_per_node: Annotated[float, msgspec.Meta(ge=1)] = 200.0
    """Batches a node may send at once after a quiet spell (a backlog drains in bursts)."""
    max_future_s: Annotated[float, msgspec.Meta(ge=0)] = 86400.0
    """Frames stamped further than this ahead of the hub's clock are refused."""
    drift_warn_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """A node whose clock is further than this from the hub's is flagged."""


class RetentionConfig(_Strict, frozen=True):
    raw_days: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """Raw frames are kept this long (PostgreSQL drops whole daily partitions)."""
    rollup_days: Annotated[float, msgspec.Meta(gt=0)] = 3650.0
    """1-minute and 1-hour rollups are kept this long."""


class HubConfig(_Strict, frozen=True):
    hub: HubSection = HubSection()
    storage: StorageConfig = StorageConfig()
    ingest: IngestConfig = IngestConfig()
    retention: RetentionConfig = RetentionConfig()

    def __post_init__(self) -> None:
        url = self.storage.url
        if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("expected sqlite:///PATH or postgresql://... - at `$.storage.url`")
        if self.hub.workers > 1 and url.startswith("sqlite"):
            raise ValueError(
                "several workers need PostgreSQL (SQLite has one writer) - at `$.hub.workers`"
            )


def load_hub_config(path: str | Path) -> HubConfig:
    """Read and validate hub.toml; raise HubConfigError naming file, line and key."""
    p = Path(path)
    return parse_hub_config(read_text(p, HubConfigError), str(p))


def parse_hub_config(text: str, filename: str = "<hub config>") -> HubConfig:
    return decode_toml(text, filename, HubConfig, HubConfigError)
