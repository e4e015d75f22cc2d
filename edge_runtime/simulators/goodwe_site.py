"""A plausible home behind the simulated GoodWe inverter: a solar day, a household, a battery.

One model drives every ET register the real ``goodwe`` library reads for power and energy, so
that each reading balances: house consumption as goodwe computes it (``ppv + pbattery1 -
active_power``) is exactly the modelled load, grid import is load - PV - battery, and each
energy counter grows by the integral of its power. Time may be compressed: with
``day_seconds=600`` a whole day passes in ten minutes, which is what the demo and tests use.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from .goodwe_registers import RegisterBank

__all__ = ("SiteState", "SolarSite")

# ET registers (goodwe/et.py sensor ids in comments), running-data block 35100..35224.
_TIMESTAMP = 35100  # timestamp: 6 bytes y-2000, month, day, hour, minute, second
_PV = ((35103, 35104, 35105), (35107, 35108, 35109))  # vpv1/ipv1/ppv1 (x10, x10, u32 W), pv2
_PV_MODES = 35120  # pv2_mode (high byte), pv1_mode (low byte): 2 = producing
_GRID_PHASES = (
    (35121, 35122, 35123, 35125),
    (35126, 35127, 35128, 35130),
    (35131, 35132, 35133, 35135),
)
_TOTAL_INVERTER_POWER = 35138  # s16 W
_ACTIVE_POWER = 35140  # s16 W, export positive
_BACKUP_P = (35150, 35156, 35162)  # backup_p1..3, s16 W
_LOAD_P = (35164, 35166, 35168)  # load_p1..3, s16 W
_BACKUP_PTOTAL = 35170
_LOAD_PTOTAL = 35172
_TEMP_AIR, _TEMP_RADIATOR = 35174, 35176  # x10 C
_VBAT, _IBAT, _PBAT, _BAT_MODE = 35180, 35181, 35182, 35184  # x10 V, s16 x10 A, s32 W, mode
_E_PV_TOTAL, _E_PV_DAY = 35191, 35193  # u32 x10 kWh
_E_EXP_TOTAL, _H_TOTAL, _E_EXP_DAY = 35195, 35197, 35199  # u32 x10 kWh, u32 h, u16 x10 kWh
_E_IMP_TOTAL, _E_IMP_DAY = 35200, 35202
_E_LOAD_TOTAL, _E_LOAD_DAY = 35203, 35205
_E_CHG_TOTAL, _E_CHG_DAY = 35206, 35208
_E_DIS_TOTAL, _E_DIS_DAY = 35209, 35211
# Meter block 36000..
_METER_P = (36005, 36006, 36007)  # active_power1..3, s16 W (export positive, like active_power)
_METER_PTOTAL = 36008
_METER_FREQ = 36014  # x100 Hz
_METER_E_EXP, _METER_E_IMP = 36015, 36017  # float32 Wh (goodwe divides by 1000 -> kWh)
_METER_P4 = (36019, 36021, 36023)  # meter_active_power1..3, s32 W
_METER_P4_TOTAL = 36025
_METER_E8_EXP, _METER_E8_IMP = 36104, 36120  # u64 x100 kWh (extended meters only)
# Battery block 37000..
_BAT_TEMP, _BAT_SOC = 37003, 37007
# MPPT block 35301.. (20 kW and larger models)
_PPV_TOTAL, _PMPPT, _IMPPT = 35301, (35337, 35338), (35345, 35346)
_DEVICE_RATED_POWER = 35001

_BATTERY_MODE_STANDBY, _BATTERY_MODE_DISCHARGE, _BATTERY_MODE_CHARGE = 1, 2, 3


@dataclass(frozen=True)
class SiteState:
    """The site at one instant, in W, kWh and %; battery power is GoodWe's sign (discharge
    positive), grid power the usual one (import positive)."""

    at: datetime
    pv_w: float = 0.0
    load_w: float = 0.0
    battery_w: float = 0.0
    grid_w: float = 0.0
    soc_pct: float = 50.0
    pv_kwh: float = 0.0
    pv_day_kwh: float = 0.0
    load_kwh: float = 0.0
    load_day_kwh: float = 0.0
    import_kwh: float = 0.0
    import_day_kwh: float = 0.0
    export_kwh: float = 0.0
    export_day_kwh: float = 0.0
    charge_kwh: float = 0.0
    charge_day_kwh: float = 0.0
    discharge_kwh: float = 0.0
    discharge_day_kwh: float = 0.0
    pv_hours: float = 0.0


class SolarSite:
    """Advances the model with a (possibly compressed) clock and writes it into the bank.

    ``update()`` is called before each request is answered; it recomputes at most every
    ``min_step_s`` of real time, so a fast poller costs little and still sees values move.
    Starting counters, battery state of charge and grid voltages come from the capture.
    """

    def __init__(
        self,
        bank: RegisterBank,
        *,
        day_seconds: float = 86400.0,
        start_hour: float | None = None,
        seed: int = 0,
        battery_kwh: float = 10.0,
        battery_max_w: float = 5000.0,
        min_soc_pct: float = 10.0,
        min_step_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if day_seconds <= 0:
            raise ValueError("day_seconds must be positive")
        self.bank = bank
        self.speed = 86400.0 / day_seconds
        self.seed = seed
        self.battery_wh = battery_kwh * 1000.0
        self.battery_max_w = battery_max_w
        self.min_soc_pct = min_soc_pct
        self.min_step_s = min_step_s
        self._clock = clock
        self._rng = random.Random(seed)
        rated = bank.u16(_DEVICE_RATED_POWER) if bank.has(_DEVICE_RATED_POWER) else 0
        self.peak_pv_w = 0.85 * (rated if 1000 <= rated <= 30000 else 10000)
        self.phases = 3 if bank.u16(_GRID_PHASES[1][0]) else 1
        self._vgrid = [bank.u16(p[0]) / 10 or 230.0 for p in _GRID_PHASES]
        self._vbat = bank.u16(_VBAT) / 10 if bank.u16(_VBAT) not in (0, 0xFFFF) else 400.0
        now = datetime.now().replace(microsecond=0)
        if start_hour is not None:
            midnight = now.replace(hour=0, minute=0, second=0)
            now = midnight + timedelta(hours=start_hour % 24)
        soc = bank.u16(_BAT_SOC) if bank.has(_BAT_SOC) else 50

        def kwh(reg: int, wide: bool = True) -> float:
            return (bank.u32(reg) if wide else bank.u16(reg)) / 10

        self.state = SiteState(
            at=now,
            soc_pct=float(soc if 0 < soc <= 100 else 50),
            pv_kwh=kwh(_E_PV_TOTAL),
            load_kwh=kwh(_E_LOAD_TOTAL),
            import_kwh=kwh(_E_IMP_TOTAL),
            export_kwh=kwh(_E_EXP_TOTAL),
            charge_kwh=kwh(_E_CHG_TOTAL),
            discharge_kwh=kwh(_E_DIS_TOTAL),
            pv_hours=float(bank.u32(_H_TOTAL)),
        )
        self._t0 = clock()
        self._start = now
        self._last: float | None = None
        self._slot_cache: tuple[int, float, float] = (-1, 0.0, 0.0)

    def update(self, force: bool = False) -> SiteState:
        """Advance to now (real clock scaled by the day compression) and write the bank."""
        t = self._clock()
        if not force and self._last is not None and t - self._last < self.min_step_s:
            return self.state
        first = self._last is None
        self._last = t
        at = self._start + timedelta(seconds=(t - self._t0) * self.speed)
        prev = self.state
        dt_h = 0.0 if first else max(0.0, (at - prev.at).total_seconds()) / 3600.0
        self.state = self._step(prev, at, dt_h)
        self._write(self.state)
        return self.state

    # ------------------------------------------------------------------ model

    def _pv(self, at: datetime) -> float:
        h = at.hour + at.minute / 60 + at.second / 3600
        sunrise, sunset = 6.0, 20.0  # an August day, like the recorded captures
        if not sunrise < h < sunset:
            return 0.0
        elevation = math.sin(math.pi * (h - sunrise) / (sunset - sunrise))
        clear = self.peak_pv_w * math.pow(elevation, 1.5)
        # Passing clouds: two slow waves in sim minutes give dips of varying depth and length.
        m = (at - self._start).total_seconds() / 60 + self.seed * 17
        cloud = 0.5 + 0.5 * math.sin(2 * math.pi * m / 47) * math.sin(2 * math.pi * m / 13 + 1)
        return max(0.0, clear * (1 - 0.45 * cloud * cloud) * (1 + 0.01 * self._rng.gauss(0, 1)))

    def _appliance(self, at: datetime) -> float:
        # A kettle, oven or washing machine now and then: decided per 10-minute slot by a seeded
        # generator, so the same sim time always has the same appliances whatever the poll rate.
        secs = at.timestamp()
        slot = int(secs // 600)
        if self._slot_cache[0] != slot:
            r = random.Random(self.seed * 1_000_003 + slot)
            awake = 6 <= at.hour < 23  # the odd dishwasher at night, most things by day
            on = r.random() < (0.2 if awake else 0.03)
            self._slot_cache = (
                slot,
                r.uniform(60, 480) if on else 0.0,
                r.choice((1200.0, 1800.0, 2200.0, 2800.0)),
            )
        _, duration, power = self._slot_cache
        return power if secs - slot * 600 < duration else 0.0

    def _load(self, at: datetime) -> float:
        h = at.hour + at.minute / 60 + at.second / 3600
        base = 280.0 + 90.0 * (int(at.timestamp() // 900) % 2)  # fridge and freezer cycling
        habits = (
            600 * math.exp(-(((h - 7.5) / 0.8) ** 2))
            + 250 * math.exp(-(((h - 13.0) / 2.0) ** 2))
            + 1200 * math.exp(-(((h - 19.0) / 1.5) ** 2))
        )
        load = (base + habits + self._appliance(at)) * (1 + 0.02 * self._rng.gauss(0, 1))
        return max(50.0, load)

    def _step(self, prev: SiteState, at: datetime, dt_h: float) -> SiteState:
        pv = self._pv(at)
        load = self._load(at)
        soc = prev.soc_pct
        surplus = pv - load
        # Self-use: charge from surplus, cover deficits from the battery; taper near the limits.
        if surplus > 0:
            battery = -min(surplus, self.battery_max_w * min(1.0, (100.0 - soc) / 3.0))
        else:
            room = max(0.0, (soc - self.min_soc_pct) / 3.0)
            battery = min(-surplus, self.battery_max_w * min(1.0, room))
        # Integer watts, as the registers hold them, so the balance is exact in what is read.
        pv_i, load_i, bat_i = round(pv), round(load), round(battery)
        grid_i = load_i - pv_i - bat_i
        if dt_h:
            charge_wh = max(0.0, -bat_i) * dt_h
            discharge_wh = max(0.0, bat_i) * dt_h
            soc += (0.95 * charge_wh - discharge_wh) / self.battery_wh * 100.0
            # A long step may overshoot the taper; never below where it started, if that was low.
            soc = min(100.0, max(min(self.min_soc_pct, prev.soc_pct), soc))
        else:
            charge_wh = discharge_wh = 0.0
        new_day = at.date() != prev.at.date()

        def day(value: float) -> float:
            return 0.0 if new_day else value

        def kwh(w: float) -> float:
            return max(0.0, w) * dt_h / 1000.0

        return replace(
            prev,
            at=at,
            pv_w=float(pv_i),
            load_w=float(load_i),
            battery_w=float(bat_i),
            grid_w=float(grid_i),
            soc_pct=soc,
            pv_kwh=prev.pv_kwh + kwh(pv_i),
            pv_day_kwh=day(prev.pv_day_kwh) + kwh(pv_i),
            load_kwh=prev.load_kwh + kwh(load_i),
            load_day_kwh=day(prev.load_day_kwh) + kwh(load_i),
            import_kwh=prev.import_kwh + kwh(grid_i),
            import_day_kwh=day(prev.import_day_kwh) + kwh(grid_i),
            export_kwh=prev.export_kwh + kwh(-grid_i),
            export_day_kwh=day(prev.export_day_kwh) + kwh(-grid_i),
            charge_kwh=prev.charge_kwh + charge_wh / 1000.0,
            charge_day_kwh=day(prev.charge_day_kwh) + charge_wh / 1000.0,
            discharge_kwh=prev.discharge_kwh + discharge_wh / 1000.0,
            discharge_day_kwh=day(prev.discharge_day_kwh) + discharge_wh / 1000.0,
            pv_hours=prev.pv_hours + (dt_h if pv_i > 0 else 0.0),
        )

    # ------------------------------------------------------------------ registers

    def _write(self, s: SiteState) -> None:
        b = self.bank
        gauss = self._rng.gauss
        at = s.at
        b.put_bytes(
            _TIMESTAMP,
            bytes((at.year - 2000, at.month, at.day, at.hour, at.minute, at.second)),
        )
        pv = int(s.pv_w)
        strings = (pv * 52 // 100, pv - pv * 52 // 100)  # two strings, slightly unequal
        for (v_reg, i_reg, p_reg), p in zip(_PV, strings, strict=True):
            volts = 330.0 + 30.0 * min(1.0, p / 2000.0) + gauss(0, 0.5) if p > 0 else 0.0
            b.put_u16(v_reg, round(volts * 10))
            b.put_u16(i_reg, round(p / volts * 10) if volts else 0)
            b.put_u32(p_reg, p)
        producing = 2 if pv > 0 else 1
        b.put_u16(_PV_MODES, producing << 8 | producing)
        bat = int(s.battery_w)
        inverter = pv + bat  # AC side of a lossless inverter: what balances the house exactly
        export = -int(s.grid_w)
        b.put_s16(_TOTAL_INVERTER_POWER, inverter)
        b.put_s16(_ACTIVE_POWER, export)
        n = self.phases
        freq = 50.0 + gauss(0, 0.01)
        for i, (v_reg, i_reg, f_reg, p_reg) in enumerate(_GRID_PHASES[:n]):
            volts = self._vgrid[i] + gauss(0, 0.3)
            p = inverter // n
            b.put_u16(v_reg, round(volts * 10))
            b.put_u16(i_reg, round(abs(p) / volts * 10))
            b.put_u16(f_reg, round(freq * 100))
            b.put_s16(p_reg, p)
        load = int(s.load_w)
        backup = load * 3 // 10  # the circuits on the backup output
        for reg in _BACKUP_P[:n]:
            b.put_s16(reg, backup // n)
        for reg in _LOAD_P[:n]:
            b.put_s16(reg, (load - backup) // n)
        b.put_s16(_BACKUP_PTOTAL, backup)
        b.put_s16(_LOAD_PTOTAL, load - backup)
        heat = abs(inverter) / max(1.0, self.peak_pv_w)
        b.put_s16(_TEMP_AIR, round((32.0 + 12.0 * heat + gauss(0, 0.1)) * 10))
        b.put_s16(_TEMP_RADIATOR, round((38.0 + 22.0 * heat + gauss(0, 0.1)) * 10))
        vbat = self._vbat + (s.soc_pct - 50.0) * 0.2
        b.put_u16(_VBAT, round(vbat * 10))
        b.put_s16(_IBAT, round(bat / vbat * 10))
        b.put_s32(_PBAT, bat)
        mode = (
            _BATTERY_MODE_DISCHARGE
            if bat > 0
            else _BATTERY_MODE_CHARGE
            if bat < 0
            else _BATTERY_MODE_STANDBY
        )
        b.put_u16(_BAT_MODE, mode)
        for reg, value in (
            (_E_PV_TOTAL, s.pv_kwh),
            (_E_PV_DAY, s.pv_day_kwh),
            (_E_EXP_TOTAL, s.export_kwh),
            (_E_IMP_TOTAL, s.import_kwh),
            (_E_LOAD_TOTAL, s.load_kwh),
            (_E_CHG_TOTAL, s.charge_kwh),
            (_E_DIS_TOTAL, s.discharge_kwh),
        ):
            b.put_u32(reg, math.floor(value * 10))
        for reg, value in (
            (_E_EXP_DAY, s.export_day_kwh),
            (_E_IMP_DAY, s.import_day_kwh),
            (_E_LOAD_DAY, s.load_day_kwh),
            (_E_CHG_DAY, s.charge_day_kwh),
            (_E_DIS_DAY, s.discharge_day_kwh),
        ):
            b.put_u16(reg, math.floor(value * 10))
        b.put_u32(_H_TOTAL, math.floor(s.pv_hours))
        # The grid meter sees the same exchange as the inverter's own active power.
        for reg, reg4 in zip(_METER_P[:n], _METER_P4[:n], strict=True):
            b.put_s16(reg, export // n)
            b.put_s32(reg4, export // n)
        b.put_s16(_METER_PTOTAL, export)
        b.put_s32(_METER_P4_TOTAL, export)
        b.put_u16(_METER_FREQ, round(freq * 100))
        b.put_f32(_METER_E_EXP, s.export_kwh * 1000.0)
        b.put_f32(_METER_E_IMP, s.import_kwh * 1000.0)
        b.put_u64(_METER_E8_EXP, math.floor(s.export_kwh * 100))
        b.put_u64(_METER_E8_IMP, math.floor(s.import_kwh * 100))
        b.put_s16(_BAT_TEMP, round((25.0 + 0.001 * abs(bat) + gauss(0, 0.05)) * 10))
        b.put_u16(_BAT_SOC, round(s.soc_pct))
        b.put_u32(_PPV_TOTAL, pv)
        for reg, ireg, p in zip(_PMPPT, _IMPPT, strings, strict=True):
            b.put_u16(reg, p)
            b.put_u16(ireg, round(p / 345.0 * 10))
