"""Benchmark of gridlet's predictor codec against baselines and an entropy limit, on any CSV.

``python -m bench.codec --csv PATH --time-column COL[,COL2] [--time-unit auto|s|ms|iso]
--tol COL=EPS ... [--window ROWS ...]``

The time is date text in one or two columns, or Unix seconds or milliseconds (integer or
decimal) in one; ``--time-unit auto`` tells them apart on the first data row (see MS_FROM).

For each window size the rows are cut into consecutive windows of that many rows; each window
is one steady-state ``cloud_sync`` batch (schema sent by digest), and every baseline compresses
each window on its own too, as a sender would: JSON lines, gzip'd JSON, gzip'd CSV, a deadband
with float32 protobuf rows, and zstd over the codec's own quantised residuals. The limit is the
best known code length of the whole series, with no batching and no framing: per field the
shorter of an order-1 adaptive model of the quantised closed-loop residuals and gridlet's own
coder run over the whole series in one block, plus the timestamps (see compute_limit). Sizes
are bits per value (rows x fields); the run also checks the error bound by decoding every batch
and times the compiled extension against its pure-Python twin.

Per-field attribution, the same for gridlet and every baseline: a field is charged what adding
it to a window costs, i.e. the size of the window coded with the timestamps and that field alone
minus the size coded with the timestamps and no field, summed over windows. The constant costs
(timestamps, framing, coder flush, gzip and zstd headers) thus only appear in the TOTAL row, and
the per-field figures do not add up exactly to the total; under gzip a column can even cost less
than nothing (an always-empty column adds commas that the compressor happens to like). Where
gridlet's TOTAL goes is listed under each table (see wire_parts): every protobuf field of the
batches by name, and the range-coded data split into timestamps, coder flush and values.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import itertools
import json
import math
import re
import sys
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from time import perf_counter
from typing import Protocol

import zstandard

import predictor_ext as pe
from cloud_sync import DeviceSchema, Frame, decode, default_field, encode
from proto import telemetry_pb2 as pb

DEVICE = "dev"
DEFAULT_WINDOW = 600
TARGET_WINDOW = 600
TIME_FORMATS = ("%d/%m/%Y %H:%M:%S", "%m/%d/%Y %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")
ISO = "iso"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)
# --time-unit: auto, Unix seconds, Unix milliseconds, or date text (TIME_FORMATS, ISO 8601).
TIME_UNITS = ("auto", "s", "ms", ISO)
UNIX_UNITS = {"s": "seconds", "ms": "milliseconds"}
# auto reads a number below MS_FROM as Unix seconds and one at or above it as Unix ms: 1e11 s
# is the year 5138 and 1e11 ms is 1973-03-03, so only millisecond stamps before March 1973
# (or second stamps after the year 5138) need an explicit --time-unit.
MS_FROM = Decimal("1e11")
UNIX_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
MIN_MS = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // ONE_MS
MAX_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - EPOCH) // ONE_MS
# Substrings of a column name (lower case) and the unit they suggest; the first match wins.
UNIT_GUESSES = (
    ("power", "W"),
    ("volt", "V"),
    ("temp", "C"),
    ("current", "A"),
    ("intensity", "A"),
    ("irradiance", "W/m2"),
    ("metering", "Wh/min"),  # energy per interval (UCI sub-meters), not a counter
    ("energy", "Wh"),
)
JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
GZIP_LEVEL = 9
ZSTD_LEVEL = 19
# Prior of the limit model: Pb(0) and Pb(each special kind); the non-zero integers share 1/2.
PRIOR_ZERO = 0.25
PRIOR_SPECIAL = 2.0**-8
LIMIT_KS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0)
START = pe.RESIDUAL_SPECIAL * 2  # the context of a column's first symbol: no residual takes it

Metrics = dict[str, float | int | bool | str | None]
SPEED_KEYS = (
    "values_per_s_compiled",
    "values_per_s_pure",
    "decode_values_per_s_compiled",
    "decode_values_per_s_pure",
    "compiled_over_pure",
    "decode_compiled_over_pure",
)


class UsageError(Exception):
    """Bad arguments or input: reported on stderr, exit status 2."""


@dataclass(frozen=True)
class Series:
    """The CSV columns the benchmark uses, row-aligned."""

    path: str
    time_columns: tuple[str, ...]
    fields: tuple[str, ...]
    time_cells: list[list[str]]  # per row, the raw text of the time columns
    cells: list[list[str]]  # per field, the raw text of every row
    values: list[list[float | None]]  # per field; None for an empty or non-numeric cell
    ts_ms: list[int]
    non_numeric: int  # non-empty cells that were not numbers, read as missing
    time_read: str = ""  # how the time column was read, for the report

    @property
    def rows(self) -> int:
        return len(self.ts_ms)


@dataclass(frozen=True)
class Params:
    """Per-field codec parameters in the form encode_block takes them."""

    tols: list[float]
    kinds: list[int]
    alphas: list[int]
    betas: list[int]

    def subset(self, idx: Sequence[int]) -> Params:
        return Params(
            [self.tols[j] for j in idx],
            [self.kinds[j] for j in idx],
            [self.alphas[j] for j in idx],
            [self.betas[j] for j in idx],
        )


@dataclass(frozen=True)
class Block:
    """One window of rows, prebuilt as codec input, with what the baselines need."""

    start: int
    stop: int
    ts: array[int]
    seqs: array[int]
    columns: list[array[float]]
    flat: array[float]  # the columns concatenated, as encode_block takes them
    data: bytes  # encode_block of every column (compiled implementation)
    empty_size: int  # encode_block of the timestamps alone
    residuals: list[array[int]]  # closed-loop quantised residuals per field
    residual_varints: list[bytes]  # the same, zigzag varints
    sent: list[list[bool]]  # per field and row: does the deadband send this value

    @property
    def n(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Limit:
    """Whole-series code lengths in bits (see compute_limit)."""

    bits: list[float]  # per field: the shorter of order1 and codec
    order1: list[float]  # per field: the order-1 model at its best prior weight
    k: list[float]  # per field: that prior weight
    codec: list[float]  # per field: gridlet's own coder over the whole series in one block
    ts_bits: float  # the timestamps after the first, the shorter of the same two

    @property
    def total(self) -> float:
        return sum(self.bits) + self.ts_bits

    def model(self, j: int) -> str:
        return "codec" if self.codec[j] < self.order1[j] else f"order-1 k={self.k[j]:g}"


@dataclass(frozen=True)
class Speed:
    encode_compiled: float
    encode_pure: float
    decode_compiled: float
    decode_pure: float
    pure_matches_compiled: bool

    def metrics(self) -> Metrics:
        return {
            "values_per_s_compiled": self.encode_compiled,
            "values_per_s_pure": self.encode_pure,
            "decode_values_per_s_compiled": self.decode_compiled,
            "decode_values_per_s_pure": self.decode_pure,
            "compiled_over_pure": ratio(self.encode_compiled, self.encode_pure),
            "decode_compiled_over_pure": ratio(self.decode_compiled, self.decode_pure),
            "pure_matches_compiled": self.pure_matches_compiled,
        }


@dataclass(frozen=True)
class WindowResult:
    window: int
    batches: int
    total: Metrics
    fields: dict[str, Metrics]
    parts: dict[str, int]  # where gridlet's bytes go, summed over the batches (see wire_parts)
    limit_bits: float  # the limit of the whole series, values and timestamps


Sizer = Callable[[Block, Sequence[int]], int]


# ---------------------------------------------------------------------------- small helpers


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def bits_per_value(nbytes: float, count: int) -> float:
    return 8.0 * nbytes / count if count else 0.0


def varint_len(v: int) -> int:
    """Bytes of a protobuf varint; negative int64 values take 10."""
    if v < 0:
        v += 1 << 64
    n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


def zigzag_varint(v: int, out: bytearray) -> None:
    z = 2 * v if v >= 0 else -2 * v - 1
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)


def guess_unit(name: str) -> str:
    lower = name.lower()
    return next((unit for key, unit in UNIT_GUESSES if key in lower), "")


def parse_number(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def json_number(text: str, value: float | None) -> str:
    """The raw CSV text as a JSON number when it is one, else the float; null for missing."""
    if value is None or not math.isfinite(value):
        return "null"
    text = text.strip()
    return text if JSON_NUMBER.fullmatch(text) else repr(value)


def parse_time(text: str, fmt: str) -> int:
    """Milliseconds since the epoch; naive times are UTC."""
    dt = datetime.fromisoformat(text) if fmt == ISO else datetime.strptime(text, fmt)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // ONE_MS


def detect_time_format(text: str) -> str | None:
    """ISO 8601 when it reads text (fractions of a second and UTC offsets included), else the
    first of TIME_FORMATS that does; None when none does."""
    for fmt in (ISO, *TIME_FORMATS):
        try:
            parse_time(text, fmt)
        except ValueError:
            continue
        return fmt
    return None


def unix_unit(text: str) -> str | None:
    """What --time-unit auto makes of text: "s" or "ms" by its magnitude (see MS_FROM), None
    when it is not a number."""
    if not UNIX_NUMBER.fullmatch(text):
        return None
    return "ms" if abs(Decimal(text)) >= MS_FROM else "s"


def parse_unix(text: str, unit: str) -> int:
    """Milliseconds since the epoch from Unix seconds or milliseconds, integer or decimal,
    rounded to the nearest millisecond; exact (Decimal, no float on the way)."""
    if not UNIX_NUMBER.fullmatch(text):
        raise ValueError(f"not a number of Unix {UNIX_UNITS[unit]}")
    ms = Decimal(text) * (1000 if unit == "s" else 1)
    out = int(ms.to_integral_value(rounding=ROUND_HALF_EVEN))
    if not MIN_MS <= out <= MAX_MS:
        raise ValueError(f"as Unix {UNIX_UNITS[unit]}, outside the years 1 to 9999")
    return out


def read_times(
    path: str,
    columns: Sequence[str],
    cells: Sequence[Sequence[str]],
    lines: Sequence[int],
    unit: str,
) -> tuple[list[int], str]:
    """Every row's time in ms since the epoch, and how the time column was read.

    ``unit`` is the --time-unit choice. With "auto" the first data row decides: a number in a
    single time column is Unix time, seconds or milliseconds by MS_FROM; anything else is
    date text in the first format that reads it. Every later row must read the same way;
    a row that does not is a UsageError naming its row, line and cells.
    """
    stamps = [" ".join(c.strip() for c in row) for row in cells]

    def where(i: int) -> str:
        named = ", ".join(f"{c}={v!r}" for c, v in zip(columns, cells[i], strict=True))
        return f"{path}: data row {i + 1} (line {lines[i]}), time cell {named}"

    if unit in UNIX_UNITS and len(columns) != 1:
        raise UsageError(f"--time-unit {unit} reads one time column, not {','.join(columns)}")
    auto = unit == "auto"
    if auto:
        unit = (unix_unit(stamps[0]) if len(columns) == 1 else None) or ISO
    if unit in UNIX_UNITS:
        out: list[int] = []
        for i, s in enumerate(stamps):
            try:
                seen = unix_unit(s) if auto else None
                if seen is not None and seen != unit:
                    raise ValueError(
                        f"looks like Unix {UNIX_UNITS[seen]}, data row 1 like Unix "
                        f"{UNIX_UNITS[unit]} (give --time-unit to read every row one way)"
                    )
                out.append(parse_unix(s, unit))
            except ValueError as exc:
                raise UsageError(f"{where(i)}: {exc}") from exc
        return out, f"Unix {UNIX_UNITS[unit]}" + (" (auto: by magnitude)" if auto else "")
    fmt = detect_time_format(stamps[0])
    known = f"ISO 8601 or {', '.join(TIME_FORMATS)}"
    if fmt is None:
        what = "neither Unix time nor a date" if auto and len(columns) == 1 else "not a date"
        raise UsageError(f"{where(0)}: {what} in a known format ({known})")
    name = "ISO 8601" if fmt == ISO else fmt
    out = []
    for i, s in enumerate(stamps):
        try:
            out.append(parse_time(s, fmt))
        except ValueError as exc:
            raise UsageError(f"{where(i)}: not a date in data row 1's format, {name}") from exc
    return out, f"date text, {name}"


# ---------------------------------------------------------------------------- input


def read_series(
    path: str, time_columns: Sequence[str], fields: Sequence[str], time_unit: str = "auto"
) -> Series:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            rows: list[list[str]] = []
            lines: list[int] = []  # each row's line in the file, for messages
            for r in reader:
                if r:
                    rows.append(r)
                    lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    if not rows:
        raise UsageError(f"{path} holds no data rows")
    for name in (*time_columns, *fields):
        if name not in header:
            raise UsageError(f"column {name!r} is not in {path} (columns: {', '.join(header)})")
    t_idx = [header.index(c) for c in time_columns]
    f_idx = [header.index(c) for c in fields]
    width = len(header)
    for i, r in enumerate(rows):
        if len(r) < width:
            raise UsageError(
                f"{path}: data row {i + 1} (line {lines[i]}) has {len(r)} cells, header has {width}"
            )
    time_cells = [[r[k] for k in t_idx] for r in rows]
    ts_ms, time_read = read_times(path, time_columns, time_cells, lines, time_unit)
    cells = [[r[k] for r in rows] for k in f_idx]
    values = [[parse_number(c) for c in col] for col in cells]
    non_numeric = sum(
        1
        for col, vs in zip(cells, values, strict=True)
        for c, v in zip(col, vs, strict=True)
        if v is None and c.strip()
    )
    return Series(
        path,
        tuple(time_columns),
        tuple(fields),
        time_cells,
        cells,
        values,
        ts_ms,
        non_numeric,
        time_read,
    )


def build_schema(series: Series, tols: dict[str, float], units: dict[str, str]) -> DeviceSchema:
    try:
        fields = tuple(
            default_field(name, units.get(name, guess_unit(name)), tols[name])
            for name in series.fields
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return DeviceSchema(kind="bench", model=Path(series.path).stem, fields=fields)


def codec_params(schema: DeviceSchema) -> Params:
    one = pe.ALPHA_ONE
    fs = schema.fields
    return Params(
        [f.tol for f in fs],
        [pe.TREND if f.model == "trend" else pe.LEVEL for f in fs],
        [round(f.alpha * one) for f in fs],
        [round(f.beta * one) for f in fs],
    )


def build_frames(series: Series) -> list[Frame]:
    return [
        Frame(DEVICE, ts, i, row)
        for i, (ts, row) in enumerate(
            zip(series.ts_ms, zip(*series.values, strict=True), strict=True)
        )
    ]


# ---------------------------------------------------------------------------- windows


def deadband_sent(values: Sequence[float | None], tol: float) -> list[bool]:
    """Which values a deadband sender transmits: the first of the window, any that leaves the
    band around the last sent value, and any change between missing, NaN and a number (a
    missing or NaN value is sent as a NaN float, so the receiver learns the change)."""
    sent: list[bool] = []
    last: float | None = None
    last_state = "unsent"
    for x in values:
        state = "missing" if x is None else "nan" if math.isnan(x) else "number"
        send = state != last_state or (
            x is not None and last is not None and state == "number" and abs(x - last) > tol
        )
        if send:
            last, last_state = x, state
        sent.append(send)
    return sent


def concat(columns: Sequence[array[float]], idx: Sequence[int]) -> array[float]:
    """The chosen columns back to back (column-major), as encode_block takes them."""
    out = array("d")
    for j in idx:
        out.extend(columns[j])
    return out


def encode_cols(
    block: Block | tuple[array[int], array[int], list[array[float]]],
    params: Params,
    idx: Sequence[int],
    residuals: array[int] | None = None,
) -> bytes:
    ts, seqs, columns = (block.ts, block.seqs, block.columns) if isinstance(block, Block) else block
    p = params.subset(idx)
    return pe.implementation.encode_block(
        ts, seqs, concat(columns, idx), p.tols, p.kinds, p.alphas, p.betas, None, residuals
    )


def make_blocks(series: Series, params: Params, window: int) -> list[Block]:
    nf = len(series.fields)
    every = range(nf)
    blocks: list[Block] = []
    for start in range(0, series.rows, window):
        stop = min(start + window, series.rows)
        n = stop - start
        ts = array("q", series.ts_ms[start:stop])
        seqs = array("q", range(start, stop))
        columns = [
            array("d", [pe.MISSING if v is None else v for v in col[start:stop]])
            for col in series.values
        ]
        flat_res = array("q", bytes(8 * n * nf))
        raw = (ts, seqs, columns)
        data = encode_cols(raw, params, every, flat_res)
        residuals = [flat_res[j * n : (j + 1) * n] for j in every]
        empty = encode_cols(raw, params, ())
        varints: list[bytes] = []
        for res in residuals:
            out = bytearray()
            for q in res:
                zigzag_varint(q, out)
            varints.append(bytes(out))
        sent = [
            deadband_sent(col[start:stop], params.tols[j]) for j, col in enumerate(series.values)
        ]
        blocks.append(
            Block(
                start,
                stop,
                ts,
                seqs,
                columns,
                concat(columns, every),
                data,
                len(empty),
                residuals,
                varints,
                sent,
            )
        )
    return blocks


# ---------------------------------------------------------------------------- sizes


def baseline_sizers(series: Series) -> dict[str, Sizer]:
    """Bytes of one window under each baseline, for the given subset of fields."""
    heads = [f'{{"ts":{ts}' for ts in series.ts_ms]
    pieces = [
        [f",{json.dumps(name)}:{json_number(c, v)}" for c, v in zip(cells, vals, strict=True)]
        for name, cells, vals in zip(series.fields, series.cells, series.values, strict=True)
    ]
    # Field j travels as protobuf field j + 2, a fixed32 (wire type 5); field 1 is ts_ms.
    tag_len = [varint_len(((j + 2) << 3) | 5) for j in range(len(series.fields))]
    zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def json_text(b: Block, idx: Sequence[int]) -> bytes:
        lines = (
            heads[i] + "".join(pieces[j][i] for j in idx) + "}" for i in range(b.start, b.stop)
        )
        return "\n".join(lines).encode()

    def csv_text(b: Block, idx: Sequence[int]) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*series.time_columns, *(series.fields[j] for j in idx)])
        for i in range(b.start, b.stop):
            writer.writerow([*series.time_cells[i], *(series.cells[j][i] for j in idx)])
        return out.getvalue().encode()

    def deadband(b: Block, idx: Sequence[int]) -> int:
        # Each row: a length-delimited message of ts_ms (tag 1, varint) and the sent floats.
        total = 0
        for i in range(b.n):
            body = 1 + varint_len(b.ts[i])
            body += sum(tag_len[j] + 4 for j in idx if b.sent[j][i])
            total += varint_len(body) + body
        return total

    def zstd_residuals(b: Block, idx: Sequence[int]) -> int:
        # The fields' residual columns only; the TOTAL adds gridlet's own non-field bytes (see
        # evaluate_window), a field is charged zstd(its column) - zstd(nothing).
        return len(zstd.compress(b"".join(b.residual_varints[j] for j in idx)))

    def gz(text: Callable[[Block, Sequence[int]], bytes]) -> Sizer:
        return lambda b, idx: len(gzip.compress(text(b, idx), compresslevel=GZIP_LEVEL, mtime=0))

    return {
        "json": lambda b, idx: len(json_text(b, idx)),
        "gzip_json": gz(json_text),
        "gzip_csv": gz(csv_text),
        "deadband_f32_pb": deadband,
        "zstd_residual": zstd_residuals,
    }


def per_field_bytes(sizer: Sizer, blocks: Sequence[Block], nf: int) -> list[int]:
    """What each field adds to the windows' size (see the module docstring)."""
    out = [0] * nf
    for b in blocks:
        base = sizer(b, ())
        for j in range(nf):
            out[j] += sizer(b, (j,)) - base
    return out


