"""CRC-16 with the reflected 0x8005 polynomial, shared by Modbus RTU and DSMR P1 framing."""

from __future__ import annotations

__all__ = ("crc16_arc", "crc16_modbus")


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _table()


def _crc16(data: bytes | bytearray | memoryview, crc: int) -> int:
    table = _TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


def crc16_arc(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/ARC (initial 0), the checksum DSMR 4+ telegrams end with."""
    return _crc16(data, 0)


def crc16_modbus(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS (initial 0xFFFF), sent low byte first after an RTU frame."""
    return _crc16(data, 0xFFFF)
