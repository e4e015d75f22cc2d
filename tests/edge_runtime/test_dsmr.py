"""DSMR P1: telegram framing, CRC and parsing, and the driver against the pty simulator."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from cloud_sync import DeviceSchema
from edge_runtime.config import DsmrDevice
from edge_runtime.devices.base import (
    DeviceGoneError,
    DeviceStatus,
    PushDriver,
    Sink,
    Values,
)
from edge_runtime.devices.dsmr import DsmrDriver
from edge_runtime.devices.dsmr_telegram import (
    DEAD_LETTER_SOURCE,
    FIELDS,
    TelegramError,
    TelegramSplitter,
    TelegramStream,
    crc16,
    meter_schema,
    parse_telegram,
)
from edge_runtime.simulators.dsmr import HEADER, DsmrSimulator, Fault

REPO = Path(__file__).resolve().parents[2]
INTERVAL_S = 0.05
NAMES = [f.name for f in FIELDS]


def _body(text: str) -> bytes:
    """A telegram from '/' to '!' as the meter sends it: CRLF line ends."""
    return text.strip("\n").replace("\n", "\r\n").encode("ascii")


def with_crc(body: bytes) -> bytes:
    """The full telegram: the CRC is computed, so a typo in a fixture cannot hide a CRC bug."""
    return body + b"%04X\r\n" % crc16(body)


# The example telegram of the DSMR 5.0.2 P1 companion standard (Netbeheer Nederland).
SPEC_DSMR5 = _body(r"""
/ISk5\2MT382-1000

1-3:0.2.8(50)
0-0:1.0.0(101209113020W)
0-0:96.1.1(4B384547303034303436333935353037)
1-0:1.8.1(123456.789*kWh)
1-0:1.8.2(123456.789*kWh)
1-0:2.8.1(123456.789*kWh)
1-0:2.8.2(123456.789*kWh)
0-0:96.14.0(0002)
1-0:1.7.0(01.193*kW)
1-0:2.7.0(00.000*kW)
0-0:96.7.21(00004)
0-0:96.7.9(00002)
1-0:99.97.0(2)(0-0:96.7.19)(101208152415W)(0000000240*s)(101208151004W)(0000000301*s)
1-0:32.32.0(00002)
1-0:52.32.0(00001)
1-0:72.32.0(00000)
1-0:32.36.0(00000)
1-0:52.36.0(00003)
1-0:72.36.0(00000)
0-0:96.13.0(303132333435363738393A3B3C3D3E3F303132333435363738393A3B3C3D3E3F303132333435363738393A3B3C3D3E3F303132333435363738393A3B3C3D3E3F303132333435363738393A3B3C3D3E3F)
1-0:32.7.0(220.1*V)
1-0:52.7.0(220.2*V)
1-0:72.7.0(220.3*V)
1-0:31.7.0(001*A)
1-0:51.7.0(002*A)
1-0:71.7.0(003*A)
1-0:21.7.0(01.111*kW)
1-0:41.7.0(02.222*kW)
1-0:61.7.0(03.333*kW)
1-0:22.7.0(04.444*kW)
1-0:42.7.0(05.555*kW)
1-0:62.7.0(06.666*kW)
0-1:24.1.0(003)
0-1:96.1.0(3232323241424344313233343536373839)
0-1:24.2.1(101209112500W)(12785.123*m3)
!
""")

# A single-phase DSMR 4.2 meter in summer time, with an OBIS code nobody maps.
SINGLE_PHASE_42 = _body(r"""
/KFM5KAIFA-METER

1-3:0.2.8(42)
0-0:1.0.0(230715143000S)
0-0:96.1.1(4530303034303031353934373534343134)
1-0:1.8.1(001581.123*kWh)
1-0:1.8.2(001435.706*kWh)
1-0:2.8.1(000000.000*kWh)
1-0:2.8.2(000000.000*kWh)
0-0:96.14.0(0001)
1-0:1.7.0(02.027*kW)
1-0:2.7.0(00.000*kW)
1-0:32.7.0(231.0*V)
1-0:31.7.0(009*A)
1-0:21.7.0(02.027*kW)
1-0:22.7.0(00.000*kW)
1-0:14.7.0(50.01*Hz)
!
""")

# An ESMR 5 meter that counts in Wh and W, with IEC '*255' suffixes, and a water meter on
# M-Bus channel 1 before the gas meter on channel 2.
WH_METER = _body(r"""
/EST5\253710000_A

