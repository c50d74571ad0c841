"""iptables and ip6tables accounting chains: made idempotently, read with one save per family.

Everything goes through `iptables-save -c -t mangle` (one read per interval for every chain)
and `iptables-restore --noflush` (one atomic transaction per change), so a host with a
hundred workloads costs two reads per interval, not hundreds of `iptables -L` calls. Chains
live in the mangle table: accounting never changes a verdict, and firewall managers that
rewrite the filter table leave it alone. Nothing is ever flushed on a restart: a chain that
is found intact, with a nonce we know, keeps counting where it was.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .netrules import (
    FAMILIES,
    WORKLOAD_VETH_PREFIX,
    AccountChain,
    ChainReading,
    Family,
    Hook,
    LanList,
    RuleError,
    Table,
    create_lines,
    hook_line,
    parse_save,
    read_chain,
    remove_lines,
    restore_script,
)

log = logging.getLogger("tollgate.meter")
TABLE = "mangle"
TIMEOUT = 30.0
_TOOLS: dict[Family, tuple[str, str]] = {
    "ipv4": ("iptables-save", "iptables-restore"),
    "ipv6": ("ip6tables-save", "ip6tables-restore"),
}


class NetfilterError(Exception):
    """An iptables command failed; `family` says which, the message says what to do."""

    def __init__(self, family: Family, message: str) -> None:
        super().__init__(message)
        self.family = family


@dataclass(frozen=True)
class Tool:
    """iptables-save/-restore of one address family."""

    family: Family

    def missing(self) -> str | None:
        """Why this family cannot be metered here, or None when it can."""
        save, restore = _TOOLS[self.family]
        absent = [t for t in (save, restore) if shutil.which(t) is None]
        if absent:
            return f"{' and '.join(absent)} not found (install the iptables package)"
        try:
            self.save()
        except NetfilterError as exc:
            return str(exc)
        return None

    def save(self, table: str = TABLE) -> str:
        return self._run([_TOOLS[self.family][0], "-c", "-t", table], None)

    def restore(self, script: str) -> None:
        if script:
            self._run([_TOOLS[self.family][1], "-w", "--noflush"], script)

    def _run(self, argv: list[str], stdin: str | None) -> str:
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetfilterError(self.family, f"{argv[0]} failed: {exc}") from None
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[:2] or [f"exit status {done.returncode}"]
            hint = " (tollgate meter needs root, or CAP_NET_ADMIN)" if "ermission" in why[0] else ""
            raise NetfilterError(self.family, f"{argv[0]}: {' / '.join(why)}{hint}")
        return done.stdout


@dataclass(frozen=True)
class Owner:
    """Whose traffic a pair of chains counts, and the jumps that feed them."""

    key: str
    tx: AccountChain
    rx: AccountChain | None  # None: this owner's incoming traffic cannot be told apart
    hooks: tuple[Hook, ...]
    # Chains (not accounting) the hooks need, made empty when missing: our dispatch chain.
    needs: tuple[str, ...] = ()

    @property
    def chains(self) -> tuple[AccountChain, ...]:
        return (self.tx, self.rx) if self.rx is not None else (self.tx,)


def chain_key(name: str) -> str:
    """A short, stable token for a chain name from a workload id of any length."""
    return hashlib.sha256(name.encode()).hexdigest()[:8].upper()


def host_owner(prefix: str, interfaces: Sequence[str] = ()) -> Owner:
    """The host's own traffic: INPUT and OUTPUT, all interfaces but loopback and workload veths
    unless `interfaces` names the ones to count."""
    skip = () if interfaces else ("lo", f"{WORKLOAD_VETH_PREFIX}+")
    tx = AccountChain(f"{prefix}-OUT", "tx", skip)
    rx = AccountChain(f"{prefix}-IN", "rx", skip)
    if interfaces:
        hooks = tuple(Hook("INPUT", rx.name, ("-i", i), first=True) for i in interfaces)
        hooks += tuple(Hook("OUTPUT", tx.name, ("-o", i), first=True) for i in interfaces)
    else:
        hooks = (Hook("INPUT", rx.name, first=True), Hook("OUTPUT", tx.name, first=True))
    return Owner("host", tx, rx, hooks)


def workload_owner(prefix: str, workload: str, veth: str) -> Owner:
    """A workload in its own network namespace: what crosses the host side of its veth."""
    key = chain_key(workload)
    tx = AccountChain(f"{prefix}-{key}-TX", "tx")
    rx = AccountChain(f"{prefix}-{key}-RX", "rx")
    dispatch = f"{prefix}-FWD"
    hooks = (
        Hook("FORWARD", dispatch, first=True),
        Hook(dispatch, tx.name, ("-i", veth)),
        Hook(dispatch, rx.name, ("-o", veth)),
    )
    return Owner(workload, tx, rx, hooks, needs=(dispatch,))


@dataclass
class Synced:
    """One read of every owner's chains."""

    readings: dict[Family, dict[str, ChainReading]] = field(default_factory=dict)
    created: set[tuple[Family, str]] = field(default_factory=set)
    # The last reading of counters that were replaced by new ones in this sync, where the
    # old ones could still be read (an eBPF map whose pin was removed while we held it).
    replaced: dict[tuple[Family, str], ChainReading] = field(default_factory=dict)


