"""CPU time and memory of one workload: from a cgroup v2 of its own, else its process tree.

A cgroup is exact: `cpu.stat` counts every process that ever ran in it, including children
that exited and grandchildren that were orphaned. Process-tree sampling sees only what is
alive at each look, plus what the root reaped; it is the fallback, not the plan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol

import psutil  # type: ignore[import-untyped]

from .domain import exact

log = logging.getLogger("tollgate.meter")
CGROUP_PARENT = "tollgate"


@dataclass(frozen=True)
class Usage:
    """Cumulative CPU core-seconds and current memory bytes; None when unknown."""

    cpu_seconds: Decimal | None
    mem_bytes: int | None


class Collector(Protocol):
    """Measures one workload. Created before it starts, closed after it was reaped."""

    description: str

    def preexec(self) -> Callable[[], None] | None:
        """What the child runs between fork and exec, if anything."""

    def attach(self, pid: int) -> None:
        """The workload's root process is running as `pid`."""

    def read(self) -> Usage:
        """Usage so far, while the workload runs."""

    def read_final(self) -> Usage:
        """Usage once the root process has been reaped."""

    def close(self) -> None:
        """Release what the collector made."""


def open_collector(name: str, use_cgroup: bool = True) -> Collector:
    """The best collector this machine allows, saying once what is missing."""
    if use_cgroup:
        try:
            return CgroupCollector.create(name)
        except CgroupUnavailable as exc:
            log.warning(
                "CPU is measured by sampling the process tree (%s); run as root on a host "
                "with cgroup v2 for exact figures",
                exc,
            )
    return ProcessTreeCollector()


class CgroupUnavailable(Exception):
    """No cgroup v2 we can create a child in; the message says why."""


def cgroup2_mount(mountinfo: str) -> Path | None:
    """Where the unified hierarchy is mounted (`/sys/fs/cgroup`, or `.../unified` on hybrids)."""
    for line in mountinfo.splitlines():
        fields, _, fs = line.partition(" - ")
        if fs.split(" ", 1)[0] == "cgroup2":
            # mountinfo escapes spaces and the like as octal: "\040".
            return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields.split()[4]))
    return None


class CgroupCollector:
    """A transient child cgroup `<cgroup2>/tollgate/<name>` holding the whole workload."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"cgroup v2 {path}"
        self._memory_file = path / "memory.current"
        self._has_memory = self._memory_file.exists()

    @classmethod
    def create(cls, name: str) -> CgroupCollector:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read /proc/self/mountinfo: {exc}") from None
        mount = cgroup2_mount(mountinfo)
        if mount is None:
            raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
        parent = mount / CGROUP_PARENT
        # Our pid in the name lets a later run tell a cgroup whose owner was killed.
        safe = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:100]}.{os.getpid()}"
        try:
            parent.mkdir(exist_ok=True)
            _sweep(parent)
            _enable_memory(parent)
            (parent / safe).mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create a cgroup under {parent}: {exc}") from None
        if not (parent / safe / "cpu.stat").exists():
            (parent / safe).rmdir()
            raise CgroupUnavailable(f"{parent / safe} has no cpu.stat")
        return cls(parent / safe)

    def preexec(self) -> Callable[[], None]:
        procs = str(self.path / "cgroup.procs")

        def join_cgroup() -> None:
            # In the child before exec, so everything it forks is born inside the cgroup.
            # Only syscalls here: the parent may have threads whose locks were copied held.
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)

        return join_cgroup

    def attach(self, pid: int) -> None:
        pass  # the child put itself in the cgroup

    def read(self) -> Usage:
        return Usage(self._cpu_seconds(), self._memory())

    def read_final(self) -> Usage:
        return self.read()

    def close(self) -> None:
        if not self.path.exists():
            return
        try:
            self.path.rmdir()
        except OSError as exc:
            log.warning(
                "cgroup %s stays (%s): processes the workload started are still running in it",
                self.path,
                exc.strerror,
            )

    def _cpu_seconds(self) -> Decimal | None:
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return Decimal(int(value)).scaleb(-6)
        except (OSError, ValueError) as exc:
            log.debug("cannot read %s/cpu.stat: %s", self.path, exc)
        return None

    def _memory(self) -> int | None:
        try:
            if self._has_memory:
                return int(self._memory_file.read_text())
            pids = (self.path / "cgroup.procs").read_text().split()
        except (OSError, ValueError):
            return None
        # No memory controller here (hybrid hosts): add up the members' resident sets.
        return _rss(_processes(int(pid) for pid in pids))


def _sweep(parent: Path) -> None:
    """Remove cgroups left by runs that were killed before they could clean up."""
    for entry in parent.iterdir():
        owner = entry.name.rpartition(".")[2]
        if not entry.is_dir() or not owner.isdigit() or psutil.pid_exists(int(owner)):
            continue
        # The kernel refuses while processes remain inside: those stay until they end.
        with contextlib.suppress(OSError):
            entry.rmdir()


def _enable_memory(parent: Path) -> None:
    # memory.current exists only where the parent delegates the memory controller.
    try:
        if "memory" in (parent / "cgroup.controllers").read_text().split():
            (parent / "cgroup.subtree_control").write_text("+memory")
    except OSError as exc:
        log.debug("memory controller not delegated to %s: %s", parent, exc)


class ProcessTreeCollector:
    """Samples the root and its live descendants; the final figure comes from rusage.

    Descendants that exit while their parent lives are counted when the parent reaps them;
    orphans that exit between two samples are lost. `getrusage(RUSAGE_CHILDREN)` at the end
    is exact for everything reaped up to the root, because `tollgate run` has no other child.
    """

    description = "process-tree sampling"

    def __init__(self) -> None:
        self._baseline = _children_cpu()
        self._root: psutil.Process | None = None
        self._high = Decimal(0)

    def preexec(self) -> None:
        return None

    def attach(self, pid: int) -> None:
        try:
            self._root = psutil.Process(pid)
        except psutil.Error as exc:
            log.debug("workload %s already gone: %s", pid, exc)

    def read(self) -> Usage:
        procs = self._tree()
        total = Decimal(0)
        for proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue  # exited between listing and reading: its parent will count it
            total += exact(t.user + t.system + t.children_user + t.children_system)
        self._high = max(self._high, total)
        return Usage(self._high, _rss(procs))

    def read_final(self) -> Usage:
        self._high = max(self._high, exact(_children_cpu() - self._baseline))
        return Usage(self._high, 0)

    def close(self) -> None:
        pass

    def _tree(self) -> list[psutil.Process]:
        if self._root is None:
            return []
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return []


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _processes(pids: Iterable[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue  # exited since it was listed
    return found


def _rss(procs: Iterable[psutil.Process]) -> int:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total
