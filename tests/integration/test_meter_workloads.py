"""`tollgate meter` metering real processes (CPU, memory, allocations, GPUs through a fake
NVML) and obeying termination commands, against NATS JetStream and the ledger."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client

from contracts.commands import TerminateWorkload, terminate_subject
from contracts.workloads import Resources, workloads_stream
from services.ledger.app import LedgerService
from services.meter import cgroups
from services.meter.agent import AgentOptions
from services.meter.gpu import GpuSample
from services.meter.spool import LocalWorkload, register
from tests.conftest import unique, wait_until
from tests.integration.conftest import total
from tests.integration.test_meter_agent import running
from tests.integration.test_run import final_series, stream_messages
from tests.servers import TestServers

MiB = 2**20
HOG = 256 * MiB
WORKER = """
import os, sys, time
gate = sys.argv[1]
print("ready", flush=True)
while not os.path.exists(gate):
    time.sleep(0.01)
while time.process_time() < 0.8:
    pass
data = b"\\x01" * {hog}
began = time.monotonic()
time.sleep(1.0)
held = time.monotonic() - began
del data
t = os.times()
print(t.user + t.system, held, flush=True)
"""
needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create the workloads' cgroups"
)
# The ledger may exceed what the process saw of itself by interpreter start-up and exit.
CPU_BELOW, CPU_ABOVE = Decimal("0.02"), Decimal("0.25")


@dataclass
class FakeGpus:
    """Two GPUs at fixed utilisation: what NVML would report."""

    samples: list[GpuSample] = field(default_factory=list)
    closed: bool = False

    def sample(self) -> list[GpuSample]:
        return list(self.samples)

    def close(self) -> None:
        self.closed = True


def options(servers: TestServers, prefix: str, state: Path) -> AgentOptions:
    return AgentOptions(servers.nats_url, prefix, unique("h"), state, interval=0.1, iptables=False)


async def spawn(
    script: str, *args: str, cgroup: cgroups.CgroupSet | None = None
) -> asyncio.subprocess.Process:
    def join() -> None:
        for d in cgroup.dirs if cgroup else []:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=join if cgroup else None,
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"ready\n"
    return proc


async def metering(agent_probes: dict[str, object], workload: str) -> None:
    async def seen() -> bool:
        return workload in agent_probes

    await wait_until(seen, what=f"the agent metering {workload}")


@needs_cgroups
async def test_a_workload_in_its_cgroup_is_charged_cpu_memory_and_gpu_time(
    servers: TestServers, prefix: str, pool: asyncpg.Pool, ledger: LedgerService, tmp_path: Path
) -> None:
    alice, workload, gate = unique("alice"), unique("w"), tmp_path / "gate"
    gpus = FakeGpus([GpuSample(0, "GPU-a", "H100", 50), GpuSample(1, "GPU-b", "H100", 100)])
    cgroup = cgroups.create(workload)
    try:
        async with running(options(servers, prefix, tmp_path / "state"), gpus) as agent:
            proc = await spawn(WORKER.format(hog=HOG), str(gate), cgroup=cgroup)
            record = LocalWorkload(
                workload=workload,
                subject=alice,
                pid=proc.pid,
                started_at=datetime.now(UTC),
                cgroups=[str(d) for d in cgroup.dirs],
                gpu_devices=["0"],
                resources=Resources(cpus=Decimal(2), mem_bytes=2**30, gpus=1),
            )
            register(agent.o.state_dir, record)
            await metering(agent.probes, workload)
            gate.touch()
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            series = await final_series(pool, workload)
    finally:
        cgroup.remove()
    own_cpu, held = (Decimal(x.decode()) for x in out.split())
    cpu = await total(pool, alice, "cpu.used.seconds")
    mem = await total(pool, alice, "mem.used.byte_seconds")
    hog_seconds = HOG * held
    print(
        f"CPU: {cpu} s charged, {own_cpu} s seen by the process; memory: "
        f"{mem / MiB:.1f} MiB*s charged, {hog_seconds / MiB:.1f} MiB*s of the hog alone"
    )
    assert own_cpu - CPU_BELOW <= cpu <= own_cpu + CPU_ABOVE
    # The hog, plus the interpreter and its page cache (under 80 MiB) for the whole run.
    life = series["cpu.alloc.seconds"]["high"] / 2
    assert Decimal("0.9") * hog_seconds <= mem <= hog_seconds + 80 * MiB * life
    gpu_used = await total(pool, alice, "gpu.used.seconds")
    gpu_alloc = await total(pool, alice, "gpu.alloc.seconds")
    # Its one GPU ran at 50% from the first reading on; the 100% one is not its own.
    assert Decimal("0.4") * gpu_alloc <= gpu_used <= Decimal("0.5") * gpu_alloc
    cpu_alloc = await total(pool, alice, "cpu.alloc.seconds")
    assert abs(cpu_alloc / 2 - gpu_alloc) <= Decimal("0.000001")  # the same time allocated
    labels = await pool.fetch(
        "SELECT DISTINCT metric, labels FROM usage_events "
        "WHERE workload = $1 AND metric LIKE 'gpu%'",
        workload,
    )
    assert {(r["metric"], r["labels"]) for r in labels} == {
        ("gpu.used.seconds", '{"gpu_model": "H100"}'),
        ("gpu.alloc.seconds", '{"gpu_model": "H100"}'),
    }


POLITE = """
import signal, sys, time
def bye(*_):
    print("bye", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def command(
    workload: str, subject: str, grace: str, command_id: str | None = None
) -> TerminateWorkload:
    return TerminateWorkload(
        command_id=command_id or unique("cmd"),
        workload=workload,
        subject=subject,
        reason="compute_quota_exceeded",
        quota="compute-30d",
        metric="cpu.used.seconds",
        used=Decimal("12"),
        limit=Decimal("10"),
        grace_seconds=Decimal(grace),
        decided_at=datetime.now(UTC),
    )


async def publish(nc: Client, host: str, prefix: str, cmd: TerminateWorkload, msg_id: str) -> None:
    await nc.jetstream().publish(
        terminate_subject(host, prefix), cmd.to_json(), headers={"Nats-Msg-Id": msg_id}
    )


@needs_cgroups
async def test_termination_commands_stop_workloads_even_when_sent_while_the_agent_was_down(
    servers: TestServers,
    nc: Client,
    prefix: str,
    pool: asyncpg.Pool,
    ledger: LedgerService,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tollgate.meter")
    alice, polite, stubborn = unique("alice"), unique("polite"), unique("stubborn")
    cgroup = cgroups.create(stubborn)
    opts = options(servers, prefix, tmp_path / "state")
    started: list[asyncio.subprocess.Process] = []
    try:
        started += [gentle := await spawn(POLITE), hard := await spawn(STUBBORN, cgroup=cgroup)]
        register(opts.state_dir, LocalWorkload(workload=polite, subject=alice, pid=gentle.pid))
        register(
            opts.state_dir,
            LocalWorkload(workload=stubborn, subject=alice, cgroups=[str(d) for d in cgroup.dirs]),
        )
        async with running(opts) as agent:
            await metering(agent.probes, polite)
            await metering(agent.probes, stubborn)
            await agent.listener.ready.wait()  # type: ignore[union-attr]
            sent_at = time.monotonic()
            order = command(polite, alice, grace="5")
            await publish(nc, opts.host, prefix, order, order.command_id)
            await publish(nc, opts.host, prefix, order, unique("again"))  # the same order, resent
            unknown = command(unique("gone"), alice, grace="1")
            await publish(nc, opts.host, prefix, unknown, unknown.command_id)
            assert await asyncio.wait_for(gentle.wait(), 10) == 0
            assert time.monotonic() - sent_at < 5, "SIGTERM was honoured within its grace"
            await final_series(pool, polite)
        # The agent is down: this command waits in the stream for it.
        order2 = command(stubborn, alice, "0.5")
        await publish(nc, opts.host, prefix, order2, order2.command_id)
        async with running(opts) as agent:
            began = time.monotonic()
            assert await asyncio.wait_for(hard.wait(), 10) == -9
            assert time.monotonic() - began >= 0.5, "SIGKILL only after the grace"
            await final_series(pool, stubborn)
    finally:
        for proc in started:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        cgroup.remove()
    stops = [
        e
        for e in await stream_messages(nc, workloads_stream(prefix))
        if e["schema"] == "tollgate.workload_stopped.v1"
    ]
    assert {(e["workload"], e["exit_status"], e["termination_reason"]) for e in stops} == {
        (polite, 128 + 15, "compute_quota_exceeded"),
        (stubborn, 128 + 9, "compute_quota_exceeded"),
    }
    assert f"names workload {unknown.workload}, which is not running here" in caplog.text
    assert caplog.text.count(f"terminating workload {polite}") == 1
    assert f"command {order.command_id} was already carried out" in caplog.text
    assert order2.command_id in agent.state.seen_commands
    assert json.loads((opts.state_dir / "state.json").read_text())["workloads"] == {}