def total_bytes(sizer: Sizer, blocks: Sequence[Block], nf: int) -> int:
    every = range(nf)
    return sum(sizer(b, every) for b in blocks)


# ---------------------------------------------------------------------------- the limit


def int_prior(s: int) -> float:
    """Pb of an integer: an Elias-gamma-like prior; sums to 3/4."""
    if s == 0:
        return PRIOR_ZERO
    k = abs(s).bit_length() - 1
    return 2.0 ** -(2 * k + 2) / 2


def prior(s: int) -> float:
    """Pb of a residual: int_prior, and PRIOR_SPECIAL for each special kind."""
    return PRIOR_SPECIAL if s >= pe.RESIDUAL_SPECIAL else int_prior(s)


def adaptive_bits(
    symbols: Sequence[int], k: float, prior_of: Callable[[int], float] = prior
) -> float:
    """Ideal code length of an order-1 model (context: the previous symbol) backed off to an
    adaptive order-0 model backed off to a fixed prior; counts updated after each symbol."""
    order0: dict[int, int] = {}
    order1: dict[int, dict[int, int]] = {}
    ctx_total: dict[int, int] = {}
    prev = START
    bits = 0.0
    for n0, s in enumerate(symbols):
        p0 = (order0.get(s, 0) + k * prior_of(s)) / (n0 + k)
        counts = order1.setdefault(prev, {})
        nc = ctx_total.get(prev, 0)
        bits -= math.log2((counts.get(s, 0) + k * p0) / (nc + k))
        counts[s] = counts.get(s, 0) + 1
        ctx_total[prev] = nc + 1
        order0[s] = order0.get(s, 0) + 1
        prev = s
    return bits


