"""Running at scale: a three-node NATS cluster at R3, partitioned ledger and policy.

Real processes on loopback: three clustered nats-server processes, two `tollgate ledger`
processes each owning one partition of the samples, and a node killed with SIGKILL while
samples flow. The policy partition test runs two policy instances in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import nats.errors
import pytest
from nats.aio.client import Client

from contracts import encode_token
from contracts.partitions import partition_of, partition_of_name
from contracts.samples import samples_stream, samples_subject
from contracts.spawn import SpawnRequest
from contracts.workloads import Resources
from infra.bus import connect, ensure_streams, stored_partitions
from services.policy.app import SpawnCheckResponder
from services.policy.service import PolicyService
from services.policy.source import ConfigSource
from tests.cluster import NatsCluster, jetstream_ready, start_service, stop_service
from tests.conftest import unique, wait_until
from tests.integration.conftest import batch_json
from tests.integration.test_policy_support import Fleet, Inbox, spawn
from tests.servers import TestServers

pytest_plugins = ["tests.integration.test_policy_support"]
PARTITIONS = 2
HOSTS = 40
METRICS = ("net.tx.wan.bytes", "cpu.used.seconds")


async def test_partition_of_computes_what_the_servers_stream_transform_computes(
    nc: Client, prefix: str
) -> None:
    """The policy's partition_of and NATS's partition() mapping agree on every host name."""
    n = 7
    js = nc.jetstream()
    await ensure_streams(js, prefix, 120, partitions=n)
    rng = random.Random(7)
    names = [f"node-{i}" for i in range(150)]
    names += [unique("h") for _ in range(100)]
    names += ["john.doe", "gpu node/7", "Überhost", "a", "b", "x" * 120]
    names += ["".join(rng.choice("abcXYZ019-_.é") for _ in range(rng.randint(1, 30)))
              for _ in range(100)]  # fmt: skip
    names = list(dict.fromkeys(names))
    for name in names:
        await js.publish(samples_subject(name, prefix), b"{}")
    stored = [
        (await js.get_msg(samples_stream(prefix), seq)).subject for seq in range(1, 1 + len(names))
    ]
    for name, subject in zip(names, stored, strict=True):
        host_token, partition = subject.split(".")[3:5]
        assert host_token == encode_token(name)
        assert int(partition) == partition_of_name(name, n) == partition_of(host_token, n), name
    assert {int(s.rsplit(".", 1)[1]) for s in stored} == set(range(n))


async def test_changing_the_partition_count_updates_the_stream_and_warns_it_needs_draining(
    nc: Client, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, prefix, 120)
    assert stored_partitions((await js.stream_info(samples_stream(prefix))).config) == 1
    with caplog.at_level(logging.WARNING, logger="infra.bus"):
        await ensure_streams(js, prefix, 120, partitions=3)
    assert stored_partitions((await js.stream_info(samples_stream(prefix))).config) == 3
    (warning,) = [r.getMessage() for r in caplog.records if "partitioned" in r.getMessage()]
    assert "1 way(s) and is being changed to 3" in warning
    assert "drained" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="infra.bus"):
        await ensure_streams(js, prefix, 120, partitions=3)  # unchanged: nothing to say
    assert not caplog.records


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    c = NatsCluster(tmp_path / "nats").start()
    try:
        yield c
    finally:
        c.stop()


class Host:
    """One host publishing cumulative counters for two subjects, retrying with its Msg-Id."""

    def __init__(self, rng: random.Random) -> None:
        self.name = unique("h")
        self.subjects = [unique("u"), unique("u")]
        self.rng = rng
        self.seq = 0
        self.values: dict[tuple[str, str, str], Decimal] = {}
        self.retries = 0

    async def publish_one(self, nc: Client, prefix: str) -> None:
        self.seq += 1
        counters = []
        for s in self.subjects:
            for m in METRICS:
                step = Decimal(self.rng.randint(1, 5000)) / (1000 if m.startswith("cpu") else 1)
                key = (self.name, s, m)
                self.values[key] = self.values.get(key, Decimal(0)) + step
                counters.append({"subject": s, "workload": "job", "metric": m,
                                 "value": str(self.values[key])})  # fmt: skip
        body = batch_json(self.name, "e1", self.seq, counters)
        headers = {"Nats-Msg-Id": f"{self.name}:e1:{self.seq}"}
        while True:
            try:
                await nc.jetstream().publish(
                    samples_subject(self.name, prefix), body, headers=headers, timeout=2
                )
                return
            except (nats.errors.Error, OSError):
                # Not acked (a node died, a leader is being elected): the same Msg-Id again,
                # which JetStream drops if the first attempt was stored after all.
                self.retries += 1
                await asyncio.sleep(0.1)


async def _publish_rounds(
    hosts: list[Host], nc: Client, prefix: str, rounds: int, until: asyncio.Event | None = None
) -> None:
    """Every host publishes `rounds` batches, or keeps going until `until` is set."""
    done = 0
    while (done < rounds) if until is None else not until.is_set():
        await asyncio.gather(*(h.publish_one(nc, prefix) for h in hosts))
        done += 1


async def _drained(nc: Client, prefix: str, consumers: list[str]) -> bool:
    js = nc.jetstream()
    try:
        for name in consumers:
            info = await js.consumer_info(samples_stream(prefix), name)
            if info.num_pending or info.num_ack_pending:
                return False
    except (nats.errors.Error, OSError):
        return False
    return True


async def test_two_ledger_partitions_on_an_r3_cluster_count_exactly_through_a_node_kill(
    cluster: NatsCluster, servers: TestServers, database_url: str, pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:  # fmt: skip
    prefix = "tollgate"
    nc = await connect(cluster.url, "cluster-test")
    ledgers = []
    try:
        await wait_until(lambda: jetstream_ready(nc), 60, "a JetStream meta leader")

        async def streams_made() -> bool:
            try:
                await ensure_streams(nc.jetstream(), prefix, 1200, replicas=3, partitions=2)
                return True
            except (nats.errors.Error, OSError):
                return False  # peers still joining the meta group

        await wait_until(streams_made, 60, "the streams at R3")
        info = await nc.jetstream().stream_info(samples_stream(prefix))
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2

        env = {
            "TOLLGATE_NATS_URL": cluster.url, "TOLLGATE_DATABASE_URL": database_url,
            "TOLLGATE_PREFIX": prefix, "TOLLGATE_PARTITIONS": str(PARTITIONS),
            "TOLLGATE_STREAM_REPLICAS": "3", "TOLLGATE_LEDGER_BATCH": "100",
            "TOLLGATE_LEDGER_ACK_WAIT": "5", "TOLLGATE_DATA_DIR": str(tmp_path),
        }  # fmt: skip
        for k in range(PARTITIONS):
            log = tmp_path / f"ledger-p{k}.log"
            ledgers.append(start_service("ledger", {**env, "TOLLGATE_PARTITION": str(k)}, log))

        rng = random.Random(8)
        hosts = [Host(rng) for _ in range(HOSTS)]
        assert {partition_of_name(h.name, PARTITIONS) for h in hosts} == set(range(PARTITIONS))
        await _publish_rounds(hosts, nc, prefix, 5)
        committed = "SELECT count(DISTINCT consumer) FROM ledger_batches"
        await wait_until(
            lambda: _count_is(pool, PARTITIONS, committed), 60, "both partitions to commit"
        )

        # Kill the samples stream's leader while the hosts keep publishing.
        leader = (await nc.jetstream().stream_info(samples_stream(prefix))).cluster.leader
        enough = asyncio.Event()
        publishing = asyncio.create_task(_publish_rounds(hosts, nc, prefix, 0, until=enough))
        await wait_until(lambda: _done_rounds(hosts, 8), 60, "publishing to be under way")
        killed_at = min(h.seq for h in hosts)
        cluster.kill(leader)
        await wait_until(
            lambda: _done_rounds(hosts, killed_at + 10), 120, "publishing to go on after the kill"
        )
        enough.set()
        await publishing
        # The leader died under the publishers: some publishes went unacked and were retried.
        assert sum(h.retries for h in hosts) > 0
        new_leader = (await nc.jetstream().stream_info(samples_stream(prefix))).cluster.leader
        assert new_leader != leader

        consumers = [f"ledger-p{k}" for k in range(PARTITIONS)]
        await wait_until(lambda: _drained(nc, prefix, consumers), 120, "both partitions drained")
        positions = "SELECT count(*) FROM consumer_positions WHERE consumer = ANY($1)"
        assert await pool.fetchval(positions, consumers) == PARTITIONS
        rows = await pool.fetch(
            "SELECT host, subject, metric, sum(delta) AS total FROM usage_events GROUP BY 1, 2, 3"
        )
        totals = {(r["host"], r["subject"], r["metric"]): r["total"] for r in rows}
        expected = {k: v for h in hosts for k, v in h.values.items()}
        assert totals == expected  # exact: nothing lost, nothing counted twice

        # Each ledger instance folded exactly its own partition's hosts.
        seen = await pool.fetch(
            "SELECT DISTINCT e.host, b.consumer FROM usage_events e "
            "JOIN ledger_batches b USING (batch_id)"
        )
        for r in seen:
            assert r["consumer"] == f"ledger-p{partition_of_name(r['host'], PARTITIONS)}", r
        assert {r["host"] for r in seen} == {h.name for h in hosts}
        assert all(p.poll() is None for p in ledgers), "a ledger process died"
    finally:
        for proc in ledgers:
            await stop_service(proc)
        await nc.close()


async def _count_is(pool: asyncpg.Pool, want: int, sql: str) -> bool:
    return bool(await pool.fetchval(sql) == want)


async def _done_rounds(hosts: list[Host], rounds: int) -> bool:
    return min(h.seq for h in hosts) >= rounds


POLICY_CONFIG = """
quotas:
  - name: egress
    metric: net.tx.wan.bytes
    limit: 1 GB
    window: {lifetime: true}
    per: workload
    enforce: [terminate]
    termination: {grace_seconds: 5}
  - name: memory
    metric: mem.alloc.byte_seconds
    limit: 1000 GiB*h
    window: {rolling: 30d}
    enforce: [spawn]
