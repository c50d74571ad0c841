"""How workloads are made known to `tollgate meter`: one JSON file each, in its spool directory.

Whatever starts a workload on the host (a scheduler's prolog, a spawner hook, a script)
writes `<state dir>/workloads/<anything>.json` and the agent meters the workload from the
next interval on. The file is a `tollgate.workload_started.v1` plus what the agent needs to
find the workload on this host:

    {"workload": "job-123", "subject": "alice", "groups": ["regular"],
     "resources": {"cpus": 2, "mem_bytes": 4294967296, "gpus": 1, "gpu_model": "H100"},
     "started_at": "2026-11-22T10:00:00Z",
     "pid": 4242,                                   # its root process, if known
     "cgroups": ["/slurm/job_123"],                  # its cgroup(s): absolute, or per mount;
                                                     # a v2 one also meters its network bytes
     "veth": "tgw1a2b3c4d",                          # host end of its veth, if it has a netns
     "gpu_devices": ["0", "GPU-5d1c..."]}            # its GPUs, else found by its processes

The workload ends when its root process exits, its cgroup empties, its file is removed, or
a termination command stops it. The agent then sends its final batch and
`workload_stopped`, and removes the file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydantic import Field, ValidationError

from contracts._base import Contract, Name, PayloadError, UtcDatetime, parse_json
from contracts.workloads import Resources, WorkloadStarted

log = logging.getLogger("tollgate.meter")
SPOOL = "workloads"


class LocalWorkload(Contract):
    """A workload on this host, as its launcher describes it to the agent."""

    workload: Name
    subject: Name
    groups: list[str] = Field(default_factory=list, max_length=100)
    resources: Resources = Field(default_factory=Resources)
    started_at: UtcDatetime | None = None
    pid: int | None = Field(default=None, gt=0)
    cgroups: list[str] = Field(default_factory=list, max_length=10)
    veth: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]{1,15}$")
    gpu_devices: list[str] = Field(default_factory=list, max_length=64)

    def started(self, host: str, default_start: datetime) -> WorkloadStarted:
        return WorkloadStarted(
            workload=self.workload,
            subject=self.subject,
            groups=self.groups,
            host=host,
            resources=self.resources,
            started_at=self.started_at or default_start,
        )


@dataclass
class Spool:
    """The directory of workload files, read once per interval (re-parsing only changes)."""

    path: Path
    _cache: dict[Path, tuple[float, LocalWorkload | None]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def read(self) -> dict[str, LocalWorkload]:
        """Every valid workload file, by workload id. Bad files are reported once each."""
        self.path.mkdir(parents=True, exist_ok=True)
        found: dict[str, LocalWorkload] = {}
        seen: dict[Path, tuple[float, LocalWorkload | None]] = {}
        self.files = {}
        for entry in sorted(self.path.glob("*.json")):
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            cached = self._cache.get(entry)
            record = cached[1] if cached and cached[0] == mtime else self._parse(entry)
            seen[entry] = (mtime, record)
            if record is not None:
                found[record.workload] = record
                self.files[record.workload] = entry
        self._cache = seen
        return found

    def discard(self, workload: str) -> None:
        """Remove a finished workload's file."""
        entry = self.files.pop(workload, None)
        if entry is not None:
            entry.unlink(missing_ok=True)

    def _parse(self, entry: Path) -> LocalWorkload | None:
        try:
            return LocalWorkload.model_validate(parse_json(entry.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, PayloadError, ValidationError) as exc:
            log.error("ignoring workload file %s until it is fixed: %s", entry, exc)
            return None


def register(spool: Path, record: LocalWorkload) -> Path:
    """Write a workload file atomically (for launchers written in Python, and tests)."""
    target = spool / SPOOL / f"{record.workload.replace('/', '_')}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, record.to_json())
    return target


def write_atomic(target: Path, data: bytes) -> None:
    """Replace `target` with `data` so that readers see the old file or the new, never half."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
