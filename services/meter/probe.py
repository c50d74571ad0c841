"""What the agent reads of one workload each interval, and how it signals it.

CPU and memory come from the workload's cgroups when its file names them, else from its
process tree (root `pid` and live descendants). Memory is integrated over wall-clock time,
so the integral carries across agent restarts; allocations run from `started_at`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

from .book import Observation, SeriesId, component
from .cgroups import CgroupSet
from .cpu import process_tree, tree_usage
from .domain import allocations, exact
from .gpu import GpuMeter, GpuSample
from .netfilter import Owner, Synced
from .netrules import Family
from .spool import LocalWorkload
from .state import WorkloadState

log = logging.getLogger("tollgate.meter")
GPU_METRICS = ("gpu.used.seconds", "gpu.alloc.seconds")


class WorkloadProbe:
    """One workload as the agent sees it."""

    def __init__(self, record: LocalWorkload, state: WorkloadState) -> None:
        self.record = record
        self.state = state
        self.cgroup = CgroupSet.find(record.cgroups) if record.cgroups else None
        if record.cgroups and self.cgroup is not None and not self.cgroup.dirs:
            log.warning(
                "workload %s: none of its cgroups %s exists; CPU and memory come from "
                "its process tree",
                record.workload,
                record.cgroups,
            )
            self.cgroup = None
        self.gpu = GpuMeter(record.gpu_devices, record.resources.gpu_model or state.gpu_model)
        self.gpu.used = state.gpu
        if record.pid is not None and state.pid_start is None:
            state.pid_start = _started(record.pid)

    def pids(self) -> list[int]:
        if self.cgroup is not None:
            return self.cgroup.pids()
        if self.record.pid is None or not self._root_alive():
            return []
        return [p.pid for p in process_tree(self.record.pid)]

    def alive(self) -> bool:
        """False once the workload is over: root gone, or its cgroup emptied."""
        if self.record.pid is not None:
            return self._root_alive()
        if self.cgroup is not None:
            populated = bool(self.cgroup.pids())
            self.state.populated = self.state.populated or populated
            return populated or not self.state.populated
        return True  # nothing to watch: it ends when its file goes

    def signal(self, sig: int) -> None:
        if self.cgroup is not None:
            self.cgroup.signal(sig)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def read(self, at: float, samples: Sequence[GpuSample], elapsed: Decimal) -> Observation:
        """Raw cumulative components of this workload's series at wall-clock time `at`."""
        r, w = self.record, self.record.workload
        parts: dict[SeriesId, dict[str, Decimal]] = {}
        labels: dict[SeriesId, dict[str, str]] = {}
        if self.cgroup is not None:
            cpu, mem = self.cgroup.cpu_seconds(), self.cgroup.memory_bytes()
        else:
            usage = tree_usage(process_tree(r.pid) if r.pid and self._root_alive() else [])
            cpu, mem = usage.cpu_seconds, usage.mem_bytes
        if cpu is not None:
            parts[SeriesId(r.subject, w, "cpu.used.seconds")] = {component(w, "cpu"): exact(cpu)}
        if mem is not None:
            integral = self.state.mem.add(at, Decimal(mem))
            parts[SeriesId(r.subject, w, "mem.used.byte_seconds")] = {component(w, "mem"): integral}
        for metric, value in allocations(r.resources, elapsed).items():
            parts[SeriesId(r.subject, w, metric)] = {component(w, metric): value}
        if samples and (r.gpu_devices or r.resources.gpus):
            used = self.gpu.observe(samples, at, self.pids())
            self.state.gpu_model = self.gpu.model
            parts[SeriesId(r.subject, w, "gpu.used.seconds")] = {component(w, "gpu"): used}
        for metric in GPU_METRICS:
            if SeriesId(r.subject, w, metric) in parts and self.gpu.labels():
                labels[SeriesId(r.subject, w, metric)] = self.gpu.labels()
        return Observation(parts, labels)

    def _root_alive(self) -> bool:
        started = _started(self.record.pid)
        if started is None:
            return False
        # A different start time: the pid was reused by another process.
        return self.state.pid_start is None or started == self.state.pid_start


def _started(pid: int | None) -> float | None:
    """When `pid` started (clock ticks since boot), or None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, TypeError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else float(fields[19])


def net_observation(subject: str, workload: str, owner: Owner, synced: Synced) -> Observation:
    """`net.{tx,rx}.{lan,wan}.bytes` of one owner: both families' chains added up."""
    parts: dict[SeriesId, dict[str, Decimal]] = {}
    for direction, chain in (("tx", owner.tx), ("rx", owner.rx)):
        if chain is None:
            continue  # not counted (say, ingress by the iptables cgroup match): no series
        for kind in ("lan", "wan"):
            series = SeriesId(subject, workload, f"net.{direction}.{kind}.bytes")
            parts[series] = {
                component(workload, family, chain.name, kind): Decimal(getattr(reading, kind))
                for family, readings in synced.readings.items()
                if (reading := readings.get(chain.name)) is not None
            }
    return Observation(parts)


def merge(*observations: Observation) -> Observation:
    parts: dict[SeriesId, dict[str, Decimal]] = {}
    labels: dict[SeriesId, dict[str, str]] = {}
    for obs in observations:
        for series, p in obs.parts.items():
            parts.setdefault(series, {}).update(p)
        for series, lb in obs.labels.items():
            labels[series] = dict(lb)
    return Observation(parts, labels)


def chain_changes(
    recorded: dict[Family, dict[str, str]],
    owners: Sequence[tuple[str, str, Owner]],
    synced: Synced,
) -> tuple[dict[str, str], set[str], dict[str, Decimal]]:
    """Components whose chain began again since `recorded` (with the chain's name), those
    of chains found running with no past we know of, and the last raw value of restarted
    components whose old counters could be read as they were replaced; `recorded` is
    brought up to date.

    A nonce we knew that changed means the chain was made anew: its counters restarted.
    A chain we never recorded and did not just make was made by a life of ours whose
    state is lost: what it counted may be in an old epoch, so it counts from now on.
    """
    restarted: dict[str, str] = {}
    unknown: set[str] = set()
    workload_of = {c.name: w for _, w, o in owners for c in o.chains}
    for family, readings in synced.readings.items():
        known = recorded.setdefault(family, {})
        for chain, reading in readings.items():
            before = known.get(chain)
            ids = {component(workload_of[chain], family, chain, k) for k in ("lan", "wan")}
            if before is not None and before != reading.nonce:
                restarted.update(dict.fromkeys(ids, chain))
            elif before is None and (family, chain) not in synced.created:
                unknown |= ids
            known[chain] = reading.nonce or ""
    return restarted, unknown, replaced_values(synced, workload_of, set(restarted))


def replaced_values(
    synced: Synced, workload_of: Mapping[str, str], restarted: set[str]
) -> dict[str, Decimal]:
    """The last raw value of each restarted component whose old counters were read as they
    were replaced (`Synced.replaced`), so an epoch's closing batch loses nothing."""
    out: dict[str, Decimal] = {}
    for (family, chain), old in synced.replaced.items():
        workload = workload_of.get(chain)
        if workload is None:
            continue
        for kind, value in (("lan", old.lan), ("wan", old.wan)):
            c = component(workload, family, chain, kind)
            if c in restarted:
                out[c] = Decimal(value)
    return out