def residual_symbols(residuals: array[int]) -> list[int]:
    """The residuals without the keyframe (the column's first non-special value)."""
    special = pe.RESIDUAL_SPECIAL
    first = next((i for i, q in enumerate(residuals) if q < special), None)
    return [q for i, q in enumerate(residuals) if i != first]


def time_symbols(ts_ms: Sequence[int]) -> list[int]:
    """The timestamps after the first as the codec codes them: deltas of deltas, the first
    delta against 0."""
    out: list[int] = []
    last_delta = 0
    for a, b in itertools.pairwise(ts_ms):
        out.append(b - a - last_delta)
        last_delta = b - a
    return out


def flush_bytes() -> int:
    """What a range-coded block that codes nothing takes: the coder's flush."""
    one = array("q", [0])
    return len(pe.implementation.encode_block(one, one, array("d"), [], [], [], []))


def compute_limit(series: Series, params: Params) -> Limit:
    """The best known size of the series' information, against which gridlet's batches are
    measured. Per field, the shorter of two whole-series code lengths of the closed-loop
    residuals:

    - the ideal code length of an adaptive order-1 model (the column's keyframe aside) at the
      prior weight in LIMIT_KS that gives the lowest (k chosen knowing the data favours the
      limit);
    - what the field adds to gridlet's own range-coded block of the whole series: the same
      coder with no per-batch model restarts, no framing and no flush.

    The order-1 model alone is no limit: gridlet's coder, whose binary contexts share what
    they learn across magnitudes and zero runs, codes some columns of ../shared/data up to
    30% shorter (a sparse sub-meter, noisy DC readings), and a ratio below 1 would hide what
    batching and framing cost. The order-1 figure stays as an anchor that does not move with
    the codec (reported as limit_order1_values_bits_per_value).

    The timestamps are information every batch must deliver, so the limit counts them too
    (the first aside, like a column's keyframe): the shorter of the order-1 model over their
    deltas of deltas and gridlet's in-stream cost over the whole series (which includes the
    consecutive sequence numbers, a byte or so). Framing is never in the limit: it is part of
    what the ratio is there to show.
    """
    (whole,) = make_blocks(series, params, series.rows)
    order1: list[float] = []
    ks: list[float] = []
    codec: list[float] = []
    for j, res in enumerate(whole.residuals):
        symbols = residual_symbols(res)
        b, k = min((adaptive_bits(symbols, k), k) for k in LIMIT_KS)
        order1.append(b)
        ks.append(k)
        codec.append(8.0 * (len(encode_cols(whole, params, (j,))) - whole.empty_size))
    symbols = time_symbols(series.ts_ms)
    ts_order1 = min(adaptive_bits(symbols, k, int_prior) for k in LIMIT_KS)
    ts_codec = 8.0 * max(whole.empty_size - flush_bytes(), 0)
    bits = [min(a, b) for a, b in zip(order1, codec, strict=True)]
    return Limit(bits, order1, ks, codec, min(ts_order1, ts_codec))


