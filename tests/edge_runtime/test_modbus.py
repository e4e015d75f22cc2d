"""The Modbus driver against the SDM simulator: real pymodbus client and server, loopback and pty.

Covers TCP, RTU on a pseudo-terminal null modem and RTU over TCP; exact decoding; a shared bus
polled in turn with the request gap; a silent unit that times out without hurting its neighbour
or the shared connection; exception answers; a stopped and restarted server; the CLI.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal

import pytest

from edge_runtime.config import ModbusDevice
from edge_runtime.devices.base import (
    DeviceGoneError,
    DeviceTimeoutError,
    PolledDriver,
    ProtocolError,
)
from edge_runtime.devices.modbus import ModbusDriver, make_drivers
from edge_runtime.devices.register_profile import load_profile
from edge_runtime.simulators.sdm import MeterModel, SdmSimulator

pytestmark = pytest.mark.timeout(60)

TransportName = Literal["tcp", "rtu", "rtu-over-tcp"]
TRANSPORTS: tuple[TransportName, ...] = ("tcp", "rtu", "rtu-over-tcp")


@pytest.fixture
async def sim() -> AsyncIterator[SdmSimulator]:
    async with SdmSimulator(units=(1, 2), tcp_port=0, rtu_over_tcp_port=0, rtu=True) as s:
        yield s


class Drivers:
    """Makes drivers for the simulator and closes them all at the end of the test."""

    def __init__(self, sim: SdmSimulator) -> None:
        self.sim = sim
        self.made: list[ModbusDriver] = []

    def cfg(
        self,
        transport: TransportName,
        unit: int,
        *,
        profile: str = "sdm630",
        timeout_s: float = 1.0,
        gap_ms: int = 0,
        device_id: str | None = None,
    ) -> ModbusDevice:
        where: dict[str, object] = (
            {"serial_port": self.sim.rtu_device}
            if transport == "rtu"
            else {
                "host": "127.0.0.1",
                "port": self.sim.tcp_port if transport == "tcp" else self.sim.rtu_over_tcp_port,
            }
        )
        return ModbusDevice(
            id=device_id or f"meter-{transport}-{unit}",
            profile=profile,
            transport=transport,
            unit_id=unit,
            timeout_s=timeout_s,
            request_gap_ms=gap_ms,
            **where,  # type: ignore[arg-type]
        )

    def make(self, cfgs: Sequence[ModbusDevice]) -> list[ModbusDriver]:
        drivers = make_drivers(cfgs)
        self.made.extend(drivers)
        return drivers


@pytest.fixture
async def drivers(sim: SdmSimulator) -> AsyncIterator[Drivers]:
    d = Drivers(sim)
    yield d
    for driver in d.made:
        await driver.close()


def _by_name(driver: ModbusDriver, values: Sequence[float | None]) -> dict[str, float]:
    """The values by field name; a meter that answers has no missing values."""
    out = {}
    for f, x in zip(driver.profile.fields, values, strict=True):
        assert x is not None, f.name
        out[f.name] = x
    return out


def _served(sim: SdmSimulator, driver: ModbusDriver) -> list[float]:
    served = sim.values(driver.unit_id)
    return [served[f.name] for f in driver.profile.fields]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_reads_exactly_what_the_meter_serves(
    sim: SdmSimulator, drivers: Drivers, transport: TransportName
) -> None:
    (driver,) = drivers.make([drivers.cfg(transport, 2)])
    polled: PolledDriver = driver  # the scheduler's interface (checked by mypy)
    assert polled.kind == "modbus"
    schema = await driver.connect()
    assert schema == load_profile("sdm630").schema()
    assert (schema.kind, schema.model) == ("meter", "Eastron SDM630")

    sim.pause()  # hold the values still so the comparison is exact
    before = len(sim.requests)
    values = await driver.read()
    assert values == _served(sim, driver)

    # Contiguous registers are read in blocks (4 requests for 54 fields), input table.
    asked = list(sim.requests)[before:]
    assert [(r.transport, r.unit, r.table, r.address, r.count) for r in asked] == [
        (transport, 2, b.table, b.address, b.count) for b in driver.blocks
    ]
    v = _by_name(driver, values)
    assert all(220 < v[f"voltage_l{i}_v"] < 240 for i in (1, 2, 3))
    assert 49.9 < v["frequency_hz"] < 50.1
    assert v["voltage_l1_l2_v"] == pytest.approx(400, abs=10)


async def test_sdm120_and_values_that_move() -> None:
    async with SdmSimulator(profile="sdm120", units=(5,), tcp_port=0) as sim120:
        cfg = ModbusDevice(
            id="sdm120", profile="sdm120", host="127.0.0.1", port=sim120.tcp_port, unit_id=5
        )
        (driver,) = make_drivers([cfg])
        try:
            readings = [_by_name(driver, await driver.read()) for _ in range(5)]
        finally:
            await driver.close()
    assert len({r["voltage_v"] for r in readings}) > 1, "voltage has noise"
    imports = [r["energy_import_kwh"] for r in readings]
    exports = [r["energy_export_kwh"] for r in readings]
    assert imports == sorted(imports) and exports == sorted(exports), "counters never go back"
    for r in readings:
        assert r["active_power_w"] == pytest.approx(
            r["power_factor"] * r["apparent_power_va"], rel=1e-3
        )


def test_energy_counters_integrate_the_power_served() -> None:
    model = MeterModel(3, seed=7, pv_peak_w=4000, t0=0.0)
    start_import, start_export = model.import_kwh, model.export_kwh
    expected_import = expected_export = 0.0
    for t in range(1, 3601):
        model.step(float(t))
        total_w = model.values()["active_power_total_w"]
        expected_import += max(total_w, 0) / 3.6e6  # 1 s steps
        expected_export += max(-total_w, 0) / 3.6e6
    assert model.import_kwh - start_import == pytest.approx(expected_import, rel=1e-9)
    assert model.export_kwh - start_export == pytest.approx(expected_export, rel=1e-9)
    assert expected_import > 0.1 and expected_export > 0.1, "an hour sees both directions"
    v = model.values()
    assert v["energy_total_kwh"] == pytest.approx(v["energy_import_kwh"] + v["energy_export_kwh"])
    phase_import = sum(v[f"energy_import_l{i}_kwh"] for i in (1, 2, 3))
    assert phase_import >= v["energy_import_kwh"] - 1e-6  # phases can import while the sum exports


async def test_shared_rtu_line_polls_units_in_turn_with_the_gap(
    sim: SdmSimulator, drivers: Drivers
) -> None:
    gap_ms = 25
    d1, d2 = drivers.make([drivers.cfg("rtu", u, gap_ms=gap_ms) for u in (1, 2)])
    assert d1.bus is d2.bus, "one owner per serial line"
    assert d1.bus.request_gap_s == gap_ms / 1000

    async def poll(driver: ModbusDriver, times: int) -> None:
        for _ in range(times):
            assert len(await driver.read()) == len(driver.profile.fields)

    before = len(sim.requests)
    await asyncio.gather(poll(d1, 3), poll(d2, 3))
    asked = [r for r in list(sim.requests)[before:] if r.transport == "rtu"]
    assert len(asked) == 2 * 3 * len(d1.blocks)
    # Fair turns: while both want the line, requests alternate between the units.
    assert [r.unit for r in asked] == [1, 2] * (len(asked) // 2)
    gaps = [b.t - a.t for a, b in itertools.pairwise(asked)]
    assert min(gaps) >= gap_ms / 1000
    assert d1.bus.connects == 1


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
async def test_silent_unit_times_out_and_its_neighbour_keeps_reading(
    sim: SdmSimulator, drivers: Drivers, transport: TransportName
) -> None:
    timeout_s = 0.3
    good, silent = drivers.make(
        [drivers.cfg(transport, 1), drivers.cfg(transport, 2, timeout_s=timeout_s)]
    )
    assert good.bus is silent.bus
    await good.connect()
    await silent.connect()
    sim.silence(2)

    # More timeouts in a row than pymodbus tolerates before dropping a connection by itself.
    for _ in range(6):
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeoutError, match=r"unit 2\) input 0x0000\+80: no answer"):
            await silent.read()
        assert timeout_s <= time.monotonic() - t0 < timeout_s + 0.25
        assert len(await good.read()) == len(good.profile.fields)
    await silent.recover()  # the bus answers for unit 1: no reconnect for the others to pay

    # Concurrently: the good meter waits at most one silent timeout per request.
    async def silent_reads() -> None:
        for _ in range(3):
            with pytest.raises(DeviceTimeoutError):
                await silent.read()

    async def good_reads() -> list[float]:
        took = []
        for _ in range(3):
            t0 = time.monotonic()
            await good.read()
            took.append(time.monotonic() - t0)
        return took

    _, took = await asyncio.gather(silent_reads(), good_reads())
    assert max(took) < len(good.blocks) * (timeout_s + 0.1)

    assert good.bus.connected and good.bus.connects == 1, "the shared connection survived"
    sim.silence(2, False)
    assert len(await silent.read()) == len(silent.profile.fields)


async def test_exception_answer_is_a_protocol_error_naming_the_block(
    sim: SdmSimulator, drivers: Drivers, tmp_path: Path
) -> None:
    profile = tmp_path / "odd.toml"
    profile.write_text(
        'name = "odd"\nmodel = "Odd"\ntable = "input"\ntype = "float32"\n'
        '[[fields]]\nname = "voltage_v"\naddress = 0\n'
        '[[fields]]\nname = "mystery_w"\naddress = 0x0500\n',
        encoding="utf-8",
    )
    (driver,) = drivers.make([drivers.cfg("tcp", 1, profile=str(profile))])
    with pytest.raises(
        ProtocolError,
        match=r"\(unit 1\) input 0x0500\+2: Modbus exception 2 \(illegal data address\)",
    ):
        await driver.read()

    # A read longer than the meter takes (Eastron: 80 registers) is refused the same way.
    too_long = tmp_path / "long.toml"
    too_long.write_text(
        'name = "long"\nmodel = "Long"\ntable = "input"\ntype = "float32"\nmax_gap = 100\n'
        '[[fields]]\nname = "voltage_v"\naddress = 0\n'
        '[[fields]]\nname = "frequency_hz"\naddress = 0x0056\n',
        encoding="utf-8",
    )
    (long_driver,) = drivers.make([drivers.cfg("tcp", 1, profile=str(too_long))])
    with pytest.raises(ProtocolError, match=r"input 0x0000\+88: .*\(illegal data value\)"):
        await long_driver.read()
    # the connection is fine for everyone else
    (ok,) = drivers.make([drivers.cfg("tcp", 2)])
    await ok.read()


async def test_stopped_server_gives_errors_and_a_restart_recovers(
    sim: SdmSimulator, drivers: Drivers
) -> None:
    a, b = drivers.make([drivers.cfg("tcp", u, timeout_s=0.5) for u in (1, 2)])
    await a.read()
    await b.read()

    await sim.stop()
    for driver in (a, b):
        with pytest.raises(DeviceGoneError):
            await driver.read()
    await a.recover()  # nothing answers: reconnecting is the right call, and it fails quietly
    assert not a.bus.connected

    await sim.start()
    for driver in (a, b):
        assert len(await driver.read()) == len(driver.profile.fields)
    assert a.bus.connects == 2


async def test_rtu_line_without_a_server_times_out_then_recovers(
    sim: SdmSimulator, drivers: Drivers
) -> None:
    (driver,) = drivers.make([drivers.cfg("rtu", 1, timeout_s=0.3)])
    await driver.read()
    await sim.stop()
    # A serial line cannot tell "no device" from "slow device": it times out.
    with pytest.raises(DeviceTimeoutError):
        await driver.read()
    await sim.start()
    assert len(await driver.read()) == len(driver.profile.fields)


async def test_nothing_listening_or_no_such_port_is_device_gone() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfgs = [
        ModbusDevice(id="tcp", profile="sdm120", host="127.0.0.1", port=port, timeout_s=1),
        ModbusDevice(id="rtu", profile="sdm120", transport="rtu", serial_port="/nonexistent/ttyX"),
    ]
    for driver in make_drivers(cfgs):
        with pytest.raises(DeviceGoneError, match="cannot connect"):
            await driver.connect()
        with pytest.raises(DeviceGoneError):
            await driver.read()
        await driver.close()
        await driver.close()  # twice is harmless


def test_make_drivers_gives_one_bus_per_line_or_gateway() -> None:
    def dev(i: str, **kw: object) -> ModbusDevice:
        return ModbusDevice(id=i, profile="sdm120", **kw)  # type: ignore[arg-type]

    cfgs = [
        dev("a", host="10.0.0.5", unit_id=1),
        dev("b", host="10.0.0.5", unit_id=2),
        dev("c", host="10.0.0.5", port=5020, unit_id=1),
        dev("d", transport="rtu", serial_port="/dev/ttyUSB0", unit_id=1, request_gap_ms=10),
        dev("e", transport="rtu", serial_port="/dev/ttyUSB0", unit_id=2, request_gap_ms=50),
        dev("f", transport="rtu-over-tcp", host="10.0.0.6", unit_id=3, timeout_s=4),
        dev("g", transport="rtu-over-tcp", host="10.0.0.6", unit_id=4),
    ]
    a, b, c, d, e, f, g = make_drivers(cfgs)
    assert [x.device_id for x in (a, b, c, d, e, f, g)] == list("abcdefg")
    assert a.bus is b.bus and a.bus is not c.bus
    assert d.bus is e.bus and f.bus is g.bus
    assert len({id(x.bus) for x in (a, c, d, f)}) == 4
    assert d.bus.request_gap_s == 0.05, "the line's gap is the largest any device asks"
    assert a.bus.request_gap_s == 0, "plain Modbus TCP needs no gap"
    assert f.bus.request_gap_s == 0.02 and f.bus.timeout_s == 4
    assert (a.bus.name, d.bus.name, f.bus.name) == (
        "tcp://10.0.0.5:502",
        "rtu:/dev/ttyUSB0",
        "rtu-over-tcp://10.0.0.6:502",
    )

    clash = [cfgs[3], dev("h", transport="rtu", serial_port="/dev/ttyUSB0", baudrate=19200)]
    with pytest.raises(ValueError, match="share serial port /dev/ttyUSB0"):
        make_drivers(clash)


async def test_command_line_simulator() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_runtime.simulators.sdm",
        "--tcp-port",
        "0",
        "--unit",
        "1",
        "--unit",
        "7",
        "--rtu",
        "--seed",
        "3",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        async with asyncio.timeout(20):
            while not (lines and lines[-1].startswith("rtu:")):
                line = await proc.stdout.readline()
                assert line, f"simulator exited early: {lines}"
                lines.append(line.decode().strip())
        assert lines[0] == "Eastron SDM630 simulator, unit ids 1, 7"
        m = re.fullmatch(r"modbus tcp: 127\.0\.0\.1:(\d+)", lines[1])
        assert m
        device = lines[2].removeprefix("rtu: ")
        cfgs = [
            ModbusDevice(
                id="via-tcp", profile="sdm630", host="127.0.0.1", port=int(m[1]), unit_id=7
            ),
            ModbusDevice(
                id="via-rtu", profile="sdm630", transport="rtu", serial_port=device, unit_id=7
            ),
        ]
        for driver in make_drivers(cfgs):
            try:
                values = await driver.read()
            finally:
                await driver.close()
            assert values[0] is not None and math.isclose(values[0], 230, abs_tol=10)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
    assert proc.returncode == 0


def test_only_the_modbus_driver_imports_pymodbus() -> None:
    root = Path(__file__).resolve().parents[2]
    importers = sorted(
        str(p.relative_to(root))
        for folder in ("edge_runtime", "cloud_sync", "hub_lite", "predictor_ext", "bench")
        for p in (root / folder).rglob("*.py")
        if re.search(r"^\s*(?:from|import)\s+pymodbus\b", p.read_text(encoding="utf-8"), re.M)
    )
    assert importers == ["edge_runtime/devices/modbus.py"]
