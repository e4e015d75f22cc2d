"""Chained blocks: a series coded a few rows at a time, each block continuing from the state
the one before left, on the compiled extension and the pure twin."""

from __future__ import annotations

import random
import sys
from array import array
from types import ModuleType

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import predictor_ext as pe

from .test_codec import Block, bits, blocks, within

PURE = pe.pure
IMPL = pe.implementation
BOTH = pytest.mark.parametrize("impl", [IMPL, PURE], ids=["compiled", "pure"])
JUNK = 2**62  # what a caller might pass as first_ts / first_seq of a continued block


def chunk(b: Block, i: int, j: int) -> Block:
    """Rows [i, j) of b as a block of their own."""
    cols = [col[i:j] for col in b.columns]
    return Block(b.ts[i:j], b.seqs[i:j], cols, b.tols, b.kinds, b.alphas, b.betas)


def encode(impl: ModuleType, b: Block, state: bytearray | None) -> tuple[bytes, array[float]]:
    recon = array("d", bytes(8 * b.n * len(b.columns)))
    data = impl.encode_block(
        b.ts, b.seqs, b.flat(), b.tols, b.kinds, b.alphas, b.betas, recon, None, state
    )
    return data, recon


def decode(
    impl: ModuleType, b: Block, data: bytes, state: bytearray | None, first: tuple[int, int]
) -> tuple[array[int], array[int], array[float]]:
    n = b.n
    ts = array("q", bytes(8 * n))
    seqs = array("q", bytes(8 * n))
    flat = array("d", bytes(8 * n * len(b.columns)))
    impl.decode_block(
        data, n, first[0], first[1], b.tols, b.kinds, b.alphas, b.betas, ts, seqs, flat, state
    )
    return ts, seqs, flat


def firsts(b: Block, warm: bool) -> tuple[int, int]:
    """The first timestamp and seq a cold block needs outside; junk once the state is warm."""
    if warm or not b.n:
        return JUNK, JUNK
    return b.ts[0], b.seqs[0]


@st.composite
def split(draw: st.DrawFn, max_rows: int = 80) -> tuple[Block, list[int]]:
    """A series and the row counts of the consecutive chunks it is sent in (some empty)."""
    b = draw(blocks(max_rows=max_rows, max_fields=3))
    sizes = []
    left = b.n
    while left:
        k = draw(st.integers(0, min(left, 12)))
        sizes.append(k)
        left -= k
    return b, sizes


def chunks(b: Block, sizes: list[int]) -> list[Block]:
    out = []
    i = 0
    for k in sizes:
        out.append(chunk(b, i, i + k))
        i += k
    return out


@given(split())
def test_chained_chunks_round_trip_and_the_twins_agree(case: tuple[Block, list[int]]) -> None:
    """Chunk by chunk, with one carried state per side: every value decodes to the encoder's
    reconstruction bit for bit and lies within tolerance; compiled and pure give the same
    bytes, decode each other's output and end in the same states as the encoder."""
    b, sizes = case
    nf = len(b.columns)
    enc = {IMPL: IMPL.new_state(nf), PURE: PURE.new_state(nf)}
    dec = {IMPL: IMPL.new_state(nf), PURE: PURE.new_state(nf)}
    assert enc[IMPL] == enc[PURE]
    warm = False
    for c in chunks(b, sizes):
        data, recon = encode(IMPL, c, enc[IMPL])
        data_p, recon_p = encode(PURE, c, enc[PURE])
        assert data == data_p
        assert recon.tobytes() == recon_p.tobytes()
        first = firsts(c, warm)
        warm = warm or c.n > 0
        for impl, blob in ((PURE, data), (IMPL, data_p)):  # each decodes the other's output
            ts, seqs, flat = decode(impl, c, blob, dec[impl], first)
            assert ts == c.ts
            assert seqs == c.seqs
            assert flat.tobytes() == recon.tobytes()
        for j, col in enumerate(c.columns):
            for i, x in enumerate(col):
                y = recon[j * c.n + i]
                assert within(x, y, c.tols[j]), (j, i, x, y, c.tols[j])
        assert enc[IMPL] == enc[PURE] == dec[IMPL] == dec[PURE]


@given(blocks(max_rows=40, max_fields=3))
def test_a_fresh_state_codes_a_keyframe(b: Block) -> None:
    """A fresh state changes nothing in the block itself; it only records where it ended."""
    nf = len(b.columns)
    for impl in (IMPL, PURE):
        plain, recon = encode(impl, b, None)
        state = impl.new_state(nf)
        data, recon_s = encode(impl, b, state)
        assert data == plain
        assert recon_s.tobytes() == recon.tobytes()
        dec_state = impl.new_state(nf)
        first = firsts(b, False)
        with_state = decode(impl, b, data, dec_state, first)
        without = decode(impl, b, data, None, first)
        assert [a.tobytes() for a in with_state] == [a.tobytes() for a in without]
        assert state == dec_state
        assert (state == impl.new_state(nf)) == (b.n == 0)  # an empty block leaves it as it was


def test_the_golden_block_is_the_same_with_a_fresh_state() -> None:
    from .test_codec import golden_block

    b = golden_block()
    for impl in (IMPL, PURE):
        assert encode(impl, b, impl.new_state(len(b.columns)))[0] == encode(impl, b, None)[0]


@BOTH
def test_states_of_the_wrong_shape_are_rejected(impl: ModuleType) -> None:
    b = Block(
        array("q", [1, 2]), array("q", [1, 2]), [array("d", [1.0, 2.0])], [0.1], [pe.LEVEL],
        [4096], [0],
    )  # fmt: skip
    for bad in (
        impl.new_state(2),
        impl.new_state(0),
        impl.new_state(1)[:-8],
        bytearray(len(impl.new_state(1))),
    ):
        with pytest.raises(ValueError, match="state"):
            encode(impl, b, bad)
        with pytest.raises(ValueError, match="state"):
            decode(impl, b, encode(impl, b, None)[0], bad, (1, 1))
    with pytest.raises(TypeError):
        encode(impl, b, bytes(impl.new_state(1)))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        impl.new_state(-1)


