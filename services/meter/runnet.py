"""The network side of `tollgate run`: its namespace (`--netns`) and its chains, or its cgroup
metered where it runs (eBPF or the iptables cgroup match); read each interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from .addresses import Pools
from .book import Observation
from .cgroupbpf import ROOT, pins, remove_pins
from .cgroupnet import CgroupNet, CgroupTarget
from .netfilter import Accounting, Owner, Synced
from .netns import Sandbox
from .netrules import LanList
from .probe import net_observation, replaced_values

log = logging.getLogger("tollgate.meter")


class RunNetwork:
    """One run's namespace and the LAN/WAN byte counters of everything that crosses it."""

    def __init__(self, subject: str, workload: str, lan: LanList, pools: Pools) -> None:
        self.subject = subject
        self.workload = workload
        self.sandbox = Sandbox(pools=pools)
        self.accounting = Accounting(lan)
        self.owner = self.sandbox.owner(workload)
        self._nonces: dict[str, str | None] = {}

    async def create(self) -> None:
        """Make the namespace and its chains (raises SandboxError, having cleaned up)."""
        await asyncio.to_thread(self.sandbox.create)
        await asyncio.to_thread(self.accounting.probe)

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        return self.sandbox.wrap(cmd)

    async def read(self) -> tuple[Observation, set[str], dict[str, Decimal]]:
        """The counters now, the components whose chain was recreated since last time, and
        the last values of those whose old counters were read as they were replaced."""
        synced = await asyncio.to_thread(self.accounting.sync, [self.owner])
        obs = net_observation(self.subject, self.workload, self.owner, synced)
        restarted, chains = _restarted(self._nonces, obs, synced)
        for chain in chains:
            log.warning("%s chain %s was recreated; starting a new epoch", *chain.split(" "))
        return obs, restarted, _replaced(self.workload, self.owner, synced, restarted)

    async def remove(self) -> None:
        await asyncio.to_thread(self.sandbox.remove)


def _restarted(
    nonces: dict[str, str | None], obs: Observation, synced: Synced
) -> tuple[set[str], list[str]]:
    """Components whose counters began again since the last reading (their chain or map was
    made anew), and the names of those chains; `nonces` is brought up to date."""
    restarted: set[str] = set()
    chains: list[str] = []
    for family, readings in synced.readings.items():
        for chain, reading in readings.items():
            key = f"{family}/{chain}"
            if key in nonces and nonces[key] != reading.nonce:
                chains.append(f"{family} {chain}")
                restarted |= {
                    c for c in obs.components() if c.split("\x1f")[1:3] == [family, chain]
                }
            nonces[key] = reading.nonce
    return restarted, chains


def _replaced(
    workload: str, owner: Owner, synced: Synced, restarted: set[str]
) -> dict[str, Decimal]:
    return replaced_values(synced, {c.name: workload for c in owner.chains}, restarted)


class RunCgroupNetwork:
    """One run's cgroup, metered where it is (no namespace): eBPF, else iptables (egress)."""

    def __init__(self, subject: str, workload: str, lan: LanList, directory: Path) -> None:
        self.subject = subject
        self.workload = workload
        self.directory = directory
        ident = secrets.token_hex(4)
        self.net = CgroupNet(f"run-{os.getpid()}-{ident}", lan, f"TGC{ident.upper()}")
        self.target: CgroupTarget | None = None
        self._nonces: dict[str, str | None] = {}

    async def start(self) -> bool:
        """Attach to the cgroup; False (said why, once) when nothing here can count it."""
        await asyncio.to_thread(sweep_runs)
        said = await asyncio.to_thread(self.net.start)
        if self.net.mechanism == "none":
            log.info("%s", said)
            return False
        log.info("%s", said)
        owner = self.net.owner(self.workload, self.directory)
        self.target = CgroupTarget(self.subject, self.workload, self.directory, owner)
        await self.read()  # attach now, before the command opens its first socket
        return True

    async def read(self) -> tuple[Observation, set[str], dict[str, Decimal]]:
        assert self.target is not None
        synced = await asyncio.to_thread(self.net.sync, [self.target])
        obs = net_observation(self.subject, self.workload, self.target.owner, synced)
        restarted, chains = _restarted(self._nonces, obs, synced)
        if chains:
            log.warning("%s began again; starting a new epoch", ", ".join(chains))
        return obs, restarted, _replaced(self.workload, self.target.owner, synced, restarted)

    async def remove(self) -> None:
        if self.target is not None:
            owner = self.target.owner
            if self.net.accounting is not None:
                names = [c.name for c in owner.chains]
                await asyncio.to_thread(self.net.accounting.remove_named, [*names, *owner.needs])
        await asyncio.to_thread(self.net.close, True)


def sweep_runs() -> None:
    """Remove the BPF pins of runs that were killed before they could remove them."""
    for name in pins(ROOT):
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "run" or not parts[1].isdigit():
            continue
        if not psutil.pid_exists(int(parts[1])):
            log.info("removing BPF counters left by a run that was killed (%s)", name)
            where = ROOT / name
            for entry in pins(where):
                if entry == "lan":
                    with contextlib.suppress(OSError):
                        os.unlink(where / entry)
                else:
                    remove_pins(where / entry)
            with contextlib.suppress(OSError):
                where.rmdir()
