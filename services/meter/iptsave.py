"""`iptables-save -c` output, pure: tables, chains, rules and what our chains counted.

Rules are kept as text and split into words only when asked (a host with a hundred workloads
has thousands of rules, most only ever asked for their comment). Quoting follows
iptables-save: words, or "double quoted" with backslash escapes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Final

# The comments our rules carry: a marker with the chain's nonce, and the class of the rule.
MARKER: Final = "tollgate chain "
LAN_TAG: Final = "tollgate lan"
WAN_TAG: Final = "tollgate wan"
SKIP_TAG: Final = "tollgate skip"


class RuleError(ValueError):
    """A LAN list, chain name or iptables-save text we cannot use; the message says why."""


@dataclass(frozen=True)
class Rule:
    """One `-A` line of iptables-save -c: its chain, counters, and the rest as text."""

    chain: str
    text: str
    packets: int = 0
    bytes: int = 0

    # Split into words only when asked: a host with a hundred workloads has thousands of
    # rules, and most are only ever asked for their comment.
    @cached_property
    def args(self) -> tuple[str, ...]:
        return tuple(tokens(self.text))

    def option(self, name: str) -> str | None:
        for i, arg in enumerate(self.args[:-1]):
            if arg == name:
                return self.args[i + 1]
        return None

    @cached_property
    def comment(self) -> str | None:
        found = _COMMENT.search(self.text)
        if found is None or "\\" in found[0]:
            return self.option("--comment")
        return found[1] if found[1] is not None else found[2]

    @cached_property
    def shape(self) -> tuple[str, ...]:
        """The rule as compared with what we would make (networks normalised, any nonce)."""
        return normalised(self.args)


@dataclass(frozen=True)
class Table:
    """One table of an iptables-save dump: its chains (in order) and their rules."""

    name: str
    chains: tuple[str, ...] = ()
    rules: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)

    def rules_of(self, chain: str) -> tuple[Rule, ...]:
        return self.rules.get(chain, ())


def parse_save(text: str) -> dict[str, Table]:
    """Tables of an `iptables-save -c` (or ip6tables-save -c) dump, by name."""
    tables: dict[str, Table] = {}
    name: str | None = None
    chains: list[str] = []
    rules: dict[str, list[Rule]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name, chains, rules = line[1:], [], {}
        elif name is None:
            raise RuleError(f"line {number} comes before any table: {line!r}")
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line == "COMMIT":
            tables[name] = Table(name, tuple(chains), {c: tuple(r) for c, r in rules.items()})
            name = None
        else:
            rule = _parse_rule(line, number)
            rules.setdefault(rule.chain, []).append(rule)
    if name is not None:
        raise RuleError(f"table {name!r} has no COMMIT: the dump was cut short")
    return tables


def _parse_rule(line: str, number: int) -> Rule:
    packets = octets = 0
    if line.startswith("["):
        counters, _, line = line.partition("] ")
        try:
            packets, octets = (int(x) for x in counters[1:].split(":"))
        except ValueError:
            raise RuleError(f"line {number}: bad counters {counters + ']'!r}") from None
    head, chain, rest = ([*line.split(maxsplit=2), "", ""])[:3]
    if head != "-A" or not chain:
        raise RuleError(f"line {number} is not a rule: {line!r}")
    if (line.count('"') - line.count('\\"')) % 2:
        raise RuleError(f"line {number}: unbalanced quote: {line!r}")
    return Rule(chain, rest, packets, octets)


_COMMENT = re.compile(r'--comment (?:"([^"]*)"|(\S+))')
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s"]+)|(")')


def tokens(line: str) -> list[str]:
    """Split a rule as iptables-save quotes it: words, or "double quoted" with \\ escapes."""
    out = []
    for quoted, word, stray in _TOKEN.findall(line):
        if stray:
            raise ValueError("unbalanced quote")
        if word:
            out.append(word)
        else:
            out.append(re.sub(r"\\(.)", r"\1", quoted) if "\\" in quoted else quoted)
    return out


def normalised(args: Sequence[str]) -> tuple[str, ...]:
    # Rules compared as iptables prints them, with networks normalised and the nonce ignored.
    out: list[str] = []
    for i, arg in enumerate(args):
        prev = args[i - 1] if i else ""
        if prev in ("-s", "-d"):
            arg = _network(arg)
        elif prev == "--comment" and arg.startswith(MARKER):
            arg = MARKER
        out.append(arg)
    return tuple(out)


@cache
def _network(text: str) -> str:
    try:
        return ipaddress.ip_network(text, strict=False).with_prefixlen
    except ValueError:
        return text  # not ours to judge: compared as written


@dataclass(frozen=True)
class ChainReading:
    """What one accounting chain counted, and which life of the chain it was."""

    nonce: str | None
    lan: int = 0
    wan: int = 0


def read_chain(table: Table, chain: str) -> ChainReading | None:
    """The counters of one of our chains; None when the chain does not exist."""
    if chain not in table.chains:
        return None
    nonce, lan, wan = None, 0, 0
    for rule in table.rules_of(chain):
        comment = rule.comment or ""
        if comment.startswith(MARKER) and nonce is None:
            nonce = comment[len(MARKER) :]
        elif comment == LAN_TAG:
            lan += rule.bytes
        elif comment == WAN_TAG:
            wan += rule.bytes
    return ChainReading(nonce, lan, wan)