1-3:0.2.8(50)
0-0:1.0.0(221006155014S)
1-0:1.8.1*255(005017120*Wh)
1-0:1.8.2(001528646*Wh)
1-0:1.7.0(000000286*W)
1-0:2.7.0(000000000*W)
0-1:24.1.0(007)
0-1:24.2.1(221006154500S)(00123.456*m3)
0-2:24.1.0(003)
0-2:96.1.0(4730303132333435)
0-2:24.2.1(221006154500S)(02345.678*m3)
!
""")

# DSMR 2.2: 9600 baud, no CRC, the gas reading on a line of its own.
DSMR22 = _body(r"""
/ISk5\2MT382-1004

0-0:96.1.1(00000000000000)
1-0:1.8.1(00123.456*kWh)
1-0:1.8.2(00234.567*kWh)
1-0:2.8.1(00000.000*kWh)
1-0:2.8.2(00000.000*kWh)
0-0:96.14.0(0001)
1-0:1.7.0(0000.52*kW)
1-0:2.7.0(0000.00*kW)
0-0:17.0.0(0999.00*kW)
0-0:96.3.10(1)
0-0:96.13.1()
0-0:96.13.0()
0-1:24.1.0(3)
0-1:96.1.0(000000000000)
0-1:24.3.0(161107190000)(00)(60)(1)(0-1:24.2.1)(m3)
(00042.001)
!
""")


class RecordingSink:
    """A Sink that keeps everything it is handed, for the test to look at."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, DeviceSchema, tuple[float | None, ...], int | None]] = []
        self.statuses: dict[str, DeviceStatus] = {}
        self.dead: list[tuple[str, str, bytes, str]] = []

    def frame(
        self, device_id: str, schema: DeviceSchema, values: Values, ts_ms: int | None = None
    ) -> None:
        self.frames.append((device_id, schema, tuple(values), ts_ms))

    def status(self, device_id: str, kind: str) -> DeviceStatus:
        return self.statuses.setdefault(device_id, DeviceStatus(device_id, kind))

    def dead_letter(self, source: str, key: str, payload: bytes, reason: str) -> None:
        self.dead.append((source, key, payload, reason))

    def values(self, i: int = -1) -> dict[str, float | None]:
        return dict(zip(NAMES, self.frames[i][2], strict=True))


_SINK_CONFORMS: type[Sink] = RecordingSink  # mypy checks RecordingSink against the protocol


