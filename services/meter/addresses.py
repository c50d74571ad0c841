"""Addresses for `tollgate run --netns`, pure: one small subnet pair per workload, never in use.

Slot N of the pools is an IPv4 /30 (host side .1, workload .2) and an IPv6 /64 (host ::1,
workload ::2). A workload starts looking at a slot derived from its id and takes the first one
that no other workload holds and that overlaps nothing the host already routes.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from .netrules import Network

# Private ranges that home networks and clouds rarely use; both configurable.
V4_POOL: Final = "10.213.0.0/16"
V6_POOL: Final = "fd74:6f6c:6c67::/48"  # ULA; the global ID spells "tollg"


class NoFreeSlot(Exception):
    """Every slot of the pools is held or would collide with the host's routes."""


@dataclass(frozen=True)
class Slot:
    """One workload's addresses."""

    index: int
    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network

    @property
    def host4(self) -> str:
        return str(self.v4.network_address + 1)

    @property
    def ns4(self) -> str:
        return str(self.v4.network_address + 2)

    @property
    def host6(self) -> str:
        return str(self.v6.network_address + 1)

    @property
    def ns6(self) -> str:
        return str(self.v6.network_address + 2)


@dataclass(frozen=True)
class Pools:
    """Where slots come from."""

    v4: ipaddress.IPv4Network = field(default_factory=lambda: ipaddress.IPv4Network(V4_POOL))
    v6: ipaddress.IPv6Network = field(default_factory=lambda: ipaddress.IPv6Network(V6_POOL))

    @classmethod
    def parse(cls, v4: str = V4_POOL, v6: str = V6_POOL) -> Pools:
        try:
            pools = cls(ipaddress.IPv4Network(v4), ipaddress.IPv6Network(v6))
        except ValueError as exc:
            raise ValueError(f"bad address pool: {exc}; use e.g. {V4_POOL} and {V6_POOL}") from None
        if pools.v4.prefixlen > 29 or pools.v6.prefixlen > 63:
            raise ValueError("address pools must hold at least two slots (/29 and /63 or wider)")
        return pools

    @property
    def size(self) -> int:
        return int(min(1 << (30 - self.v4.prefixlen), 1 << min(64 - self.v6.prefixlen, 24)))

    def slot(self, index: int) -> Slot:
        v4 = ipaddress.IPv4Network((int(self.v4.network_address) + 4 * index, 30))
        v6 = ipaddress.IPv6Network((int(self.v6.network_address) + (index << 64), 64))
        return Slot(index, v4, v6)

    def index_of(self, address: str) -> int | None:
        """The slot holding `address`, if it is in the IPv4 pool."""
        ip = ipaddress.ip_address(address)
        if ip.version != 4 or ip not in self.v4:
            return None
        return (int(ip) - int(self.v4.network_address)) // 4


def pick_slot(key: str, taken: Iterable[int], routed: Iterable[Network], pools: Pools) -> Slot:
    """The first free slot from the one `key` hashes to; `routed` are the host's routes."""
    held = set(taken)
    routes = [n for n in routed if n.prefixlen > 0]  # default routes overlap everything
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % pools.size
    for step in range(pools.size):
        index = (start + step) % pools.size
        if index in held:
            continue
        slot = pools.slot(index)
        if not any(_overlaps(slot, r) for r in routes):
            return slot
    raise NoFreeSlot(
        f"no free address slot in {pools.v4} / {pools.v6}: every one is in use or routed "
        "elsewhere on this host; set other pools (--netns-pool-v4, --netns-pool-v6)"
    )


def _overlaps(slot: Slot, route: Network) -> bool:
    if isinstance(route, ipaddress.IPv4Network):
        return slot.v4.overlaps(route)
    return slot.v6.overlaps(route)
