"""Network bytes per cgroup, with no network namespace: real eBPF, real iptables, real traffic.

Two workloads run side by side in the host's own network namespace, each in a cgroup-v2
directory of its own, and talk UDP to two peers (namespaces of the test's own, one made
"LAN" and one "WAN" by the LAN list) over IPv4 and IPv6 at the same time. Every datagram is
answered by one of a size the sender asks for, one at a time, so what each workload sent
and received is known to the byte, headers included: payload + 8 (UDP) + 20 (IPv4) or 40
(IPv6) per datagram, all below the lab's MTU, so nothing is fragmented. The counters must
equal that exactly, per workload: a byte of the other workload would show.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

import tests.integration.test_run as run_tests
from services.ledger.app import LedgerService
from services.meter.agent import AgentOptions
from services.meter.cgroupbpf import ROOT, pins, remove_pins, unavailable_reason
from services.meter.cgroupnet import Choice
from services.meter.cgroups import Mounts
from services.meter.netfilter import chain_key
from services.meter.netrules import LanList
from services.meter.spool import LocalWorkload, register
from tests.conftest import unique, wait_until
from tests.integration.conftest import total
from tests.integration.test_meter_agent import chain_prefix, epochs, ledger_reaches, running
from tests.integration.test_netns_lab import CLONE_NEWNET, Lab, Peer, lab, needs_lab
from tests.integration.test_run import Runs, final_series
from tests.servers import TestServers

env, runs = run_tests.env, run_tests.runs  # the fixtures `tollgate run` tests use
UDP_PORT = 9100
IP_HEADER = {4: 20, 6: 40}
UDP_HEADER = 8
PHASES = 3  # with the agent, without it (restarting), with the next life of it

CLIENT = """
import json, socket, sys, threading
plan, failed = json.loads(sys.argv[1]), []
PORT, PHASES, TOLD = int(sys.argv[2]), int(sys.argv[3]), len(sys.argv) < 5

def exchange(address, count, up, down):
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(10)
        for _ in range(count):
            s.sendto(down.to_bytes(4, "big") + b"u" * (up - 4), (address, PORT))
            data, _ = s.recvfrom(65536)
            assert len(data) == down, (address, len(data), down)
        s.close()
    except BaseException as exc:
        failed.append(repr(exc))

for phase in range(PHASES):
    if TOLD and sys.stdin.readline().strip() != "go":
        sys.exit("told to stop")
    threads = [threading.Thread(target=exchange, args=p) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        sys.exit(f"exchange failed: {failed}")
    print("done", flush=True)
"""


def why_no_bpf() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if Mounts.here().v2 is None:
        return "no cgroup v2 hierarchy is mounted"
    return unavailable_reason(f"test-probe-{os.getpid()}", LanList.default())


needs_bpf = pytest.mark.skipif(
    bool(no_bpf := why_no_bpf()), reason=f"eBPF cgroup metering unavailable: {no_bpf}"
)


def udp_echo(lab_: Lab, peer: Peer) -> None:
    """A UDP server in `peer` on both families: answers each datagram with as many bytes as
    its first four ask for. Its threads end when the test's lab closes."""
    stop = threading.Event()
    for family, address in ((socket.AF_INET, peer.ip4), (socket.AF_INET6, peer.ip6)):
        sock = _socket_in(peer.netns, family, address)

        def serve(s: socket.socket = sock) -> None:
            with s:
                while not stop.is_set():
                    try:
                        data, source = s.recvfrom(65536)
                    except TimeoutError:
                        continue
                    s.sendto(b"d" * int.from_bytes(data[:4], "big"), source)

        threading.Thread(target=serve, daemon=True).start()
    lab_.servers.append(_Stopper(stop))  # type: ignore[arg-type]


@dataclass
class _Stopper:
    stop: threading.Event

    def close(self) -> None:
        self.stop.set()


def _socket_in(netns: str, family: int, address: str) -> socket.socket:
    made: list[socket.socket | BaseException] = []

    def enter_and_bind() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((address, UDP_PORT))
            sock.settimeout(0.2)
            made.append(sock)
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=enter_and_bind)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


@contextlib.contextmanager
def cgroups_made(*names: str) -> Iterator[list[Path]]:
    v2 = Mounts.here().v2
    assert v2 is not None
    parent = v2 / f"tollgate-test-{secrets.token_hex(3)}"
    dirs = [parent / n for n in names]
    for d in dirs:
        d.mkdir(parents=True)
    try:
        yield dirs
    finally:
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
        for d in [*dirs, parent]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    threading.Event().wait(0.1)


@contextlib.contextmanager
def pins_removed(name: str) -> Iterator[None]:
    try:
        yield
    finally:
        where = ROOT / name
        for entry in pins(where):
            if entry == "lan":
                os.unlink(where / entry)
            else:
                remove_pins(where / entry)
        with contextlib.suppress(OSError):
            where.rmdir()


