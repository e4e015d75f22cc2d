"""Modbus meters over TCP, RTU (serial) and RTU over TCP: the one module that imports pymodbus.

Client side: ``ModbusDriver`` reads a register profile (``register_profile``) in block reads.
Devices on one bus (one serial line, or one TCP gateway with several unit ids) share one
``ModbusBus``: one client, one lock, polled in turn, with ``request_gap_ms`` between requests on
RTU lines. ``make_drivers(cfgs)`` groups devices by bus and wires the shared owner.

Server side: ``RegisterServer`` serves ``RegisterImage``s (one per unit id) over the same three
transports, for simulators; it lives here so that no other module needs pymodbus.

pymodbus exceptions never leave this module: they become DeviceTimeoutError, DeviceGoneError or
ProtocolError (``raise ... from exc``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from pymodbus import FramerType, ModbusException
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimAction, SimData, SimDevice

from cloud_sync import DeviceSchema
from edge_runtime.config import ModbusDevice

from .base import DeviceError, DeviceGoneError, DeviceTimeoutError, ProtocolError, Values
from .register_profile import Block, Profile, Table, load_profile

__all__ = (
    "ILLEGAL_ADDRESS",
    "ILLEGAL_FUNCTION",
    "ILLEGAL_VALUE",
    "ModbusBus",
    "ModbusDriver",
    "ReadHook",
    "RegisterImage",
    "RegisterServer",
    "Transport",
    "bus_key",
    "make_drivers",
)

_log = logging.getLogger(__name__)

Transport = Literal["tcp", "rtu", "rtu-over-tcp"]

ILLEGAL_FUNCTION = 1
ILLEGAL_ADDRESS = 2
ILLEGAL_VALUE = 3

_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}

# pymodbus drops a connection after a few unanswered requests in a row; on a shared bus one
# silent unit would then cut off the others. Liveness is judged here instead (ModbusDriver.recover).
_NEVER_DISCONNECT = 1 << 30

_Client = AsyncModbusTcpClient | AsyncModbusSerialClient


def bus_key(cfg: ModbusDevice) -> tuple[str, str]:
    """What identifies the bus a device is on: its serial port, or its gateway's host:port."""
    if cfg.transport == "rtu":
        return ("rtu", str(cfg.serial_port))
    return (cfg.transport, f"{cfg.host}:{cfg.port}")


def _hex(registers: Sequence[int]) -> str:
    return " ".join(f"{r:04X}" for r in registers)


