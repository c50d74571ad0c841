"""What `tollgate meter` keeps in its state directory so that a restart continues its epoch.

One JSON file, replaced atomically at every interval before anything is published: the
epoch, the next seq and the baselines (the counter book), the nonce of every chain, each
workload's integrals, the messages that must still be delivered, and where the command
consumer stands. A restart on the same boot reads it and goes on; a different boot id means
the kernel's counters and cgroups are gone, so a new epoch begins.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .book import CounterBook
from .domain import Integral
from .netrules import Family
from .publisher import Message
from .spool import write_atomic

log = logging.getLogger("tollgate.meter")
STATE_FILE = "state.json"
VERSION = 1


def boot_id() -> str:
    """This boot of the kernel; kernel counters do not survive a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@dataclass
class WorkloadState:
    """What the agent remembers of one workload between intervals and across restarts."""

    pid_start: float | None = None
    populated: bool = False
    mem: Integral = field(default_factory=Integral)
    gpu: Integral = field(default_factory=Integral)
    gpu_model: str | None = None
    stop_reason: str | None = None
    stop_status: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "pid_start": self.pid_start,
            "populated": self.populated,
            "mem": self.mem.to_json(),
            "gpu": self.gpu.to_json(),
            "gpu_model": self.gpu_model,
            "stop_reason": self.stop_reason,
            "stop_status": self.stop_status,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkloadState:
        return cls(
            pid_start=data.get("pid_start"),
            populated=bool(data.get("populated")),
            mem=Integral.from_json(data.get("mem")),
            gpu=Integral.from_json(data.get("gpu")),
            gpu_model=data.get("gpu_model"),
            stop_reason=data.get("stop_reason"),
            stop_status=data.get("stop_status"),
        )


@dataclass
class AgentState:
    """Everything a restart needs to continue where the last life of the agent stopped."""

    boot_id: str
    book: CounterBook
    chains: dict[Family, dict[str, str]] = field(default_factory=dict)
    workloads: dict[str, WorkloadState] = field(default_factory=dict)
    outbox: list[Message] = field(default_factory=list)
    next_command_seq: int | None = None
    seen_commands: list[str] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        data = {
            "version": VERSION,
            "boot_id": self.boot_id,
            "book": self.book.to_json(),
            "chains": self.chains,
            "workloads": {w: s.to_json() for w, s in self.workloads.items()},
            "outbox": [[m.subject, m.payload.decode(), m.msg_id] for m in self.outbox],
            "next_command_seq": self.next_command_seq,
            "seen_commands": self.seen_commands,
        }
        write_atomic(directory / STATE_FILE, json.dumps(data).encode())

    @classmethod
    def resume(cls, directory: Path, host: str) -> AgentState:
        """The saved state if it is of this boot and host; else a new epoch that keeps what
        is still owed (the outbox) and where the command consumer stood."""
        saved, boot = cls.load(directory), boot_id()
        if saved is not None and saved.boot_id == boot and saved.book.host == host:
            log.info("continuing epoch %s at seq %d", saved.book.epoch, saved.book.seq)
            return saved
        fresh = cls(boot, CounterBook(host))
        if saved is not None:
            why = "the host rebooted" if saved.boot_id != boot else "the host name changed"
            log.warning("%s: starting epoch %s", why, fresh.book.epoch)
            fresh.outbox, fresh.workloads = saved.outbox, saved.workloads
            fresh.next_command_seq = saved.next_command_seq
            fresh.seen_commands = saved.seen_commands
        return fresh

    @classmethod
    def load(cls, directory: Path) -> AgentState | None:
        """The saved state, or None when there is none or it cannot be read (said why)."""
        path = directory / STATE_FILE
        try:
            data = json.loads(path.read_bytes())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            return cls(
                boot_id=str(data["boot_id"]),
                book=CounterBook.from_json(data["book"]),
                chains=data["chains"],
                workloads={w: WorkloadState.from_json(s) for w, s in data["workloads"].items()},
                outbox=[Message(s, p.encode(), i) for s, p, i in data["outbox"]],
                next_command_seq=data.get("next_command_seq"),
                seen_commands=list(data.get("seen_commands", [])),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "cannot read the meter state %s (%s); starting a new epoch, counting from now",
                path,
                exc,
            )
            return None
