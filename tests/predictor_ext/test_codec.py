"""Properties of the predictor codec, checked on the compiled extension and the pure twin."""

from __future__ import annotations

import hashlib
import math
import struct
from array import array
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import predictor_ext as pe

PURE = pe.pure
IMPL = pe.implementation
INF = math.inf


def bits(x: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", x))[0])


@dataclass
class Block:
    ts: array[int]
    seqs: array[int]
    columns: list[array[float]]
    tols: list[float]
    kinds: list[int]
    alphas: list[int]
    betas: list[int]

    @property
    def n(self) -> int:
        return len(self.ts)

    def flat(self) -> array[float]:
        out = array("d")
        for col in self.columns:
            out.extend(col)
        return out

    def encode(self, impl: object) -> tuple[bytes, list[array[float]]]:
        n = self.n
        recon = array("d", bytes(8 * n * len(self.columns)))
        data = impl.encode_block(  # type: ignore[attr-defined]
            self.ts, self.seqs, self.flat(), self.tols, self.kinds, self.alphas, self.betas, recon
        )
        return data, [recon[j * n : (j + 1) * n] for j in range(len(self.columns))]

    def decode(
        self, impl: object, data: bytes
    ) -> tuple[array[int], array[int], list[array[float]]]:
        n = self.n
        ts = array("q", bytes(8 * n))
        seqs = array("q", bytes(8 * n))
        flat = array("d", bytes(8 * n * len(self.columns)))
        first_ts = self.ts[0] if n else 0
        first_seq = self.seqs[0] if n else 0
        impl.decode_block(  # type: ignore[attr-defined]
            data, n, first_ts, first_seq, self.tols, self.kinds, self.alphas, self.betas,
            ts, seqs, flat,
        )  # fmt: skip
        return ts, seqs, [flat[j * n : (j + 1) * n] for j in range(len(self.columns))]


TOLS = st.sampled_from([1e-6, 0.0005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 1000.0])


@st.composite
def values(draw: st.DrawFn, tol: float) -> float:
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.sampled_from([math.nan, INF, -INF, pe.MISSING]))
    if kind == 1:
        return draw(st.floats(allow_nan=False, allow_infinity=False))  # any double
    scale = tol * draw(st.sampled_from([1, 10, 1e3, 1e6, 1e9]))
    return draw(st.floats(-scale, scale, allow_nan=False))


@st.composite
def blocks(draw: st.DrawFn, max_rows: int = 120, max_fields: int = 4) -> Block:
    n = draw(st.integers(0, max_rows))
    nf = draw(st.integers(0, max_fields))
    t0 = draw(st.integers(-(2**50), 2**50))
    steps = draw(st.lists(st.integers(-(10**6), 10**7), min_size=n, max_size=n))
    ts = array("q", [t0])
    for s in steps[1:]:
        ts.append(ts[-1] + s)
    ts = ts[:n]
    seq0 = draw(st.integers(0, 2**40))
    seq_steps = draw(st.lists(st.integers(-3, 5), min_size=n, max_size=n))
    seqs = array("q", [seq0 + sum(seq_steps[:i]) for i in range(n)])
    tols, kinds, alphas, betas, columns = [], [], [], [], []
    for _ in range(nf):
        tol = draw(TOLS)
        tols.append(tol)
        kinds.append(draw(st.sampled_from([pe.LEVEL, pe.TREND])))
        alphas.append(draw(st.integers(1, pe.ALPHA_ONE)))
        betas.append(draw(st.integers(0, pe.ALPHA_ONE)))
        shape = draw(st.integers(0, 2))
        if shape == 0:  # arbitrary values
            col = draw(st.lists(values(tol), min_size=n, max_size=n))
        else:  # a random walk or ramp, as real signals move
            x = draw(st.floats(-1e6, 1e6))
            slope = draw(st.floats(-100, 100)) * tol
            col = []
            for _ in range(n):
                x += slope + draw(st.floats(-5, 5)) * tol
                col.append(x)
        columns.append(array("d", col))
    return Block(ts, seqs, columns, tols, kinds, alphas, betas)


def within(x: float, y: float, tol: float) -> bool:
    """Finite values come back within tol (huge ones exactly); NaN, missing, inf exactly."""
    if math.isnan(x):
        return math.isnan(y) and (bits(y) == pe.MISSING_BITS) == (bits(x) == pe.MISSING_BITS)
    return abs(y - x) <= tol or x == y


def test_compiled_extension_is_loaded() -> None:
    """make test builds the extension; a silent fallback to the pure twin would hide a break."""
    assert pe.compiled, "the Cython extension did not build or load"
    assert IMPL is not PURE