def test_a_state_is_either_rejected_or_used_alike_whatever_its_words() -> None:
    """The compiled coder indexes its contexts with the state's words unchecked, and a zero
    probability would never renormalise: a state no coding can leave must be turned away,
    and any other must give the same bytes in both twins."""
    b = Block(
        array("q", [1, 2]), array("q", [1, 2]), [array("d", [1.0, 2.0])], [0.1], [pe.TREND],
        [4096], [2048],
    )  # fmt: skip
    good = IMPL.new_state(1)
    encode(IMPL, b, good)
    rejected = 0
    for word in range(len(good) // 8):
        for value in (-1, 7, 2**60):
            bad = bytearray(good)
            bad[8 * word : 8 * word + 8] = value.to_bytes(8, sys.byteorder, signed=True)
            out = []
            for impl in (IMPL, PURE):
                try:
                    out.append(encode(impl, b, bytearray(bad))[0])
                except ValueError as exc:
                    assert "state" in str(exc)
                    out.append(b"rejected")
            assert out[0] == out[1], (word, value)
            rejected += out[0] == b"rejected"
    assert rejected > 0.9 * 3 * len(good) // 8  # the context probabilities are most of it


@given(split(max_rows=40), st.data())
def test_a_corrupt_chained_block_raises_and_leaves_the_state(
    case: tuple[Block, list[int]], data: st.DataObject
) -> None:
    b, sizes = case
    parts = [c for c in chunks(b, sizes) if c.n]
    assume(len(parts) >= 2)
    nf = len(b.columns)
    enc_state = IMPL.new_state(nf)
    coded = [encode(IMPL, c, enc_state)[0] for c in parts]
    k = data.draw(st.integers(1, len(parts) - 1))
    raw = bytearray(coded[k])
    op = data.draw(st.integers(0, 2))
    if op == 0:  # the range coder's length always tells a truncation or an extension
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == 1:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    else:  # a flipped byte may go unnoticed, but must not crash or corrupt the state
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    for impl in (IMPL, PURE):
        dec_state = impl.new_state(nf)
        for j in range(k):
            decode(impl, parts[j], coded[j], dec_state, firsts(parts[j], j > 0))
        before = bytes(dec_state)
        try:
            decode(impl, parts[k], bytes(raw), dec_state, firsts(parts[k], True))
        except pe.CodecError:
            assert bytes(dec_state) == before
        else:
            assert op == 2
            assert len(dec_state) == len(before)


@BOTH
def test_a_failed_encode_leaves_the_state(impl: ModuleType) -> None:
    b = Block(
        array("q", [1, 2, 3]), array("q", [1, 2, 3]), [array("d", [1.0, 2.0, 3.0])], [0.1],
        [pe.LEVEL], [4096], [0],
    )  # fmt: skip
    state = impl.new_state(1)
    encode(impl, b, state)
    before = bytes(state)
    bad = Block(
        array("q", [4, 2**62]), array("q", [4, 5]), [array("d", [4.0, 5.0])], [0.1], [pe.LEVEL],
        [4096], [0],
    )  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):
        encode(impl, bad, state)
    assert bytes(state) == before


def test_chained_small_blocks_cost_far_less_than_small_keyframes() -> None:
    """Live uploads: 5 rows every 5 s. Carrying the models and predictors must save most of
    what restarting them costs."""
    rng = random.Random(20240601)
    nf, n, rows = 8, 300, 5
    cols = []
    for _ in range(nf):
        x = rng.uniform(-100, 100)
        col = []
        for _ in range(n):
            x += rng.gauss(0, 0.05)
            col.append(x)
        cols.append(array("d", col))
    b = Block(
        array("q", range(1_700_000_000_000, 1_700_000_000_000 + 1000 * n, 1000)),
        array("q", range(n)), cols, [0.01] * nf, [pe.LEVEL] * nf, [4096] * nf, [0] * nf,
    )  # fmt: skip
    state = IMPL.new_state(nf)
    parts = [chunk(b, i, i + rows) for i in range(0, n, rows)]
    chained = sum(len(encode(IMPL, c, state)[0]) for c in parts)
    keyframes = sum(len(encode(IMPL, c, None)[0]) for c in parts)
    assert chained < 0.6 * keyframes, (chained, keyframes)


def test_a_column_of_only_special_values_starts_its_predictor_later() -> None:
    """A field that has had no number yet carries no prediction: its first number, blocks
    later, is coded against none, on both sides alike."""
    nan = float("nan")
    series = [nan, pe.MISSING, nan, 5.0, 5.1, nan, 5.2]
    nf = 1
    enc_state = IMPL.new_state(nf)
    dec_state = IMPL.new_state(nf)
    pure_state = PURE.new_state(nf)
    for i in range(0, len(series), 2):
        xs = series[i : i + 2]
        b = Block(
            array("q", range(i, i + len(xs))), array("q", range(i, i + len(xs))),
            [array("d", xs)], [0.01], [pe.TREND], [2048], [1024],
        )  # fmt: skip
        data, recon = encode(IMPL, b, enc_state)
        _, _, flat = decode(IMPL, b, data, dec_state, firsts(b, i > 0))
        assert [bits(v) for v in flat] == [bits(v) for v in recon]
        assert data == encode(PURE, b, pure_state)[0]
    assert enc_state == dec_state == pure_state
