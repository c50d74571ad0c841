"""`tollgate run`: ask for a spawn decision, run the command, meter it, report (SPEC 5, 6).

Metering is best-effort and never costs the workload anything: NATS may be down at the start,
in the middle or at the end, and the command still runs with its output flowing. Exit codes of
our own (2, 3, 4) are in `domain`; otherwise we return the command's status, or 128 + N when
signal N killed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import BinaryIO

from contracts._base import utcnow
from contracts.samples import samples_subject
from contracts.spawn import SpawnRequest
from contracts.workloads import Resources, WorkloadStarted, WorkloadStopped, workloads_subject

from .child import Child, CommandNotStarted, Output, SignalRelay, start_child
from .cpu import Collector, ProcessTreeCollector, open_collector
from .domain import (
    EXIT_DENIED,
    EXIT_UNCHECKED,
    BatchSequence,
    Reading,
    UsageAccount,
    exit_status,
)
from .publisher import Message, MeterLink, NoDecision

log = logging.getLogger("tollgate.meter")
DRAIN_GRACE = 2.0
SAMPLE_EVERY = 1.0


@dataclass(frozen=True)
class RunOptions:
    """Who runs what where, and how the meter behaves."""

    nats_url: str
    prefix: str
    subject: str
    host: str
    workload: str
    resources: Resources = field(default_factory=Resources)
    groups: tuple[str, ...] = ()
    interval: float = 10.0
    fail_closed: bool = False
    use_cgroup: bool = True
    spawn_timeout: float = 2.0
    flush_timeout: float = 10.0


async def run_workload(
    cmd: Sequence[str],
    options: RunOptions,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run `cmd` metered; return its exit status, or EXIT_DENIED / EXIT_UNCHECKED unrun."""
    link = MeterLink(options.nats_url, f"tollgate-run {options.workload}")
    link.start()
    try:
        refusal = await _ask_to_spawn(link, options)
        if refusal is not None:
            return refusal
        outputs = (Output(stdout or sys.stdout.buffer), Output(stderr or sys.stderr.buffer))
        return await _Metered(options, link, outputs).run(cmd)
    finally:
        await link.close()


async def _ask_to_spawn(link: MeterLink, options: RunOptions) -> int | None:
    request = SpawnRequest(
        subject=options.subject,
        groups=list(options.groups),
        workload=options.workload,
        host=options.host,
        resources=options.resources,
    )
    answer = await link.spawn_decision(options.prefix, request, options.spawn_timeout)
    if isinstance(answer, NoDecision):
        if options.fail_closed:
            log.error(
                "no spawn decision (%s); not starting, because of --fail-closed", answer.reason
            )
            return EXIT_UNCHECKED
        log.warning(
            "no spawn decision (%s); starting anyway (--fail-closed refuses)", answer.reason
        )
        return None
    if not answer.allowed:
        log.error("%s", answer.message)
        return EXIT_DENIED
    if any(quota.state != "ok" for quota in answer.quotas):
        log.warning("%s", answer.message)
    return None


class _Metered:
    """One metered run: the command, its counters and the batches that report them."""

    def __init__(self, options: RunOptions, link: MeterLink, outputs: tuple[Output, Output]):
        self.options = options
        self.link = link
        self.outputs = outputs
        self.sequence = BatchSequence(options.host, options.subject, options.workload)
        self.account = UsageAccount(options.resources)
        self.started = time.monotonic()

    async def run(self, cmd: Sequence[str]) -> int:
        o = self.options
        collector = open_collector(f"{o.workload}.{self.sequence.epoch}", o.use_cgroup)
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
        with SignalRelay() as signals:
            try:
                child, collector = await self._start(cmd, collector)
            except CommandNotStarted as exc:
                log.error("%s", exc)
                return await self._finish(exc.status, collector)
            signals.attach(child.proc)
            reporter = asyncio.create_task(self._report_every_interval(collector))
            try:
                returncode = await child.wait(DRAIN_GRACE)
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
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

    async def _report_every_interval(self, collector: Collector) -> None:
        # Memory is integrated over time, so it is read more often than it is reported.
        step = min(self.options.interval, SAMPLE_EVERY)
        due = time.monotonic() + self.options.interval
        while True:
            self._observe(collector, final=False)
            await asyncio.sleep(max(min(step, due - time.monotonic()), 0))
            if time.monotonic() >= due:
                due = time.monotonic() + self.options.interval
                await self.link.deliver(self._batch(self._observe(collector, final=False)))

    async def _finish(self, status: int, collector: Collector) -> int:
        o = self.options
        final = self._batch(self._observe(collector, final=True), final=True)
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

    def _observe(self, collector: Collector, final: bool) -> dict[str, Decimal]:
        usage = collector.read_final() if final else collector.read()
        reading = Reading(
            at=time.monotonic() - self.started,
            log_bytes=sum(out.stripper.visible_bytes for out in self.outputs),
            cpu_seconds=usage.cpu_seconds,
            mem_bytes=usage.mem_bytes,
        )
        return self.account.update(reading)

    def _batch(self, counters: dict[str, Decimal], final: bool = False) -> Message:
        batch = self.sequence.next(counters, utcnow(), final)
        subject = samples_subject(self.options.host, self.options.prefix)
        return Message(subject, batch.to_json(), batch.msg_id)

    def _lifecycle(self, payload: bytes, event: str) -> Message:
        subject = workloads_subject(self.options.host, self.options.prefix)
        return Message(subject, payload, f"{self.options.host}:{self.sequence.epoch}:{event}")