# ---------------------------------------------------------------------------- checks


def value_error(orig: float | None, rec: float | None) -> float | None:
    """|rec - orig|, 0 for matching special values, None when the kinds do not match."""
    if orig is None or rec is None:
        return 0.0 if orig is None and rec is None else None
    if math.isnan(orig) or math.isinf(orig):
        same = math.isnan(rec) if math.isnan(orig) else rec == orig
        return 0.0 if same else None
    return abs(rec - orig) if math.isfinite(rec) else None


def decode_errors(
    batches: Sequence[bytes], schema: DeviceSchema, series: Series
) -> tuple[list[float], list[int]]:
    """Per field: the largest |error| over every decoded batch and the count of values whose
    kind (number, missing, NaN) did not survive."""
    nf = len(series.fields)
    known = {schema.digest(): schema}
    worst = [0.0] * nf
    bad = [0] * nf
    seen = 0
    for body in batches:
        for frame in decode(body, known).frames:
            seen += 1
            for j, rec in enumerate(frame.values):
                err = value_error(series.values[j][frame.seq], rec)
                if err is None:
                    bad[j] += 1
                elif err > worst[j]:
                    worst[j] = err
    if seen != series.rows:
        bad = [b + abs(series.rows - seen) for b in bad]
    return worst, bad