async def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    """Return as soon as ``condition()`` holds; fail the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- CRC and parsing ------------------------------------------------------------------------


def test_crc16_is_crc16_arc() -> None:
    # The check value of CRC-16/ARC in the catalogue of parametrised CRC algorithms.
    assert crc16(b"123456789") == 0xBB3D
    assert crc16(b"") == 0


def test_spec_example_telegram() -> None:
    telegram = parse_telegram(with_crc(SPEC_DSMR5))
    assert telegram.header == "ISk5\\2MT382-1000"
    assert telegram.manufacturer == "ISk"
    assert telegram.crc == crc16(SPEC_DSMR5)
    expected = {
        "energy_import_t1_kwh": 123456.789,
        "energy_import_t2_kwh": 123456.789,
        "energy_export_t1_kwh": 123456.789,
        "energy_export_t2_kwh": 123456.789,
        "power_import_kw": 1.193,
        "power_export_kw": 0.0,
        "voltage_l1_v": 220.1,
        "voltage_l2_v": 220.2,
        "voltage_l3_v": 220.3,
        "current_l1_a": 1.0,
        "current_l2_a": 2.0,
        "current_l3_a": 3.0,
        "power_import_l1_kw": 1.111,
        "power_import_l2_kw": 2.222,
        "power_import_l3_kw": 3.333,
        "power_export_l1_kw": 4.444,
        "power_export_l2_kw": 5.555,
        "power_export_l3_kw": 6.666,
        "tariff": 2.0,
        "gas_m3": 12785.123,
    }
    assert dict(zip(NAMES, telegram.values, strict=True)) == expected
    # 2010-12-09 11:30:20 winter time (UTC+1).
    assert telegram.timestamp_ms == 1291890620000
    assert telegram.info["dsmr_version"] == "5.0"
    assert telegram.info["meter_id"] == "K8EG004046395507"
    assert telegram.info["gas_meter_id"] == "2222ABCD123456789"
    assert telegram.info["power_failures"] == 4
    assert telegram.info["long_power_failures"] == 2
    assert telegram.info["voltage_swells_l2"] == 3
    assert str(telegram.info["message"]).startswith("0123456789:;<=>?")
    assert telegram.unknown == ()
    assert telegram.bad_values == ()
    assert telegram.malformed_lines == 0


def test_schema_is_fixed_and_carries_units() -> None:
    schema = meter_schema("ISk5\\2MT382-1000")
    assert schema.kind == "meter"
    assert schema.model == "ISk5\\2MT382-1000"
    units = {f.name: f.unit for f in schema.fields}
    assert units["energy_import_t1_kwh"] == "kWh"
    assert units["power_export_l3_kw"] == "kW"
    assert units["voltage_l2_v"] == "V"
    assert units["current_l3_a"] == "A"
    assert units["gas_m3"] == "m3"
    assert units["tariff"] == ""
    assert len(NAMES) == len(set(NAMES)) == 20
    # Counters are predicted with a trend, levels with a deadband (cloud_sync defaults).
    assert {f.name: f.model for f in schema.fields}["energy_import_t1_kwh"] == "trend"


def test_single_phase_meter_leaves_missing_values_none() -> None:
    telegram = parse_telegram(with_crc(SINGLE_PHASE_42))
    values = dict(zip(NAMES, telegram.values, strict=True))
    assert values["energy_import_t2_kwh"] == 1435.706
    assert values["voltage_l1_v"] == 231.0
    assert values["current_l1_a"] == 9.0
    assert values["tariff"] == 1.0
    for name in ("voltage_l2_v", "voltage_l3_v", "current_l3_a", "power_export_l2_kw", "gas_m3"):
        assert values[name] is None
    assert telegram.unknown == ("1-0:14.7.0",)
    assert telegram.info["dsmr_version"] == "4.2"
    # 2023-07-15 14:30:00 summer time (UTC+2).
    assert telegram.timestamp_ms == 1689424200000


def test_wh_meter_is_converted_and_gas_found_on_its_channel() -> None:
    telegram = parse_telegram(with_crc(WH_METER))
    assert telegram.value("energy_import_t1_kwh") == 5017.12
    assert telegram.value("energy_import_t2_kwh") == 1528.646
    assert telegram.value("power_import_kw") == 0.286
    assert telegram.value("power_export_kw") == 0.0
    # Channel 1 is a water meter (type 7); the gas meter (type 3) is on channel 2.
    assert telegram.value("gas_m3") == 2345.678
    assert telegram.info["gas_meter_id"] == "G0012345"
    assert telegram.unknown == ()


def test_wrong_unit_and_odd_lines_are_counted_not_fatal() -> None:
    body = SINGLE_PHASE_42.replace(b"(231.0*V)", b"(231.0*kV)").replace(
        b"1-0:31.7.0", b"this is no OBIS line\r\n1-0:31.7.0"
    )
    telegram = parse_telegram(with_crc(body))
    assert telegram.value("voltage_l1_v") is None
    assert telegram.bad_values == ("1-0:32.7.0",)
    assert telegram.malformed_lines == 1
    assert telegram.value("current_l1_a") == 9.0


def test_dsmr22_without_crc_is_accepted() -> None:
    telegram = parse_telegram(DSMR22 + b"\r\n")
    assert telegram.crc is None
    assert telegram.value("energy_import_t1_kwh") == 123.456
    assert telegram.value("power_import_kw") == 0.52
    # The DSMR 2.2 hourly gas record (24.3.0) is not read: counted as unknown, gas is None.
    assert telegram.value("gas_m3") is None
    assert telegram.unknown == ("0-1:24.3.0",)
    assert telegram.malformed_lines == 0


@pytest.mark.parametrize(
    ("raw", "counter"),
    [
        pytest.param(with_crc(SPEC_DSMR5).replace(b"220.1", b"220.7"), "crc_errors", id="bad-crc"),
        pytest.param(SPEC_DSMR5 + b"\r\n", "crc_errors", id="dsmr5-without-crc"),
        pytest.param(SPEC_DSMR5 + b"12G4", "crc_errors", id="crc-not-hex"),
        pytest.param(b"/ISk5\\2MT382-1000\r\n1-0:1.8.1(0", "malformed", id="no-end"),
        pytest.param(b"hello!", "malformed", id="no-header"),
        pytest.param(with_crc(b"/ISk5\\2MT382-1000\r\n\r\n!"), "malformed", id="no-objects"),
    ],
)
def test_bad_telegrams_raise_with_their_counter(raw: bytes, counter: str) -> None:
    with pytest.raises(TelegramError) as info:
        parse_telegram(raw)
    assert info.value.counter == counter


# -- framing --------------------------------------------------------------------------------


def test_splitter_handles_any_chunking() -> None:
    good = with_crc(SPEC_DSMR5)
    stream = b"\r\n" + good + good
    whole = TelegramSplitter().feed(stream)
    splitter = TelegramSplitter()
    bytewise = [piece for i in range(len(stream)) for piece in splitter.feed(stream[i : i + 1])]
    assert whole == bytewise
    assert [p.kind for p in whole] == ["telegram", "telegram"]
    assert whole[0].data == good.rstrip()
    assert splitter.pending == 0  # the trailing CRLF is dropped, not held


def test_splitter_sorts_out_garbage_and_truncation() -> None:
    good = with_crc(SPEC_DSMR5)
    # Noise with a stray '/' that is no header, a telegram cut short, then a good one.
    stream = b"\x00\xffno/ise\r\n" + good + good[:300] + good
    pieces = TelegramSplitter().feed(stream)
    assert [p.kind for p in pieces] == ["garbage", "telegram", "truncated", "telegram"]
    assert pieces[0].data == b"\x00\xffno/ise\r\n"
    assert pieces[2].data == good[:300]


def test_splitter_gives_up_on_endless_telegrams_and_noise() -> None:
    splitter = TelegramSplitter(max_size=1000)
    pieces = splitter.feed(b"/ISk5\\2MT382-1000\r\n" + b"1-0:1.8.1(001234.567*kWh)\r\n" * 50)
    assert [p.kind for p in pieces] == ["truncated"]
    pieces = splitter.feed(b"\xfe" * 1001)  # a wrong baud rate: never a telegram
    assert [p.kind for p in pieces] == ["garbage"]
    assert splitter.pending == 0


def test_splitter_flush_gives_back_a_stalled_telegram() -> None:
    splitter = TelegramSplitter()
    assert [p.kind for p in splitter.feed(b"junk" + with_crc(SPEC_DSMR5)[:100])] == ["garbage"]
    assert splitter.pending == 100
    assert [p.kind for p in splitter.flush()] == ["truncated"]
    assert splitter.flush() == []
    assert splitter.feed(b"noise without end") == []
    assert [p.kind for p in splitter.flush()] == ["garbage"]


# -- stream: counting, dead letters, recovery -----------------------------------------------


@pytest.mark.parametrize(
    ("bad", "counter"),
    [
        pytest.param(with_crc(SPEC_DSMR5).replace(b"01.193", b"01.198"), "crc_errors", id="crc"),
        pytest.param(with_crc(SPEC_DSMR5)[:500], "truncated", id="truncated"),
        pytest.param(b"\x00\x17\xfe line noise \xff\r\n", "garbage", id="garbage"),
        pytest.param(with_crc(b"/ISk5 no lines but a CRC!"), "malformed", id="malformed"),
    ],
)
def test_stream_counts_and_dead_letters_bad_pieces_then_carries_on(
    bad: bytes, counter: str
) -> None:
    sink = RecordingSink()
    stream = TelegramStream("p1", sink)
    good = with_crc(SPEC_DSMR5)
    assert stream.feed(good, ts_ms=1000) == 1
    assert stream.feed(bad + good, ts_ms=2000) == 1
    status = sink.statuses["p1"]
    assert status.counters == {counter: 1}
    assert status.errors == 1
    assert status.reads == 2
    assert status.online
    ((source, key, payload, reason),) = sink.dead
    assert (source, key) == (DEAD_LETTER_SOURCE, "p1")
    # A telegram ends at its CRC; the line end after it is no part of what is kept.
    telegram_shaped = counter in ("crc_errors", "malformed")
    assert payload == (bad.rstrip(b"\r\n") if telegram_shaped else bad)
    assert reason
    assert [f[3] for f in sink.frames] == [1000, 2000]
    assert sink.values(-1)["power_import_kw"] == 1.193


def test_stream_status_info_and_distinct_unknown_codes() -> None:
    sink = RecordingSink()
    stream = TelegramStream("p1", sink)
    stream.feed(with_crc(SINGLE_PHASE_42) * 3, ts_ms=1689424200000)
    status = sink.statuses["p1"]
    assert status.kind == "dsmr"
    assert status.reads == 3
    assert status.last_seen_ms == 1689424200000
    assert status.counters == {"unknown_obis": 1}
    assert status.info["unknown_obis"] == ["1-0:14.7.0"]
    assert status.info["model"] == "KFM5KAIFA-METER"
    assert status.info["dsmr_version"] == "4.2"
    assert status.info["meter_id"] == "E0004001594754414"
    assert status.info["meter_clock_offset_s"] == 0.0
    schemas = {f[1] for f in sink.frames}
    assert schemas == {meter_schema("KFM5KAIFA-METER")}


# -- the driver on the simulated P1 port ----------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[DsmrSimulator]:
    async with DsmrSimulator(interval_s=INTERVAL_S, seed=7) as simulator:
        yield simulator


@contextlib.asynccontextmanager
async def running(driver: DsmrDriver, sink: RecordingSink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(driver.run(sink), name=f"{driver.device_id} under test")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, DeviceGoneError):
            await task


def driver_for(port: str, timeout_s: float = 2.0) -> DsmrDriver:
    driver = DsmrDriver(DsmrDevice(id="p1", serial_port=port, timeout_s=timeout_s))
    assert (driver.device_id, driver.kind) == ("p1", "dsmr")
    return driver


def _conforms(driver: DsmrDriver) -> PushDriver:
    return driver  # mypy checks DsmrDriver against the PushDriver protocol


async def inject_and_recover(
    sim: DsmrSimulator, sink: RecordingSink, fault: Fault, counter: str
) -> None:
    """Inject ``fault``: it is counted once, and good telegrams keep coming after it."""
    status = sink.statuses["p1"]
    frames = len(sink.frames)
    sim.inject(fault)
    await wait_until(lambda: status.counters.get(counter) == 1)
    await wait_until(lambda: len(sink.frames) >= frames + 2)


async def test_driver_reads_simulated_meter_and_survives_faults() -> None:
    fds = open_fds()
    sink = RecordingSink()
    async with (
        DsmrSimulator(interval_s=INTERVAL_S, seed=1) as sim,
        running(driver_for(sim.port_path), sink),
    ):
        await wait_until(lambda: len(sink.frames) >= 3)
        status = sink.statuses["p1"]
        assert status.online
        assert status.counters == {}
        _, schema, _, ts_ms = sink.frames[0]
        assert schema == meter_schema(HEADER)
        assert ts_ms is not None and abs(ts_ms - time.time() * 1000) < 5000
        assert status.info["meter_id"] == "E0043007052870318"
        assert status.info["dsmr_version"] == "5.0"

        await inject_and_recover(sim, sink, "bad_crc", "crc_errors")
        await inject_and_recover(sim, sink, "truncated", "truncated")
        await inject_and_recover(sim, sink, "garbage", "garbage")
        assert status.counters == {"crc_errors": 1, "truncated": 1, "garbage": 1}
        assert [d[0] for d in sink.dead] == [DEAD_LETTER_SOURCE] * 3

        # Every frame holds exactly what the simulator wrote into some good telegram.
        written = {tuple(v[n] for n in NAMES) for v in sim.sent}
        assert all(values in written for _, _, values, _ in sink.frames)
        assert len(sink.frames) <= sim.telegrams

    # Plausible physics in the simulator: ~230 V, counters never run backwards.
    sent = list(sim.sent)
    assert all(215 < v["voltage_l2_v"] < 245 for v in sent)
    assert all(v["current_l1_a"] >= 0 and v["tariff"] in (1.0, 2.0) for v in sent)
    for name in ("energy_import_t1_kwh", "energy_export_t2_kwh", "gas_m3"):
        assert all(a[name] <= b[name] for a, b in itertools.pairwise(sent))
    assert not sink.statuses["p1"].online
    assert open_fds() == fds


async def test_silent_meter_goes_offline_within_timeout_and_back(sim: DsmrSimulator) -> None:
    timeout_s = 0.3
    sink = RecordingSink()
    async with running(driver_for(sim.port_path, timeout_s), sink) as task:
        await wait_until(lambda: len(sink.frames) >= 2)
        status = sink.statuses["p1"]
        sim.pause()
        paused_at = time.monotonic()
        await wait_until(lambda: not status.online, timeout=timeout_s + 2)
        # timeout_s after the last telegram, which came before the pause; slack for a busy CI.
        assert time.monotonic() - paused_at <= timeout_s + 0.3
        assert status.timeouts == 1
        assert "no valid telegram" in (status.last_error or "")
        assert not task.done()  # still listening

        frames = len(sink.frames)
        sim.resume()
        await wait_until(lambda: status.online and len(sink.frames) > frames)
        assert status.timeouts == 1


async def test_port_that_vanishes_while_reading_raises_gone() -> None:
    sink = RecordingSink()
    async with DsmrSimulator(interval_s=INTERVAL_S) as sim:
        task = asyncio.create_task(driver_for(sim.port_path).run(sink))
        await wait_until(lambda: len(sink.frames) >= 1)
    # The simulator is gone: so is its pty, as when a USB P1 cable is pulled.
    with pytest.raises(DeviceGoneError):
        await asyncio.wait_for(task, 2)
    status = sink.statuses["p1"]
    assert not status.online
    assert "gone" in (status.last_error or "")


async def test_missing_port_raises_gone(tmp_path: Path) -> None:
    # Not a closed pty's path: another process may be handed the same /dev/pts number.
    sink = RecordingSink()
    with pytest.raises(DeviceGoneError, match="cannot open"):
        await driver_for(str(tmp_path / "ttyUSB0")).run(sink)
    status = sink.statuses["p1"]
    assert not status.online
    assert "cannot open" in (status.last_error or "")


async def test_second_reader_on_the_same_port_is_refused(sim: DsmrSimulator) -> None:
    sink = RecordingSink()
    async with running(driver_for(sim.port_path), sink):
        await wait_until(lambda: len(sink.frames) >= 1)
        with pytest.raises(DeviceGoneError):
            await DsmrDriver(DsmrDevice(id="p1b", serial_port=sim.port_path)).run(sink)


async def test_simulator_command_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_runtime.simulators.dsmr",
        "--interval",
        str(INTERVAL_S),
        "--fault-rate",
        "0.2",
        "--seed",
        "3",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        path = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert path.startswith("/dev/")
        sink = RecordingSink()
        async with running(driver_for(path), sink) as task:
            await wait_until(lambda: len(sink.frames) >= 3)
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            # The simulator took its pty with it.
            with pytest.raises(DeviceGoneError):
                await asyncio.wait_for(task, 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
