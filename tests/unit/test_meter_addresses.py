"""Addresses for `tollgate run --netns`: a free slot, never one the host already routes."""

from __future__ import annotations

import ipaddress

import pytest

from services.meter.addresses import NoFreeSlot, Pools, pick_slot

POOLS = Pools()


def test_a_slot_is_a_slash_30_and_a_slash_64_with_the_host_end_first() -> None:
    slot = POOLS.slot(3)
    assert (str(slot.v4), slot.host4, slot.ns4) == ("10.213.0.12/30", "10.213.0.13", "10.213.0.14")
    assert (str(slot.v6), slot.host6, slot.ns6) == (
        "fd74:6f6c:6c67:3::/64", "fd74:6f6c:6c67:3::1", "fd74:6f6c:6c67:3::2",
    )  # fmt: skip
    assert POOLS.index_of("10.213.0.14") == 3
    assert POOLS.index_of("10.9.0.1") is None and POOLS.index_of("fd74:6f6c:6c67:3::1") is None


def test_the_same_workload_starts_at_the_same_slot_and_skips_held_ones() -> None:
    first = pick_slot("run-a", [], [], POOLS)
    assert pick_slot("run-a", [], [], POOLS) == first
    assert pick_slot("run-a", [first.index], [], POOLS).index == (first.index + 1) % POOLS.size


def test_slots_the_host_routes_elsewhere_are_skipped() -> None:
    first = pick_slot("run-b", [], [], POOLS)
    routed = [ipaddress.ip_network(f"{first.v4.network_address}/24", strict=False),
              ipaddress.ip_network("0.0.0.0/0")]  # fmt: skip
    chosen = pick_slot("run-b", [], routed, POOLS)
    assert not chosen.v4.overlaps(routed[0])  # the default route is not a collision
    v6_routed = [first.v6]
    assert pick_slot("run-b", [], v6_routed, POOLS).index != first.index


def test_a_full_pool_says_what_to_change() -> None:
    tiny = Pools.parse("10.9.0.0/29", "fd00:1::/63")
    with pytest.raises(NoFreeSlot, match="--netns-pool-v4"):
        pick_slot("x", [0, 1], [], tiny)


@pytest.mark.parametrize(("v4", "v6"), [("10.9.0.0/30", "fd00::/48"), ("nope", "fd00::/48")])
def test_pools_too_small_or_wrong_are_refused(v4: str, v6: str) -> None:
    with pytest.raises(ValueError, match="pool"):
        Pools.parse(v4, v6)
