"""One metered run of `tollgate run`: the command, its counters, its termination.

The command's output is counted as it passes; CPU and memory come from its cgroups (or its
process tree), network bytes from its namespace's chains (`--netns`) or else from its cgroup
(eBPF counters, or an iptables cgroup match for what it sends), GPU time from NVML
when it was given GPUs. A termination command for this workload (SIGTERM, grace, SIGKILL)
or the local hourly log quota (SIGKILL at once) ends it with 128 + the last signal, and the
reason said in one line and sent in `workload_stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from contracts._base import utcnow
from contracts.commands import LOG_QUOTA_EXCEEDED, TerminateWorkload
from contracts.notice import Notice
from contracts.samples import CounterBatch, samples_subject
from contracts.workloads import WorkloadStarted, WorkloadStopped, workloads_subject

from .book import CounterBook, Observation, SeriesId, component
from .cgroupnet import v2_directory
from .child import Child, CommandNotStarted, Output, SignalRelay, not_runnable, start_child
from .commands import CommandListener, NoticeListener
from .cpu import CgroupCollector, Collector, ProcessTreeCollector, open_collector
from .domain import EXIT_NO_NETNS, LogQuota, Reading, UsageAccount, exit_status, new_epoch
from .gpu import GpuMeter, GpuProvider, open_gpus
from .netns import SandboxError
from .probe import merge
from .publisher import Message, MeterLink
from .runnet import RunCgroupNetwork, RunNetwork
from .stopping import Stopped, kill, terminate

if TYPE_CHECKING:
    from .run import RunOptions

log = logging.getLogger("tollgate.meter")
DRAIN_GRACE = 2.0
SAMPLE_EVERY = 1.0
STOP_WAIT = 5.0


class Metered:
    """One metered run: the command, its counters and the batches that report them."""

    def __init__(self, options: RunOptions, link: MeterLink, outputs: tuple[Output, Output]):
        self.options = options
        self.link = link
        self.outputs = outputs
        self.book = CounterBook(options.host)
        self.run_id = self.book.epoch
        self.account = UsageAccount(options.resources)
        self.quota = LogQuota(options.log_quota_per_hour)
        self.network = (
            RunNetwork(options.subject, options.workload, options.lan, options.pools)
            if options.netns
            else None
        )
        self.cgroup_network: RunCgroupNetwork | None = None
        self.started = time.monotonic()
        self.child: Child | None = None
        self.child_started = asyncio.Event()
        self.collector: Collector = ProcessTreeCollector()
        self.stopped: Stopped | None = None
        self.stopping: asyncio.Task[None] | None = None
        self._logged = 0
        self._reporting = True
        self.gpus: GpuProvider | None = open_gpus() if options.resources.gpus else None
        self.gpu = GpuMeter(model=options.resources.gpu_model)
        for out in outputs:
            out.on_output = self._check_log_quota

    async def run(self, cmd: Sequence[str], commands_since: datetime) -> int:
        o = self.options
        collector = open_collector(f"{o.workload}.{self.run_id}", o.use_cgroup)
        self.collector = collector
        started = WorkloadStarted(
            workload=o.workload,
            subject=o.subject,
            groups=list(o.groups),
            host=o.host,
            resources=o.resources,
            started_at=utcnow(),
        )
        self.link.enqueue(self._lifecycle(started.to_json(), "started"))
        await self.link.deliver()  # now if NATS is there; otherwise before the next batch
        listener = CommandListener(self.link, o.prefix, o.host, self._command, since=commands_since)
        listening = asyncio.create_task(listener.run())
        notices = NoticeListener(self.link, o.prefix, o.host, self._notice, since=commands_since)
        hearing = asyncio.create_task(notices.run())
        try:
            if self.network is None and o.cgroup_net and isinstance(collector, CgroupCollector):
                await self._meter_cgroup(collector)
            if self.network is not None:
                try:
                    await self.network.create()
                except SandboxError as exc:
                    log.error("not running anything: %s", exc)
                    self.network = None
                    return await self._finish(EXIT_NO_NETNS, collector)
                missing = not_runnable(cmd[0])
                if missing is not None:
                    log.error("%s", missing)
                    return await self._finish(missing.status, collector)
                cmd = self.network.wrap(cmd)
            return await self._run_child(cmd, collector)
        finally:
            await listener.stop(listening)
            await notices.stop(hearing)
            if self.stopping is not None and not self.stopping.done():
                self.stopping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.stopping
            if self.network is not None:
                await self.network.remove()
            if self.cgroup_network is not None:
                await self.cgroup_network.remove()
            if self.gpus is not None:
                self.gpus.close()

    async def _meter_cgroup(self, collector: CgroupCollector) -> None:
        o = self.options
        directory = v2_directory([str(d) for d in collector.cgroup.dirs])
        if directory is None:
            log.info("network bytes are not metered: the run's cgroup is not a cgroup-v2 one")
            return
        network = RunCgroupNetwork(o.subject, o.workload, o.lan, directory)
        if await network.start():
            self.cgroup_network = network
        else:
            await network.remove()

    async def _run_child(self, cmd: Sequence[str], collector: Collector) -> int:
        with SignalRelay() as signals:
            try:
                child, collector = await self._start(cmd, collector)
            except CommandNotStarted as exc:
                log.error("%s", exc)
                return await self._finish(exc.status, collector)
            self.child, self.collector = child, collector
            self.child_started.set()
            signals.attach(child.proc)
            reporter = asyncio.create_task(self._report_every_interval(collector))
            try:
                returncode = await child.wait(DRAIN_GRACE)
                if self.stopping is not None:
                    await self.stopping
            finally:
                self._reporting = False  # in case the cancellation is swallowed on its way
                reporter.cancel()
                await asyncio.wait({reporter}, timeout=STOP_WAIT)
            if self.stopped is not None:
                log.error("%s", self.stopped.sentence())
                return await self._finish(self.stopped.status, collector)
            return await self._finish(exit_status(returncode), collector)

    async def _start(self, cmd: Sequence[str], collector: Collector) -> tuple[Child, Collector]:
        self.started = time.monotonic()
        try:
            child = await start_child(cmd, self.outputs, collector.preexec())
        except subprocess.SubprocessError as exc:
            # Joining the cgroup failed before exec, so the command has not run: run it now
            # without the cgroup rather than not at all.
            log.warning("cannot put the command in %s (%s)", collector.description, exc)
            collector.close()
            collector = ProcessTreeCollector()
            self.started = time.monotonic()
            child = await start_child(cmd, self.outputs, None)
        collector.attach(child.proc.pid)
        return child, collector

    # Termination: by command, or by the local log quota.

    async def _command(self, command: TerminateWorkload) -> None:
        if command.workload != self.options.workload:
            return  # another workload on this host: not ours to stop
        if self.stopped is not None:
            log.info(
                "already stopping %s; command %s changes nothing",
                command.workload,
                command.command_id,
            )
            return
        detail = f"quota {command.quota}: {command.metric} used {command.used} of {command.limit}"
        self._stop(Stopped(signal.SIGTERM, command.reason, detail), command.grace_seconds)

    async def _notice(self, notice: Notice) -> None:
        """Tell the workload, on its stderr, that it will be stopped (or no longer will)."""
        if notice.workload != self.options.workload or self.stopped is not None:
            return
        print(f"Tollgate: {notice.message}", file=sys.stderr, flush=True)

    def _check_log_quota(self) -> None:
        total = self._log_bytes()
        before, self._logged = self._logged, total
        if self.stopped is None and self.quota.over(time.monotonic() - self.started, before, total):
            detail = (
                f"{self.quota.used} bytes of log in hour {self.quota.hour + 1} of the run, over "
                f"the --log-quota-per-hour of {self.quota.limit} bytes"
            )
            self._stop(Stopped(signal.SIGKILL, LOG_QUOTA_EXCEEDED, detail), Decimal(0))

    def _stop(self, stopped: Stopped, grace: Decimal) -> None:
        self.stopped = stopped
        self.stopping = asyncio.create_task(self._terminate(float(grace)))

    async def _terminate(self, grace: float) -> None:
        await self.child_started.wait()  # ordered to stop while it was being started
        if grace > 0:
            last = await terminate(self._signal, self._alive, grace)
        else:
            last = await kill(self._signal, self._alive)
        assert self.stopped is not None
        self.stopped = replace(self.stopped, signal=last)

    def _signal(self, sig: int) -> None:
        self.collector.signal(sig)
        if self.child is not None and self.child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.proc.send_signal(sig)

    def _alive(self) -> bool:
        running = self.child is not None and self.child.proc.returncode is None
        return running or bool(self.collector.members())

    # Reading and reporting.

    async def _report_every_interval(self, collector: Collector) -> None:
        # Memory is integrated over time, so it is read more often than it is reported.
        step = min(self.options.interval, SAMPLE_EVERY)
        due = time.monotonic() + self.options.interval
        while self._reporting:
            await self._observe(collector, final=False)
            await asyncio.sleep(max(min(step, due - time.monotonic()), 0))
            if time.monotonic() >= due:
                due = time.monotonic() + self.options.interval
                obs = await self._observe(collector, final=False)
                await self.link.deliver(self._batch(obs))

    async def _finish(self, status: int, collector: Collector) -> int:
        o = self.options
        obs = await self._observe(collector, final=True)
        final = self._message(self.book.final_batch(o.workload, obs, utcnow()))
        collector.close()
        deadline = time.monotonic() + o.flush_timeout
        delivered = await self.link.deliver_until(final, deadline)
        if delivered:
            stopped = WorkloadStopped(
                workload=o.workload,
                subject=o.subject,
                host=o.host,
                stopped_at=utcnow(),
                exit_status=status,
                termination_reason=self.stopped.reason if self.stopped else None,
            )
            self.link.enqueue(self._lifecycle(stopped.to_json(), "stopped"))
            delivered = await self.link.deliver_until(None, deadline)
        if not delivered:
            log.error(
                "could not deliver the final usage of %s to NATS at %s within %g s; what it "
                "used since the last delivered batch is not in the ledger",
                o.workload,
                o.nats_url,
                o.flush_timeout,
            )
        return status

    async def _observe(self, collector: Collector, final: bool) -> Observation:
        usage = collector.read_final() if final else collector.read()
        reading = Reading(
            at=time.monotonic() - self.started,
            log_bytes=self._log_bytes(),
            cpu_seconds=usage.cpu_seconds,
            mem_bytes=usage.mem_bytes,
        )
        s, w = self.options.subject, self.options.workload
        values = self.account.update(reading)
        if self.gpus is not None:
            samples = await asyncio.to_thread(self.gpus.sample)
            values["gpu.used.seconds"] = self.gpu.observe(samples, reading.at, collector.members())
        obs = Observation(
            {SeriesId(s, w, m): {component(w, m): v} for m, v in values.items()},
            {SeriesId(s, w, m): self.gpu.labels() for m in values if m.startswith("gpu.")},
        )
        source = self.network or self.cgroup_network
        if source is None:
            return obs
        net, restarted, last = await source.read()
        obs = merge(obs, net)
        if restarted:
            closing = self.book.roll(obs, restarted, utcnow(), new_epoch(), last=last)
            if closing is not None:
                self.link.enqueue(self._message(closing))
        self.book.values(obs)  # so a chain recreated before the next batch loses the least
        return obs

    def _log_bytes(self) -> int:
        return sum(out.stripper.visible_bytes for out in self.outputs)

    def _batch(self, obs: Observation, final: bool = False) -> Message:
        return self._message(self.book.batch(obs, utcnow(), final))

    def _message(self, batch: CounterBatch) -> Message:
        subject = samples_subject(self.options.host, self.options.prefix)
        return Message(subject, batch.to_json(), batch.msg_id)

    def _lifecycle(self, payload: bytes, event: str) -> Message:
        subject = workloads_subject(self.options.host, self.options.prefix)
        return Message(subject, payload, f"{self.options.host}:{self.run_id}:{event}")
