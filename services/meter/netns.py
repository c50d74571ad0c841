"""`tollgate run --netns`: a network namespace of the workload's own, NATed to the host.

Layout (as in the OSG note): namespace `tollgate-<id>-<pid>` holds `eth0`, the workload end
of a veth pair whose host end is `tgw<ID>`. Each end gets an address from a free slot (an
IPv4 /30 and an IPv6 /64, see `addresses`); the namespace routes everything to the host,
which forwards it and MASQUERADEs it behind its own addresses. Chains `TGR<ID>-NAT` (nat)
and `TGR<ID>-ACC` (filter: accept what the workload sends and what answers it) carry that;
the accounting chains are `TGR<ID>-TX/-RX` in mangle. Everything is removed when the
workload ends, after errors too; a run that was killed leaves it behind, and the next
`--netns` run removes it (its pid is in the namespace's name).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .addresses import Pools, Slot, pick_slot
from .netfilter import NetfilterError, Owner, Tool
from .netrules import (
    FAMILIES,
    WORKLOAD_VETH_PREFIX,
    AccountChain,
    Hook,
    remove_lines,
    restore_script,
)
from .netrules import parse_save as parse

log = logging.getLogger("tollgate.meter")
LOCK = Path("/run/tollgate/netns.lock")
_NAME = re.compile(r"^tollgate-([0-9a-f]{8})-(\d+)$")
_CHAIN = re.compile(r"^TGR([0-9A-F]{8})-[A-Z]+$")


class SandboxError(Exception):
    """The namespace could not be set up; the message says what failed and what to check."""


@dataclass
class Sandbox:
    """One workload's namespace, veth pair, NAT and accounting hooks."""

    ident: str = field(default_factory=lambda: secrets.token_hex(4))
    pools: Pools = field(default_factory=Pools)
    slot: Slot | None = None
    ipv6: bool = True

    @property
    def name(self) -> str:
        return f"tollgate-{self.ident}-{os.getpid()}"

    @property
    def veth(self) -> str:
        return f"{WORKLOAD_VETH_PREFIX}{self.ident}"

    @property
    def chain_prefix(self) -> str:
        return f"TGR{self.ident.upper()}"

    def owner(self, workload: str) -> Owner:
        """The accounting chains of this workload's traffic, hooked on the host end."""
        p = self.chain_prefix
        tx, rx = AccountChain(f"{p}-TX", "tx"), AccountChain(f"{p}-RX", "rx")
        hooks = (
            Hook("FORWARD", tx.name, ("-i", self.veth), first=True),
            Hook("FORWARD", rx.name, ("-o", self.veth), first=True),
        )
        return Owner(workload, tx, rx, hooks)

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def create(self) -> None:
        """Make everything; on failure remove what was made and raise SandboxError."""
        if os.geteuid() != 0:
            raise SandboxError(
                "--netns needs root (it makes a network namespace, a veth pair and iptables "
                "rules); run `tollgate run` as root, or without --netns"
            )
        sweep()
        try:
            with _locked():
                self.slot = pick_slot(self.ident, _taken(self.pools), _routed(), self.pools)
                self._links(self.slot)
            self.ipv6 = self.ipv6 and _forwarding()
            self._inside(self.slot)
            self._firewall(self.slot)
        except (SandboxError, NetfilterError, OSError) as exc:
            self.remove()
            raise SandboxError(
                f"cannot give the workload its own network namespace: {exc}"
            ) from exc

    def remove(self) -> None:
        """Remove everything this sandbox made (missing pieces are fine)."""
        teardown(self.ident, self.name)

    def _links(self, slot: Slot) -> None:
        _ip("netns", "add", self.name)
        peer = f"tgn{self.ident}"
        _ip(
            "link",
            "add",
            self.veth,
            "mtu",
            str(_uplink_mtu()),
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            self.name,
        )
        _ip("addr", "add", f"{slot.host4}/30", "dev", self.veth)
        _ip("-6", "addr", "add", f"{slot.host6}/64", "dev", self.veth, "nodad")
        _ip("link", "set", self.veth, "up")
        _ip("link", "set", peer, "name", "eth0", netns=self.name)

    def _inside(self, slot: Slot) -> None:
        n = self.name
        _ip("link", "set", "lo", "up", netns=n)
        _ip("addr", "add", f"{slot.ns4}/30", "dev", "eth0", netns=n)
        _ip("link", "set", "eth0", "up", netns=n)
        _ip("route", "add", "default", "via", slot.host4, netns=n)
        if self.ipv6:
            _ip("-6", "addr", "add", f"{slot.ns6}/64", "dev", "eth0", "nodad", netns=n)
            _ip("-6", "route", "add", "default", "via", slot.host6, netns=n)

    def _firewall(self, slot: Slot) -> None:
        p, v = self.chain_prefix, self.veth
        for family in FAMILIES if self.ipv6 else ("ipv4",):
            net = slot.v4 if family == "ipv4" else slot.v6
            tool = Tool(family)
            tool.restore(
                restore_script(
                    "nat",
                    [
                        f":{p}-NAT - [0:0]",
                        f"-A {p}-NAT -s {net} ! -o {v} -j MASQUERADE",
                        f"-A POSTROUTING -j {p}-NAT",
                    ],
                )
            )
            tool.restore(
                restore_script(
                    "filter",
                    [
                        f":{p}-ACC - [0:0]",
                        f"-A {p}-ACC -i {v} -j ACCEPT",
                        f"-A {p}-ACC -o {v} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                        f"-A FORWARD -j {p}-ACC",
                    ],
                )
            )


