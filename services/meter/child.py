"""The metered command as a child process: its output passed through untouched, and counted.

stdin is inherited, so interactive commands work. stdout and stderr go through pipes we own:
every chunk is written on to our own stdout/stderr as it arrives (binary, flushed) and fed
to an ANSI stripper that counts the visible bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from .ansi import AnsiStripper

log = logging.getLogger("tollgate.meter")
CHUNK = 64 * 1024
# Signals a terminal sends to the whole foreground process group, the child included.
_TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT)
_FORWARDED = (*_TERMINAL_SIGNALS, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class CommandNotStarted(Exception):
    """The command could not be executed; `status` follows the shell (127, 126)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def not_runnable(program: str) -> CommandNotStarted | None:
    """Why `program` cannot be run, found before starting it (behind `ip netns exec` a
    missing command would be ip's own failure, status 1, not the shell's 127)."""
    if shutil.which(program) is not None:
        return None
    if "/" in program and os.path.exists(program):
        return CommandNotStarted(f"cannot run {program!r}: Permission denied", 126)
    return CommandNotStarted(f"cannot run {program!r}: No such file or directory", 127)


@dataclass
class Output:
    """Where one of the child's streams goes, and what counts it."""

    sink: BinaryIO
    stripper: AnsiStripper = field(default_factory=AnsiStripper)
    # Called after every chunk is counted: where a log quota is enforced.
    on_output: Callable[[], None] | None = None


@dataclass
class Child:
    """A running command and the tasks passing its output on."""

    proc: asyncio.subprocess.Process
    transports: list[asyncio.ReadTransport]
    pumps: list[asyncio.Task[None]]

    async def wait(self, drain_grace: float) -> int:
        """The command's return code, once its output has been passed on.

        Processes it left in the background may hold the pipes open; their later output is
        not waited for beyond `drain_grace` seconds.
        """
        returncode = await self.proc.wait()
        _, pending = await asyncio.wait(self.pumps, timeout=drain_grace)
        if pending:
            log.info("the command exited; not waiting for output of what it left running")
            for transport in self.transports:
                transport.close()
            await asyncio.wait(pending)
        return returncode


async def start_child(
    cmd: Sequence[str], outputs: tuple[Output, Output], preexec: Callable[[], None] | None
) -> Child:
    """Start `cmd` with stdout and stderr into `outputs`.

    Raises CommandNotStarted when it cannot be executed, and subprocess.SubprocessError when
    `preexec` failed, in which case the command did not run at all.
    """
    pipes = [os.pipe(), os.pipe()]
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=None, stdout=pipes[0][1], stderr=pipes[1][1], preexec_fn=preexec
        )
    except (OSError, subprocess.SubprocessError) as exc:
        for read_end, _ in pipes:
            os.close(read_end)
        if isinstance(exc, subprocess.SubprocessError):
            raise
        status = 127 if isinstance(exc, FileNotFoundError) else 126
        raise CommandNotStarted(f"cannot run {cmd[0]!r}: {exc.strerror or exc}", status) from exc
    finally:
        for _, write_end in pipes:
            os.close(write_end)
    loop = asyncio.get_running_loop()
    transports: list[asyncio.ReadTransport] = []
    pumps: list[asyncio.Task[None]] = []
    for (read_end, _), output in zip(pipes, outputs, strict=True):
        reader = asyncio.StreamReader(limit=CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_read_pipe(
            lambda: protocol,  # noqa: B023 - called at once, inside this iteration
            os.fdopen(read_end, "rb", 0),
        )
        transports.append(transport)
        pumps.append(asyncio.create_task(_pump(reader, transport, output)))
    return Child(proc, transports, pumps)


async def _pump(
    reader: asyncio.StreamReader, transport: asyncio.ReadTransport, out: Output
) -> None:
    forwarding = True
    try:
        while chunk := await reader.read(CHUNK):
            out.stripper.feed(chunk)
            if out.on_output is not None:
                out.on_output()
            if not forwarding:
                continue
            try:
                await asyncio.to_thread(_write, out.sink, chunk)
            except OSError as exc:
                # Whoever reads our output went away (`tollgate run -- yes | head`): close the
                # pipe so the command gets EPIPE/SIGPIPE, as it would without us in between.
                if exc.errno != errno.EPIPE:
                    log.warning("cannot pass the command's output on: %s", exc)
                forwarding = False
                transport.close()
    finally:
        out.stripper.finish()
        transport.close()


def _write(sink: BinaryIO, chunk: bytes) -> None:
    sink.write(chunk)
    sink.flush()


class SignalRelay:
    """Passes signals meant for the workload on to it, instead of dying of them ourselves.

    Installed before the command starts, so a signal that arrives while it is starting is
    held and delivered as soon as it exists. Ctrl-C and Ctrl-\\ already reach the child
    from the terminal, so those are only passed on when they did not come from a terminal
    whose foreground we share.
    """

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._held: list[signal.Signals] = []
        self._installed: list[signal.Signals] = []

    def __enter__(self) -> SignalRelay:
        loop = asyncio.get_running_loop()
        for sig in _FORWARDED:
            try:
                loop.add_signal_handler(sig, self._deliver, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread: signals stay as they were
            self._installed.append(sig)
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)

    def attach(self, proc: asyncio.subprocess.Process) -> None:
        """From now on signals go to `proc`, starting with any that were held."""
        self._proc = proc
        held, self._held = self._held, []
        for sig in held:
            self._deliver(sig)

    def _deliver(self, sig: signal.Signals) -> None:
        if sig in _TERMINAL_SIGNALS and _terminal_foreground():
            return
        if self._proc is None:
            self._held.append(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(sig)


def _terminal_foreground() -> bool:
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            return os.tcgetpgrp(fd) == os.getpgrp()
    return False
