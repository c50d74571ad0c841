"""Cgroups that hold one workload: found through mountinfo, in v2, v1 or both (hybrid hosts).

CPU comes from cgroup v2 `cpu.stat` (present in every v2 cgroup) or v1 `cpuacct.usage`;
memory from v2 `memory.current` where the memory controller is enabled, else v1
`memory.usage_in_bytes`, else the members' resident sets. A hybrid host (v1 controllers
plus an empty unified tree) thus gets CPU from v2 and memory from v1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from pathlib import Path

import psutil  # type: ignore[import-untyped]

log = logging.getLogger("tollgate.meter")
PARENT = "tollgate"


class CgroupUnavailable(Exception):
    """No cgroup we can create or read; the message says why."""


def _unescape(path: str) -> Path:
    # mountinfo escapes spaces and the like as octal: "\040".
    return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), path))


@dataclass(frozen=True)
class Mounts:
    """Where the hierarchies that measure usage are mounted."""

    v2: Path | None = None
    cpuacct: Path | None = None
    memory: Path | None = None

    @classmethod
    def parse(cls, mountinfo: str) -> Mounts:
        v2 = cpuacct = memory = None
        for line in mountinfo.splitlines():
            fields, _, fs = line.partition(" - ")
            parts, fs_parts = fields.split(), fs.split()
            if len(parts) < 5 or not fs_parts:
                continue
            where = _unescape(parts[4])
            if fs_parts[0] == "cgroup2" and v2 is None:
                v2 = where
            elif fs_parts[0] == "cgroup" and len(fs_parts) >= 3:
                options = fs_parts[2].split(",")
                cpuacct = where if "cpuacct" in options and cpuacct is None else cpuacct
                memory = where if "memory" in options and memory is None else memory
        return cls(v2, cpuacct, memory)

    @classmethod
    def here(cls) -> Mounts:
        try:
            return cls.parse(Path("/proc/self/mountinfo").read_text())
        except OSError:
            return cls()

    def all(self) -> list[Path]:
        return [m for m in (self.v2, self.cpuacct, self.memory) if m is not None]


def own_path(proc_cgroup: str, controller: str) -> str:
    """Our cgroup in the v1 hierarchy of `controller`, from /proc/self/cgroup ("/" if none)."""
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return "/"


@dataclass(frozen=True)
class CgroupSet:
    """The directories holding one workload: where its CPU and its memory are read."""

    cpu: Path | None
    memory: Path | None

    @property
    def dirs(self) -> list[Path]:
        return list(dict.fromkeys(d for d in (self.cpu, self.memory) if d is not None))

    @property
    def description(self) -> str:
        return " + ".join(str(d) for d in self.dirs)

    @classmethod
    def find(cls, paths: Iterable[str], mounts: Mounts | None = None) -> CgroupSet:
        """From the cgroups a workload record names (absolute, or relative to each mount)."""
        mounts = mounts or Mounts.here()
        found: list[Path] = []
        for text in paths:
            inside = any(text.startswith(f"{m}/") for m in mounts.all())
            found += [Path(text)] if inside else [m / text.lstrip("/") for m in mounts.all()]
        found = [d for d in found if d.is_dir()]
        cpu = next((d for d in found if (d / "cpu.stat").exists()), None)
        cpu = cpu or next((d for d in found if (d / "cpuacct.usage").exists()), None)
        mem = next((d for d in found if (d / "memory.current").exists()), None)
        mem = mem or next((d for d in found if (d / "memory.usage_in_bytes").exists()), None)
        return cls(cpu, mem)

    @cached_property
    def _cpu_file(self) -> tuple[Path, int] | None:
        # Which file, and the power of ten of its unit: found once, read every interval.
        if self.cpu is not None and (self.cpu / "cpu.stat").exists():
            return self.cpu / "cpu.stat", -6
        if self.cpu is not None and (self.cpu / "cpuacct.usage").exists():
            return self.cpu / "cpuacct.usage", -9
        return None

    @cached_property
    def _memory_file(self) -> Path | None:
        for name in ("memory.current", "memory.usage_in_bytes"):
            if self.memory is not None and (self.memory / name).exists():
                return self.memory / name
        return None

    def cpu_seconds(self) -> Decimal | None:
        if self._cpu_file is None:
            return None
        path, exponent = self._cpu_file
        try:
            text = path.read_text()
            if exponent == -6:  # cpu.stat: "usage_usec N" is its first line
                text = next(ln for ln in text.splitlines() if ln.startswith("usage_usec "))[11:]
            return Decimal(int(text)).scaleb(exponent)
        except (OSError, ValueError, StopIteration) as exc:
            log.debug("cannot read CPU of %s: %s", self.cpu, exc)
            return None

    def memory_bytes(self) -> int | None:
        if self._memory_file is not None:
            with contextlib.suppress(OSError, ValueError):
                return int(self._memory_file.read_text())
        pids = self.pids()
        return rss(pids) if pids or self.cpu is not None else None

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(found)

    def signal(self, sig: int) -> int:
        """Send `sig` to every process inside; returns how many were signalled."""
        if sig == signal.SIGKILL and self.cpu is not None and (self.cpu / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (self.cpu / "cgroup.kill").write_text("1")
        count = 0
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                count += 1
        return count

    def remove(self) -> None:
        for d in self.dirs:
            if d.exists():
                try:
                    d.rmdir()
                except OSError as exc:
                    log.warning(
                        "cgroup %s stays (%s): processes the workload started are "
                        "still running in it",
                        d,
                        exc.strerror,
                    )


def create(name: str, mounts: Mounts | None = None) -> CgroupSet:
    """A new cgroup set `tollgate/<name>.<our pid>` in the hierarchies that measure best."""
    mounts = mounts or Mounts.here()
    try:
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        proc_cgroup = ""
    safe = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:100]}.{os.getpid()}"
    cpu = memory = None
    try:
        if mounts.v2 is not None and (mounts.v2 / "cgroup.controllers").exists():
            cpu = _make(mounts.v2 / PARENT, safe, enable_memory=True)
            memory = cpu if (cpu / "memory.current").exists() else None
        elif mounts.cpuacct is not None:
            cpu = _make(_under_own(mounts.cpuacct, proc_cgroup, "cpuacct"), safe)
        if memory is None and mounts.memory is not None:
            # Under our own memory cgroup: whatever limits we live under, the workload does too.
            memory = _make(_under_own(mounts.memory, proc_cgroup, "memory"), safe)
    except OSError as exc:
        CgroupSet(cpu, memory).remove()
        raise CgroupUnavailable(f"cannot create a cgroup: {exc}") from None
    if cpu is None:
        CgroupSet(None, memory).remove()
        raise CgroupUnavailable("no cgroup v2 or v1 cpuacct hierarchy is mounted")
    return CgroupSet(cpu, memory)


def _under_own(mount: Path, proc_cgroup: str, controller: str) -> Path:
    return mount / own_path(proc_cgroup, controller).lstrip("/") / PARENT


def _make(parent: Path, name: str, enable_memory: bool = False) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent)
    if enable_memory:
        # memory.current exists only where the parent delegates the memory controller.
        with contextlib.suppress(OSError):
            if "memory" in (parent / "cgroup.controllers").read_text().split():
                (parent / "cgroup.subtree_control").write_text("+memory")
    (parent / name).mkdir()
    return parent / name


def sweep(parent: Path) -> None:
    """Remove cgroups left by runs that were killed before they could clean up."""
    for entry in parent.iterdir():
        owner = entry.name.rpartition(".")[2]
        if not entry.is_dir() or not owner.isdigit() or psutil.pid_exists(int(owner)):
            continue
        # The kernel refuses while processes remain inside: those stay until they end.
        with contextlib.suppress(OSError):
            entry.rmdir()


def rss(pids: Iterable[int]) -> int:
    """Resident bytes of the live processes among `pids`."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total
