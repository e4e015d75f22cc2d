"""bench.codec: time columns in Unix s, ms and date text, the limit, where the bytes go."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import codec as bc
from bench.sparse_csv import TIME_COLUMN, unix_seconds, write_sparse_csv
from cloud_sync import encode

# 2021-01-01 00:00:00.000, 00:00:00.500, 00:01:00.123, 00:02:00.000 UTC
STAMPS_MS = [1609459200000, 1609459200500, 1609459260123, 1609459320000]
SECONDS = ["1609459200", "1609459200.5", "1609459260.123", "1609459320"]
MILLIS = ["1609459200000", "1609459200500", "1609459260123", "1609459320000"]
MILLIS_DECIMAL = ["1609459200000.0", "1609459200499.6", "1609459260123.4", "1609459320000"]
ISO_TEXT = [
    "2021-01-01T00:00:00",
    "2021-01-01T00:00:00.500",
    "2021-01-01 00:01:00.123",
    "2021-01-01T01:02:00+01:00",
]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> str:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def time_csv(tmp_path: Path, stamps: list[str]) -> str:
    rows = [[t, str(i)] for i, t in enumerate(stamps)]
    return write_csv(tmp_path / "t.csv", ["t", "power_w"], rows)


def sparse_rows(n: int, *, step_s: int = 60, start_s: int = 1609459200) -> list[list[str]]:
    """A circuit that is off (0) most of the time, with two short bursts."""
    rows = []
    for i in range(n):
        on = 40 <= i < 46 or 150 <= i < 153
        rows.append([str(start_s + step_s * i), "37.000" if on else "0.000"])
    return rows


@pytest.mark.parametrize(
    ("unit", "stamps"),
    [
        ("auto", SECONDS),
        ("s", SECONDS),
        ("auto", MILLIS),
        ("ms", MILLIS),
        ("auto", MILLIS_DECIMAL),
        ("auto", ISO_TEXT),
        ("iso", ISO_TEXT),
    ],
)
def test_unix_seconds_millis_and_iso_give_the_same_times(
    tmp_path: Path, unit: str, stamps: list[str]
) -> None:
    series = bc.read_series(time_csv(tmp_path, stamps), ["t"], ["power_w"], unit)
    assert series.ts_ms == STAMPS_MS


def test_auto_says_how_it_read_the_column(tmp_path: Path) -> None:
    seconds = bc.read_series(time_csv(tmp_path, SECONDS), ["t"], ["power_w"])
    millis = bc.read_series(time_csv(tmp_path, MILLIS), ["t"], ["power_w"])
    assert seconds.time_read == "Unix seconds (auto: by magnitude)"
    assert millis.time_read == "Unix milliseconds (auto: by magnitude)"


def test_date_and_time_in_two_columns(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "uci.csv",
        ["Date", "Time", "Sub_metering_1"],
        [["1/1/2021", "00:00:00", "0"], ["1/1/2021", "00:02:00", "1"]],
    )
    series = bc.read_series(path, ["Date", "Time"], ["Sub_metering_1"])
    assert series.ts_ms == [STAMPS_MS[0], STAMPS_MS[3]]
    assert series.time_read == "date text, %d/%m/%Y %H:%M:%S"


def test_auto_splits_seconds_from_millis_at_1e11(tmp_path: Path) -> None:
    below = bc.read_series(time_csv(tmp_path, ["99999999999"]), ["t"], ["power_w"])
    at = bc.read_series(time_csv(tmp_path, ["100000000000"]), ["t"], ["power_w"])
    assert below.ts_ms == [99_999_999_999_000]  # seconds: the year 5138
    assert at.ts_ms == [100_000_000_000]  # milliseconds: 1973-03-03


def test_a_forced_unit_wins_over_the_magnitude(tmp_path: Path) -> None:
    # Millisecond stamps of January 1970 would read as seconds under auto.
    series = bc.read_series(time_csv(tmp_path, ["1000", "2000"]), ["t"], ["power_w"], "ms")
    assert series.ts_ms == [1000, 2000]
    assert bc.read_series(time_csv(tmp_path, ["1000"]), ["t"], ["power_w"]).ts_ms == [1_000_000]


@given(st.integers(min_value=bc.MIN_MS, max_value=bc.MAX_MS))
def test_seconds_written_by_sparse_csv_read_back_exactly(ms: int) -> None:
    assert bc.parse_unix(unix_seconds(ms), "s") == ms
    assert bc.parse_unix(str(ms), "ms") == ms


def cell_at(row: int, text: str) -> str:
    """How an error names data row ``row`` (line row + 1) and its time cell in column t."""
    return f"data row {row} (line {row + 1}), time cell t={text!r}"


@pytest.mark.parametrize(
    ("stamps", "unit", "where", "why"),
    [
        (["1609459200", "1609459260", "soon"], "auto", cell_at(3, "soon"), "not a number"),
        (["1609459200", "1609459260", "soon"], "s", cell_at(3, "soon"), "not a number"),
        (["1609459200", ""], "s", cell_at(2, ""), "not a number of Unix seconds"),
        (["1609459200", "nan"], "s", cell_at(2, "nan"), "not a number of Unix seconds"),
        (["1609459200", "1e20"], "s", cell_at(2, "1e20"), "outside the years 1 to 9999"),
        ([*MILLIS[:2], "1609459320"], "auto", cell_at(3, "1609459320"), "looks like Unix seconds"),
        ([*ISO_TEXT[:2], "01/02/2021"], "auto", cell_at(3, "01/02/2021"), "not a date"),
        (["yesterday", "1609459200"], "auto", cell_at(1, "yesterday"), "neither Unix time nor"),
    ],
)
def test_a_bad_time_cell_names_its_row_and_cell(
    tmp_path: Path, stamps: list[str], unit: str, where: str, why: str
) -> None:
    path = time_csv(tmp_path, stamps)
    with pytest.raises(bc.UsageError) as info:
        bc.read_series(path, ["t"], ["power_w"], unit)
    message = str(info.value)
    assert where in message
    assert why in message


def test_unix_units_need_one_time_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "two.csv", ["d", "t", "power_w"], [["1", "2", "3"]])
    with pytest.raises(bc.UsageError, match="--time-unit s reads one time column"):
        bc.read_series(path, ["d", "t"], ["power_w"], "s")


def test_the_command_line_reports_a_bad_cell_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = time_csv(tmp_path, ["1609459200", "12:00"])
    status = bc.main(["--csv", path, "--time-column", "t", "--tol", "power_w=1"])
    err = capsys.readouterr().err
    assert status == 2
    assert "data row 2 (line 3), time cell t='12:00'" in err


def test_the_limit_counts_the_timestamps_and_is_never_beaten_by_one_batch(
    tmp_path: Path,
) -> None:
    rows = sparse_rows(300)
    regular = bc.read_series(write_csv(tmp_path / "r.csv", ["t", "w"], rows), ["t"], ["w"])
    jitter = [[str(int(t) + (i * 7919) % 13), v] for i, (t, v) in enumerate(rows)]
    jittery = bc.read_series(write_csv(tmp_path / "j.csv", ["t", "w"], jitter), ["t"], ["w"])
    schema = bc.build_schema(regular, {"w": 0.5}, {})
    params = bc.codec_params(schema)
    limit = bc.compute_limit(regular, params)
    assert limit.bits[0] == min(limit.order1[0], limit.codec[0])
    assert limit.total == limit.bits[0] + limit.ts_bits
    # Jittered timestamps carry information: the limit grows by it, the values' does not.
    jittery_limit = bc.compute_limit(jittery, params)
    assert jittery_limit.ts_bits > limit.ts_bits + 150
    assert jittery_limit.bits == limit.bits
    # The whole series in one batch costs at least the limit: framing only adds to it.
    frames = bc.build_frames(regular)
    whole = bc.evaluate_window(regular, schema, frames, limit, window=regular.rows, min_s=0.001)
    ratio = whole.total["ratio_to_limit"]
    assert isinstance(ratio, float)
    assert ratio >= 1.0


def test_where_the_bytes_go_adds_up_to_every_batch(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "sparse.csv", ["t", "w"], sparse_rows(250))
    series = bc.read_series(path, ["t"], ["w"])
    schema = bc.build_schema(series, {"w": 0.5}, {})
    limit = bc.compute_limit(series, bc.codec_params(schema))
    frames = bc.build_frames(series)
    result = bc.evaluate_window(series, schema, frames, limit, window=60, min_s=0.001)
    parts = result.parts
    batches = result.batches
    assert batches == 5
    total_bits = result.total["bits_per_value"]
    assert isinstance(total_bits, float)
    assert 8 * sum(parts.values()) / series.rows == pytest.approx(total_bits)
    assert parts["Batch.node_id"] == batches * (2 + len("bench"))
    assert parts["DeviceBlock.schema_hash"] == batches * (2 + 16)
    assert parts["DeviceBlock.device_id"] == batches * (2 + len(bc.DEVICE))
    assert parts[bc.FLUSH_PART] == batches * bc.flush_bytes()
    assert parts[bc.VALUES_PART] > 0
    assert parts[bc.TS_PART] > 0
    names = list(parts)
    assert names.index("Batch.version") < names.index("DeviceBlock.device_id")
    assert names.index("DeviceBlock.data: tag, length") < names.index(bc.VALUES_PART)


def test_wire_parts_names_every_byte_of_a_batch(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "sparse.csv", ["t", "w"], sparse_rows(100))
    series = bc.read_series(path, ["t"], ["w"])
    schema = bc.build_schema(series, {"w": 0.5}, {})
    (block,) = bc.make_blocks(series, bc.codec_params(schema), series.rows)
    body = encode(
        bc.build_frames(series),
        {bc.DEVICE: schema},
        node_id="a-node-with-a-long-name",
        batch_id=7,
        created_ms=series.ts_ms[0],
        known_schemas={schema.digest()},
    )
    parts = bc.wire_parts(body, block, bc.flush_bytes())
    assert sum(n for _, n in parts.values()) == len(body)
    assert parts["Batch.node_id"][1] == 2 + len("a-node-with-a-long-name")
    assert parts["Batch.batch_id"][1] == 2
    assert parts[bc.VALUES_PART][1] == len(block.data) - block.empty_size


def test_the_report_shows_where_the_bytes_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [[str(int(t) * 1000), v] for t, v in sparse_rows(200)]
    path = write_csv(tmp_path / "ms.csv", ["ts_ms", "Sub_metering_1"], rows)
    argv = ["--csv", path, "--time-column", "ts_ms", "--tol", "Sub_metering_1=0.5"]
    status = bc.main([*argv, "--window", "50", "--window", "200", "--speed-seconds", "0.001"])
    out = capsys.readouterr().out
    assert status == 0
    assert "time read as Unix milliseconds (auto: by magnitude)" in out
    assert out.count("where gridlet's bytes go:") == 2
    for part in ("Batch.node_id", "DeviceBlock.schema_hash", "DeviceBlock.first_ts_ms"):
        assert re.search(rf"^{re.escape(part)}\s+\d+\.\d\d\s", out, re.M), part
    assert re.search(r"^limit \(values, timestamps\)\s+\d", out, re.M)
    assert "target size (window 200)" in out


def test_sparse_csv_copies_a_sub_meter_with_unix_seconds(tmp_path: Path) -> None:
    source = write_csv(
        tmp_path / "uci.csv",
        ["Date", "Time", "Sub_metering_1", "Sub_metering_2"],
        [
            ["16/12/2006", "17:24:00", "0.000", "1.000"],
            ["16/12/2006", "17:25:00", "?", "1.000"],
            ["16/12/2006", "17:26:00", "37.000", "2.000"],
        ],
    )
    out = tmp_path / "build" / "sparse.csv"
    assert write_sparse_csv(source, "Sub_metering_1", str(out)) == 3
    with out.open(newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    assert table == [
        [TIME_COLUMN, "Sub_metering_1"],
        ["1166289840", "0.000"],
        ["1166289900", "?"],
        ["1166289960", "37.000"],
    ]
    original = bc.read_series(source, ["Date", "Time"], ["Sub_metering_1"])
    copied = bc.read_series(str(out), [TIME_COLUMN], ["Sub_metering_1"], "s")
    assert copied.ts_ms == original.ts_ms
    assert copied.values == original.values
