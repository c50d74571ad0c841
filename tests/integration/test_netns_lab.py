"""A small network lab for the meter's tests, and tests that it cleans up after itself.

Every peer is a network namespace of the test's own, joined to the host (the root
namespace) by a veth pair with addresses from private ranges nothing on the host routes.
Traffic only ever goes to loopback or to these namespaces. Which peer counts as "LAN" and
which as "WAN" is decided by the LAN list the meter is given, never by real addresses.
Servers run inside the peers from this very process: a thread enters the namespace, makes
the listening socket (which stays in that namespace for good) and leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import math
import os
import random
import secrets
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLONE_NEWNET = 0x40000000
PORT = 9000
# TCP/IP header bytes of one packet (IP + TCP with the timestamp option), per family.
HEADERS = {4: 20 + 32, 6: 40 + 32}
# SYN, SYN-ACK, final ACK, FINs and their ACKs, and a few window updates: per connection.
CONTROL_PACKETS = 10
SYN_OPTIONS = 20


def why_not() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces and iptables chains"
    for tool in ("ip", "iptables-save", "ip6tables-save", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install iptables iproute2)"
    probe = f"tglabprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    saved = subprocess.run(["iptables-save", "-t", "mangle"], capture_output=True, text=True)
    if saved.returncode != 0:
        return f"iptables does not work here: {saved.stderr.strip()}"
    return None


needs_lab = pytest.mark.skipif(
    bool(reason := why_not()), reason=f"network lab unavailable: {reason}"
)


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _routed() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for fam in ("-4", "-6"):
        for route in json.loads(sh("ip", "-j", fam, "route", "show", "table", "all") or "[]"):
            with contextlib.suppress(ValueError):  # "default", "multicast" and the like
                nets.append(ipaddress.ip_network(route.get("dst", "default"), strict=False))
    return nets


def free_networks() -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    """A /30 and a /64 that nothing on this host routes (never the --netns pools)."""
    routed = _routed()
    for _ in range(1000):
        a, b, c = random.randint(100, 199), random.randint(0, 255), 4 * random.randint(0, 63)
        v4 = ipaddress.IPv4Network((f"10.{a}.{b}.{c}", 30))
        v6 = ipaddress.IPv6Network((0xFD00 << 112 | random.getrandbits(56) << 64, 64))
        if not any(v4.overlaps(r) for r in routed if r.version == 4) and not any(
            v6.overlaps(r) for r in routed if r.version == 6
        ):
            return v4, v6
    raise RuntimeError("no free private network found for the lab")


@dataclass
class Peer:
    """A namespace joined to the host: host end `veth`, the peer at `ip4`/`ip6`."""

    netns: str
    veth: str
    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network
    received: list[int] = field(default_factory=list)

    @property
    def ip4(self) -> str:
        return str(self.v4.network_address + 2)

    @property
    def ip6(self) -> str:
        return str(self.v6.network_address + 2)

    def ip(self, version: int) -> str:
        return self.ip4 if version == 4 else self.ip6


class Lab:
    """Peers made by one test; `close` removes every one of them."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.peers: list[Peer] = []
        self.servers: list[asyncio.AbstractServer] = []

    def peer(self, ipv6: bool = True) -> Peer:
        n = len(self.peers)
        v4, v6 = free_networks()
        peer = Peer(f"tglab-{self.tag}-{n}", f"tl{self.tag}{n}h", v4, v6)
        self.peers.append(peer)
        inside = f"tl{self.tag}{n}p"
        sh("ip", "netns", "add", peer.netns)
        sh(
            "ip",
            "link",
            "add",
            peer.veth,
            "type",
            "veth",
            "peer",
            "name",
            inside,
            "netns",
            peer.netns,
        )
        if not ipv6:  # a quiet link: no neighbour discovery or MLD to count
            sh("sysctl", "-q", "-w", f"net.ipv6.conf.{peer.veth}.disable_ipv6=1")
            sh(
                "ip",
                "netns",
                "exec",
                peer.netns,
                "sysctl",
                "-q",
                "-w",
                f"net.ipv6.conf.{inside}.disable_ipv6=1",
            )
        sh("ip", "addr", "add", f"{v4.network_address + 1}/30", "dev", peer.veth)
        sh("ip", "link", "set", peer.veth, "up")
        sh("ip", "-n", peer.netns, "link", "set", "lo", "up")
        sh("ip", "-n", peer.netns, "addr", "add", f"{peer.ip4}/30", "dev", inside)
        if ipv6:
            sh("ip", "-6", "addr", "add", f"{v6.network_address + 1}/64", "dev", peer.veth, "nodad")
            sh(
                "ip",
                "-n",
                peer.netns,
                "-6",
                "addr",
                "add",
                f"{peer.ip6}/64",
                "dev",
                inside,
                "nodad",
            )
        sh("ip", "-n", peer.netns, "link", "set", inside, "up")
        return peer

    async def serve(self, peer: Peer) -> None:
        """An exchange server in `peer` on both families: read N bytes, send M back."""

        async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up, down = struct.unpack("!II", await reader.readexactly(8))
            peer.received.append(len(await reader.readexactly(up)))
            writer.write(b"d" * down)
            await writer.drain()
            writer.close()

        for family, address in ((socket.AF_INET, peer.ip4), (socket.AF_INET6, peer.ip6)):
            with contextlib.suppress(OSError):
                sock = listening_socket(peer.netns, family, address)
                self.servers.append(await asyncio.start_server(exchange, sock=sock))

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for peer in self.peers:
            sh("ip", "link", "del", peer.veth, check=False)
            sh("ip", "netns", "del", peer.netns, check=False)


