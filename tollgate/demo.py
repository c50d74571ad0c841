"""A simulated fleet for `tollgate up --demo`: three hosts publishing real counter batches.

Its messages are the same raw JSON any meter sends; the ledger cannot tell them apart.
Bob runs a large-memory server, so within about a minute he crosses the demo memory quota
and his spawn checks start being denied with the reason and the time quota returns. Like a
real host, the fleet announces its workloads (`workload_started` when the demo starts,
`workload_stopped` when the policy terminates one or the demo ends), so the page lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts.commands import TerminateWorkload, terminate_subject
from contracts.samples import CounterBatch, CounterSample, samples_subject
from contracts.spawn import SpawnRequest, spawn_check_subject
from contracts.workloads import Resources, WorkloadStarted, WorkloadStopped, workloads_subject

log = logging.getLogger("tollgate.demo")
GIB = 2**30


@dataclass
class SimWorkload:
    subject: str
    workload: str
    mem_bytes: int
    gpus: int
    cpu_load: Decimal
    egress_per_s: int
    log_per_s: int
    gpu_model: str | None = None
    counters: dict[str, Decimal] = field(default_factory=dict)
    stopped_by: str | None = None

    def labels(self, metric: str) -> dict[str, str]:
        """GPU usage carries the model, as NVML reports it (prices may depend on it)."""
        if metric.startswith("gpu.") and self.gpu_model:
            return {"gpu_model": self.gpu_model}
        return {}

    def advance(self, seconds: Decimal) -> None:
        if self.stopped_by is not None:
            return  # terminated: its counters stay where they were
        add = {
            "cpu.used.seconds": self.cpu_load * seconds,
            "mem.alloc.byte_seconds": self.mem_bytes * seconds,
            "net.tx.wan.bytes": Decimal(int(self.egress_per_s * seconds)),
            "log.bytes": Decimal(int(self.log_per_s * seconds)),
        }
        if self.gpus:
            add["gpu.alloc.seconds"] = self.gpus * seconds
        for metric, amount in add.items():
            self.counters[metric] = self.counters.get(metric, Decimal(0)) + amount


FLEET = {
    "demo-node-1": [SimWorkload("alice", "jupyter-alice", 4 * GIB, 0, Decimal("0.7"), 40_000, 300)],
    "demo-node-2": [SimWorkload("bob", "jupyter-bob", 192 * GIB, 0, Decimal("3.5"), 900_000, 2000)],
    "demo-node-3": [
        SimWorkload("carol", "train-carol", 64 * GIB, 2, Decimal("7.9"), 120_000, 800, "H100")
    ],
}


async def run_fleet(nc: Client, prefix: str, stop: asyncio.Event, interval: float = 2.0) -> None:
    """Publish cumulative counters for every simulated host every `interval` seconds."""
    js = nc.jetstream()
    epoch = uuid.uuid4().hex[:12]  # a new life of the counters each time the demo starts
    await _obey_terminations(nc, prefix, epoch)
    seq = 0
    last = datetime.now(UTC)
    ticks = 0
    await _announce_all(nc, prefix, epoch, last, started=True)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        now = datetime.now(UTC)
        elapsed = Decimal(str(round((now - last).total_seconds(), 6)))
        last, seq, ticks = now, seq + 1, ticks + 1
        for host, workloads in FLEET.items():
            for w in workloads:
                w.advance(elapsed)
            batch = CounterBatch(
                host=host, epoch=epoch, seq=seq, sampled_at=now,
                counters=[
                    CounterSample(subject=w.subject, workload=w.workload, metric=m,
                                  value=v.quantize(Decimal("0.000001")), labels=w.labels(m))
                    for w in workloads for m, v in sorted(w.counters.items())
                ],
            )  # fmt: skip
            try:
                await js.publish(
                    samples_subject(host, prefix), batch.to_json(),
                    headers={"Nats-Msg-Id": batch.msg_id},
                )  # fmt: skip
            except (nats.errors.Error, OSError) as exc:  # the demo keeps going through outages
                log.warning("demo: publish for %s failed (%s); next batch catches up", host, exc)
        if ticks % 5 == 0:
            await _spawn_checks(nc, prefix)
    await _announce_all(nc, prefix, epoch, datetime.now(UTC), started=False)


async def _announce_all(nc: Client, prefix: str, epoch: str, at: datetime, started: bool) -> None:
    """Every workload starts (the demo begins: also those the policy terminated in an
    earlier run, as a host restarting them would) or, if still running, stops (it ends)."""
    for host, workloads in FLEET.items():
        for w in workloads:
            if not started and w.stopped_by is not None:
                continue
            event: WorkloadStarted | WorkloadStopped = (
                _started(host, w, at) if started else WorkloadStopped(
                    workload=w.workload, subject=w.subject, host=host, stopped_at=at,
                    exit_status=0)
            )  # fmt: skip
            await _announce(nc, prefix, host, w, event, f"{epoch}:{type(event).__name__}")


def _started(host: str, w: SimWorkload, at: datetime) -> WorkloadStarted:
    resources = Resources(cpus=w.cpu_load.to_integral_value(rounding="ROUND_CEILING"),
                          mem_bytes=w.mem_bytes, gpus=w.gpus, gpu_model=w.gpu_model)  # fmt: skip
    return WorkloadStarted(
        workload=w.workload, subject=w.subject, host=host, resources=resources, started_at=at
    )


async def _announce(
    nc: Client, prefix: str, host: str, w: SimWorkload,
    event: WorkloadStarted | WorkloadStopped, msg_id: str,
) -> None:  # fmt: skip
    """Publish a lifecycle event as a meter would (a failure only costs the page a line)."""
    try:
        await nc.jetstream().publish(
            workloads_subject(host, prefix), event.to_json(),
            headers={"Nats-Msg-Id": f"{host}:{w.workload}:{msg_id}"},
        )  # fmt: skip
    except (nats.errors.Error, OSError) as exc:
        log.warning("demo: cannot announce %s (%s)", w.workload, exc)


async def _obey_terminations(nc: Client, prefix: str, epoch: str) -> None:
    """Stop a simulated workload when the policy orders it, as a real meter agent would,
    and report it stopped with the command's reason."""
    by_name = {w.workload: (host, w) for host, workloads in FLEET.items() for w in workloads}

    async def on_command(msg: Msg) -> None:
        try:
            command = TerminateWorkload.model_validate_json(msg.data)
        except ValueError:
            return
        found = by_name.get(command.workload)
        if found is not None and found[1].stopped_by is None:
            host, w = found
            w.stopped_by = command.reason
            log.info("demo: %s terminated by the policy (%s)", w.workload, command.reason)
            ended = WorkloadStopped(workload=w.workload, subject=w.subject, host=host,
                                    stopped_at=datetime.now(UTC), exit_status=143,
                                    termination_reason=command.reason)  # fmt: skip
            await _announce(nc, prefix, host, w, ended, f"{epoch}:WorkloadStopped")

    for host in FLEET:
        await nc.subscribe(terminate_subject(host, prefix), cb=on_command)


async def _spawn_checks(nc: Client, prefix: str) -> None:
    for user in ("alice", "bob", "carol"):
        request = SpawnRequest(subject=user, workload=f"next-{user}")
        try:
            reply = await nc.request(spawn_check_subject(prefix), request.to_json(), timeout=2)
        except (nats.errors.Error, OSError) as exc:
            log.info("demo: spawn check for %s got no answer yet (%s)", user, exc)
            continue
        decision = json.loads(reply.data)
        verdict = "allowed" if decision.get("allowed") else "DENIED"
        log.info("demo: spawn check for %s: %s. %s", user, verdict, decision.get("message", ""))
