"""Modbus register profiles: a meter described as data (TOML), validated, grouped into block reads.

A profile names the device, its default register table and value type, how many registers one
request may read, and one ``[[fields]]`` table per measurement::

    name = "sdm120"
    manufacturer = "Eastron"
    model = "SDM120"
    table = "input"          # default table of the fields: "input" (FC 4) or "holding" (FC 3)
    type = "float32"         # default type: int16 uint16 int32 uint32 float32 float64
    word_order = "big"       # default: "big" = most significant register first
    max_registers = 80       # registers per request (the protocol allows at most 125)
    max_gap = 16             # unused registers a block read may span to save a request

    [[fields]]
    name = "voltage_v"       # the name carries the unit (STYLE rule 2)
    address = 0x0000         # 0-based register address, as on the wire
    # table, type, word_order: override the defaults above
    # scale = 0.1            # value = raw * scale
    # unit = "V"             # optional; must agree with the name's suffix
    # tolerance = 0.1        # optional; the usual tolerance of the unit otherwise

Validation is strict and every error names the file and the field (``sdm630.toml:12:
fields[3] (voltage_l3_v): ...``): unknown keys, unknown types, addresses out of range,
overlapping registers, repeated names, and a ``unit`` that disagrees with the name's suffix.
The unit check is an error, not a warning: a shipped profile is data that a test loads, so a
mismatch is a bug to fix, and a silently wrong unit would travel all the way to the hub.
Dimensionless fields (power factor) have no unit suffix and ``unit = ""``.

Decoding registers is plain Python (``struct``); this module does not import pymodbus.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from cloud_sync import DeviceSchema
from cloud_sync.tomlerrors import format_path, line_of, parse_toml, read_text, split_error

from .base import field_from_name, unit_of

__all__ = (
    "MAX_READ_REGISTERS",
    "PROFILES_DIR",
    "Block",
    "Profile",
    "ProfileError",
    "RegisterField",
    "RegisterType",
    "Table",
    "WordOrder",
    "load_profile",
    "parse_profile",
    "shipped_profiles",
)

MAX_READ_REGISTERS = 125
"""Protocol limit of one read-registers request (Modbus application protocol, FC 3 and 4)."""

PROFILES_DIR = Path(__file__).with_name("profiles")
"""Where the shipped profiles live; ``load_profile("sdm630")`` reads ``sdm630.toml`` there."""

Table = Literal["input", "holding"]
RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64"]
WordOrder = Literal["big", "little"]

# struct format and width in registers of each type.
_TYPES: dict[str, tuple[str, int]] = {
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "float32": ("f", 2),
    "float64": ("d", 4),
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_Address = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]


class ProfileError(ValueError):
    """A register profile is missing, not TOML, or not a valid profile."""


# --- the file format ------------------------------------------------------------------------


class _FieldSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: str
    address: _Address
    table: Table | None = None
    type: RegisterType | None = None
    word_order: WordOrder | None = None
    scale: float = 1.0
    unit: str | None = None
    tolerance: float | None = None
    description: str = ""


class _ProfileSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: str
    manufacturer: str = ""
    model: str
    description: str = ""
    kind: str = "meter"
    table: Table
    type: RegisterType = "uint16"
    word_order: WordOrder = "big"
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=MAX_READ_REGISTERS)] = MAX_READ_REGISTERS
    max_gap: Annotated[int, msgspec.Meta(ge=0, le=MAX_READ_REGISTERS)] = 0
    fields: list[_FieldSpec]


# --- the loaded profile ---------------------------------------------------------------------


class RegisterField(msgspec.Struct, frozen=True, kw_only=True):
    """One measurement: where it lives, how it is encoded, and what it means."""

    name: str
    address: int
    table: Table
    type: RegisterType
    word_order: WordOrder = "big"
    scale: float = 1.0
    """value = raw * scale."""
    unit: str = ""
    tolerance: float | None = None
    """None: the usual tolerance of the unit (``field_from_name``)."""
    description: str = ""

    @property
    def width(self) -> int:
        """Registers the value occupies."""
        return _TYPES[self.type][1]

    @property
    def end(self) -> int:
        """One past the last register of the value."""
        return self.address + self.width

    def decode(self, registers: Sequence[int]) -> float | None:
        """The value of ``width`` registers (scaled); None for NaN or infinity."""
        code, width = _TYPES[self.type]
        if len(registers) != width:
            raise ValueError(f"{self.name}: needs {width} registers, got {len(registers)}")
        words = registers if self.word_order == "big" else registers[::-1]
        raw = struct.unpack(">" + code, struct.pack(f">{width}H", *words))[0]
        value = float(raw) * self.scale
        return value if math.isfinite(value) else None

    def encode(self, value: float) -> list[int]:
        """The registers a device holding ``value`` serves (what a simulator needs)."""
        code, width = _TYPES[self.type]
        raw = value / self.scale
        try:
            data = struct.pack(">" + code, raw if code in "fd" else round(raw))
        except (struct.error, OverflowError) as exc:
            raise ValueError(f"{self.name}: {value!r} does not fit {self.type}") from exc
        words = list(struct.unpack(f">{width}H", data))
        return words if self.word_order == "big" else words[::-1]


class Block(msgspec.Struct, frozen=True):
    """One read request: ``count`` registers of ``table`` from ``address``, and the fields in it."""

    table: Table
    address: int
    count: int
    fields: tuple[int, ...]
    """Indexes into ``Profile.fields``."""

    @property
    def name(self) -> str:
        """How logs and errors name the block: ``input 0x0000+80``."""
        return f"{self.table} 0x{self.address:04X}+{self.count}"


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    """A device's registers as data. Built by ``load_profile``; validated on construction."""

    name: str
    model: str
    fields: tuple[RegisterField, ...]
    manufacturer: str = ""
    description: str = ""
    kind: str = "meter"
    max_registers: int = MAX_READ_REGISTERS
    max_gap: int = 0
    source: str = "<profile>"
    """The file it was read from, for error messages."""

    def __post_init__(self) -> None:
        _validate(self)

    def schema(self) -> DeviceSchema:
        """What each read returns: one schema field per profile field, in order."""
        return DeviceSchema(
            kind=self.kind,
            model=f"{self.manufacturer} {self.model}".strip(),
            fields=tuple(field_from_name(f.name, f.unit, f.tolerance) for f in self.fields),
        )

    def blocks(self, max_regs: int | None = None) -> tuple[Block, ...]:
        """Group the fields into as few reads as the limits allow.

        Fields of one table whose registers are contiguous, or separated by at most
        ``max_gap`` unused registers, share a block of at most ``max_regs`` registers (default:
        the profile's ``max_registers``; never more than the protocol's 125).
        """
        limit = min(max_regs or self.max_registers, self.max_registers, MAX_READ_REGISTERS)
        order = sorted(range(len(self.fields)), key=self._sort_key)
        blocks: list[Block] = []
        cur: list[int] = []
        for i in order:
            f = self.fields[i]
            if f.width > limit:
                raise ProfileError(
                    f"{self.source}: {f.name}: {f.width} registers do not fit reads of {limit}"
                )
            if cur:
                first, last = self.fields[cur[0]], self.fields[cur[-1]]
                if (
                    f.table == first.table
                    and f.address - last.end <= self.max_gap
                    and f.end - first.address <= limit
                ):
                    cur.append(i)
                    continue
                blocks.append(self._block(cur))
            cur = [i]
        if cur:
            blocks.append(self._block(cur))
        return tuple(blocks)

    def decode(self, reads: Iterable[tuple[Block, Sequence[int]]]) -> list[float | None]:
        """Values aligned with ``fields`` from the registers of each block read.

        Fields in no given block are None (missing)."""
        values: list[float | None] = [None] * len(self.fields)
        for block, registers in reads:
            if len(registers) != block.count:
                raise ValueError(
                    f"{self.name} {block.name}: got {len(registers)} registers, "
                    f"expected {block.count}"
                )
            for i in block.fields:
                f = self.fields[i]
                start = f.address - block.address
                values[i] = f.decode(registers[start : start + f.width])
        return values

    def _sort_key(self, i: int) -> tuple[str, int]:
        f = self.fields[i]
        return (f.table, f.address)

    def _block(self, idx: list[int]) -> Block:
        first = self.fields[idx[0]]
        end = max(self.fields[i].end for i in idx)
        return Block(first.table, first.address, end - first.address, tuple(idx))


