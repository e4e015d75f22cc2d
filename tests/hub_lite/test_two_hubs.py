"""Two hub processes on one PostgreSQL receive the same batches at the same moment: each
batch is stored by exactly one of them, the other answers "duplicate", and every frame is
held once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud_sync import DeviceSchema, Frame, default_field, encode
from cloud_sync.protocol import BATCHES_PATH, CONTENT_TYPE
from cloud_sync.signing import NodeKey, sign
from hub_lite.read import read_frames
from hub_lite.storage import make_storage

from .test_sync_e2e import Hub, run

SCHEMA = DeviceSchema(
    "meter",
    "sim",
    tuple(default_field(f"p{i}_w", "W", 5.0) for i in range(20)),
)
T0 = 1_790_000_000_000


@pytest.fixture
def hubs(tmp_path: Path, pg_url: str) -> Iterator[tuple[Hub, Hub]]:
    cfg = tmp_path / "hub.toml"
    cfg.write_text(f'[storage]\nurl = "{pg_url}"\n[ingest]\nmax_future_s = 1e9\n')
    with Hub(cfg).running() as a, Hub(cfg).running() as b:
        yield a, b


def test_the_same_batches_at_two_hubs_are_stored_once(
    tmp_path: Path, hubs: tuple[Hub, Hub], pg_url: str
) -> None:
    a, b = hubs
    key = NodeKey.generate()
    run("hub", "add-node", "--config", str(a.config), "twin", key.public_text, cwd=tmp_path)
    rng = random.Random(3)
    bodies = []
    seq = 0
    for batch_id in range(1, 41):
        rows = []
        for dev in ("m1", "m2"):
            for i in range(30):
                t = T0 + (seq + i) * 1000
                rows.append(
                    Frame(dev, t, seq + i + 1, tuple(rng.uniform(0, 5000) for _ in range(20)))
                )
        seq += 30
        raw = encode(
            rows, {"m1": SCHEMA, "m2": SCHEMA}, node_id="twin", batch_id=batch_id, created_ms=T0
        )
        bodies.append(sign(key, "twin", raw))

    async def post_both() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(url: str, body: bytes) -> str:
                r = await client.post(
                    url + BATCHES_PATH, content=body, headers={"content-type": CONTENT_TYPE}
                )
                assert r.status_code == 200, r.text
                return str(r.json()["result"])

            out = []
            for body in bodies:
                x, y = await asyncio.gather(one(a.url, body), one(b.url, body))
                out.append((x, y))
            return out

    answers = asyncio.run(post_both())
    assert all(sorted(pair) == ["duplicate", "stored"] for pair in answers), answers

    async def held() -> dict[str, list[int]]:
        async with make_storage(pg_url) as st:
            return {
                d: [f.seq for f in await read_frames(st, "twin", d, 0, 2**62)] for d in ("m1", "m2")
            }

    got = asyncio.run(held())
    assert got["m1"] == got["m2"] == list(range(1, seq + 1))
