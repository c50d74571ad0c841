"""The run: servers up, baselines first, then P1 to P6, a table and bench/results/latest.json."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import nats.errors
from nats.aio.client import Client
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from infra.bus import connect, ensure_streams
from infra.db import connect_and_migrate

from . import baselines, enforcement, ledger_data, scenarios
from .feedlag import LEVEL_WAIT, FeedLag, FeedWatch
from .load import Fleet
from .report import Goal, Line, Report, fmt, latency_lines, ratio, rich_table
from .stack import (
    CpuMeter,
    Service,
    Stack,
    free_port,
    machine,
    service_env,
    start_service,
    wait_http,
)

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
MIB = 2**20


@dataclass(frozen=True)
class Mode:
    name: str
    baseline_seconds: float
    fetch_messages: int
    p1_seconds: float
    p1_warmup: float
    half_seconds: float
    check_rate: float
    p4_trials: int
    events: int
    p5_requests: int


QUICK = Mode("quick", 5, 10_000, 60, 8, 12, 200, 30, 500_000, 500)
FULL = Mode("full", 10, 20_000, 120, 10, 30, 200, 100, 10_000_000, 2000)


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
        console=console, transient=False,
    )  # fmt: skip


async def _wait_policy(nc: object, prefix: str, policy: Service) -> None:
    """Until the policy answers spawn checks from the ledger (not fail-open)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        policy.sample()
        with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
            reply = await nc.request(  # type: ignore[attr-defined]
                spawn_check_subject(prefix), SpawnRequest(subject="probe").to_json(), timeout=2
            )
            if not SpawnDecision.model_validate_json(reply.data).fail_open:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the policy did not answer spawn checks within 90 s; see {policy.log}")


STEPS = ("baselines", "p1", "half", "p4", "big")


async def run(
    mode: Mode, console: Console, results: Path = RESULTS, steps: tuple[str, ...] = STEPS
) -> Report:
    """The whole run (or some `steps` of it, for profiling); writes `results` even on failure."""
    stack = Stack()
    services: list[Service] = []
    started = time.perf_counter()
    with console.status("starting embedded NATS and Postgres"):
        stack.start()
    report = Report({}, mode.name if steps == STEPS else f"{mode.name}, only {'+'.join(steps)}")
    try:
        report.machine = await machine(stack, mode.name)
        report.machine["work_dir"] = str(stack.work)  # servers' and services' logs
        with _progress(console) as progress:
            await _steps(stack, mode, steps, report, services, progress)
        report.notes.append(f"whole run: {time.perf_counter() - started:.0f} s wall")
    except BaseException as exc:
        # What was measured before the failure is kept, marked as incomplete.
        report.notes.append(
            f"INCOMPLETE: the run stopped with {type(exc).__name__}: {exc} "
            f"(servers' and services' logs kept in {stack.work})"
        )
        report.write(results)
        raise
    finally:
        for s in services:
            await s.stop()
        stack.stop()
    # Kept only when the run failed (the logs say why) or BENCH_KEEP_WORK is set (to read
    # the services' logs, say with TOLLGATE_LOG_LEVEL=INFO); else nothing is left behind.
    if os.environ.get("BENCH_KEEP_WORK"):
        console.print(f"servers' and services' logs kept in {stack.work} (BENCH_KEEP_WORK)")
    else:
        shutil.rmtree(stack.work, ignore_errors=True)
    report.machine.pop("work_dir", None)
    report.write(results)
    console.print(rich_table(report))
    for note in report.notes:
        console.print(f"- {note}")
    console.print(f"written: {results}")
    return report


