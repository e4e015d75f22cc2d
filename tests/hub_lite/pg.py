"""A throwaway PostgreSQL server for the hub's tests and benchmarks (no pytest needed).

    with PostgresServer() as pg:
        url = pg.create_database("hub")  # postgresql://gridlet@127.0.0.1:PORT/hub

``initdb`` in a temporary folder, a free loopback port, the socket in that folder too (not
/var/run), durability switched off (tests, not data) and a small footprint; ``pg_ctl -m fast
stop`` and the folder removed on exit. initdb refuses to run as root, so as root the server
runs as the unprivileged ``postgres`` user Debian's package creates, through ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

__all__ = (
    "HOST",
    "PostgresMissingError",
    "PostgresServer",
    "PostgresServerError",
    "find_bindir",
    "free_port",
)

HOST = "127.0.0.1"
SUPERUSER = "gridlet"
RUN_AS = "postgres"
"""The unprivileged user a root process runs the server as (Debian's package creates it)."""
START_TIMEOUT_S = 30
START_ATTEMPTS = 3
"""A free port may be taken by someone else before the server binds it: pick another."""

# Durability off (a test database dies with the test), and small: many test servers may run
# side by side on one CI machine.
SETTINGS: Mapping[str, str] = {
    "listen_addresses": HOST,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "50",
    "max_wal_size": "256MB",
    "log_min_messages": "warning",
}


class PostgresServerError(RuntimeError):
    """The test server could not be set up, started or stopped."""


class PostgresMissingError(PostgresServerError):
    """The PostgreSQL server binaries are not installed."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the server binds it just after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.parent.name)) or (0,)


def find_bindir() -> Path:
    """The folder of initdb/pg_ctl: ``pg_config --bindir`` when it holds the server, else the
    newest /usr/lib/postgresql/*/bin, else PATH."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and (Path(out) / "initdb").is_file():
            return Path(out)
    found = sorted(
        (p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")), key=_version_key
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresMissingError(
        "PostgreSQL is missing: `make test` installs it (apt-get install postgresql)"
    )


class PostgresServer:
    """One PostgreSQL server in a temporary folder on a free loopback port.

    ``start()``/``stop()`` or a ``with`` block; ``create_database(name)`` returns a libpq URL.
    """

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        parent_dir: Path | None = None,
    ) -> None:
        self.bindir = bindir or find_bindir()
        self.settings = {**SETTINGS, **(settings or {})}
        self.parent_dir = parent_dir
        self.host = HOST
        self.user = SUPERUSER
        self.port = 0
        self.dir: Path | None = None
        self._run_as: str | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """initdb and start; returns once the server accepts connections."""
        if self._started:
            raise PostgresServerError("the test PostgreSQL server is already running")
        self._make_dir()
        try:
            self._initdb()
            for attempt in range(START_ATTEMPTS):
                self.port = free_port()
                try:
                    self._pg_ctl_start()
                    break
                except PostgresServerError:
                    if attempt == START_ATTEMPTS - 1 or "already in use" not in self.log():
                        raise
            self._started = True
        except BaseException:
            self._kill_quietly()
            self._remove_dir()
            raise

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder; safe to call twice."""
        try:
            if self._started:
                self._started = False
                try:
                    self._run(
                        [
                            self._bin("pg_ctl"),
                            "-D",
                            str(self.data_dir),
                            "-m",
                            "fast",
                            "-w",
                            "-t",
                            str(START_TIMEOUT_S),
                            "stop",
                        ]
                    )
                except PostgresServerError:
                    # Clients that never let go: end our own server now.
                    self._kill_quietly()
        finally:
            self._remove_dir()

    def _kill_quietly(self) -> None:
        """Immediate shutdown of this folder's server, if one runs (pg_ctl reads its pid)."""
        if self.dir is not None and (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(PostgresServerError):
                self._run(
                    [self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"]
                )

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ databases

    @property
    def running(self) -> bool:
        return self._started

    @property
    def data_dir(self) -> Path:
        if self.dir is None:
            raise PostgresServerError("the test PostgreSQL server has no folder yet")
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        if self.dir is None:
            raise PostgresServerError("the test PostgreSQL server has no folder yet")
        return self.dir / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        """The libpq URL of a database on this server."""
        if not self._started:
            raise PostgresServerError("the test PostgreSQL server is not running")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database; its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still connected to it."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def log(self) -> str:
        """The server's log so far ('' when there is none)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, PostgresServerError):
            return ""

    # ------------------------------------------------------------------ internals

    def _bin(self, name: str) -> str:
        path = self.bindir / name
        if not path.is_file():
            raise PostgresMissingError(
                f"PostgreSQL is missing {path}: `make test` installs it"
                " (apt-get install postgresql)"
            )
        return str(path)

    def _make_dir(self) -> None:
        # The socket lives here too; a unix socket path must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="gridlet-pg-", dir=self.parent_dir))
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(RUN_AS)
            except KeyError as exc:
                self._remove_dir()
                raise PostgresServerError(
                    f"initdb refuses to run as root and there is no {RUN_AS!r} user to run it"
                    " as: `apt-get install postgresql` creates it"
                ) from exc
            if shutil.which("runuser") is None:
                self._remove_dir()
                raise PostgresServerError("running PostgreSQL as root needs `runuser`")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._run_as = RUN_AS

    def _remove_dir(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _run(self, argv: Sequence[str]) -> None:
        if self._run_as is not None:
            argv = ["runuser", "-u", self._run_as, "--", *argv]
        # Clear PG* variables: a developer's PGDATA or PGPORT must not steer the test server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            proc = subprocess.run(
                argv,
                cwd=self.dir,  # the server's user may not read the caller's folder
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S + 30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresServerError(f"{shlex.join(argv)} failed: {exc}") from exc
        if proc.returncode != 0:
            hint = ""
            if self._run_as is not None and "Permission denied" in proc.stderr:
                hint = (
                    f"\nthe {self._run_as!r} user cannot reach the PostgreSQL binaries: is / or"
                    " a folder above them mode 0700 (a chroot made in a `mktemp -d` folder)?"
                )
            raise PostgresServerError(
                f"{shlex.join(argv)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                f"{hint}\n--- server log ---\n{self.log()}"
            )

    def _initdb(self) -> None:
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                self.user,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )

    def _pg_ctl_start(self) -> None:
        assert self.dir is not None
        options = ["-p", str(self.port), "-k", str(self.dir)]
        for key, value in self.settings.items():
            options += ["-c", f"{key}={value}"]
        self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-o",
                shlex.join(options),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "start",
            ]
        )
