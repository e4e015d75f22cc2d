"""A DSMR 5 smart meter on a pseudo-terminal: P1 telegrams with real CRCs, and faults on demand.

Library::

    async with DsmrSimulator(interval_s=0.1) as sim:
        driver = DsmrDriver(DsmrDevice(id="p1", serial_port=sim.port_path))
        sim.inject("bad_crc")

Command line (prints the device path to open, then runs until Ctrl-C)::

    python -m edge_runtime.simulators.dsmr [--interval 1] [--fault-rate 0] [--seed N]

Values move like a home with a few kW of load and rooftop PV on three phases: per-phase import
and export, voltages around 230 V that sag with load, currents, energy counters on the tariff
of the hour, and a slowly rising gas counter.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import math
import os
import random
import sys
import tty
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from types import TracebackType
from typing import Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..devices.dsmr_telegram import crc16

__all__ = ("FAULTS", "DsmrSimulator", "Fault", "main")

_log = logging.getLogger(__name__)

Fault = Literal["bad_crc", "truncated", "garbage"]
FAULTS: tuple[Fault, ...] = ("bad_crc", "truncated", "garbage")

HEADER = "ISK5\\2M550T-1012"  # an Iskra AM550, a common DSMR 5 meter
_METER_ID = "E0043007052870318"
_GAS_METER_ID = "G0012345678901234"


def _dutch_zone() -> tzinfo:
    try:
        return ZoneInfo("Europe/Amsterdam")
    except ZoneInfoNotFoundError:
        # Without tzdata, winter time all year: the W flag keeps the timestamp honest.
        return timezone(timedelta(hours=1))


_ZONE = _dutch_zone()


class _Home:
    """Three phases of household load and PV, integrated into the meter's counters."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.load_kw = [0.4, 0.8, 0.3]
        self.pv_kw = 0.0
        self.clouds = 0.7
        self.volt_base = [230.0, 231.0, 229.5]
        self.import_kwh = [4321.123, 5432.234]  # tariff 1 (low), tariff 2 (normal)
        self.export_kwh = [1234.345, 2345.456]
        self.gas_m3 = 1234.567

    def step(self, dt_s: float, local: datetime) -> dict[str, float]:
        rnd = self._rng
        self.load_kw = [min(max(p + rnd.gauss(0, 0.05), 0.05), 3.5) for p in self.load_kw]
        if rnd.random() < 0.02:  # a kettle or a washing machine switches
            phase = rnd.randrange(3)
            self.load_kw[phase] = min(self.load_kw[phase] + rnd.choice((-1.8, 1.8)), 3.5)
            self.load_kw[phase] = max(self.load_kw[phase], 0.05)
        # PV follows the sun (06:00-20:00 local, 4 kWp) under drifting clouds.
        hour = local.hour + local.minute / 60
        sun = max(math.sin(math.pi * (hour - 6) / 14), 0.0) if 6 <= hour <= 20 else 0.0
        self.clouds = min(max(self.clouds + rnd.gauss(0, 0.02), 0.2), 1.0)
        self.pv_kw = 4.0 * sun * self.clouds
        net = [load - self.pv_kw / 3 for load in self.load_kw]
        volts = [
            round(base + rnd.gauss(0, 0.3) - 0.8 * n, 1)
            for base, n in zip(self.volt_base, net, strict=True)
        ]
        total = sum(net)
        # Dutch low tariff: nights and weekends.
        tariff = 1 if local.weekday() >= 5 or not 7 <= local.hour < 23 else 2
        hours = dt_s / 3600
        self.import_kwh[tariff - 1] += max(total, 0.0) * hours
        self.export_kwh[tariff - 1] += max(-total, 0.0) * hours
        self.gas_m3 += rnd.uniform(0.0, 0.4) * hours  # a boiler on and off
        v: dict[str, float] = {
            "energy_import_t1_kwh": round(self.import_kwh[0], 3),
            "energy_import_t2_kwh": round(self.import_kwh[1], 3),
            "energy_export_t1_kwh": round(self.export_kwh[0], 3),
            "energy_export_t2_kwh": round(self.export_kwh[1], 3),
            "power_import_kw": round(max(total, 0.0), 3),
            "power_export_kw": round(max(-total, 0.0), 3),
            "tariff": float(tariff),
            "gas_m3": round(self.gas_m3, 3),
        }
        for i, n in enumerate(net, start=1):
            v[f"voltage_l{i}_v"] = volts[i - 1]
            v[f"current_l{i}_a"] = float(round(abs(n) * 1000 / volts[i - 1]))
            v[f"power_import_l{i}_kw"] = round(max(n, 0.0), 3)
            v[f"power_export_l{i}_kw"] = round(max(-n, 0.0), 3)
        return v


