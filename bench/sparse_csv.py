"""Writes bench.codec's sparse, steady input: one UCI sub-meter with Unix-second timestamps.

``python -m bench.sparse_csv --source UCI_CSV [--column Sub_metering_1] --out PATH``

A sub-metered circuit that is off most of the day: in the UCI excerpt the kitchen sub-meter
(``Sub_metering_1``, Wh per minute) reads 0 in 95% of the minutes. There the values cost
least and what every batch carries besides them (framing, schema reference, timestamps, the
coder's flush) weighs most. The cells are copied as they are; the date and time become Unix
seconds (naive times read as UTC, as bench.codec reads them), so the run also exercises
``--time-unit s``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.codec import UsageError, read_series

TIME_COLUMN = "unix_s"


def unix_seconds(ts_ms: int) -> str:
    """Milliseconds since the epoch as Unix seconds, a decimal only when needed."""
    sign = "-" if ts_ms < 0 else ""
    s, ms = divmod(abs(ts_ms), 1000)
    return f"{sign}{s}.{ms:03d}" if ms else f"{sign}{s}"


def write_sparse_csv(
    source: str, column: str, out: str, time_columns: Sequence[str] = ("Date", "Time")
) -> int:
    """Write ``unix_s,<column>`` rows from the source CSV; returns the number of rows."""
    series = read_series(source, time_columns, [column])
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow([TIME_COLUMN, column])
            for ts, text in zip(series.ts_ms, series.cells[0], strict=True):
                writer.writerow([unix_seconds(ts), text])
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc}") from exc
    return series.rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sparse_csv", description=__doc__)
    p.add_argument("--source", required=True, help="the UCI household power CSV")
    p.add_argument("--column", default="Sub_metering_1", help="the sub-meter to copy")
    p.add_argument("--time-column", default="Date,Time", help="the source's time column(s)")
    p.add_argument("--out", required=True, help="the CSV to write")
    args = p.parse_args(argv)
    time_columns = [c.strip() for c in args.time_column.split(",")]
    try:
        rows = write_sparse_csv(args.source, args.column, args.out, time_columns)
    except UsageError as exc:
        print(f"bench.sparse_csv: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {rows} rows of {args.column} with Unix-second times to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