"""


def _subjects_of(partition: int, count: int) -> list[str]:
    found: list[str] = []
    while len(found) < count:
        name = unique("u")
        if partition_of_name(name, PARTITIONS) == partition:
            found.append(name)
    return found


async def test_partitioned_policies_answer_every_spawn_check_and_terminate_once_from_the_owner(
    servers: TestServers, nc: Client, pool: asyncpg.Pool, prefix: str, streams: None,
    ledger: object, inbox: Inbox, tmp_path: Path,
) -> None:  # fmt: skip
    config = tmp_path / "quotas.yaml"
    config.write_text(POLICY_CONFIG)
    instances: list[tuple[PolicyService, SpawnCheckResponder, asyncio.Event, asyncio.Task[None]]]
    instances = []
    connections = []
    try:
        for k in range(PARTITIONS):
            own_nc = await connect(servers.nats_url, f"policy-p{k}")
            connections.append(own_nc)
            source = ConfigSource.load(config)
            service = PolicyService(
                own_nc, pool, source, prefix, sweep_every=0.5, partition=k, partitions=PARTITIONS
            )
            responder = SpawnCheckResponder(own_nc, prefix, service.checker, service.owns)
            await responder.start()
            stop = asyncio.Event()
            instances.append((service, responder, stop, asyncio.create_task(service.run(stop))))
        for service, *_ in instances:
            await wait_until(lambda s=service: _true(s.ready.is_set()), 20, "policies ready")
        assert [s.usage.durable for s, *_ in instances] == ["policy-p0", "policy-p1"]

        # Spawn checks for subjects of both partitions, through the shared queue group.
        owned = {k: _subjects_of(k, 4) for k in range(PARTITIONS)}
        for _ in range(5):
            for subjects in owned.values():
                for subject in subjects:
                    request = SpawnRequest(subject=subject, workload=unique("w"),
                                           resources=Resources(mem_bytes=2**30))  # fmt: skip
                    decision = await spawn(nc, prefix, request)
                    assert decision.allowed and not decision.fail_open, decision
                    assert "memory" in [q.name for q in decision.quotas]
        # Requests reached non-owners and were answered by the owner all the same.
        forwarded = [r.forwarded for _, r, *_ in instances]
        assert all(n > 0 for n in forwarded), forwarded
        for k, (service, *_) in enumerate(instances):
            held = {h.subject for h in service.live.holds.items.values()}
            assert held == set(owned[k])  # only the owner holds a subject's reservations

        # One crossing per partition: each is terminated once, by its owner alone.
        node = Fleet(nc, prefix, unique("n"))
        jobs = {k: unique("job-") for k in range(PARTITIONS)}
        await node.sample(
            datetime.now(UTC),
            *((owned[k][0], jobs[k], "net.tx.wan.bytes", 2 * 10**9) for k in jobs),
        )
        await wait_until(
            lambda: _true(all(len(inbox.terminations(j)) == 1 for j in jobs.values())),
            30, "both workloads terminated",
        )  # fmt: skip
        head = await pool.fetchval("SELECT last_seq FROM ledger_head")

        async def settled() -> bool:
            return all(
                s.live.usage is not None and s.live.usage.last_seq >= head and not s.live.dirty
                for s, *_ in instances
            )

        await wait_until(settled, 30, "both policies to have evaluated the usage")
        for k, (service, *_) in enumerate(instances):
            (command,) = inbox.terminations(jobs[k])
            assert service.live.sent == {command["command_id"]}  # decided here, nowhere else
            assert command["subject"] == owned[k][0]
        assert len(inbox.terminations()) == PARTITIONS
    finally:
        for _, responder, stop, task in instances:
            stop.set()
            await responder.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
        for c in connections:
            await c.close()


async def _true(value: object) -> bool:
    return bool(value)
