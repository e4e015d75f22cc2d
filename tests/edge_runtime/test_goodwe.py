"""The GoodWe driver and simulator against each other and the real goodwe library, on sockets.

Every simulated inverter binds its own random loopback address (goodwe speaks UDP only on port
8899), Modbus TCP on a free port; the captures it serves are the recorded ones in
shared/data/goodwe_captures. The tests import goodwe directly only to prove that the real
library reads the simulator; the project reaches goodwe through the driver alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import goodwe
import goodwe.et
import pytest
from goodwe.exceptions import (
    InverterError,
    MaxRetriesException,
    PartialResponseException,
    RequestFailedException,
    RequestRejectedException,
)
from goodwe.modbus import validate_modbus_rtu_response

from cloud_sync import DeviceSchema
from edge_runtime.config import GoodweDevice
from edge_runtime.devices import goodwe as gw_driver
from edge_runtime.devices.base import (
    DeviceError,
    DeviceGoneError,
    DeviceTimeoutError,
    ProtocolError,
    Values,
)
from edge_runtime.devices.goodwe import GoodweDriver
from edge_runtime.simulators import goodwe as gw_sim
from edge_runtime.simulators.goodwe import GoodweSimulator
from edge_runtime.simulators.goodwe_registers import crc16, list_models, parse_rtu_reply

MakeSim = Callable[..., Awaitable[GoodweSimulator]]
DRIVER_LOG = "edge_runtime.devices.goodwe"
TIMEOUT_S = 0.5  # the devices' read timeout in these tests: failures come back quickly

# GW10K-ET as recorded (GW10K-ET_running_data.hex, _battery_info, _meter_data).
RECORDED = {
    "vpv1": 332.6,
    "ppv": 3456.0,
    "pbattery1": -2512.0,
    "active_power": -3.0,
    "house_consumption": 947.0,
    "e_total": 6085.3,
    "battery_mode": 3.0,
    "battery_soc": 68.0,
    "active_power_total": -110.0,
}


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    """Start simulators (Modbus TCP on a free port too); all are stopped at the end."""
    sims: list[GoodweSimulator] = []

    async def make(**kwargs: Any) -> GoodweSimulator:
        kwargs.setdefault("tcp_port", 0)
        sim = GoodweSimulator(**kwargs)
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()


@pytest.fixture(params=["udp", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def port_of(sim: GoodweSimulator, transport: str) -> int:
    if transport == "udp":
        return gw_sim.UDP_PORT
    assert sim.tcp_port is not None
    return sim.tcp_port


def driver_for(
    sim: GoodweSimulator, transport: str = "udp", family: Any = None, timeout_s: float = TIMEOUT_S
) -> GoodweDriver:
    cfg = GoodweDevice(
        id="inverter",
        host=sim.host,
        port=port_of(sim, transport),
        family=family,
        timeout_s=timeout_s,
    )
    return GoodweDriver(cfg)


def by_name(schema: DeviceSchema, values: Values) -> dict[str, float | None]:
    assert len(values) == len(schema.fields)
    return {f.name: v for f, v in zip(schema.fields, values, strict=True)}


def num(values: dict[str, float | None], name: str) -> float:
    value = values[name]
    assert value is not None, name
    return value


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait for a condition the event loop makes true (the simulator runs in this loop)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# ---------------------------------------------------------------------- the real library


async def test_library_detects_family_and_reads(make_sim: MakeSim, transport: str) -> None:
    sim = await make_sim(dynamic=False)
    inv = await goodwe.connect(sim.host, port_of(sim, transport), family=None, timeout=1, retries=1)
    assert isinstance(inv, goodwe.et.ET)
    assert (inv.model_name, inv.serial_number) == ("GW10K-ET", "9010KETU000W0000")
    assert inv.rated_power == 10000
    data = await inv.read_runtime_data()
    assert {k: data[k] for k in RECORDED} == RECORDED
    assert data["battery_mode_label"] == "Charge"


@pytest.mark.parametrize("model", list_models())
async def test_every_recorded_model_reads(make_sim: MakeSim, model: str) -> None:
    sim = await make_sim(model=model, dynamic=False)
    inv = await goodwe.connect(sim.host, gw_sim.UDP_PORT, timeout=1, retries=1)
    assert isinstance(inv, goodwe.et.ET)
    drv = driver_for(sim)
    values = by_name(await drv.connect(), await drv.read())
    assert values["ppv"] is not None and values["house_consumption"] is not None
    assert values["vgrid"] is not None and values["vgrid"] > 200
    # Only blocks the recorded inverter never answered are switched off.
    disabled = drv.info["disabled_blocks"]
    assert isinstance(disabled, list)
    assert not set(disabled) & set(sim.captures)


async def test_simulator_frames_are_what_goodwe_validates(make_sim: MakeSim) -> None:
    sim = await make_sim(dynamic=False)
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            replies.put_nowait(data)

    udp, _ = await loop.create_datagram_endpoint(Client, remote_addr=(sim.host, gw_sim.UDP_PORT))
    try:

        async def ask(func: int, start: int, count: int) -> bytes:
            pdu = bytes((0xF7, func)) + start.to_bytes(2, "big") + count.to_bytes(2, "big")
            udp.sendto(pdu + crc16(pdu).to_bytes(2, "little"))
            async with asyncio.timeout(1):
                return await replies.get()

        # Any range inside a recorded block: ppv1, two registers into the running data.
        reply = await ask(0x03, 35105, 2)
        assert validate_modbus_rtu_response(reply, 0x03, 35105, 2)
        assert parse_rtu_reply(reply)[1] == sim.captures["running_data"].payload[10:14]
        # One register past the block: ILLEGAL DATA ADDRESS, as goodwe decodes it.
        reply = await ask(0x03, 35100 + 0x7D, 1)
        with pytest.raises(RequestRejectedException) as rejected:
            validate_modbus_rtu_response(reply, 0x03, 35225, 1)
        assert rejected.value.message == "ILLEGAL DATA ADDRESS"
        assert reply[3:5] == b"\x83\x02"
        assert (await ask(0x03, 35100, 0))[3:5] == b"\x83\x03"  # ILLEGAL DATA VALUE
        assert (await ask(0x10, 35100, 1))[3:5] == b"\x90\x01"  # ILLEGAL FUNCTION
    finally:
        udp.close()
    assert sim.responder.rejected["0x8999"] == 1


# ---------------------------------------------------------------------- the driver


async def test_schema_has_units_and_tolerances_and_values_align(
    make_sim: MakeSim, transport: str
) -> None:
    sim = await make_sim(dynamic=False)
    drv = driver_for(sim, transport)
    schema = await drv.connect()
    assert (schema.kind, schema.model) == ("inverter", "GW10K-ET")
    fields = {f.name: f for f in schema.fields}
    expected = {
        "ppv": ("W", 5.0),
        "vpv1": ("V", 0.1),
        "ipv1": ("A", 0.01),
        "fgrid": ("Hz", 0.005),
        "temperature": ("C", 0.05),
        "battery_soc": ("%", 0.5),
        "e_total": ("kWh", 0.0005),
        "reactive_power": ("var", 5.0),
        "apparent_power": ("VA", 5.0),
        "battery_mode": ("", 0.01),
    }
    assert {n: (fields[n].unit, fields[n].tol) for n in expected} == expected
    assert fields["e_total"].model == "trend"
    # Text sensors are left out; their numeric codes stay.
    assert not {"timestamp", "errors", "battery_mode_label", "work_mode_label"} & fields.keys()
    assert drv.info["model"] == "GW10K-ET"
    assert drv.info["serial_number"] == "9010KETU000W0000"
    assert drv.info["firmware"] == "04029-10-S11"
    assert drv.info["family"] == "ET"
    assert drv.info["transport"] == ("udp" if transport == "udp" else "modbus-tcp")

    values = by_name(schema, await drv.read())
    assert {k: values[k] for k in RECORDED} == RECORDED
    # Field by field, the driver's block reads agree with goodwe's own read_runtime_data().
    inv = await goodwe.connect(sim.host, port_of(sim, transport), family="ET", timeout=1)
    library = await inv.read_runtime_data()
    assert values == {name: float(library[name]) for name in values}
    await drv.close()


async def test_frames_are_logged_as_captures(
    make_sim: MakeSim, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await make_sim(dynamic=False)
    drv = driver_for(sim)
    await drv.connect()
    caplog.set_level(logging.DEBUG, logger=DRIVER_LOG)
    await drv.read()
    logged = [r.getMessage() for r in caplog.records if " running_data " in r.getMessage()]
    assert len(logged) == 1
    reply_hex = logged[0].rsplit(" -> ", 1)[1]
    # The DEBUG line holds the reply exactly as the capture file does: a log is a test capture.
    assert reply_hex == sim.captures["running_data"].path.read_text().strip()


async def test_values_move_plausibly(make_sim: MakeSim) -> None:
    # A day in a minute, from 11:30: sun high, battery charging from the surplus.
    sim = await make_sim(day_seconds=60, start_hour=11.5)
    drv = driver_for(sim)
    schema = await drv.connect()
    first = by_name(schema, await drv.read())
    latest = first
    counters = ("e_total", "e_load_total", "e_bat_charge_total", "h_total")

    async def moved() -> None:
        nonlocal latest
        while True:
            now = by_name(schema, await drv.read())
            for name in counters:  # counters never go back
                assert num(now, name) >= num(latest, name), name
            latest = now
            if (
                now["ppv"] != first["ppv"]
                and now["house_consumption"] != first["house_consumption"]
                and now["battery_soc"] != first["battery_soc"]
                and now["e_total"] != first["e_total"]
                and now["e_load_total"] != first["e_load_total"]
            ):
                return

    async with asyncio.timeout(5):
        await moved()
    state = sim.site.state if sim.site else None
    assert state is not None
    v = latest
    assert 2000 < num(v, "ppv") <= 8500
    assert num(v, "pbattery1") <= 0  # charging, or idle when full, at noon
    # goodwe computes the house's consumption as PV + battery - export: it is the modelled load.
    assert num(v, "house_consumption") == num(v, "ppv") + num(v, "pbattery1") - num(
        v, "active_power"
    )
    assert 11 <= state.at.hour <= 14


async def test_night_runs_on_the_battery(make_sim: MakeSim) -> None:
    sim = await make_sim(start_hour=23.0, day_seconds=3600)
    drv = driver_for(sim)
    values = by_name(await drv.connect(), await drv.read())
    assert values["ppv"] == 0
    assert num(values, "pbattery1") > 0  # discharging
    assert values["battery_mode"] == 2  # goodwe: "Discharge"
    assert num(values, "house_consumption") == num(values, "pbattery1") - num(
        values, "active_power"
    )
    assert values["e_day"] == 0


async def test_rejected_block_is_switched_off_and_logged_once(
    make_sim: MakeSim, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await make_sim(dynamic=False, reject_blocks={"meter_data"})
    if transport == "udp":
        # Why the driver reads blocks itself: goodwe's own read fails as a whole here.
        inv = await goodwe.connect(sim.host, gw_sim.UDP_PORT, family="ET", timeout=1)
        with pytest.raises(RequestRejectedException):
            await inv.read_runtime_data()
    drv = driver_for(sim, transport)
    schema = await drv.connect()
    caplog.set_level(logging.INFO, logger=DRIVER_LOG)
    first = by_name(schema, await drv.read())
    asked = sim.responder.requests["meter_data"]
    for _ in range(3):
        values = by_name(schema, await drv.read())
    # A reconnect (after the inverter dropped off) remembers what it rejected.
    assert await drv.connect() == schema
    assert by_name(schema, await drv.read()) == values
    assert sim.responder.requests["meter_data"] == asked  # never asked again
    assert values == first
    assert values["active_power_total"] is None and values["meter_freq"] is None
    assert {k: values[k] for k in RECORDED if k != "active_power_total"} == {
        k: v for k, v in RECORDED.items() if k != "active_power_total"
    }
    warnings = [r for r in caplog.records if r.name == DRIVER_LOG and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "meter_data" in warnings[0].getMessage()
    assert drv.info["disabled_blocks"] == ["meter_data"]


async def test_block_rejected_mid_run(make_sim: MakeSim, caplog: pytest.LogCaptureFixture) -> None:
    sim = await make_sim(dynamic=False)
    drv = driver_for(sim)
    schema = await drv.connect()
    assert by_name(schema, await drv.read())["battery_soc"] == 68
    caplog.set_level(logging.WARNING, logger=DRIVER_LOG)
    sim.reject_block("battery_info")  # e.g. a firmware update
    values = by_name(schema, await drv.read())
    assert values["battery_soc"] is None and values["ppv"] == 3456
    sim.restore_block("battery_info")
    await drv.read()
    assert sim.responder.rejected["battery_info"] == 1
    assert len([r for r in caplog.records if r.name == DRIVER_LOG]) == 1
    assert drv.info["disabled_blocks"] == ["battery_info"]


async def test_longer_meter_block_falls_back_to_what_the_inverter_answers(
    make_sim: MakeSim,
) -> None:
    # The GW25K-ET recording answers the 58-register meter block, not goodwe's first try of 125,
    # and has no second battery: what a real 25 kW inverter of that firmware does.
    sim = await make_sim(model="GW25K-ET", dynamic=False)
    drv = driver_for(sim)
    schema = await drv.connect()
    for _ in range(2):
        values = by_name(schema, await drv.read())
    assert values["meter_voltage1"] == 229.0  # register 36052, inside 58 registers
    assert values["meter_current3"] == 1.9  # 36057, the last one
    assert values["meter_e_total_imp1"] is None  # register 36108, beyond
    assert values["vbattery2"] is not None  # battery2_info_extended is answered
    assert values["battery2_soc"] is None  # battery2_info is not
    assert drv.info["disabled_blocks"] == ["battery2_info"]
    assert sim.responder.rejected["meter_data"] == 1


async def test_stopped_inverter_fails_fast_and_recovers(make_sim: MakeSim, transport: str) -> None:
    sim = await make_sim(dynamic=False)
    drv = driver_for(sim, transport)
    await drv.connect()
    await drv.read()
    await sim.stop()
    started = time.monotonic()
    with pytest.raises((DeviceTimeoutError, DeviceGoneError)) as failed:
        await drv.read()
    assert time.monotonic() - started < TIMEOUT_S
    if transport == "udp":  # the ICMP "port unreachable" tells a refused from a lost datagram
        assert isinstance(failed.value, DeviceGoneError)
    with pytest.raises(DeviceError):
        await drv.connect()
    await sim.start()
    # The scheduler reconnects after DeviceGoneError and reads on after a timeout: both work.
    assert by_name(await drv.connect(), await drv.read())["ppv"] == 3456
    assert len(await drv.read()) > 100


async def test_stuck_inverter_answers_after_the_wake_message(
    make_sim: MakeSim, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await make_sim(dynamic=False)
    drv = driver_for(sim, transport)
    schema = await drv.connect()
    sim.stuck = True
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(DeviceTimeoutError):
            await drv.read()
        assert time.monotonic() - started < TIMEOUT_S + 0.1
    assert sim.dropped >= 2 and sim.wake_count == 0
    caplog.set_level(logging.INFO, logger=DRIVER_LOG)
    await drv.recover()
    async with asyncio.timeout(1):
        await sim.wait_wakes(1)
    assert not sim.stuck
    assert any("answered the wake message" in r.getMessage() for r in caplog.records)
    assert by_name(schema, await drv.read())["ppv"] == 3456


async def test_detecting_a_silent_inverter_gives_up_in_time(
    make_sim: MakeSim, transport: str
) -> None:
    # goodwe's own detection would wait 4 x retries seconds on UDP; the scheduler allows 3 x.
    sim = await make_sim(dynamic=False)
    sim.stuck = True
    started = time.monotonic()
    with pytest.raises(DeviceTimeoutError):
        await driver_for(sim, transport).connect()
    assert time.monotonic() - started < 3 * TIMEOUT_S
    await sim.stop()
    with pytest.raises(DeviceGoneError if transport == "udp" else DeviceError):
        await driver_for(sim, transport).connect()


def test_wake_message_is_broadcast_only_off_loopback() -> None:
    assert gw_driver.WAKE_MESSAGE == gw_sim.WAKE_MESSAGE
    assert gw_driver.WAKE_PORT == gw_sim.WAKE_PORT
    assert gw_driver._wake_targets("127.3.4.5") == ("127.3.4.5",)
    assert gw_driver._wake_targets("192.168.1.20") == ("192.168.1.20", "255.255.255.255")


async def test_cancelling_a_read_is_not_swallowed(make_sim: MakeSim) -> None:
    # goodwe retries when its request is cancelled; the driver must still end cancelled.
    sim = await make_sim(dynamic=False)
    drv = driver_for(sim, timeout_s=1.0)
    await drv.connect()
    sim.stuck = True
    task = asyncio.create_task(drv.read())
    await until(lambda: sim.dropped >= 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The same through asyncio.timeout: the caller gets its TimeoutError, not a device error.
    drv = driver_for(sim, timeout_s=1.0)
    sim.stuck = False
    await drv.connect()
    sim.stuck = True
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await drv.read()


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RequestRejectedException("ILLEGAL DATA ADDRESS"), ProtocolError),
        (PartialResponseException(10, 257), ProtocolError),
        (RequestFailedException("No valid response"), DeviceTimeoutError),
        (MaxRetriesException(), DeviceTimeoutError),
        (TimeoutError(), DeviceTimeoutError),
        (ConnectionResetError(), DeviceGoneError),
        (InverterError("Unable to connect to the inverter"), DeviceGoneError),
        (ValueError("month must be in 1..12"), ProtocolError),
    ],
)
def test_library_errors_become_ours(exc: BaseException, expected: type[DeviceError]) -> None:
    assert type(gw_driver._device_error(exc, "inverter")) is expected


def test_refused_in_the_context_chain_means_gone() -> None:
    try:
        try:
            raise ConnectionRefusedError
        except ConnectionRefusedError:
            raise RequestFailedException("No valid response") from None
    except RequestFailedException as exc:
        assert isinstance(gw_driver._device_error(exc, "inverter"), DeviceGoneError)


# ---------------------------------------------------------------------- the simulator


async def test_addresses_are_random_loopback_and_collisions_are_refused(
    make_sim: MakeSim,
) -> None:
    a, b = await make_sim(), await make_sim()
    assert a.host != b.host
    for host in (a.host, b.host):
        assert re.fullmatch(r"127\.(\d+)\.(\d+)\.(\d+)", host)
        assert all(1 <= int(x) <= 254 for x in host.split(".")[1:])
    clash = GoodweSimulator(a.host)
    with pytest.raises(OSError):
        await clash.start()
    assert not clash.running
    with pytest.raises(ValueError, match="loopback"):
        GoodweSimulator("192.168.1.5")
    with pytest.raises(ValueError, match="unknown blocks"):
        GoodweSimulator(reject_blocks={"settings"})


async def test_speed(make_sim: MakeSim) -> None:
    sim = await make_sim()
    inv = await goodwe.connect(sim.host, gw_sim.UDP_PORT, family="ET", timeout=1)
    reads, started = 0, time.monotonic()
    while time.monotonic() - started < 0.5:
        await inv.read_runtime_data()
        reads += 1
    rate = reads / (time.monotonic() - started)
    print(f"goodwe read_runtime_data() from the simulator: {rate:.0f}/s")
    assert rate > 50  # ~1000/s on a desktop; the floor only catches a pathological slowdown


async def test_command_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_runtime.simulators.goodwe",
        "--tcp-port",
        "0",
        "--day-seconds",
        "600",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode()
        m = re.fullmatch(r"ready GW10K-ET udp://(\S+):8899 modbus-tcp://\S+:(\d+)\n", line)
        assert m, line
        host, tcp_port = m.group(1), int(m.group(2))
        for port in (gw_sim.UDP_PORT, tcp_port):
            inv = await goodwe.connect(host, port, timeout=1, retries=1)
            assert (await inv.read_runtime_data())["vgrid"] > 200
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(10):
            _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