# ---------------------------------------------------------------------------- speed


def rate(
    run: Callable[[int], object], blocks: Sequence[Block], nf: int, min_s: float, whole_passes: bool
) -> tuple[float, int]:
    """Values per second of run over the blocks, cycling until min_s have passed (after whole
    passes over every block when whole_passes); also how many blocks ran."""
    values = 0
    done = 0
    elapsed = 0.0
    start = perf_counter()
    while elapsed < min_s:
        for i, b in enumerate(blocks):
            run(i)
            done += 1
            values += b.n * nf
            if not whole_passes:
                elapsed = perf_counter() - start
                if elapsed >= min_s:
                    break
        elapsed = perf_counter() - start
    return values / elapsed, done


def measure_speed(blocks: Sequence[Block], params: Params, nf: int, min_s: float) -> Speed:
    """Encode and decode speed of the loaded implementation and the pure twin, same blocks."""
    tols, kinds, alphas, betas = params.tols, params.kinds, params.alphas, params.betas
    outs = [
        (array("q", bytes(8 * b.n)), array("q", bytes(8 * b.n)), array("d", bytes(8 * b.n * nf)))
        for b in blocks
    ]
    mismatches: list[int] = []

    def encoder(fn: Callable[..., bytes], check: bool) -> Callable[[int], object]:
        def run(i: int) -> None:
            b = blocks[i]
            data = fn(b.ts, b.seqs, b.flat, tols, kinds, alphas, betas)
            if check and data != b.data:
                mismatches.append(i)

        return run

    def decoder(fn: Callable[..., None]) -> Callable[[int], object]:
        def run(i: int) -> None:
            b = blocks[i]
            ts, seqs, cols = outs[i]
            fn(b.data, b.n, b.ts[0], b.seqs[0], tols, kinds, alphas, betas, ts, seqs, cols)

        return run

    compiled, pure = pe.implementation, pe.pure
    enc_c, _ = rate(encoder(compiled.encode_block, False), blocks, nf, min_s, True)
    enc_p, _ = rate(encoder(pure.encode_block, True), blocks, nf, min_s, False)
    dec_c, _ = rate(decoder(compiled.decode_block), blocks, nf, min_s, True)
    dec_p, _ = rate(decoder(pure.decode_block), blocks, nf, min_s, False)
    return Speed(enc_c, enc_p, dec_c, dec_p, not mismatches)


# ---------------------------------------------------------------------------- where the bytes go

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5
DATA_FIELD = "data"  # the DeviceBlock field that holds the range-coded block
TS_PART = "data: timestamps, sequence numbers"
FLUSH_PART = "data: range-coder flush"
VALUES_PART = "data: values"


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A protobuf varint at buf[pos:]: its value and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if byte < 0x80:
            return value, pos


