"""What `tollgate meter` costs its host: CPU and memory at 1 s sampling with 100 workloads.

Simulates a busy host: `--workloads` sleeping processes, each in cgroups of its own (v2 for
CPU, v1 for memory where the host is hybrid) and each in a network namespace of its own
joined to the host by a veth pair, so the agent keeps two accounting chains per workload
and family (about 3 000 iptables rules) and reads them, every cgroup and the workload spool
once per interval, and publishes one batch per interval to a real NATS JetStream. Then it
runs the real `tollgate meter` as its own process and measures it (its iptables-save
children included) over `--seconds`, against the same agent with no workload. Needs root.

`--modes` also measures the same workloads without namespaces, metered by their cgroups:
`bpf` (pinned cgroup_skb counters, one map read per workload per interval) and `iptables`
(one `-m cgroup --path` chain per workload, read in the same save as the host's).

    .venv/bin/python bench/meter_overhead.py [--workloads 100] [--interval 1] [--seconds 30]
        [--modes netns,bpf,iptables]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import psutil  # type: ignore[import-untyped]
from rich.console import Console
from rich.table import Table

from infra.bus import ensure_streams
from services.meter import cgroups
from services.meter.netrules import parse_save, remove_lines, restore_script
from services.meter.spool import LocalWorkload, register
from tollgate.embedded import EmbeddedNats

console = Console()


@dataclass
class Measured:
    mode: str
    workloads: int
    cpu_percent: float
    cpu_ms_per_tick: float
    rss_mib: float
    rules: int
    ticks: int


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def workloads(count: int, state: Path, tag: str, netns: bool = True) -> Iterator[None]:
    """`count` sleeping processes, each with its cgroups (and with `netns`, a namespace and
    veth pair of its own), registered."""
    procs, groups, names = [], [], []
    try:
        for i in range(count):
            name = f"bench-{tag}-{i}"
            group = cgroups.create(name)
            groups.append(group)
            ns, veth = f"tgbench-{tag}-{i}", f"tgw{tag}{i:03d}"
            if netns:
                sh("ip", "netns", "add", ns)
                names.append((ns, veth))
                sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                sh("ip", "link", "set", veth, "up")
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, "sleep", "3600"] if netns else ["sleep", "3600"],
                    preexec_fn=lambda g=group: [  # type: ignore[misc]
                        (d / "cgroup.procs").write_text(str(os.getpid())) for d in g.dirs
                    ],
                )
            )
            register(
                state,
                LocalWorkload(
                    workload=name,
                    subject=f"user{i % 7}",
                    pid=procs[-1].pid,
                    cgroups=[str(d) for d in group.dirs],
                    veth=veth if netns else None,
                ),
            )
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for group in groups:
            group.remove()
        for ns, veth in names:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def drop_chains(prefix: str) -> None:
    for save, restore in (
        ("iptables-save", "iptables-restore"),
        ("ip6tables-save", "ip6tables-restore"),
    ):
        table = parse_save(sh(save, "-t", "mangle")).get("mangle")
        mine = [c for c in table.chains if c.startswith(prefix)] if table else []
        if table and mine:
            lines = remove_lines(table, mine)
            subprocess.run(
                [restore, "-w", "--noflush"],
                input=restore_script("mangle", lines),
                check=True,
                text=True,
            )


def our_rules(prefix: str) -> int:
    return sum(
        1
        for save in ("iptables-save", "ip6tables-save")
        for line in sh(save, "-t", "mangle").splitlines()
        if line.startswith("-A") and prefix in line
    )


def measure(
    env: dict[str, str], state: Path, prefix: str, count: int, args: argparse.Namespace, mode: str
) -> Measured:
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tollgate.cli",
            "meter",
            "--state-dir",
            str(state),
            "--interval",
            str(args.interval),
            "--chain-prefix",
            prefix,
            "--host",
            f"bench-{prefix}",
            "--cgroup-net",
            mode if mode in ("bpf", "iptables") else "off",
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        proc = psutil.Process(agent.pid)
        time.sleep(args.warmup)  # start-up: imports, chains made for every workload
        before, seq0 = _cpu(proc), _seq(state)
        started = time.monotonic()
        rss = []
        while time.monotonic() - started < args.seconds:
            rss.append(proc.memory_info().rss)
            time.sleep(0.5)
        used, wall, ticks = _cpu(proc) - before, time.monotonic() - started, _seq(state) - seq0
        return Measured(
            mode,
            count,
            100 * used / wall,
            1000 * used / max(ticks, 1),
            max(rss) / 2**20,
            our_rules(prefix),
            ticks,
        )
    finally:
        agent.terminate()
        agent.wait(30)


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def _seq(state: Path) -> int:
    import json

    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((state / "state.json").read_text())["book"]["seq"])
    return 0


def _unpin(name: str) -> None:
    from services.meter.cgroupbpf import ROOT, pins, remove_pins

    where = ROOT / name
    for entry in pins(where):
        if entry == "lan":
            os.unlink(where / entry)
        else:
            remove_pins(where / entry)
    with contextlib.suppress(OSError):
        where.rmdir()


async def streams(url: str, prefix: str) -> None:
    nc = await nats.connect(url)
    await ensure_streams(nc.jetstream(), prefix, duplicate_window=120)
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--modes", default="netns", help="netns, bpf, iptables (comma-separated)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("meter_overhead needs root (iptables chains, network namespaces, cgroups)")
    tag = secrets.token_hex(2)
    results = []
    with tempfile.TemporaryDirectory(prefix="meter-bench-") as tmp:
        server = EmbeddedNats(Path(tmp) / "nats").start()
        try:
            env = {
                **os.environ,
                "TOLLGATE_NATS_URL": server.url,
                "TOLLGATE_PREFIX": "bench",
                "TOLLGATE_LOG_LEVEL": "WARNING",
            }
            asyncio.run(streams(server.url, "bench"))
            runs = [("netns", 0)] + [(m, args.workloads) for m in args.modes.split(",")]
            for n, (mode, count) in enumerate(runs):
                prefix = f"TGB{tag.upper()}{n}"
                state = Path(tmp) / f"state-{n}"
                try:
                    with (
                        console.status(f"{count} workloads ({mode}): setting up and measuring"),
                        workloads(count, state, f"{tag}{n % 10}", netns=mode == "netns"),
                    ):
                        results.append(measure(env, state, prefix, count, args, mode))
                finally:
                    drop_chains(prefix)
                    _unpin(f"meter-{prefix}")
        finally:
            server.stop()
    table = Table(
        title=f"tollgate meter, sampling every {args.interval:g} s for {args.seconds:g} s"
    )
    for column in (
        "network by",
        "workloads",
        "iptables rules",
        "ticks",
        "CPU (% of one core)",
        "CPU per tick (ms)",
        "peak RSS (MiB)",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.mode if r.workloads else "-",
            str(r.workloads),
            str(r.rules),
            str(r.ticks),
            f"{r.cpu_percent:.1f}",
            f"{r.cpu_ms_per_tick:.0f}",
            f"{r.rss_mib:.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
