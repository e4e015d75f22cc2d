"""DSMR P1 telegrams without I/O: framing a byte stream, the CRC, and the OBIS table.

A Dutch/Belgian smart meter (DSMR 4/5, ESMR 5, e-MUCS) pushes one ASCII telegram per second on
its P1 port::

    /ISk5\\2MT382-1000            header: '/', 3-letter maker, baud digit, identification
                                  (blank line)
    1-0:1.8.1(001234.567*kWh)     one OBIS object per line: code(value*unit)(...)
    ...
    !EF2F                         '!' and CRC-16/ARC of everything from '/' to '!'

:class:`TelegramSplitter` cuts a byte stream into telegrams, garbage and truncated pieces;
:func:`parse_telegram` checks the CRC and maps the known OBIS codes onto the fixed field table
:data:`FIELDS`; :class:`TelegramStream` ties both to a :class:`~.base.Sink` (frames, counters,
dead letters). Reading the serial port is :mod:`edge_runtime.devices.dsmr`'s job, so all of this
can be fed from a test, a capture file or a TCP bridge alike.
"""

from __future__ import annotations

import calendar
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from cloud_sync import DeviceSchema, Field

from ..crc import crc16_arc
from .base import DeviceStatus, ProtocolError, Sink, field_from_name, now_ms, unit_of

__all__ = (
    "DEAD_LETTER_SOURCE",
    "FIELDS",
    "MAX_TELEGRAM_BYTES",
    "OBIS_FIELDS",
    "Piece",
    "Telegram",
    "TelegramError",
    "TelegramSplitter",
    "TelegramStream",
    "crc16",
    "meter_schema",
    "parse_telegram",
)

_log = logging.getLogger(__name__)

DEAD_LETTER_SOURCE = "dsmr"
"""The ``source`` of every dead letter this module hands to a sink."""

MAX_TELEGRAM_BYTES = 8192
"""A DSMR 5 telegram with a full 1024-character text message stays under 4 KiB; anything longer
without an end is a broken stream, not a telegram."""

# Energy, power, voltage and current of the electricity meter, in the order of the schema.
# The unit each value must arrive in is the one its name carries.
OBIS_FIELDS: tuple[tuple[str, str], ...] = (
    ("1-0:1.8.1", "energy_import_t1_kwh"),
    ("1-0:1.8.2", "energy_import_t2_kwh"),
    ("1-0:2.8.1", "energy_export_t1_kwh"),
    ("1-0:2.8.2", "energy_export_t2_kwh"),
    ("1-0:1.7.0", "power_import_kw"),
    ("1-0:2.7.0", "power_export_kw"),
    ("1-0:32.7.0", "voltage_l1_v"),
    ("1-0:52.7.0", "voltage_l2_v"),
    ("1-0:72.7.0", "voltage_l3_v"),
    ("1-0:31.7.0", "current_l1_a"),
    ("1-0:51.7.0", "current_l2_a"),
    ("1-0:71.7.0", "current_l3_a"),
    ("1-0:21.7.0", "power_import_l1_kw"),
    ("1-0:41.7.0", "power_import_l2_kw"),
    ("1-0:61.7.0", "power_import_l3_kw"),
    ("1-0:22.7.0", "power_export_l1_kw"),
    ("1-0:42.7.0", "power_export_l2_kw"),
    ("1-0:62.7.0", "power_export_l3_kw"),
    ("0-0:96.14.0", "tariff"),
)
_GAS_FIELD = "gas_m3"

FIELDS: tuple[Field, ...] = (
    *(field_from_name(name) for _, name in OBIS_FIELDS if name != "tariff"),
    # The tariff is a small integer code (1 low, 2 normal): keep it exact.
    field_from_name("tariff", unit="", tol=0.01),
    field_from_name(_GAS_FIELD),
)
"""Every DSMR meter has this schema, whatever it sends: values a telegram lacks are None."""

_FIELD_INDEX = {name: i for i, name in enumerate(f.name for f in FIELDS)}
_OBIS_INDEX = {obis: (_FIELD_INDEX[name], unit_of(name)) for obis, name in OBIS_FIELDS}