@dataclass
class Workload:
    """One test workload: a client in its own cgroup, told phase by phase to exchange."""

    subject: str
    workload: str
    cgroup: Path
    plan: list[tuple[str, str, int, int, int, int]]  # (kind, address, version, count, up, down)
    proc: subprocess.Popen[str] | None = None
    phases: int = PHASES

    def start(self) -> None:
        procs = str(self.cgroup / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        args = json.dumps([[a, c, u, d] for _, a, _, c, u, d in self.plan])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, args, str(UDP_PORT), str(self.phases)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=join,
        )

    async def phase(self) -> None:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)
        assert line == "done\n", self.proc.stderr.read() if self.proc.stderr else line

    async def end(self) -> None:
        assert self.proc is not None
        await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 30)
        assert self.proc.returncode == 0, self.proc.stderr.read() if self.proc.stderr else ""

    def expected(self, direction: str, kind: str, phases: int = PHASES) -> int:
        """Bytes of whole IP packets this workload sends (tx) or receives (rx) of `kind`."""
        return phases * sum(
            count * ((up if direction == "tx" else down) + UDP_HEADER + IP_HEADER[version])
            for k, _, version, count, up, down in self.plan
            if k == kind
        )


def plans(lan: Peer, wan: Peer) -> list[list[tuple[str, str, int, int, int, int]]]:
    """Different sizes and counts for each workload, to LAN and WAN over both families."""
    return [
        [
            ("lan", lan.ip4, 4, 30, 300, 700),
            ("wan", wan.ip4, 4, 20, 1000, 100),
            ("lan", lan.ip6, 6, 25, 500, 1200),
            ("wan", wan.ip6, 6, 15, 200, 900),
        ],
        [
            ("lan", lan.ip4, 4, 11, 1300, 60),
            ("wan", wan.ip4, 4, 27, 80, 1100),
            ("lan", lan.ip6, 6, 19, 640, 320),
            ("wan", wan.ip6, 6, 23, 1400, 1400),
        ],
    ]


@contextlib.asynccontextmanager
async def two_workloads() -> AsyncIterator[tuple[Lab, list[Workload], str]]:
    with chain_prefix() as chains, pins_removed(f"meter-{chains}"):
        async with lab() as the_lab:
            lan, wan = the_lab.peer(), the_lab.peer()
            udp_echo(the_lab, lan)
            udp_echo(the_lab, wan)
            with cgroups_made("a", "b") as dirs:
                workloads = [
                    Workload(unique("alice"), unique("wa"), dirs[0], plans(lan, wan)[0]),
                    Workload(unique("bob"), unique("wb"), dirs[1], plans(lan, wan)[1]),
                ]
                try:
                    yield the_lab, workloads, chains
                finally:
                    for w in workloads:
                        if w.proc is not None and w.proc.poll() is None:
                            w.proc.kill()
                            w.proc.wait()


def agent_options(
    url: str, prefix: str, state: Path, lab_: Lab, chains: str, mechanism: Choice
) -> AgentOptions:
    lan = lab_.peers[0]
    return AgentOptions(
        nats_url=url,
        prefix=prefix,
        host=unique("h"),
        state_dir=state,
        interval=0.1,
        lan=LanList.parse([str(lan.v4), str(lan.v6)]),
        chain_prefix=chains,
        host_network=False,
        cgroup_net=mechanism,
    )


async def exchange_across_a_restart(
    servers: TestServers, prefix: str, pool: asyncpg.Pool, tmp_path: Path, mechanism: Choice
) -> tuple[list[Workload], str, list[str]]:
    """Both workloads exchange in three phases: with the agent, while it is down, and with
    its next life; then they exit, and the ledger has their final batches."""
    async with two_workloads() as (the_lab, workloads, chains):
        options = agent_options(
            servers.nats_url, prefix, tmp_path / "state", the_lab, chains, mechanism
        )
        for w in workloads:
            register(
                options.state_dir,
                LocalWorkload(workload=w.workload, subject=w.subject, cgroups=[str(w.cgroup)]),
            )
        async with running(options) as first:
            assert first.cgroup_net.mechanism == mechanism
            epoch = first.state.book.epoch

            async def attached() -> bool:
                return len(first.cgroup_dirs) == 2 and first.state.book.seq >= 3

            await wait_until(attached, what="both cgroups metered")
            for w in workloads:
                w.start()
            await asyncio.gather(*(w.phase() for w in workloads))
            tx = workloads[0].expected("tx", "lan", phases=1)
            await ledger_reaches(pool, workloads[0].subject, "net.tx.lan.bytes", tx)
        await asyncio.gather(*(w.phase() for w in workloads))  # no agent: the kernel counts
        async with running(options) as second:
            assert second.state.book.epoch == epoch, "a restart continues the epoch"
            await asyncio.gather(*(w.phase() for w in workloads))
            await asyncio.gather(*(w.end() for w in workloads))

            async def finished() -> bool:
                # The agent removes a workload's file once its final batch is out.
                return not list((options.state_dir / "workloads").glob("*.json"))

            await wait_until(finished, what="both workloads finished (their cgroups empty)")
        host = options.host
    return workloads, host, [epoch]