def _stamp(local: datetime) -> str:
    return local.strftime("%y%m%d%H%M%S") + ("S" if local.dst() else "W")


def _telegram_body(v: dict[str, float], local: datetime) -> str:
    """Everything from '/' to '!' inclusive, in the order of the DSMR 5.0.2 example."""
    hex_id = _METER_ID.encode().hex().upper()
    lines = [
        f"/{HEADER}",
        "",
        "1-3:0.2.8(50)",
        f"0-0:1.0.0({_stamp(local)})",
        f"0-0:96.1.1({hex_id})",
        f"1-0:1.8.1({v['energy_import_t1_kwh']:010.3f}*kWh)",
        f"1-0:1.8.2({v['energy_import_t2_kwh']:010.3f}*kWh)",
        f"1-0:2.8.1({v['energy_export_t1_kwh']:010.3f}*kWh)",
        f"1-0:2.8.2({v['energy_export_t2_kwh']:010.3f}*kWh)",
        f"0-0:96.14.0({int(v['tariff']):04d})",
        f"1-0:1.7.0({v['power_import_kw']:06.3f}*kW)",
        f"1-0:2.7.0({v['power_export_kw']:06.3f}*kW)",
        "0-0:96.7.21(00004)",
        "0-0:96.7.9(00002)",
        "1-0:99.97.0(1)(0-0:96.7.19)(230101120000W)(0000000240*s)",
        "1-0:32.32.0(00002)",
        "1-0:52.32.0(00001)",
        "1-0:72.32.0(00000)",
        "1-0:32.36.0(00000)",
        "1-0:52.36.0(00003)",
        "1-0:72.36.0(00000)",
        "0-0:96.13.0()",
    ]
    lines += [f"1-0:{c}.7.0({v[f'voltage_l{i}_v']:05.1f}*V)" for i, c in _phases(32)]
    lines += [f"1-0:{c}.7.0({int(v[f'current_l{i}_a']):03d}*A)" for i, c in _phases(31)]
    lines += [f"1-0:{c}.7.0({v[f'power_import_l{i}_kw']:06.3f}*kW)" for i, c in _phases(21)]
    lines += [f"1-0:{c}.7.0({v[f'power_export_l{i}_kw']:06.3f}*kW)" for i, c in _phases(22)]
    lines += [
        "0-1:24.1.0(003)",
        f"0-1:96.1.0({_GAS_METER_ID.encode().hex().upper()})",
        f"0-1:24.2.1({_stamp(local)})({v['gas_m3']:09.3f}*m3)",
        "!",
    ]
    return "\r\n".join(lines)


def _phases(l1_code: int) -> tuple[tuple[int, int], ...]:
    # L2 and L3 codes are L1's plus 20 and 40 (32.7.0, 52.7.0, 72.7.0).
    return ((1, l1_code), (2, l1_code + 20), (3, l1_code + 40))


