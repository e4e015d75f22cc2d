"""The GoodWe inverter driver: the only module that imports ``goodwe`` (pinned to 0.4.x).

``connect()`` detects the family the way goodwe does (unless ``family`` is configured; the
first detection is then kept for reconnects) and turns the inverter's sensor table into the
schema: one field per numeric sensor, named by goodwe's sensor id, with the sensor's unit and
that unit's usual tolerance. Each request may take 0.6 x ``timeout_s``, in two tries.

For the ET family (ET/EH/BT/BH/GEH) the driver reads goodwe's register blocks itself, one
named block at a time (``running_data``, ``battery_info``, ``meter_data``, ...), and decodes
them with goodwe's own sensors. That is what goodwe's ``read_runtime_data()`` does, except
that a block the inverter rejects with ILLEGAL DATA ADDRESS is switched off and logged once,
and the other blocks keep being read: goodwe 0.4.10 fails the whole read when the plain meter
block is rejected, and re-asks for a rejected battery block on every read. Other families
use ``read_runtime_data()``. Each block's request and reply are logged as hex at DEBUG, in
the form of the capture files (``<MODEL>_<block>.hex``), so a user's log becomes a test capture.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import goodwe
import goodwe.et
import goodwe.sensor as gw_sensor
from goodwe.const import GOODWE_UDP_PORT
from goodwe.exceptions import (
    InverterError,
    MaxRetriesException,
    PartialResponseException,
    RequestFailedException,
    RequestRejectedException,
)
from goodwe.modbus import ILLEGAL_DATA_ADDRESS
from goodwe.protocol import ModbusRtuReadCommand, ModbusTcpReadCommand, ProtocolResponse

from cloud_sync import DeviceSchema, Field

from ..config import GoodweDevice
from .base import (
    DeviceError,
    DeviceGoneError,
    DeviceTimeoutError,
    ProtocolError,
    Values,
    field_from_name,
)

__all__ = ("WAKE_MESSAGE", "WAKE_PORT", "GoodweDriver")

log = logging.getLogger(__name__)

WAKE_MESSAGE = b"WIFIKIT-214028-READ"
"""The LAN/WiFi module's discovery message; it also wakes a module that stopped answering."""
WAKE_PORT = 48899

# One retry: on a LAN a lost datagram is rarer than a slow WiFi module, so each try gets longer.
_RETRIES = 1
# Share of the read timeout one request may use, retries included. Family detection probes up
# to four protocols one after another; at 0.6 each it ends well within the 3x read timeout the
# scheduler gives connect(), and a read of a dead inverter fails before the scheduler's own
# timeout cuts it (goodwe would take that cancellation for a lost datagram and retry).
_REQUEST_SHARE = 0.6
_ET_COMM_ADDR = 0xF7  # goodwe's default for the ET family; we never pass another

# Sensors whose values are text (labels, bitmaps, dates, schedules): their numeric codes are
# separate sensors (``battery_mode`` beside ``battery_mode_label``).
_TEXT_SENSORS: tuple[type, ...] = (
    gw_sensor.Timestamp,
    gw_sensor.Enum,
    gw_sensor.EnumH,
    gw_sensor.EnumL,
    gw_sensor.Enum2,
    gw_sensor.EnumBitmap4,
    gw_sensor.EnumBitmap22,
    gw_sensor.EnumCalculated,
    gw_sensor.EcoMode,
)
_UNITS = {"°C": "C", "℃": "C", "degC": "C"}


@dataclass(frozen=True)
class _BlockSpec:
    """A register block goodwe's ET family reads (goodwe/et.py); names follow the captures."""

    name: str
    start: int
    counts: tuple[int, ...]
    """Register counts goodwe reads, largest first: newer firmware answers longer blocks, and
    a rejected count is retried with the next smaller one before the block is switched off."""
    required: bool = False
    when: Callable[[Mapping[str, float | None]], bool] | None = None
    """Read only when true of the values read so far in this reading."""