def listening_socket(netns: str, family: int, address: str) -> socket.socket:
    """A TCP socket listening on `address` inside `netns` (made by a thread that enters it)."""
    made: list[socket.socket | BaseException] = []

    def enter_and_listen() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, PORT))
            sock.listen(16)
            sock.setblocking(False)
            made.append(sock)
        except BaseException as exc:  # handed to the caller below
            made.append(exc)

    thread = threading.Thread(target=enter_and_listen)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


@contextlib.asynccontextmanager
async def lab() -> AsyncIterator[Lab]:
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()


@contextlib.contextmanager
def forwarding_restored() -> Iterator[None]:
    """Put the host's forwarding switches back as they were (--netns turns them on)."""
    paths = [Path("/proc/sys/net/ipv4/ip_forward"), Path("/proc/sys/net/ipv6/conf/all/forwarding")]
    before = [p.read_text() for p in paths]
    try:
        yield
    finally:
        for path, value in zip(paths, before, strict=True):
            if path.read_text() != value:
                path.write_text(value)


def overhead_bound(version: int, mtu: int, sent: int, received: int) -> int:
    """Most header bytes one connection can add to what it sends: every data segment it
    sends and an ACK for every one it receives, at full-size segments, plus control packets.
    (With segmentation offload the kernel counts fewer, larger packets: less overhead.)"""
    header = HEADERS[version]
    per_segment = mtu - header
    packets = math.ceil(sent / per_segment) + math.ceil(received / per_segment) + CONTROL_PACKETS
    return packets * header + SYN_OPTIONS


def mangle_chains() -> set[str]:
    out = set()
    for tool in ("iptables-save", "ip6tables-save"):
        for table in ("mangle", "nat", "filter"):
            out |= {
                line.split()[0][1:]
                for line in sh(tool, "-t", table).splitlines()
                if line.startswith(":")
            }
    return out


def leftovers(prefix: str) -> list[str]:
    """Namespaces, links and chains whose names start with `prefix` (there should be none)."""
    names = sh("ip", "netns", "list").split() + [
        link["ifname"] for link in json.loads(sh("ip", "-j", "link", "show"))
    ]
    return sorted({n for n in [*names, *mangle_chains()] if n.lower().startswith(prefix.lower())})


@needs_lab
async def test_the_lab_removes_its_namespaces_and_links() -> None:
    async with lab() as the_lab:
        peer = the_lab.peer()
        await the_lab.serve(peer)
        reader, writer = await asyncio.open_connection(peer.ip4, PORT)
        writer.write(struct.pack("!II", 5, 3) + b"hello")
        assert await reader.read() == b"ddd"
        writer.close()
    assert leftovers(f"tglab-{the_lab.tag}") == []
    assert leftovers(f"tl{the_lab.tag}") == []


def drop_chains(prefix: str) -> None:
    """Remove every mangle chain named `prefix...`, and the jumps into them (both families)."""
    from services.meter.netrules import parse_save, remove_lines, restore_script

    for save, restore in (
        ("iptables-save", "iptables-restore"),
        ("ip6tables-save", "ip6tables-restore"),
    ):
        table = parse_save(sh(save, "-t", "mangle")).get("mangle")
        mine = [c for c in table.chains if c.startswith(prefix)] if table else []
        if table and mine:
            subprocess.run(
                [restore, "-w", "--noflush"],
                check=True,
                text=True,
                input=restore_script("mangle", remove_lines(table, mine)),
            )


def chain_bytes(chain: str) -> int:
    """Bytes counted so far by our chain `chain` in both families, read straight from iptables."""
    from services.meter.netrules import parse_save, read_chain

    counted = 0
    for save in ("iptables-save", "ip6tables-save"):
        table = parse_save(sh(save, "-c", "-t", "mangle")).get("mangle")
        reading = read_chain(table, chain) if table else None
        counted += reading.lan + reading.wan if reading else 0
    return counted
