"""Network bytes of one cgroup by eBPF: `bpf/cgroup_net.bpf.o` loaded through libbpf (ctypes).

Each metered cgroup gets its own instance of the object: two cgroup_skb programs (egress,
ingress) attached through BPF links, and a `counts` array; every instance shares one `lan`
LPM trie holding the configured LAN networks. Links and maps are pinned in bpffs under
`/sys/fs/bpf/tollgate/<owner>/`, so they keep counting while no agent runs and a restarted
agent reads on where it left off. The `counts` map's kernel id is the instance's nonce: a
pin that vanished (bpffs unmounted, someone removed it, a reboot) is made anew with a new
map, so a new id, and the counters that restarted from zero begin a new epoch, exactly as
a recreated iptables chain does.

Counts are bytes of whole IP packets at the socket layer: egress before fragmentation and
segmentation offload (one large packet with one header), ingress after GRO. What never
reaches a socket of the cgroup is not seen (see the README's metering table).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from .netrules import Family, LanList

log = logging.getLogger("tollgate.meter")
OBJECT: Final = Path(__file__).with_name("bpf") / "cgroup_net.bpf.o"
BPFFS: Final = Path("/sys/fs/bpf")
ROOT: Final = BPFFS / "tollgate"
PROGRAMS: Final = (("tollgate_egress", "egress"), ("tollgate_ingress", "ingress"))
_FAMILY_INDEX: Final[dict[Family, int]] = {"ipv4": 0, "ipv6": 1}
_BPF_ANY = 0


class BpfUnavailable(Exception):
    """This host cannot meter cgroups with eBPF; the message says why and what to do."""


class _LanKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class _Count(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint64), ("packets", ctypes.c_uint64)]


def lan_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, bytes]:
    """The trie key of one LAN network: IPv4 as IPv4-mapped IPv6, prefix length + 96."""
    if network.version == 4:
        address = b"\0" * 10 + b"\xff\xff" + network.network_address.packed
        return network.prefixlen + 96, address
    return network.prefixlen, network.network_address.packed


@dataclass(frozen=True)
class CgroupReading:
    """What one cgroup's programs counted, and which life of its map (the nonce)."""

    nonce: str
    bytes: dict[tuple[str, Family, str], int]  # (tx|rx, family, lan|wan) -> bytes
    packets: dict[tuple[str, Family, str], int]


class Attached(NamedTuple):
    """One cgroup's counters after `attach`: their nonce, whether they were made just now,
    and the last reading of the map they replaced, when we still held it."""

    nonce: str
    made: bool
    last: CgroupReading | None = None