async def _steps(
    stack: Stack, mode: Mode, steps: tuple[str, ...], report: Report, services: list[Service],
    progress: Progress,
) -> None:  # fmt: skip
    logs = stack.work / "logs"
    pool = await connect_and_migrate(await stack.create_database("bench"), max_size=4)
    nc = await connect(stack.nats_url, "bench")
    checks_nc = await connect(stack.nats_url, "bench-checks")
    fleet = Fleet()
    await ensure_streams(nc.jetstream(), fleet.prefix, 20 * 60)
    base = baselines.Baselines()
    if "baselines" in steps:
        step = progress.add_task("baselines B1-B4", total=None)
        async with pool.acquire() as conn:
            base, lines = await baselines.measure(
                stack, conn, nc, fleet, seconds=mode.baseline_seconds,
                fetch_messages=mode.fetch_messages, http_rate=mode.check_rate,
            )  # fmt: skip
        for line in lines:
            report.add(line)
        progress.update(step, total=1, completed=1)
        _said(progress, report, "B1", "B2", "B3", "B4 p99")

    if {"p1", "half", "p4"} & set(steps):
        config = stack.work / "quotas.yaml"
        config.write_text(scenarios.quota_config(fleet))
        api_port = free_port()
        env = service_env(stack, "bench", config, api_port)
        step = progress.add_task("starting ledger, policy and api", total=None)
        for name in ("ledger", "policy", "api"):
            services.append(await start_service(name, env, logs))
        api_url = f"http://127.0.0.1:{api_port}"
        await wait_http(f"{api_url}/readyz", services[2])
        await _wait_policy(checks_nc, fleet.prefix, services[1])
        progress.update(step, total=1, completed=1)

        assert stack.pg and stack.pg.proc and stack.nats and stack.nats.proc
        meters = {
            "postgres": CpuMeter(stack.pg.proc.pid),
            "nats-server": CpuMeter(stack.nats.proc.pid),
            "bench": CpuMeter(os.getpid(), children=False),  # the services are its children
        }
        if "p4" in steps:  # first, on a system at rest: nothing queued anywhere
            step = progress.add_task(f"P4 enforcement, {mode.p4_trials} crossings", total=None)
            p4 = await enforcement.p4_enforcement(nc, fleet, mode.p4_trials, str(int(time.time())))
            what = "enforcement: crossing sample -> terminate command"
            for line in latency_lines("P4", what, p4.total, goal_p99_ms=250, note="ingest idle"):
                report.add(line)
            report.notes.append(f"P4 {p4.stages()}")
            progress.update(step, total=1, completed=1)
            _said(progress, report, "P4 p99")

        rate = 100.0  # messages/s, when P1 is not part of this run
        if "p1" in steps:
            p1 = await scenarios.p1_ingest(
                nc, fleet, services, progress, seconds=mode.p1_seconds, warmup=mode.p1_warmup,
                meters=meters, feed=FeedWatch(pool),
            )  # fmt: skip
            _p1_lines(report, p1, base, fleet, services)
            _said(progress, report, "P1", "P1 msgs")
            if p1.feed is not None:
                _feed_lines(report, p1.feed, p1)
                _said(progress, report, "Feed", "Feed lag", "Feed backlog")
            rate = p1.msgs_per_s

        if "half" in steps:
            half = await scenarios.half_rate(
                nc, checks_nc, fleet, api_url, progress, msgs_per_s=rate / 2,
                seconds=mode.half_seconds, check_rate=mode.check_rate,
            )  # fmt: skip
            _half_lines(report, half, base, fleet)
            _said(progress, report, "P2 p99", "P3 NATS p99", "P3 HTTP p99")
            # Like P2 after P1: the tenth starts with nothing queued from the step before.
            t0 = time.perf_counter()
            await _drained(nc, pool, fleet.prefix)
            report.notes.append(
                f"P2 tenth began once what the half-rate step left queued was committed and on "
                f"the feed: {time.perf_counter() - t0:.1f} s after that step ended"
            )
            tenth = await scenarios.ingest_lag(
                nc, fleet, progress, msgs_per_s=rate / 10, seconds=mode.half_seconds
            )
            tenth_rate = f"{rate / 10:,.1f} msgs/s = {rate / 10 * fleet.series:,.0f} points/s"
            at = f"at a tenth of P1: {tenth_rate}, no spawn checks"
            for line in latency_lines("P2 tenth", "ingest lag, JetStream ack -> ledger commit",
                                      tenth, goal_p99_ms=250, note=at):  # fmt: skip
                report.add(line)
            _said(progress, report, "P2 tenth p99")
        for s in services:
            await s.stop()
    await nc.close()
    await checks_nc.close()
    await pool.close()
    if "big" in steps:
        await _big_ledger(stack, mode, report, services, progress)


