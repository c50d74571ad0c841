"""`tollgate run` as a user types it, against real NATS, Postgres and a real ledger."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts._base import parse_json
from contracts.samples import CounterBatch, samples_stream, samples_subject
from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from contracts.workloads import workloads_stream
from infra.bus import ensure_streams
from services.ledger.app import LedgerService
from services.meter.cgroups import PARENT, Mounts, own_path
from tests.conftest import unique, wait_until
from tests.integration.conftest import total
from tollgate.embedded import EmbeddedNats, free_port

if TYPE_CHECKING:
    from tests.servers import TestServers

OURS = b"tollgate: "


@dataclass
class Ran:
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def child_stderr(self) -> bytes:
        """stderr without the meter's own lines."""
        lines = self.stderr.splitlines(keepends=True)
        return b"".join(line for line in lines if not line.startswith(OURS))


@pytest.fixture
def env(servers: TestServers, prefix: str, tmp_path: Path) -> dict[str, str]:
    """What a user's shell would have after `tollgate up`, minus the repo's .tollgate."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    return {
        **clean,
        "TOLLGATE_NATS_URL": servers.nats_url,
        "TOLLGATE_PREFIX": prefix,
        "TOLLGATE_DATA_DIR": str(tmp_path),
    }


class Runs:
    """Starts `tollgate run` as a user would, each in a session of its own."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[asyncio.subprocess.Process] = []

    async def start(
        self, *args: str, stdout: int = asyncio.subprocess.PIPE
    ) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tollgate.cli", "run", *args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        self.started.append(proc)
        return proc

    async def run(self, *args: str) -> Ran:
        proc = await self.start(*args)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return Ran(proc.returncode, out, err)

    def kill_leftovers(self) -> None:
        # A failed test must not leave `tollgate run` or its command running.
        for proc in self.started:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
async def runs(env: dict[str, str]) -> AsyncIterator[Runs]:
    started = Runs(env)
    try:
        yield started
    finally:
        started.kill_leftovers()


def python(script: str) -> list[str]:
    return [sys.executable, "-c", script]


@contextlib.asynccontextmanager
async def spawn_policy(
    nc: Client, prefix: str, allowed: bool, message: str
) -> AsyncIterator[list[SpawnRequest]]:
    """A stand-in policy answering every spawn check the same way; yields what it was asked."""
    asked: list[SpawnRequest] = []

    async def answer(msg: Msg) -> None:
        asked.append(SpawnRequest.model_validate(parse_json(msg.data)))
        decision = SpawnDecision(
            decision_id=unique("d"), allowed=allowed, reason="test", message=message
        )
        await msg.respond(decision.to_json())

    sub = await nc.subscribe(spawn_check_subject(prefix), cb=answer)
    await nc.flush()
    try:
        yield asked
    finally:
        await sub.unsubscribe()