class ModbusBus:
    """One Modbus line or gateway connection, owned once and shared by every device on it.

    Requests are serialized by a lock (asyncio locks are fair, so devices take turns) and
    each is bounded by the asking device's own timeout, so a silent unit delays the others by
    at most its timeout and never closes the connection they share.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        host: str | None = None,
        port: int = 502,
        serial_port: str | None = None,
        baudrate: int = 9600,
        parity: Literal["N", "E", "O"] = "N",
        stopbits: int = 1,
        request_gap_s: float = 0.0,
        timeout_s: float = 2.0,
    ) -> None:
        if transport == "rtu" and not serial_port:
            raise ValueError("an RTU bus needs a serial_port")
        if transport != "rtu" and not host:
            raise ValueError(f"a {transport} bus needs a host")
        self.transport: Transport = transport
        self.host = host
        self.port = port
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.parity: Literal["N", "E", "O"] = parity
        self.stopbits = stopbits
        self.request_gap_s = request_gap_s
        """Quiet time between the end of one exchange and the next request."""
        self.timeout_s = timeout_s
        """The longest request timeout of the bus's devices; connects are bounded by it."""
        self.name = f"rtu:{serial_port}" if transport == "rtu" else f"{transport}://{host}:{port}"
        self.last_ok: float | None = None
        """Event-loop time of the last answer from any unit (an exception answer counts)."""
        self.requests = 0
        """Requests sent."""
        self.connects = 0
        """Connections opened: a shared bus that stays up keeps this at 1."""
        self._client: _Client | None = None
        self._lock = asyncio.Lock()
        self._users = 0
        self._last_done = float("-inf")

    @classmethod
    def for_devices(cls, cfgs: Sequence[ModbusDevice]) -> ModbusBus:
        """The bus the devices share (same bus_key); the line settings of the first apply."""
        first = cfgs[0]
        return cls(
            first.transport,
            host=first.host,
            port=first.port,
            serial_port=first.serial_port,
            baudrate=first.baudrate,
            parity=first.parity,
            stopbits=first.stopbits,
            # A gap protects slow RS485 devices; a plain Modbus TCP device needs none.
            request_gap_s=0.0
            if first.transport == "tcp"
            else max(c.request_gap_ms for c in cfgs) / 1000,
            timeout_s=max(c.timeout_s for c in cfgs),
        )

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def attach(self) -> None:
        """A device starts using the bus."""
        self._users += 1

    def detach(self) -> None:
        """A device stops using the bus; the last one out closes the connection."""
        self._users = max(0, self._users - 1)
        if self._users == 0:
            self._close_client()

    async def connect(self, timeout_s: float | None = None) -> None:
        """Open the connection if it is not open. Raises DeviceGoneError."""
        async with self._lock:
            await self._ensure_connected(timeout_s or self.timeout_s)

    async def reconnect(self, timeout_s: float | None = None) -> None:
        """Drop the connection and open a fresh one. Raises DeviceGoneError."""
        async with self._lock:
            _log.info("%s: reconnecting", self.name)
            self._close_client()
            await self._ensure_connected(timeout_s or self.timeout_s)

    async def read_registers(
        self, unit: int, table: Table, address: int, count: int, *, timeout_s: float, what: str
    ) -> list[int]:
        """Read ``count`` registers of ``unit``; ``what`` names the read in errors and logs."""
        async with self._lock:
            await self._ensure_connected(timeout_s)
            client = self._client
            assert client is not None  # _ensure_connected made one or raised
            await self._keep_gap()
            self.requests += 1
            try:
                async with asyncio.timeout(timeout_s):
                    if table == "input":
                        rr = await client.read_input_registers(address, count=count, device_id=unit)
                    else:
                        rr = await client.read_holding_registers(
                            address, count=count, device_id=unit
                        )
            except TimeoutError as exc:
                if not client.connected:
                    raise DeviceGoneError(f"{what}: connection to {self.name} lost") from exc
                raise DeviceTimeoutError(f"{what}: no answer within {timeout_s:g} s") from exc
            except ConnectionException as exc:
                raise DeviceGoneError(f"{what}: {exc}") from exc
            except ModbusIOException as exc:
                if "No response" in str(exc):
                    raise DeviceTimeoutError(f"{what}: {exc}") from exc
                raise ProtocolError(f"{what}: {exc}") from exc
            except ModbusException as exc:
                raise ProtocolError(f"{what}: {exc}") from exc
            except OSError as exc:
                raise DeviceGoneError(f"{what}: {exc}") from exc
            finally:
                self._last_done = asyncio.get_running_loop().time()
            self.last_ok = self._last_done
        return self._check(rr, count, what)

    @staticmethod
    def _check(rr: ModbusPDU, count: int, what: str) -> list[int]:
        if rr.isError():
            code = rr.exception_code
            name = _EXCEPTION_NAMES.get(code, "unknown")
            raise ProtocolError(f"{what}: Modbus exception {code} ({name})")
        registers = list(rr.registers)
        if len(registers) != count:
            raise ProtocolError(f"{what}: {len(registers)} registers in the answer, asked {count}")
        return registers

    async def close(self) -> None:
        """Close the connection whoever still uses it."""
        async with self._lock:
            self._close_client()

    async def _keep_gap(self) -> None:
        if self.request_gap_s <= 0:
            return
        wait = self._last_done + self.request_gap_s - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _ensure_connected(self, timeout_s: float) -> None:
        if self._client is not None and self._client.connected:
            return
        if self._client is None:
            self._client = self._make_client()
        try:
            async with asyncio.timeout(timeout_s):
                ok = await self._client.connect()
        except TimeoutError as exc:
            raise DeviceGoneError(f"{self.name}: connect timed out after {timeout_s:g} s") from exc
        except (ModbusException, OSError) as exc:
            raise DeviceGoneError(f"{self.name}: cannot connect: {exc}") from exc
        if not ok:
            raise DeviceGoneError(f"{self.name}: cannot connect")
        self.connects += 1
        _log.info("%s: connected", self.name)

    def _make_client(self) -> _Client:
        # pymodbus must neither retry (the scheduler decides when to try again), nor reconnect
        # in the background (connects happen here, under the lock), and its own timer must not
        # fire before the per-request timeout given to read_registers.
        backstop_s = 2 * self.timeout_s + 1
        client: _Client
        if self.transport == "rtu":
            assert self.serial_port is not None
            client = AsyncModbusSerialClient(
                self.serial_port,
                framer=FramerType.RTU,
                baudrate=self.baudrate,
                bytesize=8,
                parity=self.parity,
                stopbits=self.stopbits,
                name=self.name,
                reconnect_delay=0.0,
                retries=0,
                timeout=backstop_s,
                trace_packet=self._trace,
            )
        else:
            assert self.host is not None
            client = AsyncModbusTcpClient(
                self.host,
                port=self.port,
                framer=FramerType.SOCKET if self.transport == "tcp" else FramerType.RTU,
                name=self.name,
                reconnect_delay=0.0,
                retries=0,
                timeout=backstop_s,
                trace_packet=self._trace,
            )
        client.set_max_no_responses(_NEVER_DISCONNECT)
        return client

    def _trace(self, sending: bool, data: bytes) -> bytes:
        # Raw frames at DEBUG, so that a user's log can become a test capture.
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s %s %s", self.name, ">" if sending else "<", data.hex())
        return data

    def _close_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing must not raise; the client is dropped regardless
                _log.debug("%s: error while closing", self.name, exc_info=True)
            self._client = None


