"""Network bytes per cgroup, for workloads without a network namespace of their own.

The best mechanism this host allows is chosen once, at start, and said in one line:

- `bpf`: cgroup_skb programs on the workload's cgroup-v2 directory (`cgroupbpf`), both
  directions, LAN/WAN, IPv4/IPv6; counters in pinned maps that outlive the agent;
- `iptables`: a mangle chain per workload reached from OUTPUT by `-m cgroup --path`, so
  egress only (netfilter sees a packet's socket on the way out, not reliably on the way
  in); chains are never flushed, exactly like the netns and host chains;
- `none`: nothing per cgroup; the host's chains still count everything per host.

Either way each workload is an `Owner` whose chain names label its components, so the
readings join the iptables ones in one `Synced` and epochs, nonces and adoption work the
same for all of them.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .cgroupbpf import BpfUnavailable, CgroupBpf
from .cgroups import Mounts
from .netfilter import Accounting, NetfilterError, Owner, Synced, Tool, chain_key
from .netrules import (
    FAMILIES,
    AccountChain,
    ChainReading,
    Hook,
    LanList,
    RuleError,
    parse_save,
    restore_script,
)

log = logging.getLogger("tollgate.meter")
Mechanism = Literal["bpf", "iptables", "none"]
Choice = Literal["auto", "bpf", "iptables", "off"]
CHOICES: tuple[Choice, ...] = ("auto", "bpf", "iptables", "off")


@dataclass(frozen=True)
class CgroupTarget:
    """One workload metered by its cgroup: the cgroup-v2 directory, and its owner."""

    subject: str
    workload: str
    directory: Path
    owner: Owner


def v2_directory(
    paths: Sequence[str], mounts: Mounts | None = None, existing: bool = True
) -> Path | None:
    """The cgroup-v2 directory among a workload's cgroups (absolute, or relative to the v2
    mount), or None when none of them is one that exists (with `existing=False`: the first
    that would be one, existing or not)."""
    mounts = mounts or Mounts.here()
    if mounts.v2 is None:
        return None
    for text in paths:
        path = Path(text)
        if path.is_relative_to(mounts.v2):
            candidate = path
        elif any(path.is_relative_to(m) for m in mounts.all()):
            continue  # a v1 hierarchy: sockets are not charged to those
        else:
            candidate = mounts.v2 / text.lstrip("/")
        if not existing or (candidate / "cgroup.procs").exists():
            return candidate
    return None


class CgroupNet:
    """Per-cgroup counters of one owner (`tollgate meter`, or one `tollgate run`)."""

    def __init__(
        self,
        name: str,
        lan: LanList,
        chain_prefix: str,
        choice: Choice = "auto",
        mounts: Mounts | None = None,
    ) -> None:
        self.name = name
        self.lan = lan
        self.prefix = chain_prefix
        self.choice = choice
        self.mounts = mounts or Mounts.here()
        self.mechanism: Mechanism = "none"
        self.bpf: CgroupBpf | None = None
        self.accounting: Accounting | None = None
        self._said: set[str] = set()

    @property
    def dispatch(self) -> str:
        return f"{self.prefix}-CG"

    def start(self) -> str:
        """Choose the mechanism; returns the one line that says which, and why not better."""
        why: list[str] = []
        if self.choice == "off":
            return "network by cgroup: off (--cgroup-net off); only namespaces and the host"
        if self.mounts.v2 is None:
            return "network by cgroup: none (no cgroup v2 hierarchy is mounted); per host only"
        if self.choice in ("auto", "bpf"):
            bpf = CgroupBpf(_safe(self.name), self.lan)
            try:
                bpf.probe()
            except (BpfUnavailable, OSError) as exc:
                bpf.close()
                why.append(f"eBPF unavailable: {exc}")
            else:
                self.bpf, self.mechanism = bpf, "bpf"
                return (
                    "network by cgroup: eBPF cgroup_skb, egress and ingress, "
                    f"{len(self.lan.networks)} LAN networks (pins in {bpf.dir})"
                )
        if self.choice in ("auto", "iptables"):
            reason = _iptables_cgroup_missing()
            if reason is None:
                self.accounting = Accounting(self.lan)
                self.accounting.probe()
                self.mechanism = "iptables"
                said = "; ".join(why)
                return (
                    "network by cgroup: iptables cgroup match, egress only (received bytes "
                    f"of cgroup workloads are counted per host only){f'; {said}' if said else ''}"
                )
            why.append(f"iptables cgroup match unavailable: {reason}")
        return f"network by cgroup: none ({'; '.join(why)}); per host only"

    def owner(self, workload: str, directory: Path) -> Owner:
        """The owner (chain names, hooks) of one workload metered by its cgroup."""
        key = chain_key(workload)
        tx = AccountChain(f"{self.prefix}-{key}-CT", "tx")
        if self.mechanism != "iptables":
            return Owner(workload, tx, AccountChain(f"{self.prefix}-{key}-CR", "rx"), ())
        assert self.mounts.v2 is not None
        path = str(directory.relative_to(self.mounts.v2)) or "/"
        hooks = (
            Hook("OUTPUT", self.dispatch, first=True),
            Hook(self.dispatch, tx.name, ("-m", "cgroup", "--path", path)),
        )
        return Owner(workload, tx, None, hooks, needs=(self.dispatch,))

    def sync(self, targets: Sequence[CgroupTarget]) -> Synced:
        """Attach what is new, read everything: one reading per chain name and family."""
        if self.accounting is not None:
            return self.accounting.sync([t.owner for t in targets])
        out = Synced()
        if self.bpf is None:
            return out
        for target in targets:
            key = target.owner.key
            try:
                nonce, made, last = self.bpf.attach(chain_key(key), target.directory)
                reading = self.bpf.read(chain_key(key))
            except (BpfUnavailable, OSError) as exc:
                self._once(f"cannot count the network bytes of cgroup {target.directory}: {exc}")
                continue
            if reading is None:
                continue
            for family in FAMILIES:
                readings = out.readings.setdefault(family, {})
                for direction, chain in (("tx", target.owner.tx), ("rx", target.owner.rx)):
                    assert chain is not None
                    readings[chain.name] = ChainReading(
                        nonce,
                        reading.bytes[(direction, family, "lan")],
                        reading.bytes[(direction, family, "wan")],
                    )
                    if made:
                        out.created.add((family, chain.name))
                    if last is not None:
                        out.replaced[(family, chain.name)] = ChainReading(
                            last.nonce,
                            last.bytes[(direction, family, "lan")],
                            last.bytes[(direction, family, "wan")],
                        )
        return out

    def remove(self, target_owner: Owner) -> None:
        """Stop counting one workload (its pins or chains go)."""
        if self.bpf is not None:
            self.bpf.detach(chain_key(target_owner.key))
        if self.accounting is not None:
            self.accounting.remove([target_owner])

    def pinned(self, workload: str) -> bool:
        """Whether a previous life left counters pinned for `workload` (eBPF only)."""
        return self.bpf is not None and chain_key(workload) in self.bpf.pinned_keys()

    def sweep(self, workloads: set[str]) -> None:
        """Remove what a previous life counted for workloads that are gone (ended while no
        agent ran): pins, or chains and their jumps."""
        keep = {chain_key(w) for w in workloads}
        if self.bpf is not None:
            for key in self.bpf.pinned_keys() - keep:
                log.info("removing the BPF counters of a cgroup workload that ended (%s)", key)
                self.bpf.detach(key)
        if self.accounting is not None:
            pattern = re.compile(rf"^{re.escape(self.prefix)}-([0-9A-F]{{8}})-CT$")
            for family, tool in self.accounting.tools.items():
                try:
                    table = parse_save(tool.save("mangle")).get("mangle")
                except (NetfilterError, RuleError) as exc:
                    log.warning("cannot look for stale %s cgroup chains: %s", family, exc)
                    continue
                stale = [
                    c
                    for c in (table.chains if table else ())
                    if (m := pattern.match(c)) and m[1] not in keep
                ]
                if stale:
                    self.accounting.remove_named(stale)

    def close(self, remove: bool = False) -> None:
        if self.bpf is not None:
            self.bpf.close(remove)

    def _once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning("%s", message)


def _safe(name: str) -> str:
    # bpffs refuses dots in names.
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:60] or "meter"


def _iptables_cgroup_missing() -> str | None:
    """Why `-m cgroup --path` cannot be used here (None when it can), tried on a scratch chain."""
    chain = f"TGCGPROBE{secrets.token_hex(3).upper()}"
    for family in FAMILIES:
        tool = Tool(family)
        why = tool.missing()
        if why is not None:
            return why
        try:
            tool.restore(
                restore_script(
                    "mangle",
                    [f":{chain} - [0:0]", f"-A {chain} -m cgroup --path / -j RETURN"],
                )
            )
        except NetfilterError as exc:
            return f"{exc} (the kernel needs xt_cgroup)"
        finally:
            try:
                tool.restore(restore_script("mangle", [f"-F {chain}", f"-X {chain}"]))
            except NetfilterError as exc:
                log.debug("could not remove probe chain %s: %s", chain, exc)
    return None