async def _drained(nc: Client, pool: asyncpg.Pool, prefix: str) -> None:
    """Until the ledger has committed every sample published and the feed has them all."""
    await scenarios.AckFloor(nc, prefix).wait_for(await scenarios.stream_last_seq(nc, prefix))
    await FeedWatch(pool).until_level(LEVEL_WAIT)


async def _big_ledger(
    stack: Stack, mode: Mode, report: Report, services: list[Service], progress: Progress
) -> None:
    big = "bench_ledger"
    big_pool = await connect_and_migrate(await stack.create_database(big), max_size=2)
    async with big_pool.acquire() as conn:
        t0 = time.perf_counter()
        events = await ledger_data.seed(conn, mode.events, progress)
        seeded = time.perf_counter() - t0
        # A live ledger updates its rollup all the time, so autovacuum visits it every few
        # minutes and marks the settled pages all-visible (what the quota queries' index-only
        # scans read); after a bulk seed it would get there a minute or so later.
        visible = await ledger_data.vacuum_rollup(conn)
        step = progress.add_task("P5 quota queries", total=None)
        p5, api = await ledger_data.p5_quota_queries(
            stack, big, mode.p5_requests, stack.work / "logs"
        )
        services.append(api)
        await api.stop()
        progress.update(step, total=1, completed=1)
        step = progress.add_task("P6 replay --rebuild vs GROUP BY", total=None)
        p6 = await ledger_data.p6_rebuild(stack, conn, big)
        progress.update(step, total=1, completed=1)
    await big_pool.close()
    size = f"{events:,} events" + (" (quick mode; BENCH_FULL=1 for 10M)" if
                                   mode.name == "quick" else "")  # fmt: skip
    what = "quota query GET /v1/subjects/{s}/quotas"
    note = f"{size}, 5 quotas, sequential"
    for line in latency_lines("P5", what, p5, goal_p99_ms=20, note=note):
        report.add(line)
    report.add(Line(
        "P6", "tollgate replay --rebuild", p6.command, "s", "GROUP BY",
        ratio(p6.command, p6.group_by), Goal("ratio", at_most=2, text="<= 2 x GROUP BY"),
        note=f"{size}; the command's wall time, interpreter start included; the comparison "
             f"alone {p6.in_process:.2f} s; bare GROUP BY {p6.group_by:.2f} s (the rollup's "
             f"key and sums; {p6.group_by_unsummed:.2f} s and "
             f"{ratio(p6.command, p6.group_by_unsummed):.2f} x without gpu_model and with "
             "the sums left unread, which the planner then skips)",
    ))  # fmt: skip
    _said(progress, report, "P5 p99", "P6")
    report.notes.append(
        f"P5/P6 ledger: {events:,} events seeded through services.ledger.store."
        f"apply_readings (fold, hash chain, rollups) in {seeded:.0f} s "
        f"({events / seeded:,.0f} events/s), in a second database on the same server; "
        f"then VACUUM (ANALYZE) usage_hourly (autovacuum had marked {visible:.0%} of its "
        "pages all-visible)"
    )


def _said(progress: Progress, report: Report, *keys: str) -> None:
    """Headline figures as each phase ends (also readable when the output is not a terminal)."""
    parts = []
    for key in keys:
        line = report.get(key)
        parts.append(f"{key} {fmt(line.value, line.unit)}")
    progress.console.print("  " + ", ".join(parts))