class ModbusDriver:
    """A Modbus device read through a register profile (a PolledDriver).

    Each read issues one request per block of the profile; the first failing block ends the
    read (a silent device costs one timeout per read, not one per block).
    """

    kind = "modbus"

    def __init__(
        self, cfg: ModbusDevice, bus: ModbusBus | None = None, *, profile: Profile | None = None
    ) -> None:
        self.device_id: str = cfg.id
        self.config = cfg
        self.unit_id = cfg.unit_id
        self.timeout_s = cfg.timeout_s
        self.bus = bus or ModbusBus.for_devices([cfg])
        self.profile = profile or load_profile(cfg.profile)
        self.blocks: tuple[Block, ...] = self.profile.blocks()
        self._schema = self.profile.schema()
        self._attached = False
        self._failing_since: float | None = None

    async def connect(self) -> DeviceSchema:
        """Join the bus and open it if needed. Raises DeviceGoneError.

        The device itself is not probed: a meter that is off at start-up is reported by
        read(), with its schema already known."""
        self._attach()
        await self.bus.connect(self.timeout_s)
        return self._schema

    async def read(self) -> Values:
        self._attach()
        reads: list[tuple[Block, Sequence[int]]] = []
        for block in self.blocks:
            what = f"{self.device_id} (unit {self.unit_id}) {block.name}"
            try:
                registers = await self.bus.read_registers(
                    self.unit_id,
                    block.table,
                    block.address,
                    block.count,
                    timeout_s=self.timeout_s,
                    what=what,
                )
            except DeviceError:
                if self._failing_since is None:
                    self._failing_since = asyncio.get_running_loop().time()
                raise
            _log.debug("%s: %s", what, _hex(registers))
            reads.append((block, registers))
        self._failing_since = None
        return self.profile.decode(reads)

    async def recover(self) -> None:
        """Reconnect the bus, but only when no unit on it has answered since this device began
        failing: then the line or gateway is at fault, not this device, and the others lose
        nothing by the reconnect."""
        since = self._failing_since
        if since is None:
            return
        last_ok = self.bus.last_ok
        if self.bus.connected and last_ok is not None and last_ok >= since:
            _log.debug("%s: bus %s is answering; not reconnecting", self.device_id, self.bus.name)
            return
        try:
            await self.bus.reconnect(self.timeout_s)
        except DeviceError as exc:
            _log.info("%s: reconnect failed: %s", self.device_id, exc)

    async def close(self) -> None:
        if self._attached:
            self._attached = False
            try:
                self.bus.detach()
            except Exception:  # close must not raise
                _log.debug("%s: error while closing", self.device_id, exc_info=True)

    def _attach(self) -> None:
        if not self._attached:
            self._attached = True
            self.bus.attach()


