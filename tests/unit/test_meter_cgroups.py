"""Finding the cgroup hierarchies: pure v2, and hybrid hosts with v1 controllers beside v2."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from services.meter.cgroups import CgroupSet, Mounts, own_path

# Captured on this project's CI machine: v1 controllers plus an empty unified hierarchy.
HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUP = """\
9:name=systemd:/
4:memory:/process_api/a53c0dd0a1c79cfb40381d2d6a995858
2:cpuacct:/
0::/
"""
UNIFIED = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
# Debian-style joint mount, and a mount point with a space (escaped as \\040).
JOINT = "25 23 0:22 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n" \
        "26 23 0:23 / /my\\040cgroups/memory rw - cgroup cgroup rw,memory\n"  # fmt: skip


def test_a_hybrid_host_has_v2_and_v1_cpuacct_and_memory() -> None:
    assert Mounts.parse(HYBRID) == Mounts(
        Path("/sys/fs/cgroup/unified"),
        Path("/sys/fs/cgroup/cpuacct"),
        Path("/sys/fs/cgroup/memory"),
    )


def test_a_unified_host_has_only_v2() -> None:
    assert Mounts.parse(UNIFIED) == Mounts(v2=Path("/sys/fs/cgroup"))


def test_joint_controllers_and_escaped_mount_points_are_understood() -> None:
    mounts = Mounts.parse(JOINT)
    assert mounts.cpuacct == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert mounts.memory == Path("/my cgroups/memory")
    assert mounts.v2 is None


def test_our_own_v1_cgroup_is_found_per_controller() -> None:
    assert own_path(PROC_CGROUP, "memory") == "/process_api/a53c0dd0a1c79cfb40381d2d6a995858"
    assert own_path(PROC_CGROUP, "cpuacct") == "/"
    assert own_path(PROC_CGROUP, "blkio") == "/"


def cgroup_dir(root: Path, name: str, files: dict[str, str]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for file, text in files.items():
        (d / file).write_text(text)
    return d


def test_v2_cpu_stat_and_memory_current_are_read_in_seconds_and_bytes(tmp_path: Path) -> None:
    d = cgroup_dir(tmp_path, "v2/job", {
        "cpu.stat": "usage_usec 1500250\nuser_usec 1000000\nsystem_usec 500250\n",
        "memory.current": "734003200\n", "cgroup.procs": "",
    })  # fmt: skip
    found = CgroupSet.find(["job"], Mounts(v2=tmp_path / "v2"))
    assert found == CgroupSet(d, d)
    assert found.cpu_seconds() == Decimal("1.500250")
    assert found.memory_bytes() == 734003200


def test_v1_cpuacct_and_memory_are_read_from_their_own_hierarchies(tmp_path: Path) -> None:
    cpu = cgroup_dir(tmp_path, "cpuacct/tollgate/job", {"cpuacct.usage": "2500000001\n"})
    mem = cgroup_dir(tmp_path, "memory/a/tollgate/job", {"memory.usage_in_bytes": "4096\n"})
    mounts = Mounts(cpuacct=tmp_path / "cpuacct", memory=tmp_path / "memory")
    found = CgroupSet.find([str(cpu), "/a/tollgate/job"], mounts)
    assert found == CgroupSet(cpu, mem)
    assert found.cpu_seconds() == Decimal("2.500000001")
    assert found.memory_bytes() == 4096
    assert CgroupSet.find([str(tmp_path / "cpuacct/gone")], mounts) == CgroupSet(None, None)