@given(blocks())
def test_every_value_within_tolerance_and_decodes_bit_identically(b: Block) -> None:
    data, recons = b.encode(IMPL)
    ts, seqs, cols = b.decode(IMPL, data)
    assert ts == b.ts
    assert seqs == b.seqs
    for j, col in enumerate(b.columns):
        for i, x in enumerate(col):
            assert within(x, recons[j][i], b.tols[j]), (j, i, x, recons[j][i], b.tols[j])
            assert bits(cols[j][i]) == bits(recons[j][i])


@given(blocks())
def test_pure_twin_gives_identical_bytes_and_reconstructions(b: Block) -> None:
    data_c, recons_c = b.encode(IMPL)
    data_p, recons_p = b.encode(PURE)
    assert data_c == data_p
    assert [c.tobytes() for c in recons_c] == [c.tobytes() for c in recons_p]
    decoded_p = b.decode(PURE, data_c)
    decoded_c = b.decode(IMPL, data_p)
    assert decoded_p[0] == decoded_c[0]
    assert [c.tobytes() for c in decoded_p[2]] == [c.tobytes() for c in decoded_c[2]]


@given(blocks(max_rows=40, max_fields=2))
def test_encode_is_deterministic(b: Block) -> None:
    assert b.encode(IMPL)[0] == b.encode(IMPL)[0]


@given(blocks(max_rows=60, max_fields=3), st.data())
def test_corrupt_blocks_raise_codec_error_or_decode_in_bounds(
    b: Block, data: st.DataObject
) -> None:
    assume(b.n > 0)
    coded, _ = b.encode(IMPL)
    raw = bytearray(coded)
    op = data.draw(st.integers(0, 2))
    if op == 0:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == 1:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    for impl in (IMPL, PURE):
        try:
            ts, _, cols = b.decode(impl, bytes(raw))
        except pe.CodecError:
            continue
        assert len(ts) == b.n and all(len(c) == b.n for c in cols)


def test_nan_inf_and_missing_never_corrupt_the_state() -> None:
    n = 50
    clean = [230.0 + 0.37 * i for i in range(n)]
    dirty = list(clean)
    for i, special in ((3, math.nan), (4, pe.MISSING), (10, INF), (11, -INF), (12, 1e300)):
        dirty[i] = special
    b = Block(
        array("q", range(n)), array("q", range(n)), [array("d", dirty)], [0.05], [pe.TREND],
        [3000], [500],
    )  # fmt: skip
    _, recons = b.encode(IMPL)
    out = recons[0]
    assert math.isnan(out[3]) and bits(out[3]) != pe.MISSING_BITS
    assert bits(out[4]) == pe.MISSING_BITS
    assert out[10] == INF and out[11] == -INF and out[12] == 1e300
    for i, x in enumerate(dirty):
        if math.isfinite(x) and x != 1e300:
            assert abs(out[i] - x) <= 0.05


def test_deadband_holds_the_previous_value() -> None:
    """alpha = 1 is a plain deadband: values within tol of the last one cost no residual."""
    xs = [100.0, 103.0, 96.0, 100.0, 150.0, 151.0, 149.5]
    n = len(xs)
    res = array("q", bytes(8 * n))
    recon = array("d", bytes(8 * n))
    IMPL.encode_block(
        array("q", range(n)), array("q", range(n)), array("d", xs), [5.0], [pe.LEVEL],
        [pe.ALPHA_ONE], [0], recon, res,
    )  # fmt: skip
    assert list(res)[1:] == [0, 0, 0, 5, 0, 0]
    r = list(recon)
    assert r[0] == r[1] == r[2] == r[3] and r[4] == r[5] == r[6]
    assert all(abs(y - x) <= 5.0 for x, y in zip(xs, r, strict=True))


def test_trend_model_follows_a_counter_cheaply() -> None:
    """Holt on a steadily growing counter sends far less than a deadband, which sends every
    value once the counter moves a step per read."""
    n = 600
    xs = array("d", [1000.0 + 0.0123 * i for i in range(n)])
    sizes = {}
    for kind, alpha, beta in ((pe.TREND, 2048, 512), (pe.LEVEL, pe.ALPHA_ONE, 0)):
        res = array("q", bytes(8 * n))
        sizes[kind] = len(
            IMPL.encode_block(
                array("q", range(n)), array("q", range(n)), xs, [0.0005], [kind], [alpha],
                [beta], None, res,
            )
        )  # fmt: skip
        nonzero = sum(1 for q in res[100:] if q)
        if kind == pe.TREND:
            assert nonzero < 0.15 * (n - 100)
        else:
            assert nonzero == n - 100
    assert sizes[pe.TREND] * 3 < sizes[pe.LEVEL]