async def counted(pool: asyncpg.Pool, w: Workload, metric: str) -> int:
    return int(await total(pool, w.subject, metric))


@needs_lab
@needs_bpf
async def test_two_cgroups_in_one_namespace_are_charged_their_own_bytes_to_the_byte_across_a_restart(  # noqa: E501
    servers: TestServers, prefix: str, pool: asyncpg.Pool, ledger: LedgerService, tmp_path: Path
) -> None:
    workloads, host, epochs_seen = await exchange_across_a_restart(
        servers, prefix, pool, tmp_path, "bpf"
    )
    for w in workloads:
        for direction in ("tx", "rx"):
            for kind in ("lan", "wan"):
                metric = f"net.{direction}.{kind}.bytes"
                wanted = w.expected(direction, kind)
                await ledger_reaches(pool, w.subject, metric, wanted)
                got = await counted(pool, w, metric)
                print(f"{w.workload} {metric}: counted {got}, payload+headers {wanted}")
                assert got == wanted, (w.workload, metric)
    assert await epochs(pool, host) == epochs_seen


@needs_lab
async def test_the_iptables_cgroup_match_charges_each_cgroup_what_it_sends_and_nothing_it_receives(
    servers: TestServers, prefix: str, pool: asyncpg.Pool, ledger: LedgerService, tmp_path: Path
) -> None:
    workloads, host, epochs_seen = await exchange_across_a_restart(
        servers, prefix, pool, tmp_path, "iptables"
    )
    for w in workloads:
        for kind in ("lan", "wan"):
            metric = f"net.tx.{kind}.bytes"
            wanted = w.expected("tx", kind)
            await ledger_reaches(pool, w.subject, metric, wanted)
            got = await counted(pool, w, metric)
            print(f"{w.workload} {metric}: counted {got}, payload+headers {wanted}")
            assert got == wanted, (w.workload, metric)
            # Received bytes are not told apart by this mechanism: no series, not zeros.
            rows = await pool.fetchval(
                "SELECT count(*) FROM usage_events WHERE subject = $1 AND metric = $2",
                w.subject,
                f"net.rx.{kind}.bytes",
            )
            assert rows == 0
    assert await epochs(pool, host) == epochs_seen


