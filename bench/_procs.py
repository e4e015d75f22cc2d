"""Processes for benchmarks: started in a session of their own, stopped whatever happens,
measured through /proc (CPU of a whole process tree, resident memory), and a loopback TCP
proxy that counts the bytes each way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = (
    "ByteCountingProxy",
    "Proc",
    "cpu_seconds",
    "cpu_used",
    "free_port",
    "rss_bytes",
    "tree",
    "wait_for",
)

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for(
    cond: Callable[[], object], timeout_s: float, what: str, *, every_s: float = 0.05
) -> None:
    """Poll ``cond`` until it is true; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:g} s: {what}")
        time.sleep(every_s)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # after the command name in parentheses (which may hold spaces): state is field 0
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(root: int) -> dict[int, float]:
    """User + system CPU seconds used so far by ``root`` and each of its descendants alive."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in tree(root):
        st = _stat(pid)
        if st is not None:
            out[pid] = (int(st[11]) + int(st[12])) / tick
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds a process tree used between two ``cpu_seconds`` snapshots (processes
    that started in between count whole; those that ended in between are not seen)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (VmRSS), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


class Proc:
    """A command run in a session of its own (a Ctrl-C at the terminal does not reach it:
    the benchmark stops it in order), its output appended to ``log``. ``stop()`` sends
    SIGTERM (or ``sig``) to its whole process group, waits, then SIGKILL; safe to repeat."""

    def __init__(
        self,
        argv: Sequence[str],
        log: Path,
        *,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.log = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self._drain: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def first_line(self, timeout_s: float) -> str:
        """The first line of stdout (``stdout_pipe``); the rest is copied to the log."""
        out = self.popen.stdout
        assert out is not None
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(out.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not got:
            raise TimeoutError(f"{self.argv[:3]} printed nothing within {timeout_s:g} s")
        self._drain = threading.Thread(target=self._copy, args=(out,), daemon=True)
        self._drain.start()
        return got[0].decode(errors="replace").strip()

    def _copy(self, out: IO[bytes]) -> None:
        for line in iter(out.readline, b""):
            self._log.write(line)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        """Stop the process group; the exit status of the process (None if killed)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout_s)
        # Whatever is left of the group (workers of a supervisor that died first).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        code = self.popen.wait()
        if self._drain is not None:
            self._drain.join(5)
        if not self._log.closed:
            self._log.close()
        return code

    def tail(self, lines: int = 20) -> str:
        """The end of the process's log, for error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ByteCountingProxy:
    """A loopback TCP proxy to ``127.0.0.1:upstream_port`` on a thread of its own, counting
    the bytes each way: ``up`` (client to server: whole HTTP requests) and ``down``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.up = 0
        self.down = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> ByteCountingProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        fut.result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._client, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            writer.close()
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pipe(reader, up_w, "up"))
            tg.create_task(self._pipe(up_r, writer, "down"))

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str
    ) -> None:
        try:
            while data := await src.read(65536):
                if direction == "up":
                    self.up += len(data)
                else:
                    self.down += len(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                dst.close()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> ByteCountingProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
