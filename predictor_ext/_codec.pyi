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
) -> bytes:
    """Code n rows of nf fields: ``ts`` and ``seqs`` int64 buffers of n values (|v| < 2**59),
    ``values`` a float64 buffer of nf * n values, column-major (field j at [j*n, (j+1)*n));
    per field its tolerance, model kind and smoothing factors. ``recon`` (float64) and
    ``residuals`` (int64), buffers of nf * n values, receive the reconstructions and the
    quantised residuals when given. Raises ValueError for parameters or sizes that do not fit."""

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
) -> None:
    """Decode n rows coded by encode_block into preallocated writable buffers (ts, seqs: n
    int64; values: nf * n float64, column-major). Raises CodecError for corrupt or truncated
    data, ValueError for bad parameters or buffer sizes."""

def reconstruct(r: int, step: float) -> float:
    """The value a fixed-point predictor state stands for."""

def pack_values(xs: Buffer) -> bytes:
    """Pack one frame's float64 values (MISSING for missing) losslessly: as small integers
    with a common decimal scale, or as float32, whenever that gives back every value bit for
    bit (-0.0 becomes 0.0, NaN payloads are not kept); float64 otherwise."""

def unpack_values(blob: bytes) -> array[float]:
    """The values pack_values packed; CodecError for a malformed blob."""
