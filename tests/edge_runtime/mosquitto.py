"""The real mosquitto broker as a pytest fixture (the broker itself: simulators/broker.py).

from tests.edge_runtime.mosquitto import Mosquitto, mosquitto_fixture  # noqa: F401

def test_x(mosquitto: Mosquitto) -> None:
    ...  # mosquitto.host, mosquitto.port; mosquitto.kill(); mosquitto.start()
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.simulators.broker import (
    Mosquitto,
    MosquittoMissingError,
    find_mosquitto,
    free_port,
    running_mosquitto,
)

__all__ = ("Mosquitto", "find_mosquitto", "free_port", "mosquitto_fixture", "running_mosquitto")


# Named apart from the fixture so that test parameters called `mosquitto` do not shadow
# the import (ruff F811).
@pytest.fixture(name="mosquitto")
def mosquitto_fixture(tmp_path: Path) -> Iterator[Mosquitto]:
    """``mosquitto``: a real mosquitto on a free loopback port, for this test only. A missing
    broker fails the test (never skips it), so a run cannot pass without these tests."""
    try:
        find_mosquitto()
    except MosquittoMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    with running_mosquitto(tmp_path / "mosquitto") as broker:
        yield broker