def make_drivers(cfgs: Sequence[ModbusDevice]) -> list[ModbusDriver]:
    """One driver per device, in order; devices on the same bus share one ModbusBus.

    Raises ValueError when devices on one serial port disagree on the line settings."""
    groups: dict[tuple[str, str], list[ModbusDevice]] = {}
    for cfg in cfgs:
        groups.setdefault(bus_key(cfg), []).append(cfg)
    buses: dict[tuple[str, str], ModbusBus] = {}
    for key, group in groups.items():
        first = group[0]
        for other in group[1:]:
            if (other.baudrate, other.parity, other.stopbits) != (
                first.baudrate,
                first.parity,
                first.stopbits,
            ) and key[0] == "rtu":
                raise ValueError(
                    f"devices {first.id!r} and {other.id!r} share serial port {key[1]} but "
                    "differ in baudrate, parity or stopbits"
                )
        buses[key] = ModbusBus.for_devices(group)
        if len(group) > 1:
            _log.debug("%s shared by %s", buses[key].name, ", ".join(c.id for c in group))
    return [ModbusDriver(cfg, buses[bus_key(cfg)]) for cfg in cfgs]


# --- serving registers (simulators) ---------------------------------------------------------

ReadHook = Callable[[int, Table, int, int], int | None]
"""Called with (unit, table, address, count) before a read is answered; may update the unit's
image; returns a Modbus exception code to answer with instead, or None."""


class RegisterImage:
    """The registers one simulated unit serves: spans of each table, each register a word.

    Reads that touch a register outside the spans are answered ILLEGAL DATA ADDRESS.
    """

    def __init__(self, spans: Iterable[tuple[Table, int, int]]) -> None:
        self.spans: tuple[tuple[Table, int, int], ...] = tuple(
            sorted(spans, key=lambda s: (s[0], s[1]))
        )
        self._words: dict[Table, dict[int, int]] = {"input": {}, "holding": {}}
        for table, address, count in self.spans:
            if count < 1 or address < 0 or address + count > 0x10000:
                raise ValueError(f"span {table} 0x{address:04X}+{count} is out of range")
            for a in range(address, address + count):
                self._words[table][a] = 0

    def set(self, table: Table, address: int, words: Sequence[int]) -> None:
        for i, w in enumerate(words):
            if address + i not in self._words[table]:
                raise KeyError(f"{table} 0x{address + i:04X} is not in the image")
            self._words[table][address + i] = w & 0xFFFF

    def get(self, table: Table, address: int, count: int) -> list[int]:
        return [self._words[table][a] for a in range(address, address + count)]


