"""Fixtures for the hub's tests: every storage backend, each on a real database.

- ``storage_url``: parametrized (``sqlite``, ``postgresql``), a URL for ``make_storage`` to a
  database of this test only, for tests that open the hub themselves (ingest, end to end);
- ``storage``: the same, opened;
- ``pg_url``: a fresh PostgreSQL database, for tests about PostgreSQL only;
- ``postgres_server``: the one PostgreSQL server of the session (tests/hub_lite/pg.py),
  started when a test first needs it and stopped at the end of the session, whatever happens.
  A missing PostgreSQL fails those tests (never skips them): a run cannot pass without them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hub_lite.storage import Storage, make_storage

from .pg import PostgresMissingError, PostgresServer

__all__ = ("BACKENDS",)

BACKENDS = ("sqlite", "postgresql")

_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except PostgresMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    with server:
        yield server


@pytest.fixture
def pg_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A new database named after the test (63 bytes at most: PostgreSQL's limit)."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")
    return postgres_server.create_database(f"t{next(_numbers)}_{slug}"[:63])


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def storage(storage_url: str) -> AsyncIterator[Storage]:
    async with make_storage(storage_url) as opened:
        yield opened
