"""bucket_stats, the one rollup implementation of edge and hub, against plain Python."""

from __future__ import annotations

import math
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

import predictor_ext as pe

PURE = pe.pure
IMPL = pe.implementation
M = pe.MISSING


def reference(
    ts: array[int], values: array[float], n: int, nf: int, bucket_ms: int
) -> tuple[array[int], array[float]]:
    """What the edge's rollups computed in Python, bucket by bucket."""
    rows: dict[int, list[int]] = {}
    for i in range(n):
        rows.setdefault(ts[i] // bucket_ms * bucket_ms, []).append(i)
    stats = array("d")
    for start in sorted(rows):
        for j in range(nf):
            col = [values[j * n + i] for i in rows[start]]  # rows in their given order
            good = [v for v in col if math.isfinite(v)]
            total = 0.0  # sum(good) on CPython 3.11; 3.12's sum compensates rounding
            for v in good:
                total += v
            if good:
                stats.extend((len(good), min(good), total / len(good), max(good)))
            else:
                stats.extend((0, M, M, M))
    return array("q", sorted(rows)), stats


VALUES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, M, 0.0, -0.0, 1e308, -1e308]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-1000, 1000).map(lambda i: i / 8),
)


@st.composite
def tables(draw: st.DrawFn) -> tuple[array[int], array[float], int, int, int]:
    n = draw(st.integers(0, 80))
    nf = draw(st.integers(0, 4))
    bucket_ms = draw(st.one_of(st.sampled_from([1, 7, 1000, 60_000]), st.integers(1, 10**7)))
    t0 = draw(st.integers(-(10**9), 10**9))
    if draw(st.booleans()):  # in time order, as a device sends them
        steps = draw(st.lists(st.integers(0, 3 * bucket_ms), min_size=n, max_size=n))
        ts = [t0 + sum(steps[: i + 1]) for i in range(n)]
    else:
        ts = draw(st.lists(st.integers(t0 - 5 * bucket_ms, t0 + 5 * bucket_ms), min_size=n,
                           max_size=n))  # fmt: skip
    values = draw(st.lists(VALUES, min_size=n * nf, max_size=n * nf))
    return array("q", ts), array("d", values), n, nf, bucket_ms


@given(tables())
def test_twins_equal_plain_python_bit_for_bit(
    case: tuple[array[int], array[float], int, int, int],
) -> None:
    want_starts, want = reference(*case)
    for impl in (IMPL, PURE):
        starts, stats = impl.bucket_stats(*case)
        assert starts.typecode == "q" and stats.typecode == "d"
        assert starts == want_starts
        assert stats.tobytes() == want.tobytes()


def test_signed_zeros_and_missing_values() -> None:
    """min and max keep the first of equal values; the sum starts from +0.0."""
    ts = array("q", [-1, -60_000, 5, 59_999, 60_000])
    values = array("d", [-0.0, 0.0, 0.0, -0.0, -0.0, M, M, math.nan, 2.0, math.inf])
    sign = [math.copysign(1.0, x) for x in (-0.0, 0.0, -0.0, 0.0, 0.0, 0.0, -0.0, 0.0, -0.0)]
    for impl in (IMPL, PURE):
        starts, stats = impl.bucket_stats(ts, values, 5, 2, 60_000)
        assert list(starts) == [-60_000, 0, 60_000]
        assert stats.tobytes() == reference(ts, values, 5, 2, 60_000)[1].tobytes()
        zeros = [x for b in range(3) for x in stats[8 * b + 1 : 8 * b + 4]]  # min, avg, max
        assert [math.copysign(1.0, x) for x in zeros] == sign
        assert stats[4] == 0 and list(stats[12:16]) == [1, 2.0, 2.0, 2.0]
        assert array("Q", stats[5:8].tobytes()) == array("Q", [pe.MISSING_BITS] * 3)


def test_empty_input_gives_empty_arrays() -> None:
    for impl in (IMPL, PURE):
        starts, stats = impl.bucket_stats(array("q"), array("d"), 0, 3, 1000)
        assert (starts, stats) == (array("q"), array("d"))


@pytest.mark.parametrize(
    ("n", "nf", "bucket_ms", "match"),
    [(2, 1, 0, "bucket_ms"), (3, 1, 1000, "ts holds"), (2, 2, 1000, "values holds"),
     (-1, 1, 1000, "counts")],
)  # fmt: skip
def test_bad_sizes_are_value_errors(n: int, nf: int, bucket_ms: int, match: str) -> None:
    for impl in (IMPL, PURE):
        with pytest.raises(ValueError, match=match):
            impl.bucket_stats(array("q", [1, 2]), array("d", [1.0, 2.0]), n, nf, bucket_ms)


def test_timestamps_out_of_range_are_value_errors() -> None:
    for impl in (IMPL, PURE):
        with pytest.raises(ValueError, match="row 1"):
            impl.bucket_stats(array("q", [0, -(2**62)]), array("d", [1.0, 2.0]), 2, 1, 1000)


def merge_reference(blobs: list[bytes], nf: int) -> bytes:
    """The merge the edge did in Python before it moved into the codec module."""
    out = array("d")
    parts = [array("d", b) for b in blobs]
    for j in range(nf):
        n = 0.0
        total = 0.0
        lo = math.inf
        hi = -math.inf
        for p in parts:
            c = p[4 * j]
            if c > 0:
                n += c
                total += p[4 * j + 2] * c
                lo = min(lo, p[4 * j + 1])
                hi = max(hi, p[4 * j + 3])
        out.extend((n, lo, total / n, hi) if n else (0, M, M, M))
    return out.tobytes()


@given(
    st.integers(1, 4),
    st.lists(
        st.lists(
            st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.just(M)),
            min_size=1,
            max_size=12,
        ),
        min_size=0,
        max_size=6,
    ),
)
def test_merge_stats_matches_the_python_merge(nf: int, pieces: list[list[float]]) -> None:
    blobs = []
    for k, piece in enumerate(pieces):
        n = len(piece)
        vals = array("d", [v for _ in range(nf) for v in piece])
        _, stats = IMPL.bucket_stats(array("q", [k] * n), vals, n, nf, 10**6)
        blobs.append(stats.tobytes())
    want = merge_reference(blobs, nf)
    for impl in (IMPL, PURE):
        got = impl.merge_stats(b"".join(blobs), len(blobs), nf)
        assert array("Q", got) == array("Q", want)  # bit for bit, MISSING payloads too


def test_merge_stats_checks_sizes() -> None:
    for impl in (IMPL, PURE):
        with pytest.raises(ValueError, match="blob"):
            impl.merge_stats(b"\x00" * 31, 1, 1)
        assert impl.merge_stats(b"", 0, 2) == array("d", [0.0, M, M, M] * 2).tobytes()
