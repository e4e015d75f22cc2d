"""GoodWe ET register banks built from recorded captures, and the frames that carry them.

The ET family (ET/EH/BT/BH/GEH) speaks Modbus: RTU frames inside UDP datagrams on port 8899,
replies prefixed with ``AA55``, or plain Modbus TCP on any other port. Each capture file in
``goodwe_captures/et`` is one recorded reply, named ``<MODEL>_<block>[_<variant>].hex``; the
block name says which registers it answers (``BLOCK_STARTS``, from goodwe's ET family module).
A ``Responder`` answers any read range the bank holds and ``ILLEGAL DATA ADDRESS`` otherwise,
which is what a real inverter does for registers its firmware lacks.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..crc import crc16_modbus

__all__ = (
    "BLOCK_STARTS",
    "CAPTURES_ENV",
    "ILLEGAL_DATA_ADDRESS",
    "ILLEGAL_DATA_VALUE",
    "ILLEGAL_FUNCTION",
    "MAX_READ_REGISTERS",
    "Capture",
    "DeviceIdentity",
    "RegisterBank",
    "Responder",
    "crc16",
    "default_captures_dir",
    "list_models",
    "load_captures",
    "parse_rtu_reply",
)

log = logging.getLogger(__name__)

# First register of each block goodwe's ET family reads (goodwe/et.py, 0.4.x).
BLOCK_STARTS: Mapping[str, int] = {
    "device_info": 0x88B8,  # 35000, 0x21 registers
    "running_data": 0x891C,  # 35100, 0x7D
    "battery2_info_extended": 0x89BE,  # 35262, 0x06
    "mppt_data": 0x89E5,  # 35301, 0x3D
    "meter_data": 0x8CA0,  # 36000, 0x2D / 0x3A / 0x7D depending on the platform
    "battery_info": 0x9088,  # 37000, 0x18
    "battery2_info": 0x9858,  # 39000, 0x16
}
# Longest first, so that "battery2_info_extended" is not read as "battery2_info" + variant.
_BLOCK_NAMES = sorted(BLOCK_STARTS, key=len, reverse=True)
_BLOCK_OF_START = {start: name for name, start in BLOCK_STARTS.items()}

ILLEGAL_FUNCTION = 0x01
ILLEGAL_DATA_ADDRESS = 0x02
ILLEGAL_DATA_VALUE = 0x03
MAX_READ_REGISTERS = 125  # Modbus limit for one read-holding-registers request

CAPTURES_ENV = "GRIDLET_GOODWE_CAPTURES"
"""Environment variable naming the folder of ET captures (default: ../shared beside the repo)."""

_READ_HOLDING = 0x03
_READ_INPUT = 0x04
# goodwe's family probe on UDP 8899: "read device info" in the older AA55 protocol.
_AA55_REQUEST_HEAD = b"\xaa\x55\xc0\x7f"
_AA55_DEVICE_INFO = b"\x01\x02\x00"


def crc16(data: bytes | bytearray | memoryview) -> int:
    """Modbus CRC-16 (polynomial 0xA001, initial 0xFFFF); sent low byte first."""
    return crc16_modbus(data)


def parse_rtu_reply(raw: bytes) -> tuple[int, bytes]:
    """The (function code, payload) of the first ``AA55`` RTU read reply in ``raw``.

    A capture may hold the same reply twice (one of goodwe's samples does): only the first
    frame counts. Raises ValueError for anything that is not a valid read reply.
    """
    if len(raw) < 7 or raw[:2] != b"\xaa\x55":
        raise ValueError("not an AA55 reply")
    func, length = raw[3], raw[4]
    if func not in (_READ_HOLDING, _READ_INPUT):
        raise ValueError(f"not a read reply (function 0x{func:02x})")
    end = 5 + length + 2
    if len(raw) < end or length % 2:
        raise ValueError(f"truncated reply: {len(raw)} bytes, header says {end}")
    if crc16(raw[2 : end - 2]) != int.from_bytes(raw[end - 2 : end], "little"):
        raise ValueError("CRC mismatch")
    return func, bytes(raw[5 : end - 2])


@dataclass(frozen=True)
class Capture:
    """One recorded reply: which block, from which file, and the register values it holds."""

    block: str
    variant: str
    path: Path
    start: int
    payload: bytes

    @property
    def count(self) -> int:
        return len(self.payload) // 2


def default_captures_dir() -> Path:
    """``$GRIDLET_GOODWE_CAPTURES``, else ``shared/data/goodwe_captures/et`` beside the repo
    (every recorded model), else the GW10K-ET captures shipped inside the package."""
    env = os.environ.get(CAPTURES_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for root in (repo.parent / "shared", repo / "shared"):
        d = root / "data" / "goodwe_captures" / "et"
        if d.is_dir():
            return d
    return Path(__file__).resolve().parent / "captures" / "et"


def _split_name(stem: str) -> tuple[str, str, str] | None:
    """``GW10K-ET_device_info_fw1023`` -> (model, block, variant), or None."""
    for block in _BLOCK_NAMES:
        m = re.fullmatch(rf"(?P<model>.+?)_{block}(?:_(?P<variant>[A-Za-z0-9]+))?", stem)
        if m:
            return m.group("model"), block, m.group("variant") or ""
    return None


def list_models(captures_dir: Path | None = None) -> tuple[str, ...]:
    """Models with at least device info and running data: enough for goodwe to read."""
    d = captures_dir or default_captures_dir()
    blocks: dict[str, set[str]] = {}
    for p in d.glob("*.hex"):
        parts = _split_name(p.stem)
        if parts:
            blocks.setdefault(parts[0], set()).add(parts[1])
    return tuple(sorted(m for m, b in blocks.items() if {"device_info", "running_data"} <= b))


def _variant_rank(variant: str) -> tuple[int, int]:
    # Plain captures first, then the newest firmware ("fw1023" beats "fw819").
    digits = re.sub(r"\D", "", variant)
    return (0 if not variant else 1, -int(digits) if digits else 0)


def load_captures(
    model: str, captures_dir: Path | None = None, variant: str | None = None
) -> dict[str, Capture]:
    """Every block recorded for ``model``: the ``variant`` file where there is one (e.g.
    ``fw1023``), else the plain file, else the newest firmware's. Raises FileNotFoundError
    when the model has no device info or running data, ValueError for a corrupt capture."""
    d = captures_dir or default_captures_dir()
    if not d.is_dir():
        raise FileNotFoundError(
            f"no GoodWe captures at {d}; set {CAPTURES_ENV} to the goodwe_captures/et folder"
        )
    found: dict[str, list[tuple[str, Path]]] = {}
    for p in sorted(d.glob("*.hex")):
        parts = _split_name(p.stem)
        if parts and parts[0] == model:
            found.setdefault(parts[1], []).append((parts[2], p))
    out: dict[str, Capture] = {}
    for block, files in found.items():
        files.sort(key=lambda vp: (vp[0] != variant, *_variant_rank(vp[0])))
        var, path = files[0]
        try:
            _, payload = parse_rtu_reply(bytes.fromhex(path.read_text().strip()))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        out[block] = Capture(block, var, path, BLOCK_STARTS[block], payload)
    missing = {"device_info", "running_data"} - out.keys()
    if missing:
        known = ", ".join(list_models(d)) or "none"
        raise FileNotFoundError(
            f"model {model!r} lacks {', '.join(sorted(missing))} in {d} (models: {known})"
        )
    return out


class RegisterBank:
    """65536 holding registers, each either present (answered) or absent (rejected)."""

    def __init__(self) -> None:
        self._words = bytearray(0x20000)
        self._have = bytearray(0x10000)

    def load(self, start: int, payload: bytes) -> None:
        """Make ``len(payload) // 2`` registers from ``start`` present, with these values."""
        self._check(start, len(payload) // 2)
        self._words[start * 2 : start * 2 + len(payload)] = payload
        self._have[start : start + len(payload) // 2] = b"\x01" * (len(payload) // 2)

    def drop(self, start: int, count: int) -> None:
        """Make registers absent: reads touching them get ILLEGAL DATA ADDRESS."""
        self._check(start, count)
        self._have[start : start + count] = bytes(count)

    def has(self, start: int, count: int = 1) -> bool:
        if start < 0 or count < 1 or start + count > 0x10000:
            return False
        return 0 not in self._have[start : start + count]

    def read(self, start: int, count: int) -> bytes | None:
        """The registers' bytes, or None when any of them is absent."""
        if not self.has(start, count):
            return None
        return bytes(self._words[start * 2 : (start + count) * 2])

    def raw(self, start: int, count: int) -> bytes:
        """The stored bytes whether present or not (for tests and the site model)."""
        self._check(start, count)
        return bytes(self._words[start * 2 : (start + count) * 2])

    # Writes land whether or not the register is present: the site model writes every register
    # it drives and presence alone decides what is answered, so a rejected block stays rejected.
    def put_u16(self, reg: int, value: int) -> None:
        struct.pack_into(">H", self._words, reg * 2, max(0, min(0xFFFF, int(value))))

    def put_s16(self, reg: int, value: int) -> None:
        struct.pack_into(">h", self._words, reg * 2, max(-0x8000, min(0x7FFF, int(value))))

    def put_u32(self, reg: int, value: int) -> None:
        struct.pack_into(">I", self._words, reg * 2, max(0, min(0xFFFFFFFF, int(value))))

    def put_s32(self, reg: int, value: int) -> None:
        v = max(-0x80000000, min(0x7FFFFFFF, int(value)))
        struct.pack_into(">i", self._words, reg * 2, v)

    def put_u64(self, reg: int, value: int) -> None:
        struct.pack_into(">Q", self._words, reg * 2, max(0, int(value)))

    def put_f32(self, reg: int, value: float) -> None:
        struct.pack_into(">f", self._words, reg * 2, float(value))

    def put_bytes(self, reg: int, data: bytes) -> None:
        self._words[reg * 2 : reg * 2 + len(data)] = data

    def u16(self, reg: int) -> int:
        return int(struct.unpack_from(">H", self._words, reg * 2)[0])

    def s16(self, reg: int) -> int:
        return int(struct.unpack_from(">h", self._words, reg * 2)[0])

    def u32(self, reg: int) -> int:
        return int(struct.unpack_from(">I", self._words, reg * 2)[0])

    @staticmethod
    def _check(start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > 0x10000:
            raise ValueError(f"registers {start}+{count} are outside 0..65535")


@dataclass(frozen=True)
class DeviceIdentity:
    """What the inverter says about itself, decoded from its device-info registers."""

    model: str
    serial: str
    firmware: str

    @classmethod
    def from_device_info(cls, payload: bytes) -> DeviceIdentity:
        # Registers 35003..35010 serial, 35011..35015 model, 35021..35026 firmware (goodwe/et.py).
        def text(b: bytes) -> str:
            return b.decode("ascii", "replace").replace("\x00", "").strip()

        return cls(text(payload[22:32]), text(payload[6:22]), text(payload[42:54]))


def _aa55_device_info_reply(ident: DeviceIdentity) -> bytes:
    """The reply to goodwe's AA55 probe: goodwe reads the model at bytes 5..15 and the serial
    at 31..47 of the payload and picks the family from tags in the serial (``ETU`` -> ET)."""
    payload = bytearray(b" " * 77)
    payload[0:5] = b"\x00\x00\x00\x00\x00"
    payload[5:15] = ident.model.encode("ascii", "replace")[:10].ljust(10)
    payload[31:47] = ident.serial.encode("ascii", "replace")[:16].ljust(16, b"0")
    payload[50:62] = ident.firmware.encode("ascii", "replace")[:12].ljust(12)
    frame = b"\xaa\x55\x7f\xc0\x01\x82" + bytes([len(payload)]) + bytes(payload)
    return frame + (sum(frame) & 0xFFFF).to_bytes(2, "big")


class Responder:
    """Turns requests into replies against a register bank; transport-independent and fast."""

    def __init__(self, bank: RegisterBank, identity: DeviceIdentity | None = None) -> None:
        self.bank = bank
        self._aa55_reply = _aa55_device_info_reply(identity) if identity else None
        self.requests: Counter[str] = Counter()
        """Read requests per block name (``meter_data``) or start register (``0xB9C7``)."""
        self.rejected: Counter[str] = Counter()
        """Exception replies per block name or start register."""

    @staticmethod
    def block_name(start: int) -> str:
        return _BLOCK_OF_START.get(start, f"0x{start:04X}")

    def pdu(self, func: int, body: bytes) -> tuple[int, bytes]:
        """Answer one request PDU (function code and the bytes after it) with (function
        code, reply body); an exception reply has the function code's high bit set."""
        if func not in (_READ_HOLDING, _READ_INPUT):
            return func | 0x80, bytes([ILLEGAL_FUNCTION])
        if len(body) < 4:
            return func | 0x80, bytes([ILLEGAL_DATA_VALUE])
        start, count = struct.unpack_from(">HH", body)
        name = self.block_name(start)
        self.requests[name] += 1
        if not 1 <= count <= MAX_READ_REGISTERS:
            self.rejected[name] += 1
            return func | 0x80, bytes([ILLEGAL_DATA_VALUE])
        data = self.bank.read(start, count)
        if data is None:
            self.rejected[name] += 1
            return func | 0x80, bytes([ILLEGAL_DATA_ADDRESS])
        return func, bytes([len(data)]) + data

    def udp(self, datagram: bytes) -> bytes | None:
        """The reply to a datagram on UDP 8899, or None for one that gets no reply."""
        if datagram[:4] == _AA55_REQUEST_HEAD:
            if datagram[4:7] == _AA55_DEVICE_INFO and self._aa55_reply is not None:
                return self._aa55_reply
            return None  # other AA55 commands belong to older families: stay silent like ET
        if len(datagram) != 8 or crc16(datagram[:6]) != int.from_bytes(datagram[6:8], "little"):
            return None  # a garbled datagram is dropped; the client retries
        addr, func = datagram[0], datagram[1]
        rfunc, body = self.pdu(func, datagram[2:6])
        frame = bytes((addr, rfunc)) + body
        return b"\xaa\x55" + frame + crc16(frame).to_bytes(2, "little")

    def tcp(self, adu: bytes) -> bytes:
        """The reply to one complete Modbus TCP ADU (MBAP header + PDU)."""
        tx, unit, func = adu[0:2], adu[6], adu[7]
        rfunc, body = self.pdu(func, adu[8:])
        return tx + b"\x00\x00" + (len(body) + 2).to_bytes(2, "big") + bytes((unit, rfunc)) + body
