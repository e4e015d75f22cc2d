"""Eastron SDM630/SDM120 meters simulated as real Modbus servers: TCP, RTU over TCP, RTU on a pty.

The registers are those of the shipped profile, encoded as the meter does (float32, most
significant register first), so any Modbus client reads it as it would read the real meter. Each
unit id on the server is its own meter with its own ``MeterModel``: voltages around 230 V with
noise, 50 Hz, a household load that switches appliances on and off, some PV that exports at times,
and energy counters that integrate exactly the power served. Values advance on every read.

Library use::

    async with SdmSimulator(units=(1, 2), tcp_port=0, rtu=True) as sim:
        sim.tcp_port        # the port picked
        sim.rtu_device      # the serial device path a client opens
        sim.silence(2)      # unit 2 stops answering
        await sim.stop(); await sim.start()   # same ports and device path again

Command line (prints where to connect, runs until Ctrl-C)::

    python -m edge_runtime.simulators.sdm --tcp-port 5020 --unit 1 --unit 2 --rtu
"""

from __future__ import annotations

import argparse
import asyncio
import cmath
import contextlib
import logging
import math
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from edge_runtime.devices.modbus import (
    ILLEGAL_VALUE,
    RegisterImage,
    RegisterServer,
    Transport,
)
from edge_runtime.devices.register_profile import Profile, Table, load_profile

from .pty import PtyNullModem

__all__ = ("MeterModel", "SdmSimulator", "SimRequest", "main")

_log = logging.getLogger(__name__)

_PHASE_SHIFT = (0.0, -2 * math.pi / 3, 2 * math.pi / 3)


@dataclass
class _Appliance:
    power_w: float
    phase: int
    on_rate: float  # switch-ons per second while off
    off_rate: float  # switch-offs per second while on
    on: bool = False