def meter_schema(model: str) -> DeviceSchema:
    """The schema of a meter whose header identification is ``model``."""
    return DeviceSchema(kind="meter", model=model, fields=FIELDS)


# -- CRC ------------------------------------------------------------------------------------


def crc16(data: bytes | bytearray) -> int:
    """CRC-16/ARC (polynomial 0x8005 reflected as 0xA001, init 0), as DSMR 4+ sends it."""
    return crc16_arc(data)


# -- framing --------------------------------------------------------------------------------

# A telegram starts with '/', a 3-letter manufacturer code and the baud-rate digit. Requiring
# all five keeps a stray '/' in line noise from being taken for the start of a telegram.
_HEADER_BYTES = re.compile(rb"/[A-Za-z]{3}[0-9]")
_HEADER_LEN = 5
_HEX4 = re.compile(rb"[0-9A-Fa-f]{4}")
_HEX_RUN = re.compile(rb"[0-9A-Fa-f]*")
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True, slots=True)
class Piece:
    """A cut of the byte stream: a candidate telegram, or bytes that are no use."""

    kind: Literal["telegram", "garbage", "truncated"]
    data: bytes
    reason: str = ""


class TelegramSplitter:
    """Cuts a P1 byte stream into telegrams, whatever chunks the serial port delivers.

    Bytes outside telegrams that are not whitespace come out as one ``garbage`` piece per run;
    a telegram that is cut short (a new header arrives before its ``!``, or it outgrows
    ``max_size``) comes out as ``truncated``. Telegrams are not checked here: see
    :func:`parse_telegram`.
    """

    def __init__(self, max_size: int = MAX_TELEGRAM_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_size

    @property
    def pending(self) -> int:
        """Bytes held back, waiting for the rest of a telegram."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Piece]:
        """Add bytes; return the pieces they complete, in stream order."""
        self._buf += data
        out: list[Piece] = []
        while (piece := self._next()) is not None:
            out.append(piece)
        return out

    def flush(self) -> list[Piece]:
        """Give up on what is held back (the line went quiet mid-telegram) and return it."""
        buf = bytes(self._buf)
        self._buf.clear()
        if not buf.strip(_WHITESPACE):
            return []
        m = _HEADER_BYTES.search(buf)
        if m is None:
            return [Piece("garbage", buf, "bytes outside a telegram")]
        out = []
        if buf[: m.start()].strip(_WHITESPACE):
            out.append(Piece("garbage", buf[: m.start()], "bytes outside a telegram"))
        out.append(Piece("truncated", buf[m.start() :], "the line went quiet mid-telegram"))
        return out

    def _find_start(self, pos: int) -> tuple[int, bool] | None:
        """The first '/' from ``pos`` that starts a header (True), or that still might once
        more bytes arrive (False: too near the end of the buffer to tell); else None."""
        buf = self._buf
        while (i := buf.find(b"/", pos)) >= 0:
            if _HEADER_BYTES.match(buf, i):
                return i, True
            tail = buf[i + 1 : i + _HEADER_LEN]
            if len(tail) < _HEADER_LEN - 1 and (not tail or tail.isalpha()):
                return i, False
            pos = i + 1
        return None

    def _next(self) -> Piece | None:
        buf = self._buf
        found = self._find_start(0)
        if found is None or not found[1]:
            # No complete header yet: what lies before the candidate is whitespace or noise.
            keep = len(buf) if found is None else found[0]
            if not buf[:keep].strip(_WHITESPACE):
                del buf[:keep]
            elif keep > self._max:
                # Nothing but noise for a long while (a wrong baud rate looks like this): say so
                # now rather than when a telegram finally turns up.
                noise = bytes(buf[:keep])
                del buf[:keep]
                return Piece("garbage", noise, "bytes outside a telegram")
            return None
        start = found[0]
        if start:
            noise = bytes(buf[:start])
            del buf[:start]
            if noise.strip(_WHITESPACE):
                return Piece("garbage", noise, "bytes outside a telegram")
        # A telegram starts at buf[0].
        end = buf.find(b"!", 1)
        nxt = self._find_start(1)
        if nxt is not None and nxt[1] and (end < 0 or nxt[0] < end):
            data = bytes(buf[: nxt[0]])
            del buf[: nxt[0]]
            return Piece("truncated", data, "a new telegram began before this one ended")
        if end < 0:
            if len(buf) > self._max:
                data = bytes(buf)
                buf.clear()
                return Piece("truncated", data, f"no end of telegram within {self._max} bytes")
            return None
        rest = bytes(buf[end + 1 : end + 5])
        if _HEX4.fullmatch(rest):
            stop = end + 5
        elif rest[:1] in (b"\r", b"\n"):
            stop = end + 1  # DSMR 2.2/3 telegrams end with a bare '!'
        elif len(rest) < 4 and _HEX_RUN.fullmatch(rest):
            return None  # the CRC is still on its way
        else:
            # A mangled CRC: hand over what there is and let parse_telegram reject it.
            m = _HEX_RUN.match(buf, end + 1)
            stop = m.end() if m else end + 1
        data = bytes(buf[:stop])
        del buf[:stop]
        return Piece("telegram", data)


# -- parsing --------------------------------------------------------------------------------


class TelegramError(ProtocolError):
    """A telegram that cannot be used; ``counter`` names the status counter it goes into."""

    def __init__(self, counter: str, message: str) -> None:
        super().__init__(message)
        self.counter = counter


@dataclass(frozen=True, slots=True)
class Telegram:
    """One checked telegram and what it means."""

    raw: bytes
    header: str
    """The identification after '/', e.g. ``ISk5\\2MT382-1000``: the meter model."""
    objects: dict[str, tuple[str, ...]]
    """Every OBIS object as sent: code -> the texts inside its parentheses."""
    values: tuple[float | None, ...]
    """Aligned with :data:`FIELDS`."""
    crc: int | None
    """None for DSMR 2.2/3 telegrams, which carry no CRC."""
    timestamp_ms: int | None = None
    """The meter's clock (``0-0:1.0.0``), UTC."""
    info: dict[str, object] = field(default_factory=dict)
    """Meter id, DSMR version, power-failure counts, gas meter id, text message."""
    unknown: tuple[str, ...] = ()
    """OBIS codes this module does not know."""
    bad_values: tuple[str, ...] = ()
    """Known OBIS codes whose value could not be read (wrong unit, not a number)."""
    malformed_lines: int = 0

    @property
    def manufacturer(self) -> str:
        return self.header[:3]

    def value(self, name: str) -> float | None:
        """The value of field ``name``."""
        return self.values[_FIELD_INDEX[name]]


_OBJECT_LINE = re.compile(
    r"^(?P<obis>\d{1,3}-\d{1,3}:\d{1,3}\.\d{1,3}\.\d{1,3})(?:\*\d{1,3})?"
    r"(?P<groups>(?:\([^()]*\))+)\s*$"
)
_GROUP = re.compile(r"\(([^()]*)\)")
_NUMBER = re.compile(r"^\s*(?P<num>[-+]?\d+(?:\.\d+)?)\s*(?:\*\s*(?P<unit>[A-Za-z0-9]+))?\s*$")
_TIMESTAMP = re.compile(r"^(?P<stamp>\d{12})(?P<dst>[SW])?$")
# M-Bus devices (gas, water, heat) on channels 1-4: type, reading, equipment id. The DSMR 2.2/3
# hourly gas record (24.3.0) is not read, so it counts as unknown.
_MBUS = re.compile(r"^0-[1-4]:(?:24\.1\.0|24\.2\.[13]|96\.1\.[01])$")
_MBUS_TYPE_GAS = 3
_GAS_OBIS = ("24.2.1", "24.2.3")  # NL hourly/5-minute reading; BE temperature-corrected

# Meters that report in Wh and W (some ESMR 5 variants, e.g. Sagemcom T210-D in Luxembourg).
_SCALE: dict[tuple[str, str], float] = {("wh", "kwh"): 1000.0, ("w", "kw"): 1000.0}


def _hex_text(text: str) -> str:
    """Equipment ids and text messages travel hex-encoded; show them as text when they are."""
    try:
        decoded = bytes.fromhex(text).decode("ascii")
    except ValueError:
        return text
    return decoded if decoded.isprintable() else text


def _version(text: str) -> str:
    # 1-3:0.2.8(50) is DSMR 5.0, (42) is 4.2; the Belgian 0-0:96.1.4(50217) stays as sent.
    return f"{text[0]}.{text[1]}" if len(text) == 2 and text.isdigit() else text


_INFO_OBIS: dict[str, tuple[str, Callable[[str], object]]] = {
    "1-3:0.2.8": ("dsmr_version", _version),
    "0-0:96.1.4": ("dsmr_version", _version),
    "0-0:96.1.1": ("meter_id", _hex_text),
    "0-0:96.7.21": ("power_failures", int),
    "0-0:96.7.9": ("long_power_failures", int),
    "1-0:32.32.0": ("voltage_sags_l1", int),
    "1-0:52.32.0": ("voltage_sags_l2", int),
    "1-0:72.32.0": ("voltage_sags_l3", int),
    "1-0:32.36.0": ("voltage_swells_l1", int),
    "1-0:52.36.0": ("voltage_swells_l2", int),
    "1-0:72.36.0": ("voltage_swells_l3", int),
    "0-0:96.13.0": ("message", _hex_text),
}
# Standard objects this runtime deliberately leaves out; they are not "unknown".
_IGNORED_OBIS = frozenset(
    {
        "0-0:1.0.0",  # the meter's clock: Telegram.timestamp_ms
        "1-0:99.97.0",  # power failure event log
        "0-0:96.13.1",  # numeric message (DSMR 2/3)
        "0-0:17.0.0",  # power threshold (DSMR 2/3)
        "0-0:96.3.10",  # breaker state (DSMR 2/3)
    }
)


def _number(text: str, want_unit: str) -> float:
    m = _NUMBER.match(text)
    if m is None:
        raise ValueError(f"not a number: {text!r}")
    value = float(m.group("num"))
    unit = m.group("unit")
    if unit is None or unit.lower() == want_unit.lower():
        return value
    scale = _SCALE.get((unit.lower(), want_unit.lower()))
    if scale is None:
        raise ValueError(f"unit {unit!r} where {want_unit!r} was expected")
    return value / scale


def _timestamp_ms(text: str) -> int:
    """``YYMMDDhhmmssX`` in Dutch local time; X is W (winter, UTC+1) or S (summer, UTC+2)."""
    m = _TIMESTAMP.match(text)
    if m is None:
        raise ValueError(f"not a timestamp: {text!r}")
    local = datetime.strptime(m.group("stamp"), "%y%m%d%H%M%S")
    offset_s = 7200 if m.group("dst") == "S" else 3600
    return (calendar.timegm(local.timetuple()) - offset_s) * 1000


def _gas(
    objects: dict[str, tuple[str, ...]], bad: list[str]
) -> tuple[float | None, dict[str, object]]:
    """The gas reading among up to four M-Bus channels (a water meter may share the bus)."""
    readings: list[tuple[int | None, str, str, str | None]] = []  # type, OBIS, value, meter id
    for ch in "1234":
        obis = next((f"0-{ch}:{o}" for o in _GAS_OBIS if f"0-{ch}:{o}" in objects), None)
        if obis is None:
            continue
        type_text = objects.get(f"0-{ch}:24.1.0", ("",))[0]
        device_type = int(type_text) if type_text.isdigit() else None
        meter_id = objects.get(f"0-{ch}:96.1.0", ("",))[0] or None
        readings.append((device_type, obis, objects[obis][-1], meter_id))
    typed = any(device_type is not None for device_type, *_ in readings)
    for device_type, obis, value, meter_id in readings:
        # Older meters name no device types: then the first reading in m3 is the gas meter.
        if (device_type == _MBUS_TYPE_GAS) if typed else value.lower().endswith("m3"):
            info: dict[str, object] = {"gas_meter_id": _hex_text(meter_id)} if meter_id else {}
            try:
                return _number(value, "m3"), info
            except ValueError:
                bad.append(obis)
                return None, info
    return None, {}


def parse_telegram(raw: bytes) -> Telegram:
    """Check one telegram (``/`` to ``!`` and its CRC) and read it.

    Raises :class:`TelegramError` with ``counter`` ``"crc_errors"`` (CRC wrong or missing where
    DSMR 4+ requires it) or ``"malformed"`` (not a telegram at all). Lines and values that do not
    parse inside an otherwise good telegram are counted in the result instead.
    """
    bang = raw.rfind(b"!")
    if not raw.startswith(b"/") or bang < 0:
        raise TelegramError("malformed", "not a telegram: no '/' header or no '!' end")
    trailer = raw[bang + 1 :].strip(_WHITESPACE)
    crc: int | None = None
    if trailer:
        if not _HEX4.fullmatch(trailer):
            raise TelegramError("crc_errors", f"CRC {trailer!r} is not 4 hex digits")
        crc = int(trailer, 16)
        computed = crc16(raw[: bang + 1])
        if computed != crc:
            raise TelegramError(
                "crc_errors", f"CRC mismatch: telegram says {crc:04X}, content gives {computed:04X}"
            )
    text = raw[:bang].decode("latin-1")  # never fails; a good CRC vouches for the bytes
    lines = text.splitlines()
    header = lines[0][1:].strip()
    if not _HEADER_BYTES.match(raw):
        raise TelegramError("malformed", f"bad header line {lines[0]!r}")

    objects: dict[str, tuple[str, ...]] = {}
    malformed = 0
    last: str | None = None
    for raw_line in lines[1:]:
        line = raw_line.strip()
        if not line:
            continue
        if line.startswith("(") and last is not None:
            # DSMR 2.2/3 put the gas reading on a line of its own after 0-n:24.3.0.
            objects[last] = (*objects[last], *_GROUP.findall(line))
            continue
        m = _OBJECT_LINE.match(line)
        if m is None:
            malformed += 1
            continue
        last = m.group("obis")
        objects.setdefault(last, tuple(_GROUP.findall(m.group("groups"))))

    if not objects:
        raise TelegramError("malformed", "a telegram without a single OBIS object")
    declared = objects.get("1-3:0.2.8", ("",))[0]
    if crc is None and (declared[:1] >= "4" or "0-0:96.1.4" in objects):
        raise TelegramError("crc_errors", "a DSMR 4+ telegram without its CRC")

    info: dict[str, object] = {}
    values: list[float | None] = [None] * len(FIELDS)
    bad: list[str] = []
    unknown: list[str] = []
    timestamp: int | None = None
    for obis, groups in objects.items():
        if obis in _OBIS_INDEX:
            index, unit = _OBIS_INDEX[obis]
            try:
                values[index] = _number(groups[-1], unit)
            except ValueError:
                bad.append(obis)
        elif obis in _INFO_OBIS:
            key, convert = _INFO_OBIS[obis]
            try:
                info[key] = convert(groups[0])
            except (ValueError, IndexError):
                bad.append(obis)
        elif obis == "0-0:1.0.0":
            try:
                timestamp = _timestamp_ms(groups[0])
            except ValueError:
                bad.append(obis)
        elif not (obis in _IGNORED_OBIS or _MBUS.match(obis)):
            unknown.append(obis)
    gas, gas_info = _gas(objects, bad)
    values[_FIELD_INDEX[_GAS_FIELD]] = gas
    info.update(gas_info)
    return Telegram(
        raw=raw,
        header=header,
        objects=objects,
        values=tuple(values),
        crc=crc,
        timestamp_ms=timestamp,
        info=info,
        unknown=tuple(unknown),
        bad_values=tuple(bad),
        malformed_lines=malformed,
    )


# -- stream ---------------------------------------------------------------------------------


class TelegramStream:
    """Turns the bytes of one P1 port into frames, status updates and dead letters.

    Every unusable piece is counted in the device status (``crc_errors``, ``truncated``,
    ``garbage``, ``malformed``) and kept via ``sink.dead_letter``; it never stops the stream.
    ``unknown_obis`` counts distinct OBIS codes not in the table (listed in ``info``), since a
    meter repeats the same ones every second.
    """

    def __init__(
        self, device_id: str, sink: Sink, kind: str = "dsmr", max_size: int = MAX_TELEGRAM_BYTES
    ) -> None:
        self.device_id = device_id
        self._sink = sink
        self.status: DeviceStatus = sink.status(device_id, kind)
        self._splitter = TelegramSplitter(max_size)
        self._schemas: dict[str, DeviceSchema] = {}
        self._unknown: set[str] = set()
        self._warned: set[str] = set()
        self.last: Telegram | None = None
        """The last good telegram."""

    def feed(self, data: bytes, ts_ms: int | None = None) -> int:
        """Handle newly received bytes; return how many good telegrams they completed."""
        good = 0
        for piece in self._splitter.feed(data):
            good += self._handle(piece, ts_ms)
        return good

    def flush(self) -> None:
        """The line went quiet: what is held back will not be completed."""
        for piece in self._splitter.flush():
            self._handle(piece, None)

    def _handle(self, piece: Piece, ts_ms: int | None) -> int:
        if piece.kind != "telegram":
            self._reject(piece.kind, piece.data, piece.reason)
            return 0
        _log.debug("%s: telegram %r", self.device_id, piece.data)
        try:
            telegram = parse_telegram(piece.data)
        except TelegramError as exc:
            self._reject(exc.counter, piece.data, str(exc))
            return 0
        self._deliver(telegram, now_ms() if ts_ms is None else ts_ms)
        return 1

    def _deliver(self, telegram: Telegram, ts_ms: int) -> None:
        schema = self._schemas.get(telegram.header)
        if schema is None:
            schema = self._schemas[telegram.header] = meter_schema(telegram.header)
            _log.info("%s: meter %s (%s)", self.device_id, telegram.header, telegram.info)
        # Frames carry the receive time, like every other device on this node; the meter's own
        # clock (1 s resolution, often off by minutes) is shown as an offset instead.
        self._sink.frame(self.device_id, schema, telegram.values, ts_ms)
        st = self.status
        st.seen(ts_ms)
        st.info["model"] = telegram.header
        st.info["manufacturer"] = telegram.manufacturer
        st.info.update(telegram.info)
        if telegram.timestamp_ms is not None:
            st.info["meter_clock_offset_s"] = round((telegram.timestamp_ms - ts_ms) / 1000, 1)
        for obis in telegram.unknown:
            if obis not in self._unknown:
                self._unknown.add(obis)
                st.count("unknown_obis")
                st.info["unknown_obis"] = sorted(self._unknown)
                _log.info("%s: ignoring unknown OBIS code %s", self.device_id, obis)
        if telegram.bad_values:
            st.count("bad_values", len(telegram.bad_values))
            _log.debug("%s: unreadable values of %s", self.device_id, telegram.bad_values)
        if telegram.malformed_lines:
            st.count("malformed_lines", telegram.malformed_lines)
        self.last = telegram

    def _reject(self, counter: str, data: bytes, reason: str) -> None:
        st = self.status
        st.count(counter)
        st.errors += 1
        st.last_error = reason
        # A bad cable or baud rate repeats every second: warn once per kind, then keep it quiet.
        if counter in self._warned:
            _log.debug("%s: %s: %s (%d bytes)", self.device_id, counter, reason, len(data))
        else:
            self._warned.add(counter)
            _log.warning(
                "%s: %s: %s (%d bytes; further ones are logged at DEBUG)",
                self.device_id,
                counter,
                reason,
                len(data),
            )
        self._sink.dead_letter(DEAD_LETTER_SOURCE, self.device_id, data, reason)
