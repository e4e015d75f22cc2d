"""A null-modem cable made of two pseudo-terminals, for serial simulators that need no hardware.

``PtyNullModem`` opens two pty pairs and copies bytes between their master ends on the event
loop, so the two slave device paths behave like two serial ports joined by a cable: what one
side writes to ``device_a`` the other reads from ``device_b``, and back. Both sides open their
path with pyserial (or pymodbus) exactly as they would open ``/dev/ttyUSB0``; no socat needed.

Like a cable it has no buffer of its own: bytes the far side cannot take are dropped and
counted. ``connected = False`` cuts the cable (both directions drop) without closing anything.
Linux and other POSIX systems only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pty
import tty

__all__ = ("PtyNullModem",)

_log = logging.getLogger(__name__)

_CHUNK = 4096


class PtyNullModem:
    """Two serial device paths joined like a null-modem cable. Use ``async with`` (or
    ``open()``/``close()`` inside a running event loop)."""

    def __init__(self) -> None:
        self.connected = True
        """False drops everything in both directions, like a pulled cable."""
        self.bytes_a_to_b = 0
        self.bytes_b_to_a = 0
        self.dropped = 0
        self._ends: list[tuple[int, int, str]] = []  # (master fd, slave fd, slave path)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def device_a(self) -> str:
        """One end's device path (``/dev/pts/N``)."""
        return self._end(0)[2]

    @property
    def device_b(self) -> str:
        """The other end's device path."""
        return self._end(1)[2]

    @property
    def is_open(self) -> bool:
        return bool(self._ends)

    def open(self) -> None:
        """Create both ends and start copying; needs a running event loop."""
        if self._ends:
            return
        loop = asyncio.get_running_loop()
        try:
            for _ in range(2):
                self._ends.append(_open_end())
        except OSError:
            self._close_fds()
            raise
        (ma, _, _), (mb, _, _) = self._ends
        loop.add_reader(ma, self._forward, ma, mb, True)
        loop.add_reader(mb, self._forward, mb, ma, False)
        self._loop = loop
        _log.debug("pty null modem %s <-> %s", self.device_a, self.device_b)

    def close(self) -> None:
        """Stop copying and close every descriptor; the device paths disappear."""
        if self._loop is not None:
            for master, _, _ in self._ends:
                self._loop.remove_reader(master)
            self._loop = None
        self._close_fds()

    async def __aenter__(self) -> PtyNullModem:
        self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    def _end(self, i: int) -> tuple[int, int, str]:
        if not self._ends:
            raise RuntimeError("the null modem is not open")
        return self._ends[i]

    def _forward(self, src: int, dst: int, a_to_b: bool) -> None:
        try:
            data = os.read(src, _CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            # Not expected while we hold the slave ends open; stop rather than spin on it.
            _log.warning("pty null modem: read failed, stopping this direction: %s", exc)
            if self._loop is not None:
                self._loop.remove_reader(src)
            return
        if not self.connected:
            self.dropped += len(data)
            return
        try:
            written = os.write(dst, data)
        except BlockingIOError:
            written = 0
        self.dropped += len(data) - written
        if a_to_b:
            self.bytes_a_to_b += written
        else:
            self.bytes_b_to_a += written

    def _close_fds(self) -> None:
        for master, slave, _ in self._ends:
            for fd in (master, slave):
                try:
                    os.close(fd)
                except OSError:
                    _log.debug("pty null modem: closing fd %d failed", fd, exc_info=True)
        self._ends = []


def _open_end() -> tuple[int, int, str]:
    master, slave = pty.openpty()
    try:
        # Raw: no echo (which the bridge would bounce back), no line editing, no CR/LF
        # translation, no flow-control bytes: Modbus RTU frames are binary.
        tty.setraw(slave)
        os.set_blocking(master, False)
        path = os.ttyname(slave)
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    # The slave stays open here so the master never reads EIO while no one has the path open
    # (a simulator restarting, a client reconnecting); pyserial flushes stale input on open.
    return master, slave, path