class MeterModel:
    """Plausible readings of one grid connection, advanced by ``step(t)``.

    Power is import positive (Eastron's sign). Energy counters integrate the power of each step
    over the time since the previous step, so they always agree with the power served.
    """

    def __init__(
        self,
        phases: int = 3,
        *,
        seed: int | None = None,
        base_load_w: float = 250.0,
        pv_peak_w: float = 3000.0,
        pv_period_s: float = 240.0,
        start_import_kwh: float = 1234.5,
        start_export_kwh: float = 321.0,
        t0: float = 0.0,
    ) -> None:
        if phases not in (1, 3):
            raise ValueError("phases must be 1 or 3")
        self.phases = phases
        self._rng = random.Random(seed)
        rng = self._rng
        self._base = [base_load_w * rng.uniform(0.6, 1.4) for _ in range(phases)]
        self._pv_peak = pv_peak_w
        self._pv_period = pv_period_s
        self._phase0 = rng.uniform(0, 2 * math.pi)
        self._appliances = [
            _Appliance(2000.0, 0, 1 / 40, 1 / 20),  # kettle
            _Appliance(800.0, (1 % phases), 1 / 30, 1 / 60),  # fridge compressor
            _Appliance(1500.0, (2 % phases), 1 / 90, 1 / 45),  # dishwasher heater
            _Appliance(120.0, 0, 1 / 10, 1 / 10),  # lights, TV
        ]
        self.t = t0
        self.voltage = [230.0] * phases
        self.power = [0.0] * phases
        self.pf_abs = [0.95] * phases
        self.frequency = 50.0
        self.import_kwh = start_import_kwh
        self.export_kwh = start_export_kwh
        self.import_phase_kwh = [start_import_kwh / phases] * phases
        self.export_phase_kwh = [start_export_kwh / phases] * phases
        self.q_import_kvarh = start_import_kwh * 0.2
        self.q_export_kvarh = start_export_kwh * 0.05
        self.demand_w = 0.0
        self.demand_max_w = 0.0
        self._compute(t0)

    def step(self, t: float) -> None:
        """Advance to time ``t`` (seconds): new instantaneous values, then energy over the step."""
        dt = max(0.0, t - self.t)
        self.t = t
        rng = self._rng
        for a in self._appliances:
            rate = a.off_rate if a.on else a.on_rate
            if rng.random() < 1 - math.exp(-rate * dt):
                a.on = not a.on
        self._compute(t)
        hours = dt / 3600
        total = sum(self.power)
        self.import_kwh += max(total, 0.0) * hours / 1000
        self.export_kwh += max(-total, 0.0) * hours / 1000
        for i, p in enumerate(self.power):
            self.import_phase_kwh[i] += max(p, 0.0) * hours / 1000
            self.export_phase_kwh[i] += max(-p, 0.0) * hours / 1000
        q = sum(self._reactive())
        self.q_import_kvarh += max(q, 0.0) * hours / 1000
        self.q_export_kvarh += max(-q, 0.0) * hours / 1000
        # Eastron's demand is a sliding average over the demand period; a one-minute
        # exponential average keeps it visibly moving in a demo.
        k = 1 - math.exp(-dt / 60.0)
        self.demand_w += (total - self.demand_w) * k
        self.demand_max_w = max(self.demand_max_w, self.demand_w)

    def _compute(self, t: float) -> None:
        rng = self._rng
        pv = self._pv_peak * max(0.0, math.sin(2 * math.pi * t / self._pv_period + self._phase0))
        pv *= rng.uniform(0.97, 1.0)  # passing clouds
        for i in range(self.phases):
            wobble = 1.5 * math.sin(2 * math.pi * t / 90 + i)
            self.voltage[i] = 230.0 + wobble + rng.gauss(0, 0.3)
            load = self._base[i] * (1 + 0.05 * rng.gauss(0, 1))
            load += sum(a.power_w for a in self._appliances if a.on and a.phase == i)
            self.power[i] = load - pv / self.phases
            self.pf_abs[i] = min(0.999, 0.9 + 0.09 * min(1.0, abs(self.power[i]) / 2000))
        self.frequency = 50.0 + 0.02 * math.sin(2 * math.pi * t / 300) + rng.gauss(0, 0.003)

    def _apparent(self) -> list[float]:
        return [abs(p) / pf for p, pf in zip(self.power, self.pf_abs, strict=True)]

    def _reactive(self) -> list[float]:
        # Household loads are inductive: reactive power positive whichever way P flows.
        return [
            s * math.sqrt(1 - pf * pf) for s, pf in zip(self._apparent(), self.pf_abs, strict=True)
        ]

    def values(self) -> dict[str, float]:
        """The current readings, keyed by the shipped profiles' field names."""
        s = self._apparent()
        q = self._reactive()
        current = [si / v for si, v in zip(s, self.voltage, strict=True)]
        pf = [math.copysign(a, p) for a, p in zip(self.pf_abs, self.power, strict=True)]
        total_p, total_s, total_q = sum(self.power), sum(s), sum(q)
        common = {
            "frequency_hz": self.frequency,
            "energy_import_kwh": self.import_kwh,
            "energy_export_kwh": self.export_kwh,
            "reactive_energy_import_kvarh": self.q_import_kvarh,
            "reactive_energy_export_kvarh": self.q_export_kvarh,
            "energy_total_kwh": self.import_kwh + self.export_kwh,
            "reactive_energy_total_kvarh": self.q_import_kvarh + self.q_export_kvarh,
            "power_demand_total_w": self.demand_w,
            "power_demand_max_w": self.demand_max_w,
        }
        if self.phases == 1:
            return {
                "voltage_v": self.voltage[0],
                "current_a": current[0],
                "active_power_w": self.power[0],
                "apparent_power_va": s[0],
                "reactive_power_var": q[0],
                "power_factor": pf[0],
                **common,
            }
        out: dict[str, float] = {}
        for i in range(3):
            n = f"l{i + 1}"
            out[f"voltage_{n}_v"] = self.voltage[i]
            out[f"current_{n}_a"] = current[i]
            out[f"active_power_{n}_w"] = self.power[i]
            out[f"apparent_power_{n}_va"] = s[i]
            out[f"reactive_power_{n}_var"] = q[i]
            out[f"power_factor_{n}"] = pf[i]
            out[f"voltage_thd_{n}_pct"] = 2.0 + 0.3 * math.sin(self.t / 50 + i)
            out[f"current_thd_{n}_pct"] = 8.0 + 4.0 * math.sin(self.t / 70 + i)
            out[f"energy_import_{n}_kwh"] = self.import_phase_kwh[i]
            out[f"energy_export_{n}_kwh"] = self.export_phase_kwh[i]
            out[f"energy_total_{n}_kwh"] = self.import_phase_kwh[i] + self.export_phase_kwh[i]
        v = [cmath.rect(self.voltage[i], _PHASE_SHIFT[i]) for i in range(3)]
        ll = [abs(v[0] - v[1]), abs(v[1] - v[2]), abs(v[2] - v[0])]
        neutral = abs(sum(cmath.rect(current[i], _PHASE_SHIFT[i]) for i in range(3)))
        out.update(
            voltage_avg_v=sum(self.voltage) / 3,
            current_avg_a=sum(current) / 3,
            current_sum_a=sum(current),
            active_power_total_w=total_p,
            apparent_power_total_va=total_s,
            reactive_power_total_var=total_q,
            power_factor_total=math.copysign(abs(total_p) / total_s, total_p) if total_s else 1.0,
            voltage_l1_l2_v=ll[0],
            voltage_l2_l3_v=ll[1],
            voltage_l3_l1_v=ll[2],
            voltage_ll_avg_v=sum(ll) / 3,
            current_neutral_a=neutral,
            **common,
        )
        return out