class _Lib:
    """The few libbpf 1.x calls we need, typed."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise BpfUnavailable(
                f"libbpf is not installed ({exc}); install the libbpf1 package"
            ) from None
        vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        sigs: dict[str, tuple[list[type], type | None]] = {
            "libbpf_set_print": ([vp], vp),
            "bpf_object__open_file": ([cp, vp], vp),
            "bpf_object__load": ([vp], i),
            "bpf_object__close": ([vp], None),
            "bpf_object__find_map_by_name": ([vp, cp], vp),
            "bpf_object__find_program_by_name": ([vp, cp], vp),
            "bpf_map__reuse_fd": ([vp, i], i),
            "bpf_map__fd": ([vp], i),
            "bpf_program__attach_cgroup": ([vp, i], vp),
            "bpf_link__pin": ([vp, cp], i),
            "bpf_link__destroy": ([vp], i),
            "bpf_obj_pin": ([i, cp], i),
            "bpf_obj_get": ([cp], i),
            "bpf_obj_get_info_by_fd": ([i, vp, ctypes.POINTER(ctypes.c_uint32)], i),
            "bpf_map_lookup_elem": ([i, vp, vp], i),
            "bpf_map_update_elem": ([i, vp, vp, ctypes.c_uint64], i),
            "bpf_map_delete_elem": ([i, vp], i),
            "bpf_map_get_next_key": ([i, vp, vp], i),
        }
        for fn, (args, res) in sigs.items():
            try:
                f = getattr(lib, fn)
            except AttributeError:
                raise BpfUnavailable(f"{name} lacks {fn}: libbpf 1.0 or newer is needed") from None
            f.argtypes, f.restype = args, res
        lib.libbpf_set_print(None)  # its messages would go to our stderr: we say why ourselves
        self.lib = lib

    def fail(self, what: str, rc: int | None = None) -> BpfUnavailable:
        code = ctypes.get_errno() or (abs(rc) if rc else 0)
        return BpfUnavailable(f"{what}: {os.strerror(code) if code else 'failed'}")

    def map_id(self, fd: int) -> int:
        info = (ctypes.c_uint8 * 128)()  # struct bpf_map_info: type, then id
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if self.lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) != 0:
            raise self.fail("cannot read the map's id")
        return int.from_bytes(bytes(info[4:8]), "little")


def ensure_bpffs() -> None:
    """bpffs at /sys/fs/bpf, mounted by us when it is not (root only)."""
    with contextlib.suppress(OSError):
        if any(
            line.split()[1] == str(BPFFS) and line.split()[2] == "bpf"
            for line in Path("/proc/self/mounts").read_text().splitlines()
        ):
            return
    if shutil.which("mount") is None:
        raise BpfUnavailable("bpffs is not mounted at /sys/fs/bpf and there is no mount(8)")
    done = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BpfUnavailable(
            f"bpffs is not mounted at /sys/fs/bpf and mounting it failed: "
            f"{done.stderr.strip() or done.returncode} (mount -t bpf bpf /sys/fs/bpf as root)"
        )
    log.info("mounted bpffs at /sys/fs/bpf for the meter's pinned maps")


class CgroupBpf:
    """Per-cgroup counters for one owner (an agent, or one `tollgate run`), under
    /sys/fs/bpf/tollgate/<owner>/: `lan` (shared trie) and one directory per cgroup."""

    def __init__(self, owner: str, lan: LanList, obj: Path | None = None) -> None:
        self.lan = lan
        self.obj = obj or OBJECT
        self.dir = ROOT / owner
        self._lib: _Lib | None = None
        self._lan_fd: int | None = None
        self._maps: dict[str, tuple[int, str]] = {}  # key -> (fd of counts, nonce)

    def probe(self) -> None:
        """Raise BpfUnavailable saying why eBPF cannot meter cgroups here; else be ready."""
        if os.geteuid() != 0:
            raise BpfUnavailable("needs root (CAP_BPF and CAP_NET_ADMIN) to load BPF programs")
        if not self.obj.exists():
            raise BpfUnavailable(
                f"{self.obj} is not built; `make install` builds it (needs clang and libbpf-dev)"
            )
        self._lib = _Lib()
        ensure_bpffs()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lan_fd = self._lan_map()
        # Loading the object once proves the verifier takes it on this kernel.
        obj = self._open()
        self._lib.lib.bpf_object__close(obj)

    @property
    def lib(self) -> _Lib:
        if self._lib is None:
            raise BpfUnavailable("probe() was not called")
        return self._lib

    def attach(self, key: str, cgroup: Path) -> Attached:
        """Count `cgroup` (a cgroup-v2 directory) under `key`. Pins that are there and intact
        are kept (their counters go on); missing ones are made anew, from zero, with a new
        nonce. When the map we held lost its pin, its programs are detached first and the
        map is read one last time, so what it counted since our last read is not lost."""
        known = self._maps.get(key)
        try:
            where = self._where(key, cgroup)
        except FileNotFoundError:
            # The cgroup is gone (its workload ended): read what it counted, from the map we
            # hold or the one a previous life of ours pinned.
            if known is not None:
                return Attached(known[1], False)
            return Attached(self._orphan(key, cgroup), False)
        here = pins(where)
        if known is not None and "counts" in here:
            return Attached(known[1], False)
        made, last = False, None
        fd = self.lib.lib.bpf_obj_get(str(where / "counts").encode())
        if fd < 0 or not {p for _, p in PROGRAMS} <= here:
            if fd >= 0:
                os.close(fd)
            fd, made = self._instance(where, cgroup), True  # the old links go first
        if known is not None:
            try:
                last = self.read(key)  # the old map: nothing counts into it any more
            except BpfUnavailable as exc:  # closed at its last reading instead
                log.warning("cannot read the replaced counters of %s one last time: %s", key, exc)
        self._close(key)
        nonce = str(self.lib.map_id(fd))
        self._maps[key] = (fd, nonce)
        return Attached(nonce, made, last)

    def _orphan(self, key: str, cgroup: Path) -> str:
        for name in sorted(pins(self.dir)):
            if name.startswith(f"{key}_") and "counts" in pins(self.dir / name):
                fd = int(self.lib.lib.bpf_obj_get(str(self.dir / name / "counts").encode()))
                if fd >= 0:
                    nonce = str(self.lib.map_id(fd))
                    self._maps[key] = (fd, nonce)
                    return nonce
        raise FileNotFoundError(errno.ENOENT, "no such cgroup, and no counters pinned", str(cgroup))

    def read(self, key: str) -> CgroupReading | None:
        """The counters of `key` now; None when it is not attached (or its pin was lost)."""
        known = self._maps.get(key)
        if known is None:
            return None
        fd, nonce = known
        count = _Count()
        index = ctypes.c_uint32()
        got_bytes: dict[tuple[str, Family, str], int] = {}
        got_packets: dict[tuple[str, Family, str], int] = {}
        for direction, base in (("tx", 0), ("rx", 4)):
            for family, f in _FAMILY_INDEX.items():
                for kind, k in (("lan", 0), ("wan", 1)):
                    index.value = base + f * 2 + k
                    if self.lib.lib.bpf_map_lookup_elem(
                        fd, ctypes.byref(index), ctypes.byref(count)
                    ):
                        raise self.lib.fail("cannot read a cgroup's counters")
                    got_bytes[(direction, family, kind)] = count.bytes
                    got_packets[(direction, family, kind)] = count.packets
        return CgroupReading(nonce, got_bytes, got_packets)

    def detach(self, key: str) -> None:
        """Stop counting `key`: its links and map go with their pins."""
        self._close(key)
        for name in pins(self.dir):
            if name.partition("_")[0] == key:
                remove_pins(self.dir / name)

    def pinned_keys(self) -> set[str]:
        """The keys pinned under this owner (say, by a previous life of the agent)."""
        return {n.partition("_")[0] for n in pins(self.dir) if "_" in n}

    def close(self, remove: bool = False) -> None:
        """Close our descriptors; with `remove`, unpin everything of this owner too (and
        without, the LAN map when no cgroup is counted any more: nothing would use it)."""
        for key in list(self._maps):
            self._close(key)
        remove = remove or (self._lib is not None and not self.pinned_keys())
        if self._lan_fd is not None:
            os.close(self._lan_fd)
            self._lan_fd = None
        if remove and self.dir.exists():
            for name in pins(self.dir):
                if name == "lan":
                    os.unlink(self.dir / name)
                else:
                    remove_pins(self.dir / name)
            with contextlib.suppress(OSError):
                self.dir.rmdir()

    # Inside.

    def _where(self, key: str, cgroup: Path) -> Path:
        # The cgroup's inode is its id: a cgroup made anew at the same path gets new pins.
        return self.dir / f"{key}_{os.stat(cgroup).st_ino}"

    def _close(self, key: str) -> None:
        known = self._maps.pop(key, None)
        if known is not None:
            os.close(known[0])

    def _open(self) -> int:
        lib = self.lib.lib
        obj = lib.bpf_object__open_file(str(self.obj).encode(), None)
        if not obj:
            raise self.lib.fail(f"cannot open {self.obj}")
        lan = lib.bpf_object__find_map_by_name(obj, b"lan")
        if not lan or lib.bpf_map__reuse_fd(lan, self._lan_fd) != 0:
            lib.bpf_object__close(obj)
            raise self.lib.fail("cannot share the LAN map")
        rc = lib.bpf_object__load(obj)
        if rc != 0:
            lib.bpf_object__close(obj)
            raise self.lib.fail("the kernel refused the cgroup_skb programs", rc)
        return int(obj)

    def _instance(self, where: Path, cgroup: Path) -> int:
        """Load, attach to `cgroup` and pin one instance; returns a new fd of its counts."""
        lib = self.lib.lib
        remove_pins(where)
        where.mkdir()
        obj = self._open()
        try:
            cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for program, pin in PROGRAMS:
                    prog = lib.bpf_object__find_program_by_name(obj, program.encode())
                    link = lib.bpf_program__attach_cgroup(prog, cg) if prog else None
                    if not link:
                        raise self.lib.fail(f"cannot attach {program} to {cgroup}")
                    rc = lib.bpf_link__pin(link, str(where / pin).encode())
                    lib.bpf_link__destroy(link)  # the pin holds it now
                    if rc != 0:
                        raise self.lib.fail(f"cannot pin {where / pin}", rc)
            finally:
                os.close(cg)
            counts = lib.bpf_object__find_map_by_name(obj, b"counts")
            fd = lib.bpf_map__fd(counts)
            if lib.bpf_obj_pin(fd, str(where / "counts").encode()) != 0:
                raise self.lib.fail(f"cannot pin {where / 'counts'}")
            return _dup(fd)
        except BaseException:
            remove_pins(where)
            raise
        finally:
            lib.bpf_object__close(obj)

    def _lan_map(self) -> int:
        """The shared LAN trie, pinned; made when missing and set to the configured list."""
        lib = self.lib.lib
        path = self.dir / "lan"
        fd = int(lib.bpf_obj_get(str(path).encode()))
        if fd < 0:
            obj = lib.bpf_object__open_file(str(self.obj).encode(), None)
            if not obj:
                raise self.lib.fail(f"cannot open {self.obj}")
            try:
                if lib.bpf_object__load(obj) != 0:
                    raise self.lib.fail("the kernel refused the cgroup_skb programs")
                lan = lib.bpf_object__find_map_by_name(obj, b"lan")
                if lib.bpf_obj_pin(lib.bpf_map__fd(lan), str(path).encode()) != 0:
                    raise self.lib.fail(f"cannot pin {path}")
                fd = _dup(lib.bpf_map__fd(lan))
            finally:
                lib.bpf_object__close(obj)
        self._set_lan(fd)
        return fd

    def _set_lan(self, fd: int) -> None:
        lib = self.lib.lib
        wanted = {lan_key(n) for n in self.lan.networks}
        key, nxt = _LanKey(), _LanKey()
        present: set[tuple[int, bytes]] = set()
        first = True
        while (
            lib.bpf_map_get_next_key(fd, None if first else ctypes.byref(key), ctypes.byref(nxt))
            == 0
        ):
            present.add((nxt.prefixlen, bytes(nxt.addr)))
            ctypes.memmove(ctypes.byref(key), ctypes.byref(nxt), ctypes.sizeof(key))
            first = False
        one = ctypes.c_uint8(1)
        for prefixlen, addr in present - wanted:
            k = _LanKey(prefixlen, (ctypes.c_uint8 * 16)(*addr))
            lib.bpf_map_delete_elem(fd, ctypes.byref(k))
        for prefixlen, addr in wanted - present:
            k = _LanKey(prefixlen, (ctypes.c_uint8 * 16)(*addr))
            if lib.bpf_map_update_elem(fd, ctypes.byref(k), ctypes.byref(one), _BPF_ANY) != 0:
                raise self.lib.fail("cannot write the LAN networks into the BPF map")


def _dup(fd: int) -> int:
    return os.dup(fd)


def pins(where: Path) -> set[str]:
    # Names only: bpffs refuses (EPERM) any name with a dot in it, even to look it up.
    try:
        return set(os.listdir(where))
    except (FileNotFoundError, PermissionError):
        return set()


def remove_pins(where: Path) -> None:
    for name in pins(where):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where / name)
    with contextlib.suppress(OSError):
        where.rmdir()


def unavailable_reason(owner: str, lan: LanList) -> str | None:
    """Why eBPF cannot meter cgroups here (None when it can), without keeping anything open."""
    probe = CgroupBpf(owner, lan)
    try:
        probe.probe()
    except (BpfUnavailable, OSError) as exc:
        return str(exc) if isinstance(exc, BpfUnavailable) else f"{exc.strerror}: {exc.filename}"
    finally:
        probe.close(remove=True)
    return None
