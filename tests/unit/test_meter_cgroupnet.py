"""The pure parts of metering by cgroup: trie keys, finding the v2 directory, owners."""

from __future__ import annotations

import ipaddress
from decimal import Decimal
from pathlib import Path

from services.meter.cgroupbpf import lan_key
from services.meter.cgroupnet import CgroupNet, v2_directory
from services.meter.cgroups import Mounts
from services.meter.iptsave import ChainReading
from services.meter.netfilter import Synced
from services.meter.netrules import LanList
from services.meter.probe import net_observation


def test_an_ipv4_network_is_keyed_as_ipv4_mapped_ipv6_with_96_more_prefix_bits() -> None:
    prefix, address = lan_key(ipaddress.ip_network("10.1.0.0/16"))
    assert prefix == 112
    assert address == bytes(10) + b"\xff\xff" + bytes([10, 1, 0, 0])


def test_an_ipv6_network_is_keyed_as_it_is() -> None:
    prefix, address = lan_key(ipaddress.ip_network("fd00::/8"))
    assert (prefix, address) == (8, b"\xfd" + bytes(15))


def test_the_v2_directory_is_found_absolute_or_relative_and_v1_ones_are_passed_over(
    tmp_path: Path,
) -> None:
    v2, memory = tmp_path / "unified", tmp_path / "memory"
    for d in (v2 / "slurm" / "job_1", memory / "slurm" / "job_1"):
        d.mkdir(parents=True)
        (d / "cgroup.procs").write_text("")
    mounts = Mounts(v2=v2, memory=memory)
    v1_dir = str(memory / "slurm" / "job_1")
    assert v2_directory([v1_dir, "/slurm/job_1"], mounts) == v2 / "slurm" / "job_1"
    assert v2_directory([str(v2 / "slurm" / "job_1")], mounts) == v2 / "slurm" / "job_1"
    assert v2_directory([v1_dir], mounts) is None
    assert v2_directory(["/slurm/job_2"], mounts) is None
    assert v2_directory(["/slurm/job_1"], Mounts(memory=memory)) is None


def test_the_iptables_owner_jumps_from_a_dispatch_chain_by_cgroup_path_and_counts_no_rx(
    tmp_path: Path,
) -> None:
    net = CgroupNet("t", LanList.default(), "TGX", "iptables", Mounts(v2=tmp_path))
    net.mechanism = "iptables"
    owner = net.owner("job-1", tmp_path / "slurm" / "job 1")
    assert owner.rx is None and owner.chains == (owner.tx,)
    assert owner.needs == ("TGX-CG",)
    assert owner.hooks[1].spec() == f'-m cgroup --path "slurm/job 1" -j {owner.tx.name}'


def test_an_owner_without_rx_publishes_no_rx_series_rather_than_zeros(tmp_path: Path) -> None:
    net = CgroupNet("t", LanList.default(), "TGX", "iptables", Mounts(v2=tmp_path))
    net.mechanism = "iptables"
    owner = net.owner("job-1", tmp_path / "a")
    synced = Synced({"ipv4": {owner.tx.name: ChainReading("n", lan=5, wan=7)}})
    obs = net_observation("alice", "job-1", owner, synced)
    assert sorted(s.metric for s in obs.parts) == ["net.tx.lan.bytes", "net.tx.wan.bytes"]
    assert sum(sum(p.values()) for p in obs.parts.values()) == Decimal(12)


def test_the_bpf_owner_counts_both_directions() -> None:
    net = CgroupNet("t", LanList.default(), "TGX", "bpf", Mounts(v2=Path("/x")))
    net.mechanism = "bpf"
    owner = net.owner("job-1", Path("/x/a"))
    assert owner.rx is not None and owner.hooks == ()