class RegisterServer:
    """A Modbus server answering from RegisterImages: TCP, RTU over TCP, or RTU on a serial
    device (a real port or one end of a pty null modem).

    ``silent`` holds unit ids that get no answer (requests are still seen by ``on_read``);
    ``start()``/``stop()`` may be repeated and a TCP server comes back on the same port.
    """

    def __init__(
        self,
        units: Mapping[int, RegisterImage],
        *,
        transport: Transport = "tcp",
        host: str = "127.0.0.1",
        port: int = 0,
        serial_port: str | None = None,
        baudrate: int = 9600,
        on_read: ReadHook | None = None,
        silent: set[int] | None = None,
    ) -> None:
        if transport == "rtu" and not serial_port:
            raise ValueError("an RTU server needs a serial_port")
        self.units = dict(units)
        self.transport: Transport = transport
        self.host = host
        self.port = port
        """The TCP port; 0 until start() when a free one was asked for."""
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.on_read = on_read
        self.silent: set[int] = set() if silent is None else silent
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen (TCP) or open the serial device. Raises OSError when that fails."""
        if self._server is not None:
            return
        devices = [
            SimDevice(id=unit, simdata=_simdata(image), action=self._action(unit, image))
            for unit, image in sorted(self.units.items())
        ]
        server: ModbusTcpServer | ModbusSerialServer
        if self.transport == "rtu":
            server = ModbusSerialServer(
                devices,
                framer=FramerType.RTU,
                port=str(self.serial_port),
                baudrate=self.baudrate,
                trace_packet=self._trace,
            )
        else:
            server = ModbusTcpServer(
                devices,
                framer=FramerType.SOCKET if self.transport == "tcp" else FramerType.RTU,
                address=(self.host, self.port),
                trace_packet=self._trace,
            )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:  # pymodbus's word for "could not listen"
            where = self.serial_port if self.transport == "rtu" else f"{self.host}:{self.port}"
            raise OSError(f"modbus {self.transport} server cannot open {where}") from exc
        listener = server.transport
        if isinstance(listener, asyncio.Server) and listener.sockets:
            self.port = int(listener.sockets[0].getsockname()[1])
        self._server = server
        _log.info(
            "modbus %s server on %s, units %s", self.transport, self.where, sorted(self.units)
        )

    @property
    def where(self) -> str:
        """What a client opens: ``host:port`` or the serial device path."""
        return str(self.serial_port) if self.transport == "rtu" else f"{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stop answering and drop every connection."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]
            _log.info("modbus %s server on %s stopped", self.transport, self.where)

    async def __aenter__(self) -> RegisterServer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def _action(self, unit: int, image: RegisterImage) -> SimAction:
        async def action(  # noqa: PLR0917 - the signature pymodbus calls
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            # The images are read-only (a meter's measurements); writes are refused.
            if set_values is not None or function_code not in (3, 4):
                return ExcCodes.ILLEGAL_FUNCTION
            table: Table = "holding" if function_code == 3 else "input"
            if self.on_read is not None:
                code = self.on_read(unit, table, address, count)
                if code:
                    return ExcCodes(code)
            offset = address - start_address
            registers[offset : offset + count] = image.get(table, address, count)
            return None

        return action

    def _trace(self, sending: bool, data: bytes) -> bytes:
        # A silent unit's answer is dropped on its way out: the client sees no answer at all,
        # as from a meter that is off, while requests keep flowing on the same connection.
        if sending and self.silent and data:
            unit = data[6] if self.transport == "tcp" and len(data) > 6 else data[0]
            if unit in self.silent:
                _log.debug("%s unit %d is silent: answer dropped", self.where, unit)
                return b""
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("server %s %s %s", self.where, ">" if sending else "<", data.hex())
        return data


def _simdata(
    image: RegisterImage,
) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
    """pymodbus's separate-tables layout: (coils, discrete inputs, holding, input)."""
    tables: dict[Table, list[SimData]] = {"holding": [], "input": []}
    for table, address, count in image.spans:
        tables[table].append(
            SimData(
                address=address,
                values=image.get(table, address, count),
                datatype=DataType.REGISTERS,
                readonly=True,
            )
        )

    # pymodbus wants every table defined: park an unreadable placeholder at the top.
    def no_bits() -> list[SimData]:
        return [SimData(address=0xFFF0, values=[False] * 16, datatype=DataType.BITS)]

    def no_regs() -> list[SimData]:
        return [SimData(address=0xFFFF, datatype=DataType.INVALID)]

    return (no_bits(), no_bits(), tables["holding"] or no_regs(), tables["input"] or no_regs())