@dataclass(frozen=True)
class SimRequest:
    """One read request as the simulator saw it arrive."""

    t: float
    """Arrival time (the simulator's clock, monotonic seconds)."""
    transport: Transport
    unit: int
    table: Table
    address: int
    count: int
    answered: bool
    """False when the unit was silent."""


@dataclass
class _Meter:
    model: MeterModel
    image: RegisterImage
    served: dict[str, float]


class SdmSimulator:
    """Eastron meters (one per unit id) served over TCP, RTU over TCP and/or RTU on a pty.

    ``tcp_port``/``rtu_over_tcp_port``: None serves no such transport, 0 picks a free port.
    ``rtu=True`` serves RTU on one end of a pty null modem; clients open ``rtu_device``.
    """

    def __init__(
        self,
        *,
        profile: str | Profile = "sdm630",
        units: Sequence[int] = (1,),
        host: str = "127.0.0.1",
        tcp_port: int | None = 0,
        rtu_over_tcp_port: int | None = None,
        rtu: bool = False,
        seed: int | None = 0,
        pv_peak_w: float = 3000.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        if not units or len(set(units)) != len(units):
            raise ValueError("units must be distinct unit ids")
        self._clock = clock
        self._silent: set[int] = set()
        self._paused = False
        self.requests: deque[SimRequest] = deque(maxlen=100_000)
        phases = 3 if any("_l1" in f.name for f in self.profile.fields) else 1
        spans = _spans(self.profile)
        now = clock()
        self._meters: dict[int, _Meter] = {}
        for n, unit in enumerate(units):
            model = MeterModel(
                phases,
                seed=None if seed is None else seed + n,
                pv_peak_w=pv_peak_w,
                base_load_w=250.0 * (1 + n % 3),
                t0=now,
            )
            self._meters[unit] = _Meter(model, RegisterImage(spans), {})
            self._publish(unit)
        images = {u: m.image for u, m in self._meters.items()}
        self._link: PtyNullModem | None = PtyNullModem() if rtu else None
        self._servers: list[RegisterServer] = []
        wanted: tuple[tuple[Transport, int | None], ...] = (
            ("tcp", tcp_port),
            ("rtu-over-tcp", rtu_over_tcp_port),
        )
        for transport, port in wanted:
            if port is not None:
                self._servers.append(self._server(images, transport, host=host, port=port))
        self._rtu_server: RegisterServer | None = None
        if not self._servers and not rtu:
            raise ValueError("nothing to serve: give tcp_port, rtu_over_tcp_port or rtu=True")

    # --- where to connect -------------------------------------------------------------------

    @property
    def units(self) -> list[int]:
        return sorted(self._meters)

    @property
    def tcp_port(self) -> int:
        return self._port_of("tcp")

    @property
    def rtu_over_tcp_port(self) -> int:
        return self._port_of("rtu-over-tcp")

    @property
    def rtu_device(self) -> str:
        """The serial device path a client opens (the other end of the simulator's pty)."""
        if self._link is None or not self._link.is_open:
            raise RuntimeError("RTU is not being served (rtu=True, after start())")
        return self._link.device_b

    # --- control ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve (again): same ports and device path as before a stop()."""
        if self._link is not None and not self._link.is_open:
            self._link.open()
            images = {u: m.image for u, m in self._meters.items()}
            self._rtu_server = self._server(images, "rtu", serial_port=self._link.device_a)
        try:
            for server in self._all_servers():
                await server.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop answering and drop connections; the pty stays, as a cable would."""
        for server in self._all_servers():
            await server.stop()

    async def close(self) -> None:
        await self.stop()
        if self._link is not None:
            self._link.close()

    async def __aenter__(self) -> SdmSimulator:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def silence(self, unit: int, silent: bool = True) -> None:
        """Make ``unit`` never answer (as a meter that is off), or answer again."""
        if unit not in self._meters:
            raise KeyError(f"unit {unit} is not simulated")
        if silent:
            self._silent.add(unit)
        else:
            self._silent.discard(unit)

    def pause(self) -> None:
        """Hold every value still (reads keep being answered), so a test can compare."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def values(self, unit: int) -> dict[str, float]:
        """What ``unit`` serves right now, as a client decodes it (float32 precision)."""
        return dict(self._meters[unit].served)

    def model(self, unit: int) -> MeterModel:
        return self._meters[unit].model

    # --- internals --------------------------------------------------------------------------

    def _all_servers(self) -> list[RegisterServer]:
        return [*self._servers, *([self._rtu_server] if self._rtu_server else [])]

    def _port_of(self, transport: Transport) -> int:
        for s in self._servers:
            if s.transport == transport:
                return s.port
        raise RuntimeError(f"{transport} is not being served")

    def _server(
        self,
        images: dict[int, RegisterImage],
        transport: Transport,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        serial_port: str | None = None,
    ) -> RegisterServer:
        return RegisterServer(
            images,
            transport=transport,
            host=host,
            port=port,
            serial_port=serial_port,
            on_read=partial(self._on_read, transport),
            silent=self._silent,  # shared: silence() applies to every transport at once
        )

    def _on_read(
        self, transport: Transport, unit: int, table: Table, address: int, count: int
    ) -> int | None:
        now = self._clock()
        self.requests.append(
            SimRequest(now, transport, unit, table, address, count, unit not in self._silent)
        )
        # The real meter refuses more than 40 parameters (80 registers) per request.
        if count > self.profile.max_registers:
            return ILLEGAL_VALUE
        if not self._paused:
            self._meters[unit].model.step(now)
            self._publish(unit)
        return None

    def _publish(self, unit: int) -> None:
        meter = self._meters[unit]
        values = meter.model.values()
        for f in self.profile.fields:
            try:
                words = f.encode(values.get(f.name, 0.0))
            except ValueError:
                continue  # a value the profile's type cannot hold: keep serving the last one
            meter.image.set(f.table, f.address, words)
            decoded = f.decode(words)
            meter.served[f.name] = math.nan if decoded is None else decoded


def _spans(profile: Profile) -> list[tuple[Table, int, int]]:
    """Register ranges served: the fields, with gaps up to ``max_gap`` filled (read as 0), as
    the real meter answers reads that span its unlisted registers."""
    spans: list[tuple[Table, int, int]] = []
    for f in sorted(profile.fields, key=lambda f: (f.table, f.address)):
        if spans:
            table, start, count = spans[-1]
            if table == f.table and f.address - (start + count) <= profile.max_gap:
                spans[-1] = (table, start, max(start + count, f.end) - start)
                continue
        spans.append((f.table, f.address, f.width))
    return spans


# --- command line -----------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m edge_runtime.simulators.sdm",
        description="Simulated Eastron SDM630/SDM120 meters speaking Modbus.",
    )
    ap.add_argument("--profile", default="sdm630", help="sdm630 (default), sdm120, or a file")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument(
        "--tcp-port",
        type=int,
        help="serve Modbus TCP here (0: any free port; 5020 when no transport is given)",
    )
    ap.add_argument("--rtu-over-tcp-port", type=int, help="serve RTU frames over TCP here")
    ap.add_argument("--rtu", action="store_true", help="serve RTU on a pseudo-terminal")
    ap.add_argument(
        "--unit", type=int, action="append", help="unit id to simulate (repeatable; default 1)"
    )
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every frame")
    args = ap.parse_args(argv)
    if args.tcp_port is None and args.rtu_over_tcp_port is None and not args.rtu:
        args.tcp_port = 5020
    return args


async def _serve(args: argparse.Namespace) -> None:
    sim = SdmSimulator(
        profile=args.profile,
        units=args.unit or [1],
        host=args.host,
        tcp_port=args.tcp_port,
        rtu_over_tcp_port=args.rtu_over_tcp_port,
        rtu=args.rtu,
        seed=args.seed,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        units = ", ".join(map(str, sim.units))
        out = [f"{sim.profile.manufacturer} {sim.profile.model} simulator, unit ids {units}"]
        if args.tcp_port is not None:
            out.append(f"modbus tcp: {args.host}:{sim.tcp_port}")
        if args.rtu_over_tcp_port is not None:
            out.append(f"rtu over tcp: {args.host}:{sim.rtu_over_tcp_port}")
        if args.rtu:
            out.append(f"rtu: {sim.rtu_device}")
        for line in out:
            print(line, flush=True)  # noqa: T201 - the command's output
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
