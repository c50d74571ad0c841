"""What metering a cgroup's network bytes costs each packet: eBPF against the iptables chains.

A sender in a cgroup-v2 directory of its own pushes traffic through a veth pair into a
network namespace made here (nothing else is ever addressed): small UDP datagrams (the
per-packet cost: CPU time of the sending process per datagram) and a TCP stream of N MB
(throughput; segmentation offload makes few, large packets, and the ACKs coming back pass
the ingress program). Measured with nothing attached, with our cgroup_skb programs, and
with the iptables cgroup match as the meter lays it out (a dispatch chain from OUTPUT with
one `-m cgroup --path` jump per metered workload, ours last: 1 and 100 workloads). Each
figure is the best of `--repeat` runs. Needs root.

    .venv/bin/python bench/cgroup_net_cost.py [--packets 200000] [--megabytes 400]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.meter.cgroupbpf import CgroupBpf
from services.meter.cgroupnet import CgroupNet, CgroupTarget
from services.meter.cgroups import Mounts
from services.meter.netrules import LanList

console = Console()
PORT = 9300

SENDER = """
import json, socket, sys, time
mode, address, amount, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0, c0 = time.perf_counter(), time.process_time()
if mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload, target = b"x" * 18, (address, port)
    for _ in range(amount):
        s.sendto(payload, target)
else:
    s = socket.create_connection((address, port))
    chunk = b"x" * 65536
    for _ in range(amount * 16):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
s.close()
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}))
"""

SINK = """
import socket, sys, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], int(sys.argv[2])))
def drain_udp():
    while True:
        u.recv(65536)
threading.Thread(target=drain_udp, daemon=True).start()
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((sys.argv[1], int(sys.argv[2]))); t.listen(4)
print("ready", flush=True)
while True:
    c, _ = t.accept()
    while c.recv(1 << 20):
        pass
    c.close()
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def peer(tag: str) -> Iterator[str]:
    ns, host_end = f"tgcost-{tag}", f"tgc{tag}h"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", "10.254.77.1/30", "dev", host_end)
        sh("ip", "link", "set", host_end, "up")
        sh("ip", "-n", ns, "addr", "add", "10.254.77.2/30", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sink = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SINK, "10.254.77.2", str(PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sink.stdout is not None and sink.stdout.readline() == "ready\n"
        try:
            yield "10.254.77.2"
        finally:
            sink.kill()
            sink.wait()
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_in(cgroup: Path, mode: str, address: str, amount: int) -> dict[str, float]:
    def join() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run(
        [sys.executable, "-c", SENDER, mode, address, str(amount), str(PORT)],
        preexec_fn=join,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def best(cgroup: Path, address: str, args: argparse.Namespace) -> tuple[float, float]:
    """(ns of sender CPU per UDP datagram, MB/s of the TCP stream), best of --repeat."""
    udp = min(run_in(cgroup, "udp", address, args.packets)["cpu"] for _ in range(args.repeat))
    tcp = min(run_in(cgroup, "tcp", address, args.megabytes)["wall"] for _ in range(args.repeat))
    return udp / args.packets * 1e9, args.megabytes / tcp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--megabytes", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("cgroup_net_cost needs root (network namespace, cgroups, BPF, iptables)")
    v2 = Mounts.here().v2
    if v2 is None:
        sys.exit("cgroup_net_cost needs a cgroup v2 hierarchy")
    tag = secrets.token_hex(2)
    parent = v2 / f"tollgate-cost-{tag}"
    groups = [parent / f"w{i:03d}" for i in range(100)]
    for g in groups:
        g.mkdir(parents=True)
    ours = groups[-1]
    lan = LanList.parse(["10.254.77.0/30"])
    rows: list[tuple[str, float, float]] = []
    try:
        with peer(tag) as address:
            rows.append(("nothing attached", *best(ours, address, args)))
            bpf = CgroupBpf(f"cost-{tag}", lan)
            bpf.probe()
            try:
                bpf.attach("OURS", ours)
                rows.append(
                    ("eBPF cgroup_skb (any number of workloads)", *best(ours, address, args))
                )
                reading = bpf.read("OURS")
                assert reading is not None and reading.bytes[("tx", "ipv4", "lan")] > 0
            finally:
                bpf.close(remove=True)
            for count in (1, 100):
                prefix = f"TGK{tag.upper()}{count}"
                net = CgroupNet(f"cost-{tag}", lan, prefix, "iptables")
                net.start()
                targets = [
                    CgroupTarget("s", f"w{i}", g, net.owner(f"w{i}", g))
                    for i, g in enumerate(groups[-count:])
                ]
                try:
                    net.sync(targets)
                    label = f"iptables cgroup match, {count} workload{'s' if count > 1 else ''}"
                    rows.append((label, *best(ours, address, args)))
                finally:
                    assert net.accounting is not None
                    names = [c.name for t in targets for c in t.owner.chains]
                    net.accounting.remove_named([*names, net.dispatch])
    finally:
        for g in [*groups, parent]:
            with contextlib.suppress(OSError):
                g.rmdir()
    base_ns, base_mbs = rows[0][1], rows[0][2]
    table = Table(title=f"cost per packet: {args.packets} UDP datagrams, {args.megabytes} MB TCP")
    for column in ("mechanism", "sender CPU/datagram (ns)", "added (ns)", "TCP MB/s", "vs none"):
        table.add_column(column, justify="right")
    for label, ns, mbs in rows:
        table.add_row(
            label,
            f"{ns:.0f}",
            f"{ns - base_ns:+.0f}",
            f"{mbs:.0f}",
            f"{100 * (mbs / base_mbs - 1):+.1f}%",
        )
    console.print(table)


if __name__ == "__main__":
    main()
