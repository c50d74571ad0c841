"""Child server processes: waiting for them to listen, stopping them, ports, errors.

Shared by the embedded servers (tollgate.embedded) and `tollgate up`'s supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started; the message says where to look."""


class CannotRestart(EmbeddedServerError):
    """Restarting would not bring back the same server (its data is gone, its port taken):
    trying again cannot help, a person has to act."""


class StartAborted(EmbeddedServerError):
    """`tollgate up` was told to stop while this server was starting."""


Abort = Callable[[], bool]


def never() -> bool:
    """The default Abort: nobody asks a start to give up."""
    return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nobody listens on host:port (a bind with SO_REUSEADDR, as the servers do, succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def holder(port: int) -> str:
    """Who listens on a loopback port, for an error message: `pid 123 (nginx)` if we can see."""
    import psutil

    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return f"pid {c.pid} ({psutil.Process(c.pid).name()})"
    return "another process"


def check_port(port: int, what: str) -> None:
    """Raise CannotRestart, naming who has it, if a server's old port is now taken."""
    if port and not port_free(port):
        raise CannotRestart(
            f"port {port}, where {what} must come back for the services to find it, is now "
            f"taken by {holder(port)}. Stop that process, or stop `tollgate up` and start it "
            "again (it picks free ports)."
        )


def log_size(log: Path) -> int:
    """Where this start's lines begin in a log that every start appends to."""
    try:
        return log.stat().st_size
    except OSError:
        return 0


def last_error(log: Path, since: int = 0) -> str:
    """The server's own last FATAL/error line written after `since`: usually the whole story
    of a failed start."""
    with contextlib.suppress(OSError):
        with open(log, "rb") as f:
            f.seek(max(since, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode(errors="replace").splitlines()
        for line in reversed(lines):
            if any(w in line for w in ("FATAL", "PANIC", "[FTL]", "[ERR]", "error")):
                return ": " + line.strip()[-300:]
    return ""


def wait_for_port(
    port: int,
    proc: subprocess.Popen[bytes],
    what: str,
    log: Path,
    abort: Abort = never,
    since: int = 0,
) -> None:
    """Return once `proc` listens on `port`; raise if it exits, `abort()` holds, or 60 s pass.

    `since` is where this start's lines begin in `log` (see `log_size`).
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if abort():
            stop_process(proc, signal.SIGKILL, 5)
            raise StartAborted(f"stopped while {what} was starting")
        if proc.poll() is not None:
            raise EmbeddedServerError(
                f"{what} exited with status {proc.returncode} while starting"
                f"{last_error(log, since)} (log: {log})"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            if proc.poll() is None:  # the port is ours, not someone else's who took it
                return
        time.sleep(0.05)
    raise EmbeddedServerError(f"{what} did not open port {port} within 60 s; see {log}")


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    """Send `sig`, wait up to `timeout`, then SIGKILL; blocking (for starts and tests)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def stop_leftover(pid_file: Path, name: str, sig: int) -> None:
    """Stop a server left running by a `tollgate up` that was killed (kill -9, power cut).

    Our servers run in their own session so that Ctrl-C reaches the services first; the
    price is that they outlive a killed parent and keep their data directory locked.
    """
    import psutil

    try:
        pid = int(pid_file.read_text().split()[0])
        proc = psutil.Process(pid)
        if name not in proc.name():
            return
    except (OSError, ValueError, IndexError, psutil.Error):
        return
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(10)