def teardown(ident: str, name: str) -> None:
    """Remove the chains, the veth pair and the namespace of sandbox `ident`."""
    prefix = f"TGR{ident.upper()}-"
    for family in FAMILIES:
        tool = Tool(family)
        for table in ("mangle", "nat", "filter"):
            try:
                dump = parse(tool.save(table)).get(table)
                if dump is None:
                    continue
                mine = [c for c in dump.chains if c.startswith(prefix)]
                tool.restore(restore_script(table, remove_lines(dump, mine)))
            except NetfilterError as exc:
                log.warning("could not remove %s %s chains %s*: %s", family, table, prefix, exc)
    for args in (("link", "del", f"{WORKLOAD_VETH_PREFIX}{ident}"), ("netns", "del", name)):
        with contextlib.suppress(SandboxError):
            _ip(*args, quiet=True)


def sweep() -> None:
    """Remove sandboxes whose `tollgate run` died without cleaning up."""
    living = set()
    for name in _ip("netns", "list").split():
        found = _NAME.match(name)
        if found and not _alive(int(found[2])):
            log.info("removing network namespace %s left by a run that was killed", name)
            teardown(found[1], name)
        elif found:
            living.add(found[1])
    # Chains whose namespace is gone: made before it, removed after it, so only leftovers.
    for ident in _orphan_chains() - living:
        log.info("removing iptables chains TGR%s-* left by a run that was killed", ident.upper())
        teardown(ident, f"tollgate-{ident}-0")


def _orphan_chains() -> set[str]:
    found = set()
    for family in FAMILIES:
        for table in ("mangle", "nat", "filter"):
            with contextlib.suppress(NetfilterError):
                dump = parse(Tool(family).save(table)).get(table)
                found |= (
                    {m[1].lower() for c in dump.chains if (m := _CHAIN.match(c))} if dump else set()
                )
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ip(*args: str, netns: str | None = None, quiet: bool = False) -> str:
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxError(f"{' '.join(argv)}: {exc} (is iproute2 installed?)") from None
    if done.returncode != 0:
        if not quiet:
            log.debug("%s failed: %s", " ".join(argv), done.stderr.strip())
        raise SandboxError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    # Two runs starting at once must not pick the same slot.
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _taken(pools: Pools) -> set[int]:
    taken = set()
    for link in json.loads(_ip("-j", "addr", "show") or "[]"):
        if link.get("ifname", "").startswith(WORKLOAD_VETH_PREFIX):
            for info in link.get("addr_info", []):
                index = pools.index_of(info.get("local", ""))
                if index is not None:
                    taken.add(index)
    return taken


def _routed() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    routed = []
    for family in ("-4", "-6"):
        for route in json.loads(_ip("-j", family, "route", "show") or "[]"):
            dst, dev = route.get("dst", "default"), route.get("dev", "")
            if dst != "default" and not dev.startswith(WORKLOAD_VETH_PREFIX):
                routed.append(ipaddress.ip_network(dst, strict=False))
    return routed


def _uplink_mtu() -> int:
    # A veth wider than the way out would leave every full-size packet to PMTU discovery.
    mtus = []
    for route in json.loads(_ip("-j", "route", "show", "default") or "[]"):
        with contextlib.suppress(OSError, ValueError):
            mtus.append(int(Path(f"/sys/class/net/{route['dev']}/mtu").read_text()))
    return min(mtus, default=1500)


def _forwarding() -> bool:
    """Turn on forwarding; False when IPv6 forwarding would cost the host its router adverts."""
    v4 = Path("/proc/sys/net/ipv4/ip_forward")
    if v4.read_text().strip() != "1":
        log.info("enabling net.ipv4.ip_forward so --netns workloads reach the network")
        v4.write_text("1")
    v6 = Path("/proc/sys/net/ipv6/conf/all/forwarding")
    if not v6.exists():
        return False
    if v6.read_text().strip() == "1":
        return True
    # Only interfaces whose routes came from router adverts lose anything by forwarding.
    learning = sorted(
        {
            r.get("dev", "?")
            for r in json.loads(_ip("-j", "-6", "route", "show", "proto", "ra") or "[]")
        }
    )
    if learning:
        log.warning(
            "--netns workloads get IPv4 only: IPv6 forwarding would stop %s from accepting "
            "router advertisements. Set net.ipv6.conf.<if>.accept_ra=2 and "
            "net.ipv6.conf.all.forwarding=1 to give them IPv6.",
            ", ".join(learning),
        )
        return False
    log.info("enabling net.ipv6.conf.all.forwarding so --netns workloads reach the network")
    v6.write_text("1")
    return True