class DsmrSimulator:
    """Writes a DSMR 5 telegram every ``interval_s`` to the master side of a pty.

    ``port_path`` is the slave side to open as a serial port. ``inject(fault)`` turns the next
    telegram into a fault; ``fault_rate`` does so at random. ``pause()`` stops the telegrams
    while the port stays (a meter that went quiet); leaving the ``async with`` removes the port
    (a cable pulled). ``sent`` holds the values of the latest good telegrams, as written.
    """

    def __init__(
        self, interval_s: float = 1.0, *, fault_rate: float = 0.0, seed: int | None = None
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.fault_rate = fault_rate
        self._rng = random.Random(seed)
        self._home = _Home(self._rng)
        self._master: int | None = None
        self._slave: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._faults: collections.deque[Fault] = collections.deque()
        self._paused = False
        self.port_path = ""
        self.telegrams = 0
        """Good telegrams written."""
        self.faults_sent: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self.dropped = 0
        """Telegrams lost because nobody read the port and its buffer was full."""
        self.sent: collections.deque[dict[str, float]] = collections.deque(maxlen=1000)

    async def __aenter__(self) -> Self:
        self._master, self._slave = os.openpty()
        # Raw mode: no echo back into the master, and no CR -> LF translation that would
        # break every CRC before the reader sets its own mode.
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.port_path = os.ttyname(self._slave)
        self._task = asyncio.create_task(self._run(), name=f"dsmr-simulator {self.port_path}")
        _log.info("DSMR simulator on %s every %g s", self.port_path, self.interval_s)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop and remove the port; a reader that has it open sees a hang-up."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None

    def inject(self, fault: Fault) -> None:
        """Make the next telegram a fault: a flipped digit under an unchanged CRC, a telegram
        cut off halfway, or noise on the line before a good telegram."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        self._faults.append(fault)

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while True:
            if not self._paused:
                self._tick()
            tick += 1
            # Ticks on a fixed grid so the rate does not drift with the time each write takes.
            await asyncio.sleep(max(start + tick * self.interval_s - loop.time(), 0.0))

    def _tick(self) -> None:
        local = datetime.now(UTC).astimezone(_ZONE)
        values = self._home.step(self.interval_s, local)
        body = _telegram_body(values, local).encode("ascii")
        telegram = body + b"%04X\r\n" % crc16(body)
        fault = self._faults.popleft() if self._faults else None
        if fault is None and self.fault_rate and self._rng.random() < self.fault_rate:
            fault = self._rng.choice(FAULTS)
        if fault == "bad_crc":
            # Line noise: one digit of the import counter changes, the CRC does not.
            at = telegram.index(b"1-0:1.8.1(") + 10
            digit = b"%d" % ((telegram[at] - 0x30 + 1) % 10)
            telegram = telegram[:at] + digit + telegram[at + 1 :]
        elif fault == "truncated":
            telegram = telegram[: len(telegram) // 2]
        elif fault == "garbage":
            # No '/' in the noise, so it cannot pose as the start of a telegram.
            noise = bytes(self._rng.choice(b"\x00\xff\x7f#$%&ABCxyz0189~") for _ in range(24))
            telegram = noise + b"\r\n" + telegram
        _log.debug("%s: %s %r", self.port_path, fault or "telegram", telegram)
        if self._write(telegram):
            if fault is None or fault == "garbage":
                self.telegrams += 1
                self.sent.append(values)
            if fault is not None:
                self.faults_sent[fault] += 1

    def _write(self, data: bytes) -> bool:
        if self._master is None:
            return False
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            # Nobody is reading and the pty buffer is full: a real meter does not wait either.
            self.dropped += 1
            return False
        return True


async def _serve(args: argparse.Namespace) -> None:
    async with DsmrSimulator(args.interval, fault_rate=args.fault_rate, seed=args.seed) as sim:
        sys.stdout.write(f"{sim.port_path}\n")
        sys.stdout.flush()
        await asyncio.Event().wait()  # until Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge_runtime.simulators.dsmr",
        description="A DSMR 5 P1 port on a pseudo-terminal; prints the device path to open.",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between telegrams")
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, help="share of telegrams turned into faults"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for repeatable values")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every telegram")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
