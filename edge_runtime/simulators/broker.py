"""A real mosquitto broker on a free loopback port, for the demo and the tests.

Generated config (loopback only, a large ``max_queued_messages``: the default of 1000
silently drops QoS 1 bursts), readiness checked with a real MQTT CONNECT, and ``kill()`` /
``start()`` on the same port so that clients' reconnects can be tested.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = (
    "Mosquitto",
    "MosquittoMissingError",
    "find_mosquitto",
    "free_port",
    "running_mosquitto",
)

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
MAX_QUEUED_MESSAGES = 100_000
"""mosquitto's default (1000) silently drops QoS 1 bursts to a slow subscriber."""


class MosquittoMissingError(RuntimeError):
    """The mosquitto binary is not installed."""


def find_mosquitto() -> str:
    """The broker binary, or MosquittoMissingError."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    raise MosquittoMissingError(
        "mosquitto is not installed: `make test` and `make demo` install it"
        " (apt-get install mosquitto)"
    )


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the broker binds it just after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One broker on ``host:port``, configured by a file in ``folder``; ``kill()`` and
    ``start()`` again keep the port, so clients can test their reconnects."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.binary = find_mosquitto()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = free_port() if port is None else port
        self.log_path = folder / "mosquitto.log"
        self.config_path = folder / "mosquitto.conf"
        self.stderr_path = folder / "mosquitto.stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        # `user` = whoever runs the tests: as root, mosquitto would otherwise drop to the
        # `mosquitto` user, which cannot write the log in pytest's private tmp folder.
        user = pwd.getpwuid(os.getuid()).pw_name
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"max_queued_messages {MAX_QUEUED_MESSAGES}",
            "max_queued_bytes 0",
            "persistence false",
            f"user {user}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the broker and return once it accepts TCP connections."""
        if self.running:
            raise RuntimeError("mosquitto is already running")
        # stderr to a file, not a pipe nobody reads (a full pipe would block the broker).
        with self.stderr_path.open("ab") as err_file:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                err = self.stderr_path.read_text(encoding="utf-8", errors="replace")
                self._proc = None
                raise RuntimeError(
                    f"mosquitto exited at start on port {self.port}: {err}\n{self.log()}"
                )
            if _answers_mqtt(self.host, self.port):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not listen on {self.port} in {timeout_s} s")
            time.sleep(0.01)  # polling interval of the readiness check, not a wait for it

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without telling its clients (a crash, a power cut)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Kill and start again on the same port."""
        self.kill()
        self.start(timeout_s)


# MQTT 3.1.1 CONNECT (clean session, keepalive 60 s, client id "probe") and DISCONNECT.
_CONNECT = bytes([0x10, 17, 0, 4, *b"MQTT", 4, 0x02, 0, 60, 0, 5, *b"probe"])
_DISCONNECT = bytes([0xE0, 0])


def _answers_mqtt(host: str, port: int) -> bool:
    """True when an MQTT broker accepts a connection there. A bare TCP connect is not
    enough: the port may belong to someone else while our broker fails to bind it."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(_CONNECT)
            connack = b""
            while len(connack) < 4:
                chunk = sock.recv(4 - len(connack))
                if not chunk:
                    return False
                connack += chunk
            sock.sendall(_DISCONNECT)
    except OSError:
        return False
    return connack == bytes([0x20, 2, 0, 0])


@contextlib.contextmanager
def running_mosquitto(folder: Path) -> Iterator[Mosquitto]:
    """A started broker, killed on exit whatever happens."""
    broker = Mosquitto(folder)
    # The port was free when picked; another process may grab it before mosquitto binds it.
    for attempt in range(3):
        try:
            broker.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            broker = Mosquitto(folder)
    try:
        yield broker
    finally:
        broker.kill()
