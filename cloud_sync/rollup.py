"""Rollups, the same on edge and hub: per field count, min, avg and max of a time bucket.

A stats blob is 4 float64 per field (count, min, avg, max over the field's finite values;
count 0 and MISSING where there were none). Minute blobs come from raw values by
``predictor_ext.bucket_stats`` (compiled, with its pure twin); coarser buckets and partial
buckets that arrive in pieces are combined by ``merge_blobs``. The edge and the hub both call
these and nothing else, so their rollups are computed alike.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import predictor_ext

__all__ = (
    "DAY_MS",
    "HOUR_MS",
    "MINUTE_MS",
    "Rollup",
    "bucket_blobs",
    "merge_blobs",
    "pack_values",
    "rollup_from_blob",
    "stats_blob",
    "unpack_values",
    "with_none",
)

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
_MISSING = predictor_ext.MISSING
_MISSING_BITS = predictor_ext.MISSING_BITS
_ONE_BUCKET = 1 << 62


@dataclass(frozen=True)
class Rollup:
    """Per-field statistics of one bucket; None where a field had no finite value."""

    bucket_ms: int
    count: tuple[int, ...]
    min: tuple[float | None, ...]
    avg: tuple[float | None, ...]
    max: tuple[float | None, ...]


def flat_values(rows: Sequence[Sequence[float | None]], nf: int) -> array[float]:
    """Rows of values as one column-major float64 buffer; None becomes MISSING."""
    out = array("d")
    missing = _MISSING
    for col in zip(*rows, strict=True) if rows else ():
        start = len(out)
        try:
            out.extend(cast("Sequence[float]", col))
        except TypeError:  # a None in the column; extend() may have taken a prefix
            del out[start:]
            out.extend([missing if v is None else v for v in col])
    assert len(out) == nf * len(rows)
    return out


def bucket_blobs(
    ts: array[int], values: array[float], nf: int, bucket_ms: int
) -> list[tuple[int, bytes]]:
    """(bucket start, stats blob) for each bucket the rows fall in, oldest first; ``values``
    column-major as the codec holds them."""
    n = len(ts)
    starts, stats = predictor_ext.bucket_stats(ts, values, n, nf, bucket_ms)
    width = 4 * nf * 8
    raw = stats.tobytes()
    return [(starts[b], raw[b * width : (b + 1) * width]) for b in range(len(starts))]


def stats_blob(rows: Sequence[Sequence[float | None]], nf: int) -> bytes:
    """The stats blob of rows that make one bucket."""
    if not rows:
        return array("d", [0.0, _MISSING, _MISSING, _MISSING] * nf).tobytes()
    ts = array("q", bytes(8 * len(rows)))
    blobs = bucket_blobs(ts, flat_values(rows, nf), nf, _ONE_BUCKET)
    return blobs[0][1]


def merge_blobs(blobs: Sequence[bytes], nf: int) -> bytes:
    """Combine stats of parts of a bucket (minutes of an hour, pieces of one minute)."""
    return predictor_ext.merge_stats(b"".join(blobs), len(blobs), nf)


def with_none(vals: array[float]) -> tuple[float | None, ...]:
    """Values with MISSING as None."""
    if not any(v != v for v in vals):  # noqa: PLR0124 - NaN test, the fast common case
        return tuple(vals)
    words = array("Q", vals.tobytes())
    return tuple(None if w == _MISSING_BITS else v for v, w in zip(vals, words, strict=True))


def rollup_from_blob(bucket_ms: int, blob: bytes) -> Rollup:
    a = array("d", blob)
    vals = with_none(a)
    nf = len(a) // 4
    return Rollup(
        bucket_ms,
        tuple(int(a[4 * j]) for j in range(nf)),
        tuple(vals[4 * j + 1] for j in range(nf)),
        tuple(vals[4 * j + 2] for j in range(nf)),
        tuple(vals[4 * j + 3] for j in range(nf)),
    )


def pack_values(values: Sequence[float | None]) -> bytes:
    """A frame's values, packed losslessly (small decimals, float32 or float64)."""
    try:
        raw = array("d", cast("Sequence[float]", values))
    except TypeError:
        raw = array("d", [_MISSING if v is None else v for v in values])
    return predictor_ext.pack_values(raw)


def unpack_values(blob: bytes) -> tuple[float | None, ...]:
    return with_none(predictor_ext.unpack_values(blob))