class Accounting:
    """Our chains in both families: kept in place and read, once per interval."""

    def __init__(self, lan: LanList, families: Iterable[Family] = FAMILIES) -> None:
        self.lan = lan
        self.tools = {f: Tool(f) for f in families}
        self.unavailable: dict[Family, str] = {}
        self._said: set[str] = set()
        self._verified: dict[tuple[Family, str], tuple[str | None, int]] = {}

    def probe(self) -> None:
        """Find out which families work here, saying once what is missing."""
        for family, tool in list(self.tools.items()):
            why = tool.missing()
            if why is not None:
                del self.tools[family]
                self.unavailable[family] = why
                self._once(f"{family} traffic is not metered: {why}")

    def sync(self, owners: Sequence[Owner]) -> Synced:
        """Read every owner's chains, (re)making the ones that are missing or damaged.

        An intact chain keeps its counters and nonce. A missing or damaged one is made anew
        with a fresh nonce, and missing hooks are added, in one restore per family.
        """
        out = Synced()
        for family, tool in self.tools.items():
            try:
                table = parse_save(tool.save()).get(TABLE, _EMPTY)
                lines, fresh = self._repairs(table, family, owners)
                tool.restore(restore_script(TABLE, lines))
            except (NetfilterError, RuleError) as exc:
                self._once(f"cannot read or repair {family} accounting chains: {exc}")
                continue
            readings: dict[str, ChainReading] = {}
            for owner in owners:
                for chain in owner.chains:
                    if chain.name in fresh:
                        readings[chain.name] = ChainReading(fresh[chain.name])
                        out.created.add((family, chain.name))
                    elif (reading := read_chain(table, chain.name)) is not None:
                        readings[chain.name] = reading
            out.readings[family] = readings
        return out

    def remove(self, owners: Sequence[Owner]) -> None:
        """Delete the owners' chains and every jump into them (dispatch chains stay)."""
        self.remove_named([c.name for o in owners for c in o.chains])

    def remove_named(self, chains: Sequence[str]) -> None:
        """Delete chains by name, with every jump into them."""
        for family, tool in self.tools.items():
            try:
                table = parse_save(tool.save()).get(TABLE, _EMPTY)
                tool.restore(restore_script(TABLE, remove_lines(table, chains)))
            except (NetfilterError, RuleError) as exc:
                log.warning("could not remove %s chains %s: %s", family, ", ".join(chains), exc)

    def _repairs(
        self, table: Table, family: Family, owners: Sequence[Owner]
    ) -> tuple[list[str], dict[str, str]]:
        lines: list[str] = []
        fresh: dict[str, str] = {}
        declared = set(table.chains)
        present: dict[str, set[tuple[str, ...]]] = {}
        for owner in owners:
            for name in owner.needs:
                if name not in declared:
                    lines.append(f":{name} - [0:0]")
                    declared.add(name)
            for chain in owner.chains:
                if chain.name in table.chains:
                    if self._intact(table, family, chain):
                        continue
                    log.warning(
                        "%s chain %s is not as tollgate made it; making it anew (its counters "
                        "start again, in a new epoch)",
                        family,
                        chain.name,
                    )
                fresh[chain.name] = secrets.token_hex(6)
                lines += create_lines(chain, self.lan, family, fresh[chain.name])
            for hook in owner.hooks:
                if hook.chain not in present:
                    present[hook.chain] = {r.shape for r in table.rules_of(hook.chain)}
                if hook.shape not in present[hook.chain]:
                    lines.append(hook_line(hook))
                    present[hook.chain].add(hook.shape)
            lines += _stale_jumps(table, owner)
        return lines, fresh

    def _intact(self, table: Table, family: Family, chain: AccountChain) -> bool:
        # Rule by rule once per life of a chain; after that its marker and length suffice
        # (anything that edits our chains by hand either drops the marker or the count).
        rules = table.rules_of(chain.name)
        nonce = rules[0].comment if rules else None
        if self._verified.get((family, chain.name)) == (nonce, len(rules)):
            return True
        if not chain.intact(rules, self.lan, family):
            return False
        self._verified[(family, chain.name)] = (nonce, len(rules))
        return True

    def _once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning("%s", message)


def _stale_jumps(table: Table, owner: Owner) -> list[str]:
    """Jumps into the owner's chains that it no longer wants (say, an interface taken off
    --host-interface): deleted, or they would go on counting."""
    ours = {c.name for c in owner.chains}
    wanted = {(h.chain, h.shape) for h in owner.hooks}
    return [
        f"-D {rule.chain} {rule.text}"
        for hook_chain in {h.chain for h in owner.hooks}
        for rule in table.rules_of(hook_chain)
        if rule.option("-j") in ours and (hook_chain, rule.shape) not in wanted
    ]


_EMPTY = Table(TABLE)
