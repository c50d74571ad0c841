"""`tollgate meter`: the host agent (SPEC 6).

Every interval it reads the workload spool, keeps the accounting chains in place, reads them
with one `iptables-save -c` per family, reads cgroups and GPUs, saves its state, and
publishes one cumulative batch for the host. Batches that cannot be delivered are superseded
by the next (cumulative values lose nothing); messages that must arrive (a workload's final
batch, `workload_started`/`workload_stopped`, the closing batch of an epoch) wait in the
state's outbox until NATS takes them, across restarts too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from contracts._base import utcnow
from contracts.commands import TerminateWorkload
from contracts.notice import Notice
from contracts.samples import CounterBatch, samples_subject
from contracts.workloads import WorkloadStopped, workloads_subject

from .book import Observation
from .cgroupnet import CgroupNet, CgroupTarget, Choice, v2_directory
from .commands import CommandListener, NoticeListener
from .domain import new_epoch
from .gpu import GpuProvider, GpuSample
from .netfilter import Accounting, Owner, Synced, host_owner, workload_owner
from .netrules import LanList
from .probe import WorkloadProbe, chain_changes, merge, net_observation
from .publisher import Message, MeterLink
from .spool import SPOOL, LocalWorkload, Spool
from .state import AgentState, WorkloadState
from .stopping import kill, terminate

log = logging.getLogger("tollgate.meter")


@dataclass(frozen=True)
class AgentOptions:
    """How the agent meters this host."""

    nats_url: str
    prefix: str
    host: str
    state_dir: Path
    interval: float = 10.0
    lan: LanList = field(default_factory=LanList.default)
    chain_prefix: str = "TOLLGATE"
    host_network: bool = True
    host_subject: str | None = None  # default: the host name
    host_workload: str | None = None  # default: the host name
    host_interfaces: tuple[str, ...] = ()
    iptables: bool = True
    cgroup_net: Choice = "auto"  # per-cgroup network bytes: auto, bpf, iptables or off
    flush_timeout: float = 5.0
    nats_seed_file: Path | None = None  # nkey seed from `tollgate nats-config`


class MeterAgent:
    """One host's meter: spool in, batches and lifecycle events out, commands obeyed."""

    def __init__(self, options: AgentOptions, gpus: GpuProvider | None = None) -> None:
        self.o = options
        self.gpus = gpus
        self.link = MeterLink(
            options.nats_url, f"tollgate-meter {options.host}", options.nats_seed_file
        )
        self.spool = Spool(options.state_dir / SPOOL)
        self.accounting = Accounting(options.lan) if options.iptables else None
        choice = options.cgroup_net
        if not options.iptables and choice in ("auto", "iptables"):
            choice = "bpf" if choice == "auto" else "off"
        self.cgroup_net = CgroupNet(
            f"meter-{options.chain_prefix}", options.lan, options.chain_prefix, choice
        )
        self.cgroup_dirs: dict[str, Path] = {}
        self._swept = False
        self.state = AgentState.resume(options.state_dir, options.host)
        self.probes: dict[str, WorkloadProbe] = {}
        self.stopping: dict[str, asyncio.Task[None]] = {}
        self.over: set[str] = set()
        self.wake = asyncio.Event()
        self.listener: CommandListener | None = None
        self._adopt_all = self.state.book.seq == 0 and not self.state.chains

    async def run(self, stop: asyncio.Event) -> None:
        """Meter until `stop` is set; then save, and deliver what must be delivered."""
        self.link.start()
        for message in self.state.outbox:
            self.link.enqueue(message)
        if self.accounting is not None:
            await asyncio.to_thread(self.accounting.probe)
        said = await asyncio.to_thread(self.cgroup_net.start)
        log.log(logging.INFO if self.cgroup_net.mechanism == "bpf" else logging.WARNING, "%s", said)
        self.listener = CommandListener(
            self.link,
            self.o.prefix,
            self.o.host,
            self._command,
            next_seq=self.state.next_command_seq,
            since=utcnow(),
            seen=self.state.seen_commands,
        )
        listening = asyncio.create_task(self.listener.run())
        # Notices cannot reach the stderr of a workload the agent only watches: it logs them.
        notices = NoticeListener(self.link, self.o.prefix, self.o.host, self._notice, utcnow())
        hearing = asyncio.create_task(notices.run())
        try:
            due = time.monotonic()
            while not stop.is_set():
                await self.tick()
                self.wake.clear()
                # A fixed rate: the time a reading takes is not added to the interval.
                due = max(due + self.o.interval, time.monotonic())
                waits = [asyncio.create_task(e.wait()) for e in (stop, self.wake)]
                await asyncio.wait(
                    waits, timeout=due - time.monotonic(), return_when="FIRST_COMPLETED"
                )
                for w in waits:
                    w.cancel()
        finally:
            await self.listener.stop(listening)
            await notices.stop(hearing)
            for task in self.stopping.values():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._save()
            await self.link.deliver_until(None, time.monotonic() + self.o.flush_timeout)
            self.state.outbox = self.link.pending()
            self._save()
            await self.link.close()
            self.cgroup_net.close()  # the pins stay: they count on until the next life

    async def tick(self) -> None:
        """One interval: read everything, publish one batch."""
        now, wall = utcnow(), time.time()
        records = self.spool.read()
        for workload, record in records.items():
            probe = self.probes.get(workload)
            if probe is None or probe.record != record:
                self._arrived(record, now)
        for workload in [w for w in self.probes if w not in records]:
            log.info("workload %s ended: its workload file was removed", workload)
            self.over.add(workload)
        targets = self._cgroup_targets()
        owners = self._owners() + [(t.subject, t.workload, t.owner) for t in targets]
        synced = await asyncio.to_thread(self._sync, owners, targets)
        samples = await asyncio.to_thread(self.gpus.sample) if self.gpus is not None else []
        obs = merge(*self._net(owners, synced), *self._workloads(wall, samples))
        restarted, unknown, last = chain_changes(self.state.chains, owners, synced)
        book = self.state.book
        if restarted:
            closing = book.roll(obs, set(restarted), now, epoch=new_epoch(), last=last)
            if closing is not None:
                log.warning(
                    "accounting chains %s were made anew, so their counters began "
                    "again: epoch %s follows %s",
                    ", ".join(sorted(set(restarted.values()))),
                    book.epoch,
                    closing.epoch,
                )
                self._must_deliver(closing)
        if self._adopt_all or unknown:
            book.adopt(obs, set(obs.components()) if self._adopt_all else unknown)
            self._adopt_all = False
        ended = {w for w, p in self.probes.items() if w in self.over or not p.alive()}
        ended -= {w for w, t in self.stopping.items() if not t.done()}
        for workload in sorted(ended):
            self._finish(workload, obs.only(workload), now)
        batch = book.batch(obs.without(ended), now)
        self.state.outbox = self.link.pending()
        self._save()
        await self.link.deliver(self._samples(batch))

    # Workloads coming and going.

    def _arrived(self, record: LocalWorkload, now: datetime) -> None:
        w = record.workload
        known = w in self.state.workloads
        self.state.workloads.setdefault(w, WorkloadState())
        self.probes[w] = WorkloadProbe(record, self.state.workloads[w])
        if not known:
            started = record.started(self.o.host, now)
            self._lifecycle(started.to_json(), f"{w}:started")
            log.info("metering workload %s of %s", w, record.subject)

    def _finish(self, workload: str, obs: Observation, now: datetime) -> None:
        probe, ws = self.probes.pop(workload), self.state.workloads.pop(workload)
        self.stopping.pop(workload, None)
        self.over.discard(workload)
        self._must_deliver(self.state.book.final_batch(workload, obs, now))
        stopped = WorkloadStopped(
            workload=workload,
            subject=probe.record.subject,
            host=self.o.host,
            stopped_at=now,
            exit_status=ws.stop_status,
            termination_reason=ws.stop_reason,
        )
        self._lifecycle(stopped.to_json(), f"{workload}:stopped")
        self.state.book.forget(workload)
        if workload in self.cgroup_dirs:
            owner = self.cgroup_net.owner(workload, self.cgroup_dirs.pop(workload))
            self.cgroup_net.remove(owner)
            for chains in self.state.chains.values():
                for chain in owner.chains:
                    chains.pop(chain.name, None)
        if self.accounting is not None and probe.record.veth:
            owner = workload_owner(self.o.chain_prefix, workload, probe.record.veth)
            self.accounting.remove([owner])
            for chains in self.state.chains.values():
                for chain in owner.chains:
                    chains.pop(chain.name, None)
        self.spool.discard(workload)

    async def _notice(self, notice: Notice) -> None:
        if notice.workload in self.probes:
            log.warning("workload %s of %s: %s", notice.workload, notice.subject, notice.message)

    async def _command(self, command: TerminateWorkload) -> None:
        probe = self.probes.get(command.workload)
        if probe is None or command.workload in self.stopping:
            log.warning(
                "termination command %s names workload %s, which is not running here "
                "(unknown or finished); acknowledged, nothing to do",
                command.command_id,
                command.workload,
            )
            return
        if probe.record.pid is None and probe.cgroup is None:
            log.error(
                "cannot terminate workload %s: its workload file names no pid and no "
                "cgroup; add one so that the agent can stop it",
                command.workload,
            )
            return
        log.warning(
            "terminating workload %s (%s: %s used %s of %s; grace %s s)",
            command.workload,
            command.reason,
            command.metric,
            command.used,
            command.limit,
            command.grace_seconds,
        )
        self.stopping[command.workload] = asyncio.create_task(self._stop(probe, command))

    async def _stop(self, probe: WorkloadProbe, command: TerminateWorkload) -> None:
        def alive() -> bool:
            return probe.alive() or bool(probe.pids())

        grace = float(command.grace_seconds)
        last = await (
            terminate(probe.signal, alive, grace) if grace > 0 else kill(probe.signal, alive)
        )
        probe.state.stop_reason = command.reason
        probe.state.stop_status = 128 + last
        self.over.add(probe.record.workload)
        self.wake.set()  # the final reading now, not at the next interval

    # Reading.

    def _owners(self) -> list[tuple[str, str, Owner]]:
        owners = []
        if self.o.host_network:
            subject = self.o.host_subject or self.o.host
            owners.append(
                (
                    subject,
                    self.o.host_workload or self.o.host,
                    host_owner(self.o.chain_prefix, self.o.host_interfaces),
                )
            )
        for w, probe in self.probes.items():
            if probe.record.veth:
                owner = workload_owner(self.o.chain_prefix, w, probe.record.veth)
                owners.append((probe.record.subject, w, owner))
        return owners

    def _cgroup_targets(self) -> list[CgroupTarget]:
        """Workloads without a namespace of their own whose file names a cgroup-v2 directory."""
        if self.cgroup_net.mechanism == "none":
            return []
        targets = []
        for w, probe in self.probes.items():
            if probe.record.veth or not probe.record.cgroups:
                continue
            directory = self.cgroup_dirs.get(w) or v2_directory(
                probe.record.cgroups, self.cgroup_net.mounts
            )
            if directory is None and self.cgroup_net.pinned(w):
                # Gone while no agent ran: what its pinned counters hold is still its own.
                directory = v2_directory(probe.record.cgroups, self.cgroup_net.mounts, False)
            if directory is None:
                continue  # not made yet, or v1 only: its bytes are in the host's
            self.cgroup_dirs[w] = directory
            owner = self.cgroup_net.owner(w, directory)
            targets.append(CgroupTarget(probe.record.subject, w, directory, owner))
        return targets

    def _sync(self, owners: list[tuple[str, str, Owner]], targets: list[CgroupTarget]) -> Synced:
        # Cgroup chains (the iptables mechanism) are read in the same save as all others.
        by_bpf = {t.workload for t in targets} if self.cgroup_net.mechanism == "bpf" else set()
        if self.accounting is None:
            synced = Synced()
        else:
            synced = self.accounting.sync([o for _, w, o in owners if w not in by_bpf])
        if by_bpf:
            cg = self.cgroup_net.sync(targets)
            for family, readings in cg.readings.items():
                synced.readings.setdefault(family, {}).update(readings)
            synced.created |= cg.created
            synced.replaced |= cg.replaced
        if not self._swept:
            self._swept = True
            self.cgroup_net.sweep(set(self.probes))
        return synced

    def _net(self, owners: list[tuple[str, str, Owner]], synced: Synced) -> list[Observation]:
        return [net_observation(s, w, o, synced) for s, w, o in owners]

    def _workloads(self, wall: float, samples: list[GpuSample]) -> list[Observation]:
        out = []
        for probe in self.probes.values():
            start = probe.record.started_at or datetime.fromtimestamp(wall, UTC)
            elapsed = Decimal(repr(max(wall - start.timestamp(), 0.0)))
            out.append(probe.read(wall, samples, elapsed))
        return out

    # Publishing.

    def _samples(self, batch: CounterBatch) -> Message:
        return Message(samples_subject(self.o.host, self.o.prefix), batch.to_json(), batch.msg_id)

    def _must_deliver(self, batch: CounterBatch) -> None:
        self.link.enqueue(self._samples(batch))

    def _lifecycle(self, payload: bytes, event: str) -> None:
        subject = workloads_subject(self.o.host, self.o.prefix)
        self.link.enqueue(Message(subject, payload, f"{self.o.host}:{event}"))

    def _save(self) -> None:
        if self.listener is not None:
            self.state.next_command_seq = self.listener.next_seq
            self.state.seen_commands = self.listener.seen
        self.state.save(self.o.state_dir)