def wire_fields(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The fields of the protobuf message in buf[start:end], as (field number, start of its
    tag, start of its payload, end); the payload of a length-delimited field follows its
    length prefix."""
    out: list[tuple[int, int, int, int]] = []
    pos = start
    while pos < end:
        key, at = read_varint(buf, pos)
        wire = key & 7
        if wire == WIRE_VARINT:
            stop = read_varint(buf, at)[1]
        elif wire == WIRE_LEN:
            length, at = read_varint(buf, at)
            stop = at + length
        elif wire in (WIRE_I64, WIRE_I32):
            stop = at + (8 if wire == WIRE_I64 else 4)
        else:
            raise ValueError(f"unexpected wire type {wire} at byte {pos}")
        out.append((key >> 3, pos, at, stop))
        pos = stop
    if pos != end:
        raise ValueError("a field runs past the end of its message")
    return out


Parts = dict[str, tuple[tuple[int, ...], int]]  # name: (place in the message, bytes)


class FieldDesc(Protocol):
    """What wire_parts reads of a protobuf field descriptor (python or upb)."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> int: ...
    @property
    def message_type(self) -> MessageDesc | None: ...


class MessageDesc(Protocol):
    """What wire_parts reads of a protobuf message descriptor (python or upb)."""

    @property
    def name(self) -> str: ...
    @property
    def fields_by_number(self) -> Mapping[int, FieldDesc]: ...


def wire_parts(body: bytes, block: Block, flush: int, into: Parts | None = None) -> Parts:
    """Where the bytes of one encoded batch go, added to ``into``: each protobuf field by its
    name in telemetry.proto (tag, length prefix and payload), a sub-message's own tag and
    length apart from its fields; and the range-coded block of ``block`` split by what adding
    each part costs: the timestamps and sequence numbers (the block with no field, less the
    flush), the coder's flush (a block that codes nothing) and the values (the rest). Each
    part keeps its place in the message (field numbers), to list them in wire order."""
    parts: Parts = {} if into is None else into

    def add(name: str, place: tuple[int, ...], n: int) -> None:
        parts[name] = (place, parts.get(name, (place, 0))[1] + n)

    def walk(desc: MessageDesc, start: int, end: int, outer: tuple[int, ...]) -> None:
        for number, at, payload, stop in wire_fields(body, start, end):
            fd = desc.fields_by_number.get(number)
            name = f"{desc.name}.{fd.name if fd else f'#{number}'}"
            place = (*outer, number)
            sub = fd.message_type if fd is not None else None
            if sub is not None:
                add(f"{name}: tag, length", (*place, 0), payload - at)
                walk(sub, payload, stop, place)
            elif fd is not None and fd.name == DATA_FIELD and body[payload:stop] == block.data:
                add(f"{name}: tag, length", (*place, 0), payload - at)
                add(TS_PART, (*place, 1), block.empty_size - flush)
                add(FLUSH_PART, (*place, 2), flush)
                add(VALUES_PART, (*place, 3), len(block.data) - block.empty_size)
            else:
                add(name, place, stop - at)

    walk(pb.Batch.DESCRIPTOR, 0, len(body), ())
    return parts


# ---------------------------------------------------------------------------- one window size


def size_metrics(sizes: dict[str, float], limit_bits: float, count: int) -> Metrics:
    """The bits-per-value keys shared by the TOTAL row and the field rows."""
    bpv = {key: bits_per_value(v, count) for key, v in sizes.items()}
    gridlet = bpv.pop("gridlet")
    limit = limit_bits / count if count else 0.0
    metrics: Metrics = {"bits_per_value": gridlet, "limit_bits_per_value": limit}
    metrics.update({f"{key}_bits_per_value": v for key, v in bpv.items()})
    metrics["ratio_to_limit"] = ratio(gridlet, limit)
    metrics["json_ratio"] = ratio(bpv["json"], gridlet)
    return metrics


def evaluate_window(
    series: Series,
    schema: DeviceSchema,
    frames: Sequence[Frame],
    limit: Limit,
    *,
    window: int,
    min_s: float,
) -> WindowResult:
    params = codec_params(schema)
    nf = len(series.fields)
    rows = series.rows
    blocks = make_blocks(series, params, window)
    digest = schema.digest()
    batches = [
        encode(
            frames[b.start : b.stop],
            {DEVICE: schema},
            node_id="bench",
            batch_id=i,
            created_ms=b.ts[0],
            known_schemas={digest},
        )
        for i, b in enumerate(blocks)
    ]
    sizers = baseline_sizers(series)

    def codec_size(b: Block, idx: Sequence[int]) -> int:
        return len(encode_cols(b, params, idx))

    field_sizes: dict[str, list[int]] = {"gridlet": per_field_bytes(codec_size, blocks, nf)}
    field_sizes.update({k: per_field_bytes(s, blocks, nf) for k, s in sizers.items()})
    # What a batch costs beyond coding its field columns: protobuf framing, schema digest,
    # timestamps, sequence numbers and the coder flush. The zstd baseline pays the same, so
    # that it is compared on the field columns only.
    overhead = sum(
        len(body) - (len(b.data) - b.empty_size) for body, b in zip(batches, blocks, strict=True)
    )
    flush = flush_bytes()
    placed: Parts = {}
    for body, b in zip(batches, blocks, strict=True):
        wire_parts(body, b, flush, placed)
    parts = {name: n for name, (_, n) in sorted(placed.items(), key=lambda item: item[1][0])}
    totals: dict[str, float] = {"gridlet": sum(len(body) for body in batches)}
    assert sum(parts.values()) == totals["gridlet"]
    totals.update({k: total_bytes(s, blocks, nf) for k, s in sizers.items()})
    totals["zstd_residual"] += overhead

    worst, bad = decode_errors(batches, schema, series)
    speed = measure_speed(blocks, params, nf, min_s).metrics()
    fields: dict[str, Metrics] = {}
    for j, f in enumerate(schema.fields):
        m = size_metrics({k: v[j] for k, v in field_sizes.items()}, limit.bits[j], rows)
        m.update(
            unit=f.unit,
            model=f.model,
            tol=f.tol,
            deadband_sent_fraction=sum(sum(b.sent[j]) for b in blocks) / rows if rows else 0.0,
            max_abs_error=worst[j],
            max_error_over_tol=worst[j] / f.tol,
            missing_mismatches=bad[j],
            max_abs_error_within_tol=worst[j] <= f.tol and bad[j] == 0,
        )
        m.update(speed)
        fields[f.name] = m
    total = size_metrics(totals, limit.total, rows * nf)
    total.update(
        rows=rows,
        field_count=nf,
        batches=len(blocks),
        timestamp_overhead_bits_per_value=bits_per_value(overhead, rows * nf),
        limit_models=", ".join(f"{f.name}: {limit.model(j)}" for j, f in enumerate(schema.fields)),
        limit_timestamps_bits_per_value=limit.ts_bits / (rows * nf) if rows * nf else 0.0,
        limit_order1_values_bits_per_value=sum(limit.order1) / (rows * nf) if rows * nf else 0.0,
        ratio_to_order1=ratio(totals["gridlet"] * 8, sum(limit.order1)),
        max_error_over_tol=max((worst[j] / f.tol for j, f in enumerate(schema.fields)), default=0),
        missing_mismatches=sum(bad),
        max_abs_error_within_tol=all(m["max_abs_error_within_tol"] for m in fields.values()),
        compiled=pe.compiled,
    )
    total.update(speed)
    return WindowResult(window, len(blocks), total, fields, parts, limit.total)


# ---------------------------------------------------------------------------- output

TABLE_COLUMNS = (
    ("gridlet b/v", "bits_per_value"),
    ("limit b/v", "limit_bits_per_value"),
    ("ratio to limit", "ratio_to_limit"),
    ("json b/v", "json_bits_per_value"),
    ("gzip-json b/v", "gzip_json_bits_per_value"),
    ("gzip-csv b/v", "gzip_csv_bits_per_value"),
    ("deadband-f32-pb b/v", "deadband_f32_pb_bits_per_value"),
    ("zstd-residual b/v", "zstd_residual_bits_per_value"),
    ("max err / tol", "max_error_over_tol"),
)


RATIO_KEYS = frozenset(
    (
        "ratio_to_limit",
        "ratio_to_order1",
        "json_ratio",
        "compiled_over_pure",
        "decode_compiled_over_pure",
    )
)


def cell(m: Metrics, key: str) -> str:
    v = m.get(key)
    if key == "max_error_over_tol" and m.get("missing_mismatches"):
        return f"{v:.3f}!MISSING" if isinstance(v, float) else "MISSING"
    if v is None:
        return "-"
    if key in RATIO_KEYS and isinstance(v, float):
        return f"{v:.2f}x"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def aligned(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([line(header), *(line(r) for r in rows)])


def format_table(result: WindowResult) -> str:
    header = ["field", *(title for title, _ in TABLE_COLUMNS)]
    rows = [
        [name, *(cell(m, key) for _, key in TABLE_COLUMNS)]
        for name, m in [*result.fields.items(), ("TOTAL", result.total)]
    ]
    return aligned(header, rows)


def mega(v: float | int | bool | str | None) -> str:
    return f"{v / 1e6:.2f}" if isinstance(v, float) else "-"


def format_speed(total: Metrics) -> list[str]:
    out = []
    for what, prefix in (("encode", ""), ("decode", "decode_")):
        c = total[f"{prefix}values_per_s_compiled"]
        p = total[f"{prefix}values_per_s_pure"]
        r = total[f"{prefix}compiled_over_pure"]
        rs = f"{r:.1f}" if isinstance(r, float) else "-"
        out.append(f"{what}: compiled {mega(c)} Mvalues/s, pure {mega(p)} Mvalues/s, ratio {rs}")
    if not pe.compiled:
        out.append("NOTE: predictor_ext is NOT compiled: the 'compiled' figures are the pure twin")
    if not total["pure_matches_compiled"]:
        out.append("WARNING: the pure twin's bytes differ from the compiled implementation's")
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def format_checks(result: WindowResult) -> list[str]:
    t = result.total
    r = t["ratio_to_limit"]
    jr = t["json_ratio"]
    cp = t["compiled_over_pure"]
    dcp = t["decode_compiled_over_pure"]
    enc, dec = t["values_per_s_compiled"], t["decode_values_per_s_compiled"]
    size_ok = isinstance(r, float) and r <= 1.5
    json_ok = isinstance(jr, float) and jr >= 25
    ratio_ok = isinstance(cp, float) and isinstance(dcp, float) and min(cp, dcp) >= 30
    fast = isinstance(enc, float) and isinstance(dec, float) and min(enc, dec) >= 20e6
    note = "" if pe.compiled else " (NOT compiled: pure twin measured against itself)"
    return [
        f"target size (window {result.window}): gridlet <= 1.5x limit: {verdict(size_ok)} "
        f"(ratio {cell(t, 'ratio_to_limit')}; to the order-1 model of the values alone, the "
        f"limit before it counted the codec and the timestamps: {cell(t, 'ratio_to_order1')})",
        f"gridlet >= 25x smaller than JSON: {verdict(json_ok)} (ratio {cell(t, 'json_ratio')})",
        f"speed: compiled >= 30x pure: {verdict(ratio_ok and pe.compiled)} "
        f"(encode {cell(t, 'compiled_over_pure')}, decode {cell(t, 'decode_compiled_over_pure')})"
        + note,
        f"compiled >= 20M values/s encode and decode: {verdict(fast and pe.compiled)} "
        f"(encode {mega(enc)}M, decode {mega(dec)}M)" + note,
        "error bound: every value within tol, missing kept: "
        + verdict(bool(t["max_abs_error_within_tol"])),
    ]


def format_parts(result: WindowResult, values: int) -> str:
    """Where gridlet's bytes go at one window size, per batch on average, and the limit's
    share of a batch for comparison."""
    total = sum(result.parts.values())
    n = result.batches
    header = ["part", "bytes/batch", "bits/value", "share"]
    rows = [
        [
            name,
            f"{nbytes / n:.2f}",
            f"{bits_per_value(nbytes, values):.3f}",
            f"{nbytes / total:.1%}",
        ]
        for name, nbytes in result.parts.items()
    ]
    rows.append(["all parts", f"{total / n:.2f}", f"{bits_per_value(total, values):.3f}", "100%"])
    lb = result.limit_bits
    rows.append(["limit (values, timestamps)", f"{lb / 8 / n:.2f}", f"{lb / values:.3f}", ""])
    return aligned(header, rows)


def report(series: Series, results: Sequence[WindowResult]) -> str:
    nf = len(series.fields)
    t = results[0].total
    lines = [
        f"csv: {series.path}: {series.rows} rows x {nf} fields = {series.rows * nf} values; "
        f"time read as {series.time_read}; predictor_ext compiled: {pe.compiled}",
        "limit: whole series, no batching or framing: per field the shorter of an order-1 "
        "adaptive model of the closed-loop residuals (best prior weight k of "
        f"{LIMIT_KS}) and gridlet's own coder in one block; plus the timestamps "
        f"({cell(t, 'limit_timestamps_bits_per_value')} b/v). Per field: {t['limit_models']}",
        f"order-1 model alone (the limit before it counted the codec and the timestamps): "
        f"{cell(t, 'limit_order1_values_bits_per_value')} b/v",
    ]
    if series.non_numeric:
        lines.append(f"note: {series.non_numeric} non-numeric cells were read as missing")
    for res in results:
        lines += ["", f"window {res.window} rows ({res.batches} batches)", format_table(res)]
        lines += ["", "where gridlet's bytes go:", format_parts(res, series.rows * nf)]
        lines += format_speed(res.total)
    target = next((r for r in results if r.window == TARGET_WINDOW), results[-1])
    return "\n".join([*lines, "", *format_checks(target)])


def to_json(series: Series, results: Sequence[WindowResult]) -> str:
    largest = max(results, key=lambda r: r.window)
    doc = {
        "csv": series.path,
        "window": largest.window,
        "total": largest.total,
        "fields": largest.fields,
        "parts_bytes": largest.parts,
        "windows": {
            str(r.window): {"total": r.total, "fields": r.fields, "parts_bytes": r.parts}
            for r in results
        },
    }
    return json.dumps(doc, indent=2)


# ---------------------------------------------------------------------------- command line


def assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected COL=VALUE, got {text!r}")
    return name, value


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of rows, got {text!r}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split("\n")[0])
    p.add_argument("--csv", required=True, help="the CSV file")
    p.add_argument("--time-column", required=True, help="COL, or COL1,COL2 joined by a space")
    p.add_argument(
        "--time-unit",
        choices=TIME_UNITS,
        default="auto",
        help="how to read the time: Unix seconds (s) or milliseconds (ms), integer or decimal, "
        "in one column; or date text (iso: ISO 8601, else one of "
        # argparse %-formats help texts: the strptime formats need their % doubled
        f"{', '.join(TIME_FORMATS).replace('%', '%%')}). auto (default) decides on the first "
        f"data row: a number below {MS_FROM:.0e} is seconds, from it on milliseconds; "
        "anything else is date text",
    )
    p.add_argument(
        "--tol",
        action="append",
        type=assignment,
        default=[],
        metavar="COL=EPS",
        help="a field to code and its tolerance (repeat)",
    )
    p.add_argument(
        "--unit",
        action="append",
        type=assignment,
        default=[],
        metavar="COL=UNIT",
        help="a field's unit (default: guessed from its name)",
    )
    p.add_argument(
        "--window",
        action="append",
        type=positive_int,
        metavar="ROWS",
        help=f"rows per batch (repeat; default {DEFAULT_WINDOW})",
    )
    p.add_argument(
        "--speed-seconds",
        type=float,
        default=0.5,
        help="minimum time of each speed measurement (default 0.5)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    return p


def keyed(pairs: Sequence[tuple[str, str]], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            raise UsageError(f"{what} for {name!r} is given twice")
        out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if not args.tol:
            raise UsageError("give at least one field with --tol COL=EPS")
        tol_text = keyed(args.tol, "--tol")
        units = keyed(args.unit, "--unit")
        tols: dict[str, float] = {}
        for name, text in tol_text.items():
            try:
                tols[name] = float(text)
            except ValueError as exc:
                raise UsageError(f"--tol {name}={text}: not a number") from exc
        if extra := sorted(set(units) - set(tols)):
            raise UsageError(f"--unit names columns without --tol: {', '.join(extra)}")
        time_columns = [c.strip() for c in args.time_column.split(",")]
        series = read_series(args.csv, time_columns, list(tols), args.time_unit)
        schema = build_schema(series, tols, units)
    except UsageError as exc:
        print(f"bench.codec: error: {exc}", file=sys.stderr)
        return 2
    windows = sorted(set(args.window or [DEFAULT_WINDOW]))
    frames = build_frames(series)
    limit = compute_limit(series, codec_params(schema))
    results = [
        evaluate_window(series, schema, frames, limit, window=w, min_s=args.speed_seconds)
        for w in windows
    ]
    print(to_json(series, results) if args.json else report(series, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