def _validate(p: Profile) -> None:
    def where(i: int) -> str:
        return f"{p.source}: fields[{i}] ({p.fields[i].name})"

    if not p.fields:
        raise ProfileError(f"{p.source}: a profile needs at least one field")
    if not 1 <= p.max_registers <= MAX_READ_REGISTERS:
        raise ProfileError(f"{p.source}: max_registers must be in 1..{MAX_READ_REGISTERS}")
    names: dict[str, int] = {}
    for i, f in enumerate(p.fields):
        if not _NAME.match(f.name):
            raise ProfileError(f"{where(i)}: name must be snake_case ([a-z][a-z0-9_]*)")
        if f.name in names:
            raise ProfileError(f"{where(i)}: name already used by fields[{names[f.name]}]")
        names[f.name] = i
        if f.type not in _TYPES:
            raise ProfileError(f"{where(i)}: unknown type {f.type!r}; one of {sorted(_TYPES)}")
        if f.address < 0 or f.end - 1 > 0xFFFF:
            raise ProfileError(
                f"{where(i)}: registers 0x{f.address:04X}..0x{f.end - 1:04X} "
                "are outside 0x0000..0xFFFF"
            )
        if not math.isfinite(f.scale) or f.scale == 0:
            raise ProfileError(f"{where(i)}: scale must be a finite, non-zero number")
        if f.tolerance is not None and not (math.isfinite(f.tolerance) and f.tolerance > 0):
            raise ProfileError(f"{where(i)}: tolerance must be a positive number")
        suffix_unit = unit_of(f.name)
        if f.unit != suffix_unit:
            named = f"names {suffix_unit!r}" if suffix_unit else "carries no unit suffix"
            raise ProfileError(
                f"{where(i)}: unit {f.unit!r} disagrees with the name, which {named} "
                "(field names carry their unit: voltage_l1_v, energy_import_kwh)"
            )
    by_table = sorted(range(len(p.fields)), key=lambda i: (p.fields[i].table, p.fields[i].address))
    for a, b in itertools.pairwise(by_table):
        fa, fb = p.fields[a], p.fields[b]
        if fa.table == fb.table and fb.address < fa.end:
            raise ProfileError(
                f"{where(b)}: {fb.table} register 0x{fb.address:04X} overlaps fields[{a}] "
                f"({fa.name}, 0x{fa.address:04X}..0x{fa.end - 1:04X})"
            )
    widest = max(f.width for f in p.fields)
    if widest > p.max_registers:
        raise ProfileError(
            f"{p.source}: max_registers {p.max_registers} < a {widest}-register field"
        )


