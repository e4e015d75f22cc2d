"""A simulated GoodWe ET inverter that the real ``goodwe`` library reads, for tests and the demo.

It serves a register bank built from recorded captures (``goodwe_registers``) and driven by a
solar-day model (``goodwe_site``) over UDP ``<host>:8899`` (Modbus RTU frames in datagrams,
replies prefixed ``AA55``) and, when asked, over Modbus TCP on another port: goodwe picks UDP
only for port 8899 and Modbus TCP for any other. It also listens on UDP ``<host>:48899`` for the
LAN module's discovery message, which wakes it from the "stuck" mode real WiFi dongles fall
into. Since 8899 is fixed, every simulated inverter needs its own loopback address; without a
``host`` one is picked at random in 127.0.0.0/8 and another is tried if it is taken.

    async with GoodweSimulator(day_seconds=600) as sim:
        inverter = await goodwe.connect(sim.host, 8899)

    python -m edge_runtime.simulators.goodwe --host 127.0.0.2 --tcp-port 5020 --day-seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import ipaddress
import logging
import random
import signal
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from .goodwe_registers import (
    BLOCK_STARTS,
    Capture,
    DeviceIdentity,
    RegisterBank,
    Responder,
    crc16,
    list_models,
    load_captures,
)
from .goodwe_site import SolarSite

__all__ = (
    "UDP_PORT",
    "WAKE_MESSAGE",
    "WAKE_PORT",
    "GoodweSimulator",
    "main",
    "random_loopback_host",
)

log = logging.getLogger(__name__)

UDP_PORT = 8899
WAKE_PORT = 48899
WAKE_MESSAGE = b"WIFIKIT-214028-READ"
_BIND_ATTEMPTS = 32
_MAX_ADU = 260  # MBAP header + the largest Modbus PDU


def random_loopback_host(rng: random.Random | None = None) -> str:
    """A random 127.a.b.c with every octet in 1..254 (never 127.0.0.1, never .0 or .255)."""
    r = rng or random.Random()
    return "127." + ".".join(str(r.randint(1, 254)) for _ in range(3))


def _require_loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"the simulator binds loopback addresses only, not {host!r}")


_Answer = Callable[[bytes, Any], bytes | None]
"""Turns a datagram from an address into the reply to send back, or None."""


class _Udp(asyncio.DatagramProtocol):
    """One bound UDP socket; hands each datagram to ``answer`` and sends what it returns."""

    def __init__(self, answer: _Answer) -> None:
        self._answer = answer
        self.transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's datagram transport does not subclass DatagramTransport (3.11): cast.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self._answer(data, addr)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for a client that went away: nothing to do, the next request is new.
        log.debug("udp error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _ModbusTcp(asyncio.Protocol):
    """One Modbus TCP client connection: splits the stream into ADUs by their MBAP length."""

    def __init__(self, sim: GoodweSimulator) -> None:
        self._sim = sim
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._sim._tcp_conns.add(self)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 8:
            total = 6 + int.from_bytes(buf[4:6], "big")
            if not 8 <= total <= _MAX_ADU or buf[2:4] != b"\x00\x00":
                log.debug("tcp: dropping a connection that sent %s", bytes(buf).hex())
                if self.transport is not None:
                    self.transport.close()
                return
            if len(buf) < total:
                return
            adu = bytes(buf[:total])
            del buf[:total]
            reply = self._sim._answer_tcp(adu)
            if reply is not None and self.transport is not None:
                self.transport.write(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sim._tcp_conns.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)


class GoodweSimulator:
    """A GoodWe ET inverter on a loopback address, answering the real ``goodwe`` library.

    ``host``: a loopback address, or None for a random free one (see ``self.host`` after
    ``start()``). ``model``/``variant``: which captures to serve (``list_models()``; variant
    e.g. ``fw1023``). ``tcp_port``: also serve Modbus TCP there (0: any free port, see
    ``self.tcp_port``); None: UDP only. ``day_seconds``: real seconds per simulated day;
    ``start_hour``: simulated time of day at start (None: now). ``dynamic=False`` serves the
    captures unchanged. ``reject_blocks``: capture blocks to leave out, so that reading them
    gets ILLEGAL DATA ADDRESS (``meter_data``, ``battery_info``, ...).

    ``stuck = True`` makes it ignore requests until a wake message arrives on UDP 48899;
    ``stop()`` takes it off the network and ``start()`` brings it back on the same address.
    """

    def __init__(
        self,
        host: str | None = None,
        *,
        model: str = "GW10K-ET",
        variant: str | None = None,
        tcp_port: int | None = None,
        day_seconds: float = 86400.0,
        start_hour: float | None = None,
        dynamic: bool = True,
        reject_blocks: Collection[str] = (),
        captures_dir: Path | None = None,
        seed: int = 0,
    ) -> None:
        if host is not None:
            _require_loopback(host)
        unknown = set(reject_blocks) - set(BLOCK_STARTS)
        if unknown:
            raise ValueError(f"unknown blocks {sorted(unknown)}; known: {sorted(BLOCK_STARTS)}")
        self.model = model
        self.captures: dict[str, Capture] = load_captures(model, captures_dir, variant)
        self.bank = RegisterBank()
        for cap in self.captures.values():
            if cap.block not in reject_blocks:
                self.bank.load(cap.start, cap.payload)
        self.identity = DeviceIdentity.from_device_info(self.captures["device_info"].payload)
        self.site: SolarSite | None = None
        if dynamic:
            self.site = SolarSite(
                self.bank, day_seconds=day_seconds, start_hour=start_hour, seed=seed
            )
            self.site.update(force=True)  # the first answer already shows the model's values
        self.responder = Responder(self.bank, self.identity)
        self._fixed_host = host
        self.host: str = host or ""
        """The bound address (fixed once started, kept across stop()/start())."""
        self.tcp_port = tcp_port
        """The Modbus TCP port (the actual one once started), or None for UDP only."""
        self.stuck = False
        """While True, requests are ignored; a wake message on UDP 48899 clears it."""
        self.wake_count = 0
        self.dropped = 0
        """Requests ignored while stuck."""
        self._woken = asyncio.Event()
        self._udp: list[_Udp] = []
        self._server: asyncio.Server | None = None
        self._tcp_conns: set[_ModbusTcp] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return bool(self._udp)

    async def start(self) -> None:
        """Bind UDP 8899, UDP 48899 and (if asked) the Modbus TCP port; idempotent."""
        if self.running:
            return
        rng = random.Random()
        attempts = 1 if self._fixed_host or self.host else _BIND_ATTEMPTS
        for attempt in range(attempts):
            host = self._fixed_host or self.host or random_loopback_host(rng)
            try:
                await self._bind(host)
            except OSError as exc:
                await self._unbind()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                log.debug("%s is taken, trying another address", host)
                continue
            self.host = host
            log.info(
                "GoodWe %s (S/N %s) on udp://%s:%d%s, wake on udp://%s:%d",
                self.identity.model or self.model,
                self.identity.serial,
                host,
                UDP_PORT,
                f" and modbus-tcp://{host}:{self.tcp_port}" if self.tcp_port is not None else "",
                host,
                WAKE_PORT,
            )
            return

    async def _bind(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        for port, answer in ((UDP_PORT, self._answer_udp), (WAKE_PORT, self._answer_wake)):
            _, proto = await loop.create_datagram_endpoint(
                functools.partial(_Udp, answer), local_addr=(host, port)
            )
            self._udp.append(proto)
        if self.tcp_port is not None:
            self._server = await loop.create_server(
                lambda: _ModbusTcp(self), host, self.tcp_port, reuse_address=True
            )
            self.tcp_port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close every socket: the inverter is off the network until start()."""
        await self._unbind()

    async def _unbind(self) -> None:
        waiting: list[asyncio.Future[None]] = []
        if self._server is not None:
            self._server.close()
        for conn in list(self._tcp_conns):
            if conn.transport is not None:
                conn.transport.abort()
            waiting.append(conn.closed)
        for proto in self._udp:
            if proto.transport is not None:
                proto.transport.close()
            waiting.append(proto.closed)
        # Sockets close on the next loop iteration: wait, so a restart can bind the same address.
        await asyncio.gather(*waiting)
        if self._server is not None:
            await self._server.wait_closed()
        self._server = None
        self._udp.clear()

    async def __aenter__(self) -> GoodweSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ behaviour

    def reject_block(self, block: str) -> None:
        """From now on, reading this capture block gets ILLEGAL DATA ADDRESS."""
        cap = self.captures[block]
        self.bank.drop(cap.start, cap.count)

    def restore_block(self, block: str) -> None:
        """Answer this capture block again (with its current values)."""
        cap = self.captures[block]
        self.bank.load(cap.start, self.bank.raw(cap.start, cap.count))

    async def wait_wakes(self, count: int) -> None:
        """Return once ``count`` wake messages have arrived in all (wrap in a timeout)."""
        while self.wake_count < count:
            self._woken.clear()
            await self._woken.wait()

    def _update(self) -> None:
        if self.site is not None:
            self.site.update()

    def _answer_udp(self, data: bytes, addr: Any) -> bytes | None:
        if self.stuck:
            self.dropped += 1
            return None
        self._update()
        reply = self.responder.udp(data)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("udp %s: %s -> %s", addr, data.hex(), reply.hex() if reply else None)
        return reply

    def _answer_tcp(self, adu: bytes) -> bytes | None:
        if self.stuck:
            self.dropped += 1
            return None
        self._update()
        reply = self.responder.tcp(adu)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tcp: %s -> %s", adu.hex(), reply.hex())
        return reply

    def _answer_wake(self, data: bytes, addr: Any) -> bytes | None:
        if data.strip() != WAKE_MESSAGE:
            return None
        self.wake_count += 1
        if self.stuck:
            log.info("woken by %s", addr)
        self.stuck = False
        self._woken.set()
        # A LAN module answers "ip,mac,name"; the MAC here is made up from the serial number.
        mac = f"60B0E8{crc16(self.identity.serial.encode()):04X}{self.wake_count % 256:02X}"
        return f"{self.host},{mac},Solar-WiFi{mac[-4:]}".encode()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m edge_runtime.simulators.goodwe",
        description="Simulate a GoodWe ET inverter that the goodwe library reads.",
    )
    p.add_argument("--host", help="loopback address to bind (default: a random 127.x.y.z)")
    p.add_argument("--tcp-port", type=int, help="also serve Modbus TCP on this port (0: any)")
    p.add_argument("--model", default="GW10K-ET", help="capture set to serve (see --list-models)")
    p.add_argument("--variant", help="capture variant, e.g. fw1023")
    p.add_argument("--day-seconds", type=float, default=86400.0, help="real seconds per sim day")
    p.add_argument("--start-hour", type=float, help="simulated hour of day at start (default: now)")
    p.add_argument("--static", action="store_true", help="serve the captures unchanged")
    p.add_argument(
        "--reject",
        action="append",
        default=[],
        choices=sorted(BLOCK_STARTS),
        help="answer this block with ILLEGAL DATA ADDRESS (repeatable)",
    )
    p.add_argument("--stuck", action="store_true", help="start stuck until woken on UDP 48899")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captures-dir", type=Path, help="folder of ET .hex captures")
    p.add_argument("--list-models", action="store_true", help="list the models and exit")
    p.add_argument("--log-level", default="INFO", help="DEBUG logs every frame as hex")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    sim = GoodweSimulator(
        args.host,
        model=args.model,
        variant=args.variant,
        tcp_port=args.tcp_port,
        day_seconds=args.day_seconds,
        start_hour=args.start_hour,
        dynamic=not args.static,
        reject_blocks=args.reject,
        captures_dir=args.captures_dir,
        seed=args.seed,
    )
    sim.stuck = args.stuck
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    async with sim:
        tcp = f" modbus-tcp://{sim.host}:{sim.tcp_port}" if sim.tcp_port is not None else ""
        # One line on stdout for whoever started us (the demo waits for it).
        sys.stdout.write(f"ready {sim.model} udp://{sim.host}:{UDP_PORT}{tcp}\n")
        sys.stdout.flush()
        await done.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.list_models:
        sys.stdout.write("\n".join(list_models(args.captures_dir)) + "\n")
        return 0
    try:
        asyncio.run(_serve(args))
    except (ValueError, FileNotFoundError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
