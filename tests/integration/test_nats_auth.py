"""With the config `tollgate nats-config` writes, a real nats-server enforces who may do what.

Each test generates identities for two hosts and an integrator, starts nats-server on that
generated nats-server.conf (JetStream in a tmp dir, a free loopback port), creates the
streams as the ledger identity, and then acts as each identity over real connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts._base import parse_json, utcnow
from contracts.commands import (
    SpawnBlock,
    TerminateWorkload,
    block_subject,
    commands_stream,
    terminate_subject,
)
from contracts.notice import Notice, TerminationScheduled, notice_subject
from contracts.samples import CounterBatch, CounterSample, samples_stream, samples_subject
from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from contracts.usage import UsageBatch, UsageRecorded, usage_stream, usage_wildcard
from contracts.workloads import WorkloadStarted, workloads_stream, workloads_subject
from infra.bus import connect, ensure_streams, inbox_prefix_for, seed_public_key
from infra.db import connect_and_migrate
from infra.settings import Settings
from services.api.gauges import scrape
from services.meter.agent import AgentOptions, MeterAgent
from services.meter.commands import CommandListener, NoticeListener
from services.meter.publisher import Message, MeterLink
from tests.conftest import fresh_database, unique, wait_until
from tests.servers import TestServers
from tollgate import bootstrap
from tollgate.commands.natsconfig import generate
from tollgate.embedded import free_port, nats_server_binary
from tollgate.natsauth import seed_stem


@dataclass
class Secured:
    """A nats-server running the generated config, and the names it was generated for."""

    url: str
    prefix: str
    out: Path
    a: str
    b: str
    hub: str

    def seed(self, name: str) -> Path:
        return self.out / "seeds" / f"{seed_stem(name)}.nk"


@dataclass
class Peer:
    """A connection as one identity that keeps the errors the server sends it."""

    nc: Client
    errors: list[str] = field(default_factory=list)

    async def refused(self, what: str, subject: str, exact: bool = True) -> None:
        """Wait for the server's permissions violation for `what` ("publish", ...) on `subject`
        (or on a subject starting with it, if not `exact`)."""
        end = '"' if exact else ""
        expected = f'permissions violation for {what} to "{subject}{end}'.lower()
        await wait_until(
            lambda: _true(any(expected in e.lower() for e in self.errors)),
            timeout=10,
            what=expected,
        )


async def _true(value: bool) -> bool:
    return value


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    port = free_port()
    out = tmp_path / "nats"
    s = Secured(f"nats://127.0.0.1:{port}", unique("t"), out, unique("a-"), unique("b."), "hub")
    listen, store = f"127.0.0.1:{port}", str(tmp_path / "js")
    generate(out, [s.a, s.b], [s.hub], s.prefix, [], [], listen, store, admin=True)
    with open(tmp_path / "nats.log", "wb") as log:
        proc = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(out / "nats-server.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_until(lambda: _true(_port_open(port) or proc.poll() is not None), 30)
        assert proc.poll() is None, (tmp_path / "nats.log").read_text()
        ledger = await connect(s.url, "ledger", s.seed("ledger"))
        try:  # the streams exist before anyone publishes, made by a service identity
            await ensure_streams(ledger.jetstream(), s.prefix, duplicate_window=120)
        finally:
            await ledger.close()
        yield s
    finally:
        proc.terminate()
        proc.wait(15)


@contextlib.asynccontextmanager
async def peer(s: Secured, name: str) -> AsyncIterator[Peer]:
    errors: list[str] = []

    async def keep(exc: Exception) -> None:
        errors.append(str(exc))

    seed = s.seed(name)
    nc = await nats.connect(
        s.url,
        nkeys_seed=str(seed),
        inbox_prefix=inbox_prefix_for(seed_public_key(seed)),
        error_cb=keep,
        max_reconnect_attempts=0,
    )
    try:
        yield Peer(nc, errors)
    finally:
        await nc.close()


async def stored(s: Secured, stream: str) -> dict[str, int]:
    """Messages held in `stream`, by subject (read as the ledger, which may)."""
    async with peer(s, "ledger") as ledger:
        info = await ledger.nc.jetstream().stream_info(stream, subjects_filter=">")
        return dict(info.state.subjects or {})


def batch(host: str, seq: int, value: int, subject: str = "alice") -> CounterBatch:
    counter = CounterSample(subject=subject, workload="w1", metric="log.bytes", value=value)
    return CounterBatch(host=host, epoch="e1", seq=seq, sampled_at=utcnow(), counters=[counter])


def terminate(workload: str) -> bytes:
    return TerminateWorkload(
        command_id=unique("cmd-"), workload=workload, subject="alice", reason="log_quota_exceeded",
        quota="logs", metric="log.bytes", used=Decimal(2), limit=Decimal(1),
        grace_seconds=Decimal(0), decided_at=utcnow(),
    ).to_json()  # fmt: skip


def test_the_generated_config_passes_nats_servers_own_check(secured: Secured) -> None:
    checked = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(secured.out / "nats-server.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "is valid" in checked.stdout + checked.stderr


async def test_a_host_publishes_as_itself_and_is_refused_as_another(secured: Secured) -> None:
    s = secured
    async with peer(s, s.a) as a:
        js = a.nc.jetstream()
        for subject in (samples_subject(s.b, s.prefix), workloads_subject(s.b, s.prefix)):
            with pytest.raises(nats.errors.TimeoutError):  # no ack: the server dropped it
                await js.publish(subject, batch(s.b, 1, 5).to_json(), timeout=0.3)
            await a.refused("publish", subject)
        # Published after the refused ones on the same connection, so stored after them.
        await js.publish(samples_subject(s.a, s.prefix), batch(s.a, 1, 5).to_json())
        await js.publish(workloads_subject(s.a, s.prefix), b"{}")
    assert await stored(s, samples_stream(s.prefix)) == {samples_subject(s.a, s.prefix): 1}
    assert await stored(s, workloads_stream(s.prefix)) == {workloads_subject(s.a, s.prefix): 1}


async def test_only_the_policy_may_publish_commands(secured: Secured) -> None:
    s = secured
    own = terminate_subject(s.a, s.prefix)
    for name in (s.a, s.hub, "ledger", "api"):
        async with peer(s, name) as someone:
            for subject in (own, block_subject("alice", s.prefix)):
                with pytest.raises(nats.errors.TimeoutError):
                    await someone.nc.jetstream().publish(subject, terminate("w1"), timeout=0.3)
                await someone.refused("publish", subject)
    for name in ("policy", "admin"):  # the operator identity, if made, may do anything
        async with peer(s, name) as allowed:
            await allowed.nc.jetstream().publish(own, terminate("w1"))
            assert allowed.errors == []
    assert await stored(s, commands_stream(s.prefix)) == {own: 2}


async def test_a_meter_gets_its_own_commands_and_cannot_read_another_hosts(
    secured: Secured,
) -> None:
    s = secured
    got: dict[str, list[str]] = {s.a: [], s.b: []}
    links, listeners, tasks = [], [], []
    for host in (s.a, s.b):
        link = MeterLink(s.url, f"meter {host}", s.seed(host))
        link.start()

        async def handle(command: TerminateWorkload, host: str = host) -> None:
            got[host].append(command.workload)

        listener = CommandListener(link, s.prefix, host, handle, next_seq=1)
        links.append(link)
        listeners.append(listener)
        tasks.append(asyncio.create_task(listener.run()))
    try:
        async with peer(s, s.a) as a:
            other = terminate_subject(s.b, s.prefix)
            await a.nc.subscribe(other)
            await a.refused("subscription", other)
            with pytest.raises(nats.errors.TimeoutError):  # its consumer create is dropped
                await a.nc.jetstream(timeout=1).pull_subscribe(
                    other, stream=commands_stream(s.prefix), config=_ephemeral()
                )
            create = f"$JS.API.CONSUMER.CREATE.{commands_stream(s.prefix)}."
            await a.refused("publish", create, exact=False)
            # Its own filter in the request subject, another host's in the config: refused.
            reply = await a.nc.request(
                f"$JS.API.CONSUMER.CREATE.{commands_stream(s.prefix)}.sneak."
                f"{terminate_subject(s.a, s.prefix)}",
                _create_request(commands_stream(s.prefix), other),
                timeout=5,
            )
            assert parse_json(reply.data)["error"]["err_code"] == 10131
        async with peer(s, "policy") as policy:
            await policy.nc.jetstream().publish(terminate_subject(s.a, s.prefix), terminate("wa"))
            await policy.nc.jetstream().publish(other, terminate("wb"))
        await wait_until(lambda: _true(got[s.a] == ["wa"] and got[s.b] == ["wb"]), 30)
    finally:
        for listener, task in zip(listeners, tasks, strict=True):
            await listener.stop(task)
        for link in links:
            await link.close()


def _ephemeral() -> ConsumerConfig:
    return ConsumerConfig(
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, inactive_threshold=60
    )


def _create_request(stream: str, filter_subject: str) -> bytes:
    config = _ephemeral()
    config.name = "sneak"
    config.filter_subject = filter_subject
    return json.dumps({"stream_name": stream, "config": config.as_dict()}).encode()


async def test_an_integrator_asks_reads_and_publishes_nothing_else(secured: Secured) -> None:
    s = secured
    async with peer(s, "policy") as policy, peer(s, s.hub) as hub:

        async def answer(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(b'{"allowed": true}')

        await policy.nc.subscribe(spawn_check_subject(s.prefix), queue="policy", cb=answer)
        await policy.nc.flush()
        replies: list[bytes] = []

        async def answered() -> bool:
            # Once, in a full CI run, the first request found no responder right after the
            # flush; asking again tells a slow interest apart from a refused subscription.
            try:
                replies.append((await hub.nc.request(spawn_check_subject(s.prefix), b"{}")).data)
            except nats.errors.NoRespondersError:
                return False
            return True

        await wait_until(answered, timeout=10, what=f"an answer (policy errors: {policy.errors})")
        assert replies == [b'{"allowed": true}'] and not policy.errors

        blocks = await hub.nc.subscribe(f"{s.prefix}.v1.commands.block.>")
        await hub.nc.flush()
        block = SpawnBlock(subject="alice", quota="q", reason="compute_quota_exceeded")
        await policy.nc.jetstream().publish(block_subject("alice", s.prefix), block.to_json())
        assert (await blocks.next_msg(timeout=20)).data == block.to_json()

        async with peer(s, "ledger") as ledger:
            await ledger.nc.jetstream().publish(f"{s.prefix}.v1.usage.alice", b'{"n": 1}')
        feed = await hub.nc.jetstream().pull_subscribe(
            usage_wildcard(s.prefix), durable=s.hub, stream=usage_stream(s.prefix)
        )
        assert [m.data for m in await feed.fetch(1, timeout=5)] == [b'{"n": 1}']
        # Another consumer's name (the policy's) is not the integrator's to read from.
        with pytest.raises(nats.errors.TimeoutError):
            await hub.nc.jetstream(timeout=1).pull_subscribe(
                usage_wildcard(s.prefix), durable="policy", stream=usage_stream(s.prefix)
            )
        await hub.refused("publish", f"$JS.API.CONSUMER.INFO.{usage_stream(s.prefix)}.policy")
        for subject in (samples_subject(s.a, s.prefix), terminate_subject(s.a, s.prefix)):
            with pytest.raises(nats.errors.TimeoutError):
                await hub.nc.jetstream().publish(subject, b"{}", timeout=0.3)
            await hub.refused("publish", subject)
    assert await stored(s, samples_stream(s.prefix)) == {}


async def tollgate_run(s: Secured, seed_of: str, host: str) -> tuple[int, str]:
    """`tollgate run` on a host holding `seed_of`'s seed, saying it is `host`."""
    env = {
        **os.environ,
        "TOLLGATE_NATS_URL": s.url,
        "TOLLGATE_PREFIX": s.prefix,
        "TOLLGATE_NATS_NKEY_SEED_FILE": str(s.seed(seed_of)),
        "TOLLGATE_LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tollgate.cli", "run", "--subject", "alice", "--host", host),
        *("--workload", unique("w-"), "--no-cgroup", "--spawn-timeout", "1"),
        *("--flush-timeout", "2", "--", sys.executable, "-c", "print('hello')"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_tollgate_run_reports_as_its_host_and_is_refused_as_another(
    secured: Secured,
) -> None:
    s = secured
    status, err = await tollgate_run(s, s.a, s.a)
    assert status == 0, err
    assert "violation" not in err.lower() and "refused" not in err.lower(), err
    stored_samples = await stored(s, samples_stream(s.prefix))
    assert list(stored_samples) == [samples_subject(s.a, s.prefix)]
    assert list(await stored(s, workloads_stream(s.prefix))) == [workloads_subject(s.a, s.prefix)]
    # Host A's seed, claiming to be B: the command still runs (metering never costs the
    # workload anything), its reports are refused, and nothing is stored for B.
    status, err = await tollgate_run(s, s.a, s.b)
    assert status == 0, err
    assert "cannot report usage" in err, err
    assert f'permissions violation for publish to "{s.prefix}.v1.workloads.b' in err, err
    assert await stored(s, samples_stream(s.prefix)) == stored_samples
    assert list(await stored(s, workloads_stream(s.prefix))) == [workloads_subject(s.a, s.prefix)]


async def test_the_host_agent_meters_and_obeys_as_its_own_identity(
    secured: Secured, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`tollgate meter` on host A: workload events and samples go out, A's command comes in."""
    s = secured
    caplog.set_level(logging.WARNING, logger="infra.bus")
    child = await asyncio.create_subprocess_exec("sleep", "600")
    state = tmp_path / "meter"
    (state / "workloads").mkdir(parents=True)
    spooled = {"workload": "job-1", "subject": "alice", "started_at": utcnow().isoformat()}
    (state / "workloads" / "job-1.json").write_text(json.dumps({**spooled, "pid": child.pid}))
    options = AgentOptions(
        s.url, s.prefix, s.a, state, interval=0.2, iptables=False, host_network=False,
        nats_seed_file=s.seed(s.a),
    )  # fmt: skip
    agent = MeterAgent(options)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:

        async def reported() -> bool:
            assert not running.done(), running.exception()
            samples = await stored(s, samples_stream(s.prefix))
            return bool(samples) and bool(await stored(s, workloads_stream(s.prefix)))

        await wait_until(reported, 30, "host A's first batch and workload_started")
        async with peer(s, "policy") as policy:
            await policy.nc.jetstream().publish(
                terminate_subject(s.a, s.prefix), terminate("job-1")
            )
        status = await asyncio.wait_for(child.wait(), 30)
        assert status in (-signal.SIGTERM, -signal.SIGKILL)  # the agent stopped it (grace 0)

        async def stopped_reported() -> bool:
            held = await stored(s, workloads_stream(s.prefix))
            return held == {workloads_subject(s.a, s.prefix): 2}

        await wait_until(stopped_reported, 30, "workload_stopped from host A")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert list(await stored(s, samples_stream(s.prefix))) == [samples_subject(s.a, s.prefix)]
    violations = [r.getMessage() for r in caplog.records if "violation" in r.getMessage().lower()]
    assert violations == []


QUOTAS = """
quotas:
  - name: logs
    metric: log.bytes
    limit: 200 B
    window: {lifetime: true}
    per: workload
    enforce: [terminate]
    termination: {reason: log_quota_exceeded, grace_seconds: 0}
"""


async def test_the_services_work_under_their_own_identities(
    secured: Secured, servers: TestServers, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Meter -> ledger -> Postgres -> usage feed -> policy -> terminate -> meter, each part
    connected as its own identity, as `tollgate meter | ledger | policy | api` connect."""
    s = secured
    caplog.set_level(logging.WARNING, logger="infra.bus")
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text(QUOTAS)
    async with fresh_database(servers) as database_url:

        def settings(name: str) -> Settings:
            return Settings(
                nats_url=s.url, database_url=database_url, prefix=s.prefix, config=quotas,
                nats_nkey_seed_file=s.seed(name), data_dir=tmp_path / name,
                ledger_fetch_timeout=0.2,
            )  # fmt: skip

        stop = asyncio.Event()
        services = [
            asyncio.create_task(bootstrap.run_ledger(settings("ledger"), stop)),
            asyncio.create_task(bootstrap.run_policy(settings("policy"), stop)),
        ]
        link = MeterLink(s.url, f"meter {s.a}", s.seed(s.a))
        link.start()
        terminated: list[str] = []

        async def obey(command: TerminateWorkload) -> None:
            terminated.append(command.workload)

        listener = CommandListener(link, s.prefix, s.a, obey, next_seq=1)
        listening = asyncio.create_task(listener.run())
        try:
            started = WorkloadStarted(workload="w1", subject="alice", host=s.a, started_at=utcnow())
            link.enqueue(Message(workloads_subject(s.a, s.prefix), started.to_json(), "w1:on"))
            for b in (batch(s.a, 1, 100), batch(s.a, 2, 250)):
                message = Message(samples_subject(s.a, s.prefix), b.to_json(), b.msg_id)
                assert await link.deliver_until(message, time.monotonic() + 30)

            async def folded() -> bool:
                conn = await asyncpg.connect(database_url)
                try:
                    total = await conn.fetchval(
                        "SELECT sum(delta) FROM usage_events WHERE host = $1", s.a
                    )
                except asyncpg.UndefinedTableError:  # the ledger has not migrated yet
                    return False
                finally:
                    await conn.close()
                return total == 250

            await wait_until(folded, 60, "host A's samples folded into Postgres")
            # 250 log bytes over the workload's 200: the policy orders A to stop it.
            await wait_until(lambda: _true(terminated == ["w1"]), 60, "the policy's terminate")

            async with peer(s, s.hub) as hub:
                feed = await hub.nc.jetstream().pull_subscribe(
                    usage_wildcard(s.prefix), durable=s.hub, stream=usage_stream(s.prefix)
                )
                events: list[UsageRecorded] = []

                async def fed() -> bool:
                    with contextlib.suppress(nats.errors.TimeoutError):
                        for m in await feed.fetch(2, timeout=0.5):
                            events.extend(UsageBatch.model_validate(parse_json(m.data)).records())
                    return len(events) >= 2

                await wait_until(fed, 30, "the usage feed, read by the integrator")
                assert [(e.host, e.delta) for e in events] == [(s.a, 100), (s.a, 150)]
                request = SpawnRequest(subject="alice", workload="w2", host=s.a)
                reply = await hub.nc.request(spawn_check_subject(s.prefix), request.to_json(), 10)
                assert SpawnDecision.model_validate(parse_json(reply.data)).allowed
                assert hub.errors == []

            # The API's own NATS reads (/metrics) as the api identity.
            api = await connect(s.url, "tollgate-api", s.seed("api"))
            pool = await connect_and_migrate(database_url)
            try:
                text = (await scrape(pool, api, s.prefix, utcnow())).decode()
            finally:
                await pool.close()
                await api.close()
            assert 'tollgate_api_scrape_error{source="nats"} 0.0' in text
            assert 'tollgate_ledger_backlog_messages{consumer="ledger"} 0.0' in text
        finally:
            await listener.stop(listening)
            await link.close()
            stop.set()
            await asyncio.wait(services, timeout=30)
        for task in services:
            assert task.done() and task.exception() is None
    violations = [r.getMessage() for r in caplog.records if "violation" in r.getMessage().lower()]
    assert violations == []


def scheduled(workload: str, host: str) -> bytes:
    at = utcnow()
    return TerminationScheduled(
        notice_id=unique("notice-"), command_id=unique("term-"), workload=workload,
        subject="alice", host=host, quota="logs", metric="log.bytes", used=Decimal(2),
        limit=Decimal(1), unit="B", terminate_at=at, reason="log_quota_exceeded",
        message="logs exceeded; this job will be stopped at 10:42 UTC unless usage falls or a "
        "grant arrives", decided_at=at,
    ).to_json()  # fmt: skip


async def test_a_host_reads_its_own_termination_notices_and_not_another_hosts(
    secured: Secured,
) -> None:
    s = secured
    got: list[str] = []
    link = MeterLink(s.url, f"run {s.a}", s.seed(s.a))
    link.start()

    async def handle(notice: Notice) -> None:
        got.append(notice.workload)

    listener = NoticeListener(link, s.prefix, s.a, handle, since=utcnow())
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(lambda: _true(listener.ready.is_set()), 30, "the notice consumer")
        async with peer(s, s.a) as a:
            other = notice_subject(s.b, s.prefix)
            with pytest.raises(nats.errors.TimeoutError):  # its consumer create is dropped
                await a.nc.jetstream(timeout=1).pull_subscribe(
                    other, stream=commands_stream(s.prefix), config=_ephemeral()
                )
        async with peer(s, "policy") as policy:
            js = policy.nc.jetstream()
            await js.publish(notice_subject(s.b, s.prefix), scheduled("wb", s.b))
            await js.publish(notice_subject(s.a, s.prefix), scheduled("wa", s.a))
        await wait_until(lambda: _true(got == ["wa"]), 30, "the host's own notice")
    finally:
        await listener.stop(task)
        await link.close()
