"""Typed API of the predictor codec (the Cython extension and its pure twin alike)."""

from array import array
from collections.abc import Sequence

from typing_extensions import Buffer

from ._errors import CodecError as CodecError

ALPHA_ONE: int
"""Smoothing factors are integers n / ALPHA_ONE, 1 <= n <= ALPHA_ONE; ALPHA_ONE is a deadband."""
LEVEL: int
"""Model kind: simple exponential smoothing of the level."""
TREND: int
"""Model kind: Holt's level and trend, for counters."""
MISSING: float
"""A NaN with a payload of its own that stands for a missing value in float64 columns."""
MISSING_BITS: int
RESIDUAL_SPECIAL: int
"""Residual outputs hold RESIDUAL_SPECIAL + kind for NaN (0), missing (1), +inf (2), -inf (3)
and values outside the integer range, sent raw (4)."""

def new_state(nf: int) -> bytearray:
    """A cold coder state for a device with ``nf`` fields, for a chain of blocks: pass it to
    every encode_block (or, a state of its own, every decode_block) of the chain. The first
    block is a keyframe, byte for byte what ``state=None`` gives; each later one continues
    where the last left off (context models, predictors, last timestamp and seq). Opaque, and
    only for this process: it is never sent or stored. ValueError for nf < 0."""

def encode_block(
    ts: Buffer,
    seqs: Buffer,
    values: Buffer,
    tols: Sequence[float],
    kinds: Sequence[int],
    alphas: Sequence[int],
    betas: Sequence[int],
    recon: Buffer | None = None,
    residuals: Buffer | None = None,
    state: bytearray | None = None,
) -> bytes:
    """Code n rows of nf fields: ``ts`` and ``seqs`` int64 buffers of n values (|v| < 2**59),
    ``values`` a float64 buffer of nf * n values, column-major (field j at [j*n, (j+1)*n));
    per field its tolerance, model kind and smoothing factors. ``recon`` (float64) and
    ``residuals`` (int64), buffers of nf * n values, receive the reconstructions and the
    quantised residuals when given. Raises ValueError for parameters or sizes that do not fit.

    Without ``state`` (or with a fresh one) the block is a keyframe and its first timestamp
    and seq travel outside it. With a state (new_state) that has seen a row, the block
    continues from it and carries its first timestamp and seq itself. On success the state is
    updated in place to the block's end; on any exception it is left as it was. ValueError
    (TypeError if not a bytearray) for a state that is not new_state(nf)'s or a descendant."""

def decode_block(
    data: bytes,
    n: int,
    first_ts: int,
    first_seq: int,
    tols: Sequence[float],
    kinds: Sequence[int],
    alphas: Sequence[int],
    betas: Sequence[int],
    ts: Buffer,
    seqs: Buffer,
    values: Buffer,
    state: bytearray | None = None,
) -> None:
    """Decode n rows coded by encode_block into preallocated writable buffers (ts, seqs: n
    int64; values: nf * n float64, column-major). Raises CodecError for corrupt or truncated
    data, ValueError for bad parameters or buffer sizes.

    ``state`` is the decoder's own state of a chain, updated in place on success (then equal
    to the encoder's) and left as it was on any exception. Once it has seen a row,
    ``first_ts`` and ``first_seq`` are ignored (pass 0): the block carries them."""

def bucket_stats(
    ts: Buffer, values: Buffer, n: int, nf: int, bucket_ms: int
) -> tuple[array[int], array[float]]:
    """Rollup statistics: rows grouped by bucket start ``ts // bucket_ms * bucket_ms`` (ms,
    floor division; ``ts`` an int64 buffer of n values, |ts| < 2**59, in any order), ``values``
    a float64 buffer of nf * n values, column-major. Returns the bucket starts ascending and,
    per bucket and per field, count, min, avg, max (4 float64) of the field's finite values:
    the sum added in row order from 0.0, min and max keeping the first of equal values (so
    bit for bit Python's ``min``, ``max`` and CPython 3.11's ``sum``); (0, MISSING, MISSING,
    MISSING) for a field with none. ValueError for sizes that do not match, bucket_ms < 1 or
    timestamps out of range."""

def reconstruct(r: int, step: float) -> float:
    """The value a fixed-point predictor state stands for."""

def pack_values(xs: Buffer) -> bytes:
    """Pack one frame's float64 values (MISSING for missing) losslessly: as small integers
    with a common decimal scale, or as float32, whenever that gives back every value bit for
    bit (-0.0 becomes 0.0, NaN payloads are not kept); float64 otherwise."""

def unpack_values(blob: bytes) -> array[float]:
    """The values pack_values packed; CodecError for a malformed blob."""

def merge_stats(blob: bytes, nparts: int, nf: int) -> bytes:
    """Combine ``nparts`` stats blobs of ``nf`` fields (count, min, avg, max per field, as
    bucket_stats makes them), concatenated in ``blob``, into one: counts added, the smallest
    min and largest max, averages weighted by count (summed in part order). ValueError for a
    blob of the wrong size."""