def _p1_lines(
    report: Report, p1: scenarios.IngestResult, base: baselines.Baselines, fleet: Fleet,
    services: list[Service],
) -> None:  # fmt: skip
    shape = f"{fleet.hosts} hosts x {fleet.series} series per message, {p1.seconds:.0f} s sustained"
    report.add(Line(
        "P1", "end-to-end ingest, publish -> committed + acked", p1.points_per_s, "points/s",
        "B1", ratio(p1.points_per_s, base.copy_rows_per_s),
        Goal("ratio", at_least=0.5, text=">= 0.5 x B1"), note=shape,
    ))  # fmt: skip
    report.add(Line(
        "P1 msgs", "end-to-end ingest, messages", p1.msgs_per_s, "msgs/s",
        "B3", ratio(p1.msgs_per_s, base.fetch_msgs_per_s), note=f"{p1.messages:,} messages",
    ))  # fmt: skip
    cores = ", ".join(f"{name} {used:.2f}" for name, used in p1.cpu.items())
    report.notes.append(f"P1 cores used (of {os.cpu_count()}): {cores}")
    for s in services:
        report.add(Line(
            f"RSS {s.name}", f"peak RSS of `tollgate {s.name}` during P1", s.peak_rss / MIB,
            "MiB", note=f"{p1.cpu.get(s.name, 0):.2f} cores used during P1",
        ))  # fmt: skip


def _half_lines(
    report: Report, half: scenarios.HalfRateResult, base: baselines.Baselines, fleet: Fleet
) -> None:
    rate = f"{half.rate:,.0f} msgs/s = {half.rate * fleet.series:,.0f} points/s"
    for line in latency_lines("P2", "ingest lag, JetStream ack -> ledger commit", half.lags,
                              goal_p99_ms=1000, note=f"at half P1: {rate}"):  # fmt: skip
        report.add(line)
    load = f"{half.check_rate:g} checks/s, ingest at half rate"
    nats_50, nats_99 = latency_lines(
        "P3 NATS", "spawn check over NATS", half.nats_checks, goal_p99_ms=5, note=load
    )
    http_50, http_99 = latency_lines(
        "P3 HTTP", "spawn check over HTTP", half.http_checks, note=load
    )
    # HTTP adds the API's hop to the NATS path: allowed twice an idle HTTP round trip (B4).
    http_99.ratio_to = "B4 p99, beyond NATS p99"
    http_99.ratio = ratio(http_99.value - nats_99.value, base.http_p99_ms)
    if base.http_p99_ms:
        bound = nats_99.value + 2 * base.http_p99_ms
        http_99.goal = Goal("value", at_most=bound,
                            text=f"p99 <= NATS p99 + 2 x B4 p99 = {fmt(bound, 'ms')}")  # fmt: skip
    for line in (nats_50, nats_99, http_50, http_99):
        report.add(line)


def _feed_lines(report: Report, feed: FeedLag, p1: scenarios.IngestResult) -> None:
    """The usage feed during P1 (read from Postgres: the head against the feed's position)."""
    # Never more than 1 s behind means: over the run, at most 1 s of P1's events short.
    floor = 1 - 1 / p1.seconds
    report.add(Line(
        "Feed", "usage feed publish rate during P1", feed.fed_per_s, "events/s",
        "P1", ratio(feed.fed_per_s, p1.points_per_s),
        Goal("ratio", at_least=floor, text=f">= P1's rate (less 1 s over the run: {floor:.3f})"),
        note=f"the ledger committed {feed.committed_per_s:,.0f} events/s over the same "
             f"{p1.seconds:.0f} s",
    ))  # fmt: skip
    report.add(Line(
        "Feed lag", "usage feed behind the ledger head during P1, max", feed.max_seconds_by_head,
        "s", goal=Goal("value", at_most=1, text="<= 1 s"),
        note=f"max {feed.max_events:,} events behind; {feed.samples:,} samples every 100 ms of "
             "the head and the feed's position: how long the head had shown the oldest event "
             "not yet fed (to within 100 ms, upwards); that event's age since its recorded_at, "
             f"stamped before its batch commits: max {feed.max_seconds:.2f} s",
    ))  # fmt: skip
    bound = p1.points_per_s  # 1 s of P1's rate
    caught = (f"the feed was not level within {LEVEL_WAIT:.0f} s" if feed.caught_up_in is None
              else f"level with the head {feed.caught_up_in:.1f} s later")  # fmt: skip
    report.add(Line(
        "Feed backlog", "committed events not on the feed right after P1", feed.backlog_after,
        "events", goal=Goal("value", at_most=bound, text=f"<= 1 s of P1 ({fmt(bound)})"),
        note=f"once the ledger had committed all of P1; {caught}",
    ))  # fmt: skip