@pytest.mark.parametrize(
    ("field", "value"),
    [("tol", 0.0), ("tol", math.nan), ("tol", 1e16), ("alpha", 0), ("alpha", 4097), ("beta", -1),
     ("kind", 7)],
)  # fmt: skip
def test_bad_parameters_are_value_errors(field: str, value: float) -> None:
    params: dict[str, Any] = {"tol": 1.0, "alpha": 4096, "beta": 0, "kind": pe.LEVEL}
    params[field] = value
    with pytest.raises(ValueError, match="field 0"):
        IMPL.encode_block(
            array("q", [1]), array("q", [1]), array("d", [1.0]), [params["tol"]],
            [params["kind"]], [params["alpha"]], [params["beta"]], None,
        )  # fmt: skip


def test_timestamps_out_of_range_are_value_errors() -> None:
    for impl in (IMPL, PURE):
        with pytest.raises(ValueError, match="out of range"):
            impl.encode_block(
                array("q", [0, 2**62]), array("q", [0, 1]), array("d"), [], [], [], []
            )


def test_buffers_of_the_wrong_size_are_value_errors() -> None:
    args = (array("q", [1, 2]), array("q", [1, 2]))
    with pytest.raises(ValueError, match="values holds 3 values, expected 2"):
        IMPL.encode_block(*args, array("d", [1.0, 2.0, 3.0]), [1.0], [0], [4096], [0])
    with pytest.raises(ValueError, match="recon holds 1 values"):
        IMPL.encode_block(*args, array("d", [1.0, 2.0]), [1.0], [0], [4096], [0], array("d", [0.0]))
    with pytest.raises(ValueError, match="one tolerance"):
        IMPL.encode_block(*args, array("d", [1.0, 2.0]), [1.0], [0, 0], [4096], [0])


@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(-(10**9), 10**9).map(lambda i: i / 100),
            st.floats(width=32),
            st.integers(-(2**15), 2**15),
            st.just(pe.MISSING),
        ),
        max_size=60,
    )
)
def test_pack_values_is_lossless_and_the_twins_agree(values: list[float]) -> None:
    xs = array("d", values)
    packed = IMPL.pack_values(xs)
    assert packed == PURE.pack_values(xs)
    assert len(packed) <= 4 + 8 * len(xs)
    for impl in (IMPL, PURE):
        out = impl.unpack_values(packed)
        assert len(out) == len(xs)
        for x, y in zip(xs, out, strict=True):
            if math.isnan(x):  # NaN stays NaN, missing stays missing
                assert math.isnan(y) and (bits(x) == pe.MISSING_BITS) == (
                    bits(y) == pe.MISSING_BITS
                )
            else:
                assert x == y  # -0.0 may come back as 0.0


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00\x00",
        b"\x00\x00\x00\x00\x01",
        b"\x09\x00\x00\x00",
        b"\x02\x09\x00\x00\x01\x00",
        b"\x03\x00\x00\x00\x01",
    ],
)
def test_unpack_rejects_malformed_blobs(blob: bytes) -> None:
    for impl in (IMPL, PURE):
        with pytest.raises(pe.CodecError):
            impl.unpack_values(blob)


def golden_block() -> Block:
    """Fixed inputs whose coded bytes must never change: across versions, compilers and CPUs
    (run on the Pi's aarch64 as on x86-64), a change here means hubs decode history wrongly."""
    n = 500
    cols = [
        array("d", [230.0 + 3.0 * math.sin(i / 17.0) + ((i * 7919) % 13) * 0.05 for i in range(n)]),
        array("d", [((i // 25) % 4) * 1250.5 + (i % 3) for i in range(n)]),
        array("d", [12345.678 + 0.0173 * i for i in range(n)]),
        array("d", [math.nan if i % 97 == 5 else 20.0 + i * 0.01 for i in range(n)]),
    ]
    return Block(
        array("q", [1_700_000_000_000 + 1000 * i + (i % 5 == 0) for i in range(n)]),
        array("q", [7 + i + (i == 250) for i in range(n)]),
        cols,
        [0.25, 5.0, 0.0005, 0.05],
        [pe.LEVEL, pe.LEVEL, pe.TREND, pe.LEVEL],
        [2048, 4096, 4096, 3072],
        [0, 0, 1024, 0],
    )


GOLDEN = "55d80922742766188fb316ed40e6e851a6aaf1a41bdee1ee86b9a8c3c9c72558"


def test_golden_vector() -> None:
    b = golden_block()
    data_c, recons_c = b.encode(IMPL)
    data_p, _ = b.encode(PURE)
    assert data_c == data_p
    digest = hashlib.sha256(data_c + b"".join(r.tobytes() for r in recons_c)).hexdigest()
    assert digest == GOLDEN, digest