def _has_battery(values: Mapping[str, float | None]) -> bool:
    # goodwe reads the battery block only while the running data reports a battery mode.
    return values.get("battery_mode", 0) not in (0, None)


# In goodwe's reading order; running data first, since the battery condition depends on it.
_ET_BLOCKS: tuple[_BlockSpec, ...] = (
    _BlockSpec("running_data", 0x891C, (0x7D,), required=True),
    _BlockSpec("battery_info", 0x9088, (0x18,), when=_has_battery),
    _BlockSpec("battery2_info", 0x9858, (0x16,)),
    _BlockSpec("battery2_info_extended", 0x89BE, (0x06,)),
    _BlockSpec("meter_data", 0x8CA0, (0x7D, 0x3A, 0x2D)),
    _BlockSpec("mppt_data", 0x89E5, (0x3D,)),
)
# goodwe's tables place a few sensors just past the block it reads (they decode as zeros there):
# such a sensor still belongs to the block, and reads as missing.
_BLOCK_SLACK = 8


@dataclass
class _Block:
    spec: _BlockSpec
    count: int
    sensors: list[tuple[int, Any]]
    """(field index, goodwe sensor) pairs decoded from this block."""
    on: bool = True


T = TypeVar("T")


def _unit(unit: str) -> str:
    u = (unit or "").strip()
    return _UNITS.get(u, u)


def _number(value: object) -> float | None:
    """A sensor value as a float (bool -> 0/1, IntEnum -> its code); text -> None."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return None


def _end_register(sensor: Any) -> int:
    return int(sensor.offset) + max(1, (int(sensor.size_) + 1) // 2)


def _wake_targets(ip: str) -> tuple[str, ...]:
    """Where the wake message goes: the inverter itself, and the LAN's broadcast address
    unless the inverter is on loopback (a simulator; a broadcast would reach real modules)."""
    if ipaddress.ip_address(ip).is_loopback:
        return (ip,)
    return (ip, "255.255.255.255")


def _refused(exc: BaseException) -> bool:
    """Whether a socket error (other than a timeout) sits in the exception's chain: goodwe
    raises ``... from None``, which still keeps the original in ``__context__``."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _device_error(exc: BaseException, what: str) -> DeviceError:
    """Our error class for an exception from goodwe or the socket layer."""
    if isinstance(exc, RequestRejectedException):
        return ProtocolError(f"{what}: the inverter rejected the request ({exc.message})")
    if isinstance(exc, PartialResponseException):
        return ProtocolError(f"{what}: incomplete reply ({exc.length} of {exc.expected} bytes)")
    if isinstance(exc, RequestFailedException | MaxRetriesException):
        if _refused(exc):
            return DeviceGoneError(f"{what}: connection refused")
        message = getattr(exc, "message", "") or "no valid reply"
        return DeviceTimeoutError(f"{what}: {message}")
    if isinstance(exc, TimeoutError):  # an OSError too: test it first
        return DeviceTimeoutError(f"{what}: timed out")
    if isinstance(exc, OSError):
        return DeviceGoneError(f"{what}: {exc.strerror or exc}")
    if isinstance(exc, InverterError):  # e.g. no family recognised the device
        return DeviceGoneError(f"{what}: {exc}")
    return ProtocolError(f"{what}: malformed reply ({type(exc).__name__}: {exc})")


def _reraise_swallowed_cancel() -> None:
    # goodwe's retry loop catches CancelledError as "datagram lost" and carries on, so a
    # cancellation (shutdown, the scheduler's timeout) would vanish. The task still counts it:
    # raise it again so that cancelling a read works.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError("cancelled during a goodwe request")


