"""CPU time and memory of one workload: from cgroups of its own (v2, v1), else its process tree.

A cgroup is exact: its CPU counter covers every process that ever ran in it, including
children that exited and grandchildren that were orphaned. Process-tree sampling sees only
what is alive at each look, plus what the root reaped; it is the fallback, not the plan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

import psutil  # type: ignore[import-untyped]

from . import cgroups
from .cgroups import CgroupSet, CgroupUnavailable
from .domain import exact

log = logging.getLogger("tollgate.meter")


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

    def signal(self, sig: int) -> None:
        """Send `sig` to every process of the workload."""

    def members(self) -> list[int]:
        """The workload's live processes, as far as the collector can see them."""

    def close(self) -> None:
        """Release what the collector made."""


def open_collector(name: str, use_cgroup: bool = True) -> Collector:
    """The best collector this machine allows, saying once what is missing."""
    if use_cgroup:
        try:
            return CgroupCollector(cgroups.create(name))
        except CgroupUnavailable as exc:
            log.warning(
                "CPU is measured by sampling the process tree (%s); run as root on a host "
                "with cgroups for exact figures",
                exc,
            )
    return ProcessTreeCollector()


class CgroupCollector:
    """Transient cgroups `tollgate/<name>.<pid>` holding the whole workload."""

    def __init__(self, cgroup: CgroupSet) -> None:
        self.cgroup = cgroup
        self.description = f"cgroup {cgroup.description}"

    def preexec(self) -> Callable[[], None]:
        procs = [str(d / "cgroup.procs") for d in self.cgroup.dirs]

        def join_cgroup() -> None:
            # In the child before exec, so everything it forks is born inside the cgroup.
            # Only syscalls here: the parent may have threads whose locks were copied held.
            pid = str(os.getpid()).encode()
            for path in procs:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)

        return join_cgroup

    def attach(self, pid: int) -> None:
        pass  # the child put itself in the cgroup

    def read(self) -> Usage:
        return Usage(self.cgroup.cpu_seconds(), self.cgroup.memory_bytes())

    def read_final(self) -> Usage:
        return self.read()

    def signal(self, sig: int) -> None:
        self.cgroup.signal(sig)

    def members(self) -> list[int]:
        return self.cgroup.pids()

    def close(self) -> None:
        self.cgroup.remove()


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
        usage = tree_usage(self._tree())
        self._high = max(self._high, usage.cpu_seconds or Decimal(0))
        return Usage(self._high, usage.mem_bytes)

    def read_final(self) -> Usage:
        self._high = max(self._high, exact(_children_cpu() - self._baseline))
        return Usage(self._high, 0)

    def signal(self, sig: int) -> None:
        for proc in self._tree():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    def members(self) -> list[int]:
        return [p.pid for p in self._tree()]

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


def tree_usage(procs: Iterable[psutil.Process]) -> Usage:
    """CPU seconds (their own and their reaped children's) and resident bytes of `procs`."""
    cpu, mem = Decimal(0), 0
    for proc in procs:
        try:
            t = proc.cpu_times()
            mem += proc.memory_info().rss
        except psutil.Error:
            continue  # exited between listing and reading: its parent will count it
        cpu += exact(t.user + t.system + t.children_user + t.children_system)
    return Usage(cpu, mem)


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and its live descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
