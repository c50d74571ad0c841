"""`tollgate meter` counting a host's network bytes across its own restarts, a chain deleted by
hand and a NATS outage: against real iptables, real traffic, NATS JetStream and the ledger.

The host's traffic is counted on one lab interface only (`host_interfaces`), so nothing else
the machine does can reach the counters; that interface carries IPv4 alone, so no neighbour
discovery adds bytes of its own. One connection costs at most `overhead_bound` header bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.client import Client

from contracts._base import parse_json
from contracts.samples import CounterBatch, samples_stream, samples_subject
from infra.bus import ensure_streams
from services.ledger.app import LedgerService
from services.meter.agent import AgentOptions, MeterAgent
from services.meter.book import Observation
from services.meter.gpu import GpuProvider
from services.meter.netfilter import Accounting, host_owner
from services.meter.netrules import LanList, parse_save
from services.meter.publisher import Message
from services.meter.spool import LocalWorkload, register
from tests.conftest import unique, wait_until
from tests.integration.conftest import total
from tests.integration.test_netns_lab import (
    PORT,
    Peer,
    chain_bytes,
    drop_chains,
    lab,
    needs_lab,
    overhead_bound,
    sh,
)
from tests.servers import TestServers
from tollgate.embedded import EmbeddedNats

MTU = 1500  # the lab's veths


@contextlib.asynccontextmanager
async def running(
    options: AgentOptions, gpus: GpuProvider | None = None
) -> AsyncIterator[MeterAgent]:
    """An agent metering in the background, once it has taken its first reading."""
    agent = MeterAgent(options, gpus=gpus)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))

    async def first_tick() -> bool:
        assert not task.done(), task.exception()
        return agent.state.book.seq >= 1

    try:
        await wait_until(first_tick, timeout=20, what="the agent's first reading")
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


@contextlib.contextmanager
def chain_prefix() -> Iterator[str]:
    prefix = f"TGT{secrets.token_hex(3).upper()}"
    try:
        yield prefix
    finally:
        drop_chains(prefix)


def host_options(url: str, prefix: str, state: Path, peer: Peer, chains: str) -> AgentOptions:
    return AgentOptions(
        nats_url=url,
        prefix=prefix,
        host=unique("h"),
        state_dir=state,
        interval=0.1,
        lan=LanList.parse([str(peer.v4), str(peer.v6)]),
        chain_prefix=chains,
        host_interfaces=(peer.veth,),
    )


async def connect(
    peer: Peer, up: int, version: int = 4
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(peer.ip(version), PORT)
    writer.write(struct.pack("!II", up, 0))
    return reader, writer


async def exchange(peer: Peer, up: int, version: int = 4) -> None:
    reader, writer = await connect(peer, up, version)
    writer.write(b"u" * up)
    await reader.read()  # the peer closes once it has read everything
    writer.close()


async def ledger_reaches(pool: asyncpg.Pool, subject: str, metric: str, wanted: int) -> None:
    async def reached() -> bool:
        return await total(pool, subject, metric) >= wanted

    try:
        await wait_until(reached, timeout=20, what=f"{wanted} bytes of {metric} in the ledger")
    except AssertionError as exc:
        has = await total(pool, subject, metric)
        raise AssertionError(f"{exc} (it has {has} for {subject})") from None


async def epochs(pool: asyncpg.Pool, host: str) -> list[str]:
    rows = await pool.fetch("SELECT DISTINCT epoch FROM series WHERE host = $1", host)
    return [r["epoch"] for r in rows]


@needs_lab
async def test_an_agent_restart_mid_transfer_loses_no_byte(
    servers: TestServers, prefix: str, pool: asyncpg.Pool, ledger: LedgerService, tmp_path: Path
) -> None:
    parts = (400_000, 300_000, 200_000)  # before, during and after the agent is down
    with chain_prefix() as chains:
        async with lab() as the_lab:
            peer = the_lab.peer(ipv6=False)
            await the_lab.serve(peer)
            options = host_options(servers.nats_url, prefix, tmp_path / "state", peer, chains)
            host, metric = options.host, "net.tx.lan.bytes"
            reader, writer = await connect(peer, sum(parts))  # one connection throughout
            async with running(options) as first:
                epoch = first.state.book.epoch
                writer.write(b"u" * parts[0])
                await ledger_reaches(pool, host, metric, parts[0])

            writer.write(b"u" * parts[1])  # no agent: the kernel counts on

            async def counted_meanwhile() -> bool:
                return chain_bytes(f"{chains}-OUT") >= parts[0] + parts[1]

            await wait_until(counted_meanwhile, what="the kernel counting without the agent")
            async with running(options) as second:
                assert second.state.book.epoch == epoch, "a restart continues the epoch"
                writer.write(b"u" * parts[2])
                await reader.read()
                writer.close()
                sent = sum(parts) + 8
                await ledger_reaches(pool, host, metric, sent)
                charged = await total(pool, host, metric)
    print(f"sent {sent}, charged {charged} (+{charged - sent})")
    assert sent <= charged <= sent + overhead_bound(4, MTU, sent, 0)
    assert await epochs(pool, host) == [epoch]


@needs_lab
async def test_a_chain_deleted_by_hand_starts_a_new_epoch_and_nothing_counts_twice(
    servers: TestServers, prefix: str, pool: asyncpg.Pool, ledger: LedgerService, tmp_path: Path
) -> None:
    # (IPv4, IPv6) bytes before and after the IPv4 chain is deleted; the IPv6 one lives on.
    first, second = (300_000, 400_000), (500_000, 200_000)
    with chain_prefix() as chains:
        async with lab() as the_lab:
            peer = the_lab.peer()
            await the_lab.serve(peer)
            options = host_options(servers.nats_url, prefix, tmp_path / "state", peer, chains)
            host, metric, out = options.host, "net.tx.lan.bytes", f"{chains}-OUT"
            async with running(options) as agent:
                before = agent.state.book.epoch
                for version, part in zip((4, 6), first, strict=True):
                    await exchange(peer, part, version)
                await ledger_reaches(pool, host, metric, sum(first) + 16)
                # What an administrator might do: flush and delete the IPv4 chain.
                sh("iptables", "-t", "mangle", "-D", "OUTPUT", "-o", peer.veth, "-j", out)
                sh("iptables", "-t", "mangle", "-F", out)
                sh("iptables", "-t", "mangle", "-X", out)

                async def new_epoch() -> bool:
                    return agent.state.book.epoch != before

                await wait_until(new_epoch, what="a new epoch after the chain was deleted")
                for version, part in zip((4, 6), second, strict=True):
                    await exchange(peer, part, version)
                sent = sum(first) + sum(second) + 32
                await ledger_reaches(pool, host, metric, sent)
                charged = await total(pool, host, metric)
    parts = zip((4, 6, 4, 6), first + second, strict=True)
    bound = sum(overhead_bound(v, MTU, p + 8, 0) for v, p in parts)
    # Counting the IPv6 chain's first 400 000 bytes again in the new epoch would exceed it.
    print(f"sent {sent}, charged {charged} (+{charged - sent}, bound +{bound})")
    assert sent <= charged <= sent + bound
    assert sorted(await epochs(pool, host)) == sorted([before, agent.state.book.epoch])
    resets = await pool.fetchval(
        "SELECT count(*) FROM usage_events WHERE host = $1 AND reset", host
    )
    assert resets == 0, "a new epoch, not a counter reset inside one"


@needs_lab
async def test_bytes_counted_while_nats_is_down_reach_the_ledger_exactly(
    prefix: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    nc: Client | None = None
    stop_ledger = asyncio.Event()
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        await ensure_streams(nc.jetstream(), prefix, duplicate_window=120)
        ledger = LedgerService(nc, pool, prefix=prefix, batch=500, fetch_timeout=0.2)
        await ledger.subscribe()
        ledger_task = asyncio.create_task(ledger.run(stop_ledger))
        with chain_prefix() as chains:
            async with lab() as the_lab:
                peer = the_lab.peer(ipv6=False)
                await the_lab.serve(peer)
                options = host_options(server.url, prefix, tmp_path / "state", peer, chains)
                host = options.host
                async with running(options) as agent:
                    await exchange(peer, 200_000)
                    await ledger_reaches(pool, host, "net.tx.lan.bytes", 200_008)
                    server.stop()
                    await exchange(peer, 700_000)
                    seq = agent.state.book.seq

                    async def sampled_during_outage() -> bool:
                        return agent.state.book.seq >= seq + 3

                    await wait_until(sampled_during_outage, what="readings while NATS is down")
                    server.start()
                    kernel = {
                        "net.tx.lan.bytes": chain_bytes(f"{chains}-OUT"),
                        "net.rx.lan.bytes": chain_bytes(f"{chains}-IN"),
                    }

                    async def exact() -> bool:
                        return all([await total(pool, host, m) == v for m, v in kernel.items()])

                    await wait_until(
                        exact, what="the ledger to hold exactly what the kernel counted"
                    )
        print(f"kernel counted {kernel}; the ledger holds the same")
        assert kernel["net.tx.lan.bytes"] >= 900_016
        stop_ledger.set()
        await asyncio.wait_for(ledger_task, 10)
    finally:
        stop_ledger.set()
        if nc is not None:
            await nc.close()
        server.stop()


def test_the_agent_refuses_nothing_when_iptables_is_off(tmp_path: Path) -> None:
    # The collectors are optional one by one: without iptables the agent still starts.
    agent = MeterAgent(AgentOptions("nats://127.0.0.1:1", "t", "h", tmp_path, iptables=False))
    assert agent.accounting is None


pytestmark = pytest.mark.timeout(120)


def test_after_a_reboot_the_agent_starts_a_new_epoch_and_keeps_what_it_owes(
    tmp_path: Path,
) -> None:
    options = AgentOptions("nats://127.0.0.1:1", "t", unique("h"), tmp_path, iptables=False)
    first = MeterAgent(options)
    first.state.book.batch(Observation({}), datetime.now(UTC))
    first.state.chains = {"ipv4": {"TOLLGATE-IN": "abc"}}
    first.state.outbox = [Message("t.v1.samples.h", b"{}", "h:e:1")]
    first.state.save(tmp_path)
    again = MeterAgent(options)
    assert (again.state.book.epoch, again.state.book.seq) == (first.state.book.epoch, 1)
    assert again.state.chains == first.state.chains
    state = json.loads((tmp_path / "state.json").read_text())
    state["boot_id"] = "a-boot-before-this-one"
    (tmp_path / "state.json").write_text(json.dumps(state))
    rebooted = MeterAgent(options)
    assert rebooted.state.book.epoch != first.state.book.epoch
    assert (rebooted.state.book.seq, rebooted.state.chains) == (0, {})
    assert rebooted.state.outbox == first.state.outbox  # still owed to NATS


async def test_tollgate_meter_as_a_process_publishes_and_stops_cleanly_on_sigterm(
    servers: TestServers, nc: Client, prefix: str, streams: None, tmp_path: Path
) -> None:
    host, state = unique("h"), tmp_path / "state"
    register(state, LocalWorkload(workload=unique("w"), subject=unique("alice"), pid=os.getpid()))
    env = {**os.environ, "TOLLGATE_NATS_URL": servers.nats_url, "TOLLGATE_PREFIX": prefix}
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tollgate.cli", "meter", "--host", host, "--state-dir", str(state),
        "--interval", "0.2", "--no-iptables", "--no-gpu",
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        async def published() -> bool:
            with contextlib.suppress(nats.errors.Error):
                msg = await nc.jetstream().get_last_msg(
                    samples_stream(prefix), samples_subject(host, prefix)
                )
                return CounterBatch.model_validate(parse_json(msg.data or b"")).seq >= 3
            return False

        await wait_until(published, what="three batches from `tollgate meter`")
        agent.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(agent.communicate(), 20)
    finally:
        if agent.returncode is None:
            agent.kill()
    assert agent.returncode == 0, err
    assert b"metering " + host.encode() in err
    saved = json.loads((state / "state.json").read_text())
    assert saved["book"]["seq"] >= 3 and saved["outbox"] == []


@needs_lab
def test_jumps_to_interfaces_no_longer_metered_are_removed_and_counters_kept() -> None:
    with chain_prefix() as chains:
        accounting = Accounting(LanList.default())
        accounting.probe()
        first = accounting.sync([host_owner(chains, ("tgtesta",))])
        again = accounting.sync([host_owner(chains, ("tgtestb",))])
        inputs = [r.text for r in parse_save(sh("iptables-save", "-t", "mangle"))["mangle"]
                  .rules_of("INPUT") if chains in r.text]  # fmt: skip
    assert inputs == [f"-i tgtestb -j {chains}-IN"]
    assert (
        first.readings["ipv4"][f"{chains}-IN"].nonce == again.readings["ipv4"][f"{chains}-IN"].nonce
    )