class GoodweDriver:
    """A GoodWe inverter on the LAN: UDP 8899 (WiFi/LAN module) or Modbus TCP (e.g. 502)."""

    kind = "goodwe"

    def __init__(self, cfg: GoodweDevice) -> None:
        self.device_id = cfg.id
        self.cfg = cfg
        self.info: dict[str, object] = {}
        """Model, serial number, firmware, family, transport, switched-off blocks."""
        self._inv: Any = None
        self._family: str | None = cfg.family
        self._names: tuple[str, ...] = ()
        self._blocks: list[_Block] | None = None
        # What the inverter rejected stays learned across reconnects: switched off and logged
        # once per driver, not once per reconnect of a flapping link.
        self._disabled: list[str] = []
        self._counts: dict[str, int] = {}
        self._request_timeout = cfg.timeout_s * _REQUEST_SHARE

    # ------------------------------------------------------------------ PolledDriver

    async def connect(self) -> DeviceSchema:
        await self.close()
        cfg = self.cfg
        per_try = self._request_timeout / (_RETRIES + 1)
        # goodwe.connect() also reads the device info, so there is no separate call for it.
        if self._family is None:
            inv = await self._detect(per_try)
        else:
            inv = await self._call(
                goodwe.connect(
                    cfg.host, cfg.port, family=self._family, timeout=per_try, retries=_RETRIES
                ),
                "connect",
            )
        # Keep what was detected: a reconnect then skips the probing of other families.
        self._family = type(inv).__name__
        sensors: list[Any] = []
        seen: set[str] = set()
        for s in list(inv.sensors()):
            if isinstance(s, _TEXT_SENSORS) or s.id_ in seen:
                continue
            seen.add(s.id_)
            sensors.append(s)
        fields: tuple[Field, ...] = tuple(
            field_from_name(s.id_, unit=_unit(s.unit)) for s in sensors
        )
        self._names = tuple(s.id_ for s in sensors)
        self._blocks = self._plan(sensors) if isinstance(inv, goodwe.et.ET) else None
        self._inv = inv
        model = str(inv.model_name or "").strip() or f"GoodWe {self._family}"
        self.info = {
            "model": model,
            "serial_number": inv.serial_number,
            "firmware": inv.firmware,
            "arm_firmware": inv.arm_firmware,
            "dsp1_version": inv.dsp1_version,
            "dsp2_version": inv.dsp2_version,
            "arm_version": inv.arm_version,
            "modbus_version": inv.modbus_version,
            "rated_power_w": inv.rated_power,
            "family": self._family,
            "transport": "udp" if cfg.port == GOODWE_UDP_PORT else "modbus-tcp",
            "disabled_blocks": self._disabled,
        }
        log.info(
            "%s: %s %s (S/N %s, firmware %s) at %s:%d, %d fields",
            self.device_id,
            self._family,
            model,
            inv.serial_number,
            inv.firmware,
            cfg.host,
            cfg.port,
            len(fields),
        )
        return DeviceSchema(kind="inverter", model=model, fields=fields)

    async def read(self) -> Values:
        inv = self._inv
        if inv is None:
            raise DeviceGoneError("not connected")
        if self._blocks is None:
            data = await self._call(inv.read_runtime_data(), "read_runtime_data")
            return [_number(data.get(name)) for name in self._names]
        values: list[float | None] = [None] * len(self._names)
        so_far: dict[str, float | None] = {}
        for block in self._blocks:
            if not block.on or (block.spec.when is not None and not block.spec.when(so_far)):
                continue
            response = await self._read_block(inv, block)
            if response is None:
                continue
            end = block.spec.start + block.count
            for index, sensor in block.sensors:
                # Calculated sensors (offset 0) read absolute registers of the running data.
                if sensor.offset and _end_register(sensor) > end:
                    continue  # past what this inverter answers: missing, not a made-up zero
                try:
                    value = _number(sensor.read(response))
                except (ValueError, IndexError) as exc:
                    log.debug("%s: sensor %s: %s", self.device_id, sensor.id_, exc)
                    value = None
                values[index] = value
                so_far[sensor.id_] = value
        return values

    async def recover(self) -> None:
        """Send the discovery message that wakes a LAN module which stopped answering."""
        loop = asyncio.get_running_loop()
        host = self.cfg.host
        try:
            infos = await loop.getaddrinfo(host, WAKE_PORT, family=socket.AF_INET)
            targets = _wake_targets(str(infos[0][4][0]))
        except (OSError, IndexError, ValueError) as exc:
            log.warning("%s: cannot resolve %s for the wake message: %s", self.device_id, host, exc)
            return
        replies: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

        class _Replies(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                replies.put_nowait((data, addr))

        try:
            transport, _ = await loop.create_datagram_endpoint(
                _Replies, family=socket.AF_INET, allow_broadcast=len(targets) > 1
            )
        except OSError as exc:
            log.warning("%s: cannot open a socket for the wake message: %s", self.device_id, exc)
            return
        try:
            for target in targets:
                try:
                    transport.sendto(WAKE_MESSAGE, (target, WAKE_PORT))
                except OSError as exc:
                    log.warning("%s: wake message to %s: %s", self.device_id, target, exc)
            log.info("%s: sent the wake message to %s", self.device_id, ", ".join(targets))
            # Waiting for the module's "ip,mac,name" answer tells the log whether it heard us,
            # and gives it a moment before the next read.
            try:
                async with asyncio.timeout(min(self.cfg.timeout_s, 1.0)):
                    data, addr = await replies.get()
                log.info("%s: %s answered the wake message: %r", self.device_id, addr[0], data)
            except TimeoutError:
                log.info("%s: no answer to the wake message", self.device_id)
        finally:
            transport.close()

    async def close(self) -> None:
        # goodwe closes its socket after every request (keep_alive is off): nothing stays open.
        self._inv = None

    # ------------------------------------------------------------------ internals

    async def _call(self, aw: Awaitable[T], what: str) -> T:
        """Await a goodwe call, turning its exceptions into ours at the boundary."""
        try:
            result = await aw
        except asyncio.CancelledError:
            raise
        except (InverterError, OSError, ValueError) as exc:
            _reraise_swallowed_cancel()
            raise _device_error(exc, f"{self.device_id}: {what}") from exc
        _reraise_swallowed_cancel()
        return result

    async def _detect(self, per_try: float) -> Any:
        """goodwe.discover(), in its order, without two of its problems in 0.4.10: its UDP probe
        hands (timeout, retries) to the protocol as (comm_addr, timeout), so a silent inverter
        holds it 4 x ``retries`` seconds; and its per-family probe also reads runtime data,
        which fails on an ET inverter that rejects an optional block (the block reader copes).
        """
        cfg = self.cfg
        order = ["ET", "DT", "ES"]
        errors: list[DeviceError] = []
        if cfg.port == GOODWE_UDP_PORT:
            try:
                tagged = await self._call(self._aa55_family(per_try), "detect")
            except DeviceError as exc:
                errors.append(exc)
                tagged = None
            if tagged is not None:
                order.remove(tagged)
                order.insert(0, tagged)
        for family in order:
            try:
                return await self._call(
                    goodwe.connect(
                        cfg.host, cfg.port, family=family, timeout=per_try, retries=_RETRIES
                    ),
                    f"detect {family}",
                )
            except DeviceError as exc:
                errors.append(exc)
        summary = "; ".join(str(e) for e in errors)
        if all(isinstance(e, DeviceTimeoutError) for e in errors):
            raise DeviceTimeoutError(f"no answer to any GoodWe protocol: {summary}")
        raise DeviceGoneError(f"no GoodWe family recognises the device: {summary}")

    async def _aa55_family(self, per_try: float) -> str | None:
        """The family named by tags in the serial number the AA55 "device info" reply holds."""
        protocol = goodwe.UdpInverterProtocol(self.cfg.host, self.cfg.port, 0, per_try, _RETRIES)
        response = await goodwe.DISCOVERY_COMMAND.execute(protocol)
        serial = bytes(response.response_data()[31:47]).decode("ascii", "replace")
        for family, tags in (
            ("ET", goodwe.ET_MODEL_TAGS),
            ("ES", goodwe.ES_MODEL_TAGS),
            ("DT", goodwe.DT_MODEL_TAGS),
        ):
            if any(tag in serial for tag in tags):
                return family
        return None

    def _plan(self, sensors: list[Any]) -> list[_Block] | None:
        """Group the schema's sensors by the ET block holding their registers; None (use
        ``read_runtime_data()``) if a sensor fits no block, e.g. after a goodwe update."""
        by_start = sorted(_ET_BLOCKS, key=lambda b: b.start)
        members: dict[str, list[tuple[int, Any]]] = {b.name: [] for b in _ET_BLOCKS}
        for index, sensor in enumerate(sensors):
            if not sensor.offset:
                members["running_data"].append((index, sensor))
                continue
            spec = next((b for b in reversed(by_start) if b.start <= sensor.offset), None)
            if spec is None or sensor.offset >= spec.start + spec.counts[0] + _BLOCK_SLACK:
                log.info(
                    "%s: sensor %s (register %d) fits no known block; using read_runtime_data()",
                    self.device_id,
                    sensor.id_,
                    sensor.offset,
                )
                return None
            members[spec.name].append((index, sensor))
        blocks = []
        for spec in _ET_BLOCKS:
            if not members[spec.name]:
                continue  # goodwe left these sensors out for this model
            need = max(_end_register(s) for _, s in members[spec.name] if s.offset) - spec.start
            fits = [c for c in spec.counts if c >= need]
            # The smallest count goodwe would read for these sensors; the largest if none fits.
            count = fits[-1] if fits else spec.counts[0]
            count = min(count, self._counts.get(spec.name, count))
            on = spec.name not in self._disabled
            blocks.append(_Block(spec, count, members[spec.name], on))
        return blocks

    async def _read_block(self, inv: Any, block: _Block) -> Any:
        """One block's reply, or None once the inverter has rejected the block for good."""
        spec = block.spec
        while True:
            if self.cfg.port == GOODWE_UDP_PORT:
                command = ModbusRtuReadCommand(_ET_COMM_ADDR, spec.start, block.count)
            else:
                command = ModbusTcpReadCommand(_ET_COMM_ADDR, spec.start, block.count)
            request: bytes = command.request_bytes()
            try:
                reply = await self._call(inv.send_command(request, command.validator), spec.name)
            except ProtocolError as exc:
                rejected = exc.__cause__
                if (
                    spec.required
                    or not isinstance(rejected, RequestRejectedException)
                    or rejected.message != ILLEGAL_DATA_ADDRESS
                ):
                    raise
                smaller = [c for c in spec.counts if c < block.count]
                if smaller:
                    log.info(
                        "%s: the inverter rejects %s registers %d+%d; reading %d",
                        self.device_id,
                        spec.name,
                        spec.start,
                        block.count,
                        smaller[0],
                    )
                    block.count = self._counts[spec.name] = smaller[0]
                    continue
                self._switch_off(block)
                return None
            raw: bytes = reply.raw_data
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s: %s %d+%d: %s -> %s",
                    self.device_id,
                    spec.name,
                    spec.start,
                    block.count,
                    request.hex(),
                    raw.hex(),
                )
            return ProtocolResponse(raw, command)

    def _switch_off(self, block: _Block) -> None:
        block.on = False
        self._disabled.append(block.spec.name)
        log.warning(
            "%s: the inverter rejects %s (registers %d+%d: %s); not reading it again, "
            "its %d fields stay empty",
            self.device_id,
            block.spec.name,
            block.spec.start,
            block.count,
            ILLEGAL_DATA_ADDRESS,
            len(block.sensors),
        )
