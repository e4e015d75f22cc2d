"""DSMR P1 smart meters on a serial port: the one module that imports pyserial.

The meter pushes a telegram every second (DSMR 5; every 10 s for DSMR 4); this driver reads the
port without blocking the event loop (the port's fd is watched with ``loop.add_reader`` and
read non-blocking) and hands the bytes to :class:`~.dsmr_telegram.TelegramStream`, which does
the framing, CRC check, counting and dead-lettering. POSIX only, like the Pi it runs on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import serial

from ..config import DsmrDevice
from .base import DeviceGoneError, DeviceStatus, Sink
from .dsmr_telegram import TelegramStream

__all__ = ("DsmrDriver",)

_log = logging.getLogger(__name__)

_READ_SIZE = 4096
_LEGACY_BAUDRATE = 9600  # DSMR 2.2/3 meters: 9600 baud, 7 data bits, even parity


class DsmrDriver:
    """A P1 port: ``run(sink)`` delivers one frame per valid telegram until cancelled.

    The status goes offline when no valid telegram has arrived for ``cfg.timeout_s`` (and back
    online with the next one); a port that cannot be opened or vanishes (USB cable pulled)
    raises :class:`~.base.DeviceGoneError` for the scheduler to restart ``run`` with backoff.
    """

    kind = "dsmr"

    def __init__(self, cfg: DsmrDevice) -> None:
        self.device_id = cfg.id
        self._cfg = cfg

    async def run(self, sink: Sink) -> None:
        stream = TelegramStream(self.device_id, sink, self.kind)
        status = stream.status
        try:
            port = self._open()
        except DeviceGoneError as exc:
            status.online = False
            status.last_error = str(exc)
            raise
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = port.fileno()
        loop.add_reader(fd, readable.set)
        try:
            await self._pump(port, readable, stream)
        except DeviceGoneError as exc:
            status.last_error = str(exc)
            _log.warning("%s: %s", self.device_id, exc)
            raise
        finally:
            loop.remove_reader(fd)
            port.close()
            status.online = False

    def _open(self) -> Any:
        cfg = self._cfg
        legacy = cfg.baudrate == _LEGACY_BAUDRATE
        try:
            # Opening is non-blocking (O_NONBLOCK) and quick, so it stays on the loop thread.
            # exclusive: a second reader on the same port would steal half of every telegram.
            port = serial.Serial(
                port=cfg.serial_port,
                baudrate=cfg.baudrate,
                bytesize=serial.SEVENBITS if legacy else serial.EIGHTBITS,
                parity=serial.PARITY_EVEN if legacy else serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                timeout=0,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceGoneError(f"cannot open {cfg.serial_port}: {exc}") from exc
        _log.info(
            "%s: reading P1 telegrams on %s at %d baud",
            self.device_id,
            cfg.serial_port,
            cfg.baudrate,
        )
        return port

    async def _pump(self, port: Any, readable: asyncio.Event, stream: TelegramStream) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._cfg.timeout_s
        deadline = loop.time() + timeout
        quiet = False
        while True:
            wait = timeout if quiet else max(deadline - loop.time(), 0.0)
            try:
                async with asyncio.timeout(wait):
                    await readable.wait()
            except TimeoutError:
                # Whatever is held back now will not be completed: count it as what it is.
                stream.flush()
                if not quiet:
                    quiet = True
                    self._went_quiet(stream.status, timeout)
                continue
            readable.clear()
            try:
                # timeout=0: returns what has arrived; a hung-up port raises instead of b"".
                data = port.read(_READ_SIZE)
            except (serial.SerialException, OSError) as exc:
                raise DeviceGoneError(f"{self._cfg.serial_port} is gone: {exc}") from exc
            if stream.feed(data):
                deadline = loop.time() + timeout
                if quiet:
                    quiet = False
                    _log.info("%s: telegrams are back", self.device_id)

    def _went_quiet(self, status: DeviceStatus, timeout: float) -> None:
        status.online = False
        status.timeouts += 1
        status.last_error = f"no valid telegram for {timeout:g} s"
        _log.warning(
            "%s: no valid telegram for %g s on %s; still listening",
            self.device_id,
            timeout,
            self._cfg.serial_port,
        )
