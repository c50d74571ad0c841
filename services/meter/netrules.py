"""Network accounting with iptables, pure: the chains we own and what `iptables-save -c` says.

Every accounting chain counts one direction (tx or rx) of one owner (a workload's veth, or
the host). Its first rule is a marker whose comment carries a random nonce given when the
chain was made: a chain whose nonce changed, or that vanished, was recreated and its counters
restarted from zero. Then one rule per LAN network (`-d` for tx, `-s` for rx) tagged
`tollgate lan`, and a last catch-all tagged `tollgate wan`; each ends in RETURN, so a packet
is counted once and the firewall's verdict never changes. Host chains first skip (uncounted)
loopback and the veths of workloads that are counted on their own.

Counters are bytes of whole IP packets as the kernel saw them (headers included), cumulative
for the life of the chain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Final, Literal

from .iptsave import (
    LAN_TAG,
    MARKER,
    SKIP_TAG,
    WAN_TAG,
    ChainReading,
    Rule,
    RuleError,
    Table,
    normalised,
    parse_save,
    read_chain,
    tokens,
)

__all__ = ["ChainReading", "Rule", "RuleError", "Table", "parse_save", "read_chain"]

Family = Literal["ipv4", "ipv6"]
Direction = Literal["tx", "rx"]
FAMILIES: Final[tuple[Family, ...]] = ("ipv4", "ipv6")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# SPEC 6: private, link-local, loopback and carrier-grade NAT ranges are the LAN.
DEFAULT_LAN_CIDRS: Final = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "100.64.0.0/10",
    "fc00::/7",
    "fe80::/10",
    "::1/128",
)
# Host-side names of the veths `tollgate run --netns` makes; the host chains skip them.
WORKLOAD_VETH_PREFIX: Final = "tgw"
MAX_CHAIN_NAME: Final = 28


@dataclass(frozen=True)
class LanList:
    """The networks that count as LAN; everything else is WAN."""

    networks: tuple[Network, ...]

    @classmethod
    def parse(cls, texts: Iterable[str]) -> LanList:
        """From CIDR texts such as "10.0.0.0/8" or "fd00::/8" (host bits are refused)."""
        networks: list[Network] = []
        for text in texts:
            try:
                networks.append(ipaddress.ip_network(text.strip()))
            except ValueError as exc:
                raise RuleError(
                    f"LAN network {text!r} is not a CIDR network ({exc}); write it like "
                    "10.0.0.0/8 or fd00::/8"
                ) from None
        return cls(tuple(dict.fromkeys(networks)))

    @classmethod
    def default(cls) -> LanList:
        return cls.parse(DEFAULT_LAN_CIDRS)

    def of(self, family: Family) -> list[Network]:
        version = 4 if family == "ipv4" else 6
        return [n for n in self.networks if n.version == version]

    def classify(self, address: str) -> Literal["lan", "wan"]:
        """Where traffic to or from `address` is counted."""
        ip = ipaddress.ip_address(address)
        return "lan" if any(ip in n for n in self.networks if n.version == ip.version) else "wan"


@dataclass(frozen=True)
class AccountChain:
    """One chain counting one direction of one owner's traffic."""

    name: str
    direction: Direction
    skip_interfaces: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < len(self.name) <= MAX_CHAIN_NAME or not self.name.replace("-", "").isalnum():
            raise RuleError(
                f"chain name {self.name!r} must be 1 to {MAX_CHAIN_NAME} letters, digits or '-'"
            )

    def rules(self, lan: LanList, family: Family, nonce: str) -> list[str]:
        """The rules (without `-A NAME`) in order, as iptables-save prints them."""
        where = "-d" if self.direction == "tx" else "-s"
        iface = "-i" if self.direction == "rx" else "-o"
        out = [f'-m comment --comment "{MARKER}{nonce}"']
        out += [
            f'{iface} {i} -m comment --comment "{SKIP_TAG}" -j RETURN' for i in self.skip_interfaces
        ]
        out += [
            f'{where} {n.with_prefixlen} -m comment --comment "{LAN_TAG}" -j RETURN'
            for n in lan.of(family)
        ]
        out.append(f'-m comment --comment "{WAN_TAG}" -j RETURN')
        return out

    def intact(self, found: Sequence[Rule], lan: LanList, family: Family) -> bool:
        """True when `found` is exactly what `rules` makes (any nonce): nothing added or lost."""
        return [r.shape for r in found] == self._expected(lan, family)

    @cache  # noqa: B019 - a few chains per workload, each asked once per interval
    def _expected(self, lan: LanList, family: Family) -> list[tuple[str, ...]]:
        return [normalised(tokens(r)) for r in self.rules(lan, family, "x")]


@dataclass(frozen=True)
class Hook:
    """A jump from a built-in chain (or our dispatch chain) into one of ours."""

    chain: str
    target: str
    match: tuple[str, ...] = ()
    first: bool = False  # built-in chains: ahead of the firewall's own rules

    def spec(self) -> str:
        return " ".join((*(_quoted(m) for m in self.match), "-j", self.target))

    @property
    def shape(self) -> tuple[str, ...]:
        return normalised(tokens(self.spec()))

    def found_in(self, rules: Sequence[Rule]) -> bool:
        return self.shape in {r.shape for r in rules}


def restore_script(table: str, lines: Iterable[str]) -> str:
    """Input for `iptables-restore --noflush`: one atomic transaction on one table."""
    body = list(lines)
    return "".join(f"{line}\n" for line in [f"*{table}", *body, "COMMIT"]) if body else ""


def create_lines(chain: AccountChain, lan: LanList, family: Family, nonce: str) -> list[str]:
    """(Re)create `chain` with fresh counters: declaring it in a --noflush restore flushes it."""
    return [
        f":{chain.name} - [0:0]",
        *(f"-A {chain.name} {r}" for r in chain.rules(lan, family, nonce)),
    ]


def _quoted(arg: str) -> str:
    # iptables-restore knows double quotes only.
    return f'"{arg}"' if not arg or any(c.isspace() for c in arg) else arg


def hook_line(hook: Hook) -> str:
    """The line that adds `hook`: first in a built-in chain, else appended."""
    return f"-I {hook.chain} 1 {hook.spec()}" if hook.first else f"-A {hook.chain} {hook.spec()}"


def remove_lines(table: Table, chains: Sequence[str]) -> list[str]:
    """Delete every jump into `chains` (wherever it is), then the chains themselves."""
    doomed = set(chains)
    lines = [
        f"-D {rule.chain} {' '.join(_quoted(a) for a in rule.args)}"
        for chain in table.chains
        if chain not in doomed
        for rule in table.rules_of(chain)
        if rule.option("-j") in doomed
    ]
    present = [c for c in chains if c in table.chains]
    return lines + [f"-F {c}" for c in present] + [f"-X {c}" for c in present]
