"""Reading TOML files for users, and where in one a msgspec validation error points.

msgspec says ``Expected `int`, got `str` - at `$.devices[1].port```; users want
``site.toml:14: devices[1].port: ...``. Shared by the site configuration, the Modbus
register profiles and the hub configuration.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

__all__ = (
    "decode_toml",
    "format_path",
    "line_of",
    "locate",
    "parse_toml",
    "read_text",
    "split_error",
)

T = TypeVar("T")

_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def read_text(path: Path, error: type[Exception]) -> str:
    """The file's text; ``error`` naming the file when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from exc


def parse_toml(text: str, source: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed document; ``error`` as ``source:line: not valid TOML: ...`` on bad syntax."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_LINE.search(str(exc))
        where = f"{source}:{m.group(1)}" if m else source
        raise error(f"{where}: not valid TOML: {exc}") from exc


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_FIELD = re.compile(r"(?:unknown|required) field `(?P<name>[^`]+)`")


def split_error(message: str) -> tuple[str, list[str | int]]:
    """The message without its ``- at `$...``` suffix, and the key path it names; a missing
    or unknown field's own name ends the path."""
    m = _AT.match(message)
    msg = m.group("msg") if m else message
    parts: list[str | int] = []
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", (m.group("path") or "") if m else ""):
        parts.append(int(index) if index else name)
    named = _FIELD.search(msg)
    if named:
        parts.append(named.group("name"))
    return msg, parts


def format_path(parts: list[str | int]) -> str:
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else p)
    return s


_TABLE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")


def line_of(text: str, parts: list[str | int]) -> int | None:
    """The line of the deepest table or key of ``parts`` that the file spells out."""
    lines: dict[tuple[str | int, ...], int] = {}
    counts: dict[tuple[str, ...], int] = {}
    table: tuple[str | int, ...] = ()
    for no, raw in enumerate(text.splitlines(), start=1):
        t = _TABLE.match(raw)
        if t:
            names = tuple(n.strip().strip('"') for n in t.group(2).split("."))
            if t.group(1) == "[[":
                idx = counts.get(names, 0)
                counts[names] = idx + 1
                table = (*names, idx)
            else:
                table = names
            lines.setdefault(table, no)
            continue
        k = _KEY.match(raw)
        if k:
            lines.setdefault((*table, k.group(1)), no)
    for n in range(len(parts), 0, -1):
        hit = lines.get(tuple(parts[:n]))
        if hit is not None:
            return hit
    return None


def locate(message: str, text: str, filename: str) -> str:
    """Turn msgspec's ``... - at `$.devices[0].port``` into ``file:line: devices[0].port: ...``."""
    msg, parts = split_error(message)
    key = format_path(parts)
    line = line_of(text, parts)
    where = f"{filename}:{line}" if line else filename
    return f"{where}: {key}: {msg}" if key else f"{where}: {msg}"


def decode_toml(text: str, filename: str, into: type[T], error: type[Exception]) -> T:
    """A TOML document decoded strictly into ``into``; ``error`` naming file, line and key."""
    raw = parse_toml(text, filename, error)
    try:
        return msgspec.convert(raw, into, strict=True)
    except msgspec.ValidationError as exc:
        raise error(locate(str(exc), text, filename)) from exc
