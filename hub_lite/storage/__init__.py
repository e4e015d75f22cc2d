"""Hub storage backends behind one base class: SQLite (embedded) and PostgreSQL (scale-out)."""

from __future__ import annotations

from pathlib import Path

from .base import (
    BlockRecord,
    CompletenessRecord,
    DeviceRecord,
    NodeRecord,
    Storage,
    StorageError,
    Tx,
)

__all__ = (
    "BlockRecord",
    "CompletenessRecord",
    "DeviceRecord",
    "NodeRecord",
    "Storage",
    "StorageError",
    "Tx",
    "make_storage",
)


def make_storage(url: str, base_dir: Path | None = None) -> Storage:
    """The backend a URL names: ``sqlite:///PATH`` (relative to ``base_dir``) or
    ``postgresql://...``. Not opened yet."""
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStorage

        p = Path(url[len("sqlite:///") :])
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return SqliteStorage(p)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStorage

        storage: Storage = PostgresStorage(url)
        return storage
    raise ValueError(f"unknown storage URL {url!r}: sqlite:///PATH or postgresql://...")