async def series_of(pool: asyncpg.Pool, workload: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM series WHERE workload = $1", workload)
    return {row["metric"]: row for row in rows}


async def final_series(pool: asyncpg.Pool, workload: str) -> dict[str, asyncpg.Record]:
    """The workload's series once the final batch is folded into the ledger."""

    async def folded() -> bool:
        rows = await series_of(pool, workload)
        return bool(rows) and all(row["final"] for row in rows.values())

    await wait_until(folded, timeout=20, what=f"the final batch of {workload} in the ledger")
    return await series_of(pool, workload)


STDOUT_PIECES = [
    b"plain start\n",
    b"\x1b[3",  # a colour split across writes
    b"1mred\x1b[0",
    b"m\n",
    b"\x1b]0;job title\x07",
    "ě ü 🎉\n".encode(),
    b"\xc2",  # C1 CSI in UTF-8, split between its two bytes
    b"\x9b1mC1 bold\xc2\x9b0m\n",
]
BLOB = bytes(range(32, 127)) * 3000 + b"\n"  # several pipe reads' worth
STDOUT_VISIBLE = b"plain start\nred\n" + "ě ü 🎉\n".encode() + b"C1 bold\n" + BLOB
STDERR_PIECES = [b"\x1b[1;33mwarning\x1b[0m: careful\n", b"\x1b[2K\rdone\n"]
STDERR_VISIBLE = b"warning: careful\n\rdone\n"
WRITER = """
import sys
blob = bytes(range(32, 127)) * 3000 + b"\\n"
for stream, pieces in ((sys.stdout.buffer, {out!r} + [blob]), (sys.stderr.buffer, {err!r})):
    for piece in pieces:
        stream.write(piece)
        stream.flush()
"""


async def test_output_passes_through_unchanged_while_log_bytes_count_only_visible_bytes(
    runs: Runs, nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    alice, workload = unique("alice"), unique("w")
    script = WRITER.format(out=STDOUT_PIECES, err=STDERR_PIECES)
    async with spawn_policy(nc, prefix, allowed=True, message="ok"):
        ran = await runs.run(
            "-s", alice, "--workload", workload, "--host", unique("h"), "--", *python(script)
        )

    assert ran.status == 0, ran.stderr
    assert ran.stdout == b"".join(STDOUT_PIECES) + BLOB
    assert ran.child_stderr == b"".join(STDERR_PIECES)
    assert ran.stderr == ran.child_stderr  # the policy said yes and NATS was up: nothing to say
    series = await final_series(pool, workload)
    expected = len(STDOUT_VISIBLE) + len(STDERR_VISIBLE)
    assert series["log.bytes"]["high"] == expected
    assert await total(pool, alice, "log.bytes") == expected


BURNER = """
import os, subprocess, sys, time
burn = "import time\\nwhile time.process_time() < 0.6: pass"
subprocess.run([sys.executable, "-c", burn], check=True)  # a child's CPU counts too
while time.process_time() < 0.9:
    pass
t = os.times()
print(t.user + t.system + t.children_user + t.children_system)
"""
# The ledger may exceed what the command saw of itself by its interpreter's shutdown, never
# fall short of it (beyond rounding to clock ticks).
CPU_BELOW, CPU_ABOVE = Decimal("0.02"), Decimal("0.25")


@pytest.mark.parametrize("cgroup", ["--cgroup", "--no-cgroup"])
async def test_cpu_seconds_match_what_the_command_measured_of_itself(
    cgroup: str, runs: Runs, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    alice, workload = unique("alice"), unique("w")
    ran = await runs.run(
        "-s", alice, "--workload", workload, "--host", unique("h"), cgroup, "--",
        *python(BURNER),
    )  # fmt: skip

    assert ran.status == 0, ran.stderr
    own = Decimal(ran.stdout.decode().strip())
    assert own >= Decimal("1.4")  # 1.5 s of burning, read in 10 ms clock ticks
    await final_series(pool, workload)
    used = await total(pool, alice, "cpu.used.seconds")
    print(f"{cgroup}: the command measured {own} s, the ledger has {used} s")
    assert own - CPU_BELOW <= used <= own + CPU_ABOVE, (used, own)
    assert await total(pool, alice, "mem.used.byte_seconds") > 0
    assert cgroups_named_after(workload) == [], "its cgroup should be removed when it ends"


def cgroups_named_after(workload: str) -> list[Path]:
    """The cgroups `tollgate run` made for `workload`, in every hierarchy (v2 first)."""
    mounts, ours = Mounts.here(), Path("/proc/self/cgroup").read_text()
    parents = [mounts.v2 / PARENT] if mounts.v2 else []
    for mount, controller in ((mounts.cpuacct, "cpuacct"), (mounts.memory, "memory")):
        if mount is not None:
            parents.append(mount / own_path(ours, controller).lstrip("/") / PARENT)
    return [p for parent in parents if parent.is_dir() for p in parent.iterdir()
            if workload in p.name]  # fmt: skip


def populated(cgroup: Path) -> bool:
    return bool((cgroup / "cgroup.procs").read_text().split())


async def test_a_cgroup_left_by_a_killed_run_is_swept_by_the_next_run(
    runs: Runs, streams: None
) -> None:
    workload = unique("w")
    proc = await runs.start(
        "-s", unique("alice"), "--workload", workload, "--",
        "sh", "-c", "echo ready; exec sleep 30",
    )  # fmt: skip
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"ready\n"
    left = cgroups_named_after(workload)
    if not left:
        pytest.skip("tollgate run cannot create cgroups on this machine")
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up after itself
    await proc.wait()

    async def emptied() -> bool:
        return not populated(left[0])

    await wait_until(emptied, what="the killed command's cgroup to empty")
    assert (await runs.run("-s", unique("alice"), "--", "true")).status == 0
    assert cgroups_named_after(workload) == []


@pytest.mark.parametrize(("command", "status"), [("exit 7", 7), ("kill -TERM $$", 128 + 15)])
async def test_the_command_exit_status_is_ours(
    command: str, status: int, runs: Runs, streams: None
) -> None:
    ran = await runs.run("-s", unique("alice"), "--host", unique("h"), "sh", "-c", command)
    assert ran.status == status, ran.stderr


async def test_batches_flow_while_it_runs_and_the_last_is_final(
    runs: Runs,
    nc: Client,
    prefix: str,
    pool: asyncpg.Pool,
    ledger: LedgerService,
    tmp_path: Path,
) -> None:
    alice, workload, gate = unique("alice"), unique("w"), tmp_path / "gate"
    proc = await runs.start(
        "-s", alice, "--workload", workload, "--host", unique("h"), "--interval", "0.1",
        "--cpus", "2", "--mem", "1GiB", "--", "sh", "-c",
        f"echo started; while [ ! -e {gate} ]; do sleep 0.05; done; exit 5",
    )  # fmt: skip

    async def reported_while_running() -> bool:
        rows = await series_of(pool, workload)
        return "log.bytes" in rows and rows["log.bytes"]["high"] == len(b"started\n")

    await wait_until(reported_while_running, timeout=20, what="a batch while it runs")
    assert not any(row["final"] for row in (await series_of(pool, workload)).values())
    gate.touch()
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 5, err

    series = await final_series(pool, workload)
    assert {"log.bytes", "cpu.used.seconds", "cpu.alloc.seconds"} <= series.keys()
    assert series["log.bytes"]["last_seq"] > 1
    assert await total(pool, alice, "log.bytes") == len(b"started\n")
    assert await total(pool, alice, "cpu.alloc.seconds") > 0
    events = await stream_messages(nc, workloads_stream(prefix))
    assert [(e["schema"], e.get("exit_status")) for e in events] == [
        ("tollgate.workload_started.v1", None),
        ("tollgate.workload_stopped.v1", 5),
    ]
    assert events[0]["resources"]["mem_bytes"] == 2**30  # type: ignore[index]


async def stream_messages(nc: Client, stream: str) -> list[dict[str, object]]:
    js = nc.jetstream()
    info = await js.stream_info(stream)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        found.append(parse_json((await js.get_msg(stream, seq)).data or b"{}"))
    return found


async def test_a_denied_spawn_exits_3_with_the_policy_message_and_runs_nothing(
    runs: Runs, nc: Client, prefix: str, tmp_path: Path, streams: None
) -> None:
    marker, alice, workload, host = tmp_path / "ran", unique("alice"), unique("w"), unique("h")
    message = f"{alice} used 12.5 of 10 core*h (compute-30d); more on 2026-12-01 00:00 UTC"
    async with spawn_policy(nc, prefix, allowed=False, message=message) as asked:
        ran = await runs.run(
            "-s", alice, "--workload", workload, "--host", host, "--cpus", "2",
            "--mem", "4GiB", "--group", "regular", "--", "touch", str(marker),
        )  # fmt: skip

    assert ran.status == 3
    assert ran.stderr == f"tollgate: {message}\n".encode()
    assert not marker.exists()
    assert [(a.subject, a.workload, a.host, a.groups) for a in asked] == [
        (alice, workload, host, ["regular"])
    ]
    assert (asked[0].resources.cpus, asked[0].resources.mem_bytes) == (2, 4 * 2**30)


async def test_without_a_policy_it_runs_at_once_and_fail_closed_refuses(
    runs: Runs, tmp_path: Path, streams: None
) -> None:
    marker = tmp_path / "ran"
    began = time.monotonic()
    ran = await runs.run("-s", unique("alice"), "--spawn-timeout", "30", "--", "touch", str(marker))
    assert ran.status == 0
    assert marker.exists()
    # NATS says "no responders" right away: nothing waits out the 30 s spawn-check timeout.
    assert time.monotonic() - began < 15
    assert b"nobody answers spawn checks" in ran.stderr
    assert len([line for line in ran.stderr.splitlines() if b"spawn" in line]) == 1

    marker.unlink()
    refused = await runs.run("-s", unique("alice"), "--fail-closed", "touch", str(marker))
    assert refused.status == 4
    assert b"--fail-closed" in refused.stderr
    assert not marker.exists()


async def test_without_a_nats_url_nothing_runs_and_it_says_what_to_do(
    env: dict[str, str], runs: Runs, tmp_path: Path
) -> None:
    del env["TOLLGATE_NATS_URL"]
    marker = tmp_path / "ran"
    ran = await runs.run("-s", "alice", "--", "touch", str(marker))
    assert ran.status == 2
    assert b"tollgate up" in ran.stderr and b"TOLLGATE_NATS_URL" in ran.stderr
    assert not marker.exists()


async def test_the_workload_runs_and_its_output_flows_when_nats_is_unreachable(
    env: dict[str, str],
    runs: Runs,
) -> None:
    env["TOLLGATE_NATS_URL"] = f"nats://127.0.0.1:{free_port()}"
    ran = await runs.run(
        "-s", "alice", "--flush-timeout", "0.3", "--", "sh", "-c",
        "printf '\\033[32mstill here\\033[0m\\n'; exit 3",
    )  # fmt: skip
    assert ran.stdout == b"\x1b[32mstill here\x1b[0m\n"
    assert ran.status == 3  # the command's own 3: it did run
    assert b"could not deliver the final usage" in ran.stderr


async def test_usage_from_a_nats_outage_is_delivered_when_nats_returns(
    env: dict[str, str], runs: Runs, prefix: str, tmp_path: Path
) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    host, gate = unique("h"), tmp_path / "gate"
    try:
        env["TOLLGATE_NATS_URL"] = server.url
        admin = await nats.connect(server.url)
        await ensure_streams(admin.jetstream(), prefix, duplicate_window=120)
        await admin.close()
        script = (
            "import os, time\n"
            "print('a' * 999, flush=True)\n"
            f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
            "print('b' * 1999, flush=True)\n"
        )
        proc = await runs.start(
            "-s", "alice", "--host", host, "--interval", "0.1", "--flush-timeout", "20",
            "--", *python(script),
        )  # fmt: skip
        stderr = bytearray()
        drain = asyncio.create_task(collect(proc.stderr, stderr))
        await wait_for_log_bytes(server.url, prefix, host, 1000)

        server.stop()
        gate.touch()  # the command writes more, ends, and its final batch meets no NATS

        async def outage_reported() -> bool:
            return b"cannot report usage" in stderr

        await wait_until(outage_reported, what="the outage reported")
        server.start()

        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await drain
        last = await wait_for_log_bytes(server.url, prefix, host, 1000 + 2000)
        assert last.final
        assert b"works again" in stderr
    finally:
        server.stop()


async def collect(stream: asyncio.StreamReader | None, into: bytearray) -> None:
    assert stream is not None
    while chunk := await stream.read(4096):
        into += chunk


async def wait_for_log_bytes(url: str, prefix: str, host: str, wanted: int) -> CounterBatch:
    """The newest batch in the samples stream, once it carries `wanted` log bytes."""
    nc = await nats.connect(url)
    latest: list[CounterBatch] = []
    try:

        async def reached() -> bool:
            try:
                msg = await nc.jetstream().get_last_msg(
                    samples_stream(prefix), samples_subject(host, prefix)
                )
            except nats.errors.Error:
                return False
            latest[:] = [CounterBatch.model_validate(parse_json(msg.data or b""))]
            values = {c.metric: c.value for c in latest[0].counters}
            return values.get("log.bytes", Decimal(0)) >= wanted

        await wait_until(reached, timeout=20, what=f"{wanted} log bytes in the stream")
    finally:
        await nc.close()
    return latest[0]


async def test_a_reader_that_goes_away_stops_the_command_like_a_broken_pipe(
    runs: Runs, streams: None
) -> None:
    read_end, write_end = os.pipe()
    try:
        proc = await runs.start("-s", "alice", "--", "yes", stdout=write_end)
        os.close(write_end)
        loop = asyncio.get_running_loop()
        assert (await loop.run_in_executor(None, os.read, read_end, 4096)).startswith(b"y\n")
    finally:
        os.close(read_end)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 128 + signal.SIGPIPE, err


async def test_sigterm_to_tollgate_reaches_the_command_and_is_reported(
    runs: Runs, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    workload = unique("w")
    proc = await runs.start(
        "-s", unique("alice"), "--workload", workload, "--",
        "sh", "-c", "echo ready; exec sleep 30",
    )  # fmt: skip
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"ready\n"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 128 + signal.SIGTERM
    assert time.monotonic() - started < 15  # sleep did not run its 30 s out
    assert (await final_series(pool, workload))["log.bytes"]["high"] == len(b"ready\n")