@needs_lab
@needs_bpf
async def test_tollgate_run_without_a_netns_is_charged_its_own_bytes_from_its_cgroup(
    runs: Runs, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    alice, workload = unique("alice"), unique("w")
    async with two_workloads() as (the_lab, workloads, _):
        lan = the_lab.peers[0]
        w = workloads[0]
        plan = json.dumps([[a, c, u, d] for _, a, _, c, u, d in w.plan])
        ran = await runs.run(
            "-s", alice, "--workload", workload, "--host", unique("h"),
            "--lan-cidr", f"{lan.v4},{lan.v6}", "--interval", "0.2",
            "--", sys.executable, "-c", CLIENT, plan, str(UDP_PORT), "1", "untold",
        )  # fmt: skip
        assert ran.status == 0, ran.stderr
        assert ran.stdout == b"done\n"
    await final_series(pool, workload)
    for direction in ("tx", "rx"):
        for kind in ("lan", "wan"):
            metric = f"net.{direction}.{kind}.bytes"
            wanted = w.expected(direction, kind, phases=1)
            got = int(await total(pool, alice, metric))
            print(f"tollgate run {metric}: counted {got}, payload+headers {wanted}")
            assert got == wanted, metric
    pid = runs.started[-1].pid
    assert not [n for n in pins(ROOT) if n.startswith(f"run-{pid}-")], "a run removes its pins"


@needs_lab
@needs_bpf
async def test_a_pinned_map_removed_by_hand_starts_a_new_epoch_and_nothing_counts_twice(
    servers: TestServers, prefix: str, pool: asyncpg.Pool, ledger: LedgerService, tmp_path: Path
) -> None:
    async with two_workloads() as (the_lab, workloads, chains):
        options = agent_options(
            servers.nats_url, prefix, tmp_path / "state", the_lab, chains, "bpf"
        )
        for w in workloads:
            register(
                options.state_dir,
                LocalWorkload(workload=w.workload, subject=w.subject, cgroups=[str(w.cgroup)]),
            )
        async with running(options) as agent:
            before = agent.state.book.epoch

            async def attached() -> bool:
                return len(agent.cgroup_dirs) == 2 and agent.state.book.seq >= 3

            await wait_until(attached, what="both cgroups metered")
            for w in workloads:
                w.start()
            await asyncio.gather(*(w.phase() for w in workloads))
            a = workloads[0]
            # What an administrator might do: remove workload a's pinned map, here right
            # after its traffic, so the agent's last reading of it is almost surely older
            # than its last packets: those are only charged if the map we still hold is
            # read once more as it is replaced.
            owner = ROOT / f"meter-{chains}"
            key = chain_key(a.workload)
            (counts,) = [owner / n / "counts" for n in pins(owner) if n.startswith(f"{key}_")]
            os.unlink(counts)

            async def new_epoch() -> bool:
                return agent.state.book.epoch != before

            await wait_until(new_epoch, what="a new epoch after the map was removed")
            await asyncio.gather(*(w.phase() for w in workloads))
            await asyncio.gather(*(w.phase() for w in workloads))
            await asyncio.gather(*(w.end() for w in workloads))

            async def finished() -> bool:
                return not list((options.state_dir / "workloads").glob("*.json"))

            await wait_until(finished, what="both workloads finished")
    for w in workloads:
        for direction in ("tx", "rx"):
            for kind in ("lan", "wan"):
                metric = f"net.{direction}.{kind}.bytes"
                wanted = w.expected(direction, kind)
                await ledger_reaches(pool, w.subject, metric, wanted)
                assert await counted(pool, w, metric) == wanted, (w.workload, metric)
    assert sorted(await epochs(pool, options.host)) == sorted([before, agent.state.book.epoch])


@needs_lab
def test_without_the_bpf_object_the_meter_falls_back_to_iptables_and_says_why_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import services.meter.cgroupbpf as cgroupbpf
    from services.meter.cgroupnet import CgroupNet

    monkeypatch.setattr(cgroupbpf, "OBJECT", tmp_path / "missing.bpf.o")
    net = CgroupNet(f"test-{os.getpid()}", LanList.default(), "TGF", "auto")
    said = net.start()
    assert net.mechanism == "iptables"
    assert said.startswith("network by cgroup: iptables cgroup match, egress only")
    assert "missing.bpf.o is not built; `make install` builds it" in said
    assert "\n" not in said
    forced = CgroupNet(f"test-{os.getpid()}", LanList.default(), "TGF", "bpf")
    assert forced.start().startswith("network by cgroup: none (eBPF unavailable:")
    assert forced.mechanism == "none"


@needs_lab
@needs_bpf
async def test_what_a_cgroup_sent_before_it_ended_while_no_agent_ran_is_still_charged(
    servers: TestServers, prefix: str, pool: asyncpg.Pool, ledger: LedgerService, tmp_path: Path
) -> None:
    async with two_workloads() as (the_lab, workloads, chains):
        options = agent_options(servers.nats_url, prefix, tmp_path / "s", the_lab, chains, "bpf")
        for w in workloads:
            w.phases = 2
            register(
                options.state_dir,
                LocalWorkload(workload=w.workload, subject=w.subject, cgroups=[str(w.cgroup)]),
            )
        async with running(options) as first:

            async def attached() -> bool:
                return len(first.cgroup_dirs) == 2 and first.state.book.seq >= 3

            await wait_until(attached, what="both cgroups metered")
            for w in workloads:
                w.start()
                assert w.proc is not None
                record = LocalWorkload(
                    workload=w.workload, subject=w.subject, cgroups=[str(w.cgroup)], pid=w.proc.pid
                )
                register(options.state_dir, record)  # its launcher learnt its pid
            await asyncio.gather(*(w.phase() for w in workloads))
        # No agent: the workloads exchange once more, end, and their cgroups are removed.
        await asyncio.gather(*(w.phase() for w in workloads))
        await asyncio.gather(*(w.end() for w in workloads))
        for w in workloads:
            w.cgroup.rmdir()
        async with running(options) as second:

            async def finished() -> bool:
                return not list((options.state_dir / "workloads").glob("*.json"))

            await wait_until(finished, what="both workloads finished")
            assert not second.cgroup_net.bpf or not second.cgroup_net.bpf.pinned_keys()
    for w in workloads:
        for direction in ("tx", "rx"):
            for kind in ("lan", "wan"):
                metric = f"net.{direction}.{kind}.bytes"
                wanted = w.expected(direction, kind, phases=2)
                await ledger_reaches(pool, w.subject, metric, wanted)
                assert await counted(pool, w, metric) == wanted, (w.workload, metric)
