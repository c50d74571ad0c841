"""The network side of `tollgate run --netns`: its namespace, and its chains read each interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from .addresses import Pools
from .book import Observation
from .netfilter import Accounting
from .netns import Sandbox
from .netrules import LanList
from .probe import net_observation

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

    async def read(self) -> tuple[Observation, set[str]]:
        """The counters now, and the components whose chain was recreated since last time."""
        synced = await asyncio.to_thread(self.accounting.sync, [self.owner])
        obs = net_observation(self.subject, self.workload, self.owner, synced)
        restarted: set[str] = set()
        for family, readings in synced.readings.items():
            for chain, reading in readings.items():
                key = f"{family}/{chain}"
                if key in self._nonces and self._nonces[key] != reading.nonce:
                    log.warning("%s chain %s was recreated; starting a new epoch", family, chain)
                    restarted |= {
                        c for c in obs.components() if c.split("\x1f")[1:3] == [family, chain]
                    }
                self._nonces[key] = reading.nonce
        return obs, restarted

    async def remove(self) -> None:
        await asyncio.to_thread(self.sandbox.remove)
