"""The sync conversation over HTTP: what the hub answers to an upload, as JSON.

``POST /api/v1/batches`` with a SignedBatch (``application/x-protobuf``) is answered 200 with an
``Ack`` (stored, or a duplicate of a stored batch: nothing written), or a 4xx with an
``ErrorBody`` whose ``error`` code tells the node what to do:

| status | error | the node |
|---|---|---|
| 400 | malformed, node_mismatch | keeps the batch as a dead letter, counts its frames lost |
| 401 | bad_signature | reports it, retries slowly (a key that does not match the hub's) |
| 403 | unknown_node | reports it, retries slowly (the node is not registered yet) |
| 409 | chain_broken | sends the same frames again as keyframes |
| 413 | too_large | sends smaller batches |
| 422 | unknown_schema | sends the same frames again with whole schemas |
| 422 | bad_timestamp | as malformed (a clock that was never set, or far ahead) |
| 429 | rate_limited | waits ``retry_after_s`` |
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ("BATCHES_PATH", "CONTENT_TYPE", "MIN_TS_MS", "Ack", "ErrorBody")

BATCHES_PATH = "/api/v1/batches"
CONTENT_TYPE = "application/x-protobuf"
MIN_TS_MS = 946_684_800_000
"""2000-01-01: a frame stamped earlier comes from a clock that was never set; the hub refuses
it and the node does not send it."""


class Ack(msgspec.Struct, kw_only=True):
    """The hub holds the batch: its frames count as synced."""

    result: Literal["stored", "duplicate"]
    batch_id: int
    hub_time_ms: int
    """The hub's clock when it answered: the node measures its drift from it."""
    frames_new: int
    frames_duplicate: int
    """Frames whose sequence numbers the hub already held (nothing written for them)."""
    chain: dict[str, int] = {}
    """Per device, the batch whose end state the hub holds: the next block may continue it."""


class ErrorBody(msgspec.Struct, kw_only=True):
    """Why the hub refused a body; nothing of it was stored."""

    error: str
    detail: str
    hub_time_ms: int
    unknown_schemas: list[str] = []
    """Hex digests of schemas to send whole (error unknown_schema)."""
    broken_chains: list[str] = []
    """Devices to send as keyframes (error chain_broken)."""
    retry_after_s: float | None = None