# --- loading --------------------------------------------------------------------------------


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped with gridlet (``sdm630``, ...)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (``"sdm630"``) or a profile file by path.

    Raises ProfileError naming the file (and line, field and key where it can)."""
    s = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or "/" in s or s.endswith(".toml")
    path = Path(s) if is_path else PROFILES_DIR / f"{s}.toml"
    if not is_path and not path.is_file():
        raise ProfileError(f"no shipped register profile {s!r}; shipped: {shipped_profiles()}")
    return parse_profile(read_text(path, ProfileError), str(path))


def parse_profile(text: str, source: str = "<profile>") -> Profile:
    """A profile from TOML text; ``source`` names it in errors."""
    name = Path(source).name
    raw = parse_toml(text, name, ProfileError)
    try:
        spec = msgspec.convert(raw, _ProfileSpec, strict=True)
    except msgspec.ValidationError as exc:
        raise ProfileError(_explain(str(exc), raw, text, name)) from exc
    fields = tuple(
        RegisterField(
            name=f.name,
            address=f.address,
            table=f.table or spec.table,
            type=f.type or spec.type,
            word_order=f.word_order or spec.word_order,
            scale=f.scale,
            unit=unit_of(f.name) if f.unit is None else f.unit,
            tolerance=f.tolerance,
            description=f.description,
        )
        for f in spec.fields
    )
    try:
        return Profile(
            name=spec.name,
            manufacturer=spec.manufacturer,
            model=spec.model,
            description=spec.description,
            kind=spec.kind,
            max_registers=spec.max_registers,
            max_gap=spec.max_gap,
            fields=fields,
            source=name,
        )
    except ProfileError as exc:
        raise ProfileError(_with_line(str(exc), text, name)) from None


def _explain(message: str, raw: object, text: str, name: str) -> str:
    """msgspec's ``Expected `int` - at `$.fields[2].address``` becomes
    ``x.toml:9: fields[2] (voltage_v): address: Expected `int```."""
    msg, parts = split_error(message)
    line = line_of(text, parts)
    if len(parts) < 2 or parts[0] != "fields" or not isinstance(parts[1], int):
        key = format_path(parts)
        return f"{name}{_colon(line)}: {key + ': ' if key else ''}{msg}"
    index = parts[1]
    key = format_path(parts[2:])
    field_name = "?"
    if isinstance(raw, dict):
        items = raw.get("fields")
        if isinstance(items, list) and index < len(items) and isinstance(items[index], dict):
            field_name = str(items[index].get("name", "?"))
    return f"{name}{_colon(line)}: fields[{index}] ({field_name}): {key + ': ' if key else ''}{msg}"


def _with_line(message: str, text: str, name: str) -> str:
    """Add the line of ``fields[i]`` to a validation message that names it."""
    m = re.match(rf"^{re.escape(name)}: fields\[(\d+)\]", message)
    if not m:
        return message
    line = line_of(text, ["fields", int(m.group(1))])
    return f"{name}{_colon(line)}{message[len(name) :]}"


def _colon(line: int | None) -> str:
    return f":{line}" if line else ""
