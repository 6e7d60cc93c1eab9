"""The eBPF data path: compile, pin, adopt, attach, and the maps' contents.

Everything lives under <bpffs_dir>/v1/ (maps/, progs/, links/). Pinned links
keep the programs attached when the daemon exits or is killed; a new daemon
adopts the pins instead of reloading, so traffic never notices a restart.
Only cleanup() removes them.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import shutil
import struct
from dataclasses import dataclass

from . import bpfsys

log = logging.getLogger("meshd.datapath")

LAYOUT = "v1"  # bump when a map's layout or a pin name changes
SOURCES = ("connect.c", "sockops.c", "getsockopt.c", "getpeername.c", "getsockname.c",
           "sk_lookup.c")
MAPS = ("settings", "workload_ids", "excluded_ports", "excluded_cidr4", "excluded_cidr6",
        "cookie_dst", "tuple_dst", "envoy_listeners", "counters", "meta",
        "inbound_ports", "workload_flags", "excluded_in_ports", "envoy_upstreams",
        "route_src4", "route_src6")


@dataclass(frozen=True)
class Hook:
    prog: str          # function name in bpf/*.c
    prog_type: int
    attach_type: int


HOOKS = {
    "connect4": Hook("meshd_connect4", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_CONNECT),
    "connect6": Hook("meshd_connect6", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_CONNECT),
    "getpeername4": Hook("meshd_getpeername4", bpfsys.PROG_CGROUP_SOCK_ADDR,
                         bpfsys.CGROUP_INET4_GETPEERNAME),
    "getpeername6": Hook("meshd_getpeername6", bpfsys.PROG_CGROUP_SOCK_ADDR,
                         bpfsys.CGROUP_INET6_GETPEERNAME),
    "getsockname4": Hook("meshd_getsockname4", bpfsys.PROG_CGROUP_SOCK_ADDR,
                         bpfsys.CGROUP_INET4_GETSOCKNAME),
    "getsockname6": Hook("meshd_getsockname6", bpfsys.PROG_CGROUP_SOCK_ADDR,
                         bpfsys.CGROUP_INET6_GETSOCKNAME),
    "sockops": Hook("meshd_sockops", bpfsys.PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS),
    "envoy_sockops": Hook("meshd_envoy_sockops", bpfsys.PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS),
    "getsockopt": Hook("meshd_getsockopt", bpfsys.PROG_CGROUP_SOCKOPT, bpfsys.CGROUP_GETSOCKOPT),
    "sk_lookup": Hook("meshd_sk_lookup", bpfsys.PROG_SK_LOOKUP, bpfsys.SK_LOOKUP),
}
WORKLOAD_HOOKS = ("connect4", "connect6", "getpeername4", "getpeername6", "getsockname4",
                  "getsockname6", "sockops")
ENVOY_HOOKS = ("envoy_sockops", "getsockopt")

# Must match enum meshd_counter in bpf/meshd.h.
COUNTERS = ("redirected", "excluded", "fail_open", "answered", "miss", "peername", "closed",
            "inbound", "inbound_excluded", "inbound_fail_open")
NR_COUNTERS = 12
MAX_WORKLOADS = 256


class DatapathError(Exception):
    pass


def default_bpf_dir() -> str:
    """bpf/ next to the package in a checkout, else where the .deb puts it."""
    env = os.environ.get("MESHD_BPF_DIR")
    if env:
        return env
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf")
    return here if os.path.isfile(os.path.join(here, "meshd.h")) else "/usr/share/meshd/bpf"


def program_text(bpf_dir: str) -> str:
    """One compilation unit: the header once, then every hook file.

    BCC only rewrites map calls (m.lookup() ...) in the main file, not in
    included headers, so the header is inlined instead of #included."""
    with open(os.path.join(bpf_dir, "meshd.h")) as f:
        parts = [f.read()]
    for name in SOURCES:
        with open(os.path.join(bpf_dir, name)) as f:
            parts.append(f"/* ---- {name} ---- */\n" + f.read().replace('#include "meshd.h"', ""))
    return "\n".join(parts)


def source_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def check_kernel() -> None:
    """Say exactly what is missing instead of failing deep inside BCC."""
    if not os.path.isdir(f"/lib/modules/{os.uname().release}/build"):
        raise DatapathError(
            f"BCC needs kernel headers at /lib/modules/{os.uname().release}/build: install "
            "linux-headers-$(uname -r) (or run scripts/setup.sh, which links Debian's "
            "linux-headers-amd64 there)")


def is_bpffs(path: str) -> bool:
    """True if path is on a bpf filesystem (statfs magic 0xcafe4a11)."""
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    with open("/proc/self/mountinfo") as f:
        best = ("", "")
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split(" ")[4]
            if (probe == mnt or probe.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, right.split(" ", 1)[0])
    return best[1] == "bpf"


def _link_name(owner: str, hook: str) -> str:
    # bpffs refuses names with a dot (reserved for its own files)
    return f"{owner}:{hook}".replace(".", "%")


def _link_owner(name: str) -> str:
    return name.replace("%", ".").rsplit(":", 1)[0]


class Datapath:
    def __init__(self, bpffs_dir: str, bpf_dir: str | None = None):
        self.root = os.path.join(bpffs_dir, LAYOUT)
        self.bpf_dir = bpf_dir or default_bpf_dir()
        self.maps: dict[str, int] = {}
        self.progs: dict[str, int] = {}
        self.adopted = False

    # -- loading and adopting -------------------------------------------------
    def open(self) -> str:
        """Adopt the pinned programs and maps, or compile and pin them. Returns
        "adopted" or "loaded"."""
        if not is_bpffs(os.path.dirname(self.root)):
            raise DatapathError(f"{os.path.dirname(self.root)} is not on a bpf filesystem: "
                                "mount -t bpf bpf /sys/fs/bpf")
        text = program_text(self.bpf_dir)
        if self._try_adopt(source_hash(text)):
            self.adopted = True
            return "adopted"
        self._load(text)
        return "loaded"

    def _pin(self, kind: str, name: str) -> str:
        return os.path.join(self.root, kind, name)

    def _try_adopt(self, want_hash: int) -> bool:
        paths = [self._pin("maps", m) for m in MAPS] + [self._pin("progs", h) for h in HOOKS]
        if not all(os.path.exists(p) for p in paths):
            if os.path.exists(self.root):
                log.warning("pins under %s are incomplete; loading the programs afresh", self.root)
            return False
        maps = {m: bpfsys.obj_get(self._pin("maps", m)) for m in MAPS}
        got = bpfsys.map_lookup(maps["meta"], struct.pack("<I", 0), 8)
        if got is None or struct.unpack("<Q", got)[0] != want_hash:
            log.warning("pinned programs are from other BPF sources; loading afresh")
            for fd in maps.values():
                os.close(fd)
            return False
        self.maps = maps
        self.progs = {h: bpfsys.obj_get(self._pin("progs", h)) for h in HOOKS}
        return True

    def _load(self, text: str) -> None:
        check_kernel()
        from bcc import BPF  # imported late: BCC is slow to import and needs root

        # Stale pins from another source version: their links hold the old
        # programs; remove everything and start clean.
        links = self.pinned_links()
        self._remove_pins()
        for pin in links:
            log.info("dropped stale link pin %s", pin)
        try:
            b = BPF(text=text, cflags=["-Wno-unused-function", "-Wno-incompatible-pointer-types"])
        except Exception as e:
            raise DatapathError(f"compiling bpf/*.c failed: {e}") from e
        for d in ("maps", "progs", "links"):
            os.makedirs(self._pin(d, ""), exist_ok=True)
        from bcc import libbcc
        for m in MAPS:
            fd = libbcc.lib.bpf_table_fd(b.module, m.encode())
            if fd < 0:
                raise DatapathError(f"map {m} missing from the compiled program")
            bpfsys.obj_pin(fd, self._pin("maps", m))
            self.maps[m] = os.dup(fd)
        for name, hook in HOOKS.items():
            try:
                fn = b.load_func(hook.prog, hook.prog_type, attach_type=hook.attach_type)
            except Exception as e:
                raise DatapathError(f"the kernel refused {hook.prog}: {e}") from e
            bpfsys.obj_pin(fn.fd, self._pin("progs", name))
            self.progs[name] = os.dup(fn.fd)
        bpfsys.map_update(self.maps["meta"], struct.pack("<I", 0),
                          struct.pack("<Q", source_hash(text)))
        # The BPF object may now go: pins and our dup'ed fds hold everything.
        b.cleanup()

    def _remove_pins(self) -> None:
        if os.path.isdir(self.root):
            shutil.rmtree(self.root)  # unlinking a pin drops the object with its last ref

    # -- attachments ----------------------------------------------------------
    def pinned_links(self) -> list[str]:
        d = self._pin("links", "")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def attach(self, owner: str, cgroup_path: str, hooks) -> None:
        """Link each hook to the cgroup, pinned as links/<owner>:<hook>.

        An existing pin for the same cgroup is kept (adoption); one for another
        cgroup (the workload moved) is replaced."""
        cg_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for h in hooks:
                self._ensure_link(_link_name(owner, h), h, cg_fd, os.fstat(cg_fd).st_ino)
        finally:
            os.close(cg_fd)

    def attach_netns(self, netns_path: str) -> None:
        """Link sk_lookup to a network namespace, pinned as links/netns:sk_lookup."""
        ns_fd = os.open(netns_path, os.O_RDONLY)
        try:
            # for a netns link, the link info's union starts with the netns inode (u32)
            self._ensure_link(_link_name("netns", "sk_lookup"), "sk_lookup", ns_fd,
                              os.fstat(ns_fd).st_ino, mask=0xFFFFFFFF)
        finally:
            os.close(ns_fd)

    def _ensure_link(self, name: str, hook: str, target_fd: int, target_id: int,
                     mask: int = (1 << 64) - 1) -> None:
        """A pinned link from hook's program to the target (cgroup or netns): an
        existing pin to the same target is kept (adoption), one to another
        target (the workload moved) is replaced."""
        pin = self._pin("links", name)
        if os.path.exists(pin):
            fd = bpfsys.obj_get(pin)
            try:
                if bpfsys.link_info(fd).cgroup_id & mask == target_id:
                    return
            finally:
                os.close(fd)
            self._drop_link(name)
        fd = bpfsys.link_create(self.progs[hook], target_fd, HOOKS[hook].attach_type)
        try:
            bpfsys.obj_pin(fd, pin)
        finally:
            os.close(fd)

    def other_meshd_in_netns(self, netns_path: str) -> list[int]:
        """Ids of another meshd instance's sk_lookup programs on this network
        namespace: two instances in one namespace would fight over its ports
        and its policy routing."""
        ours = bpfsys.prog_id(self.progs["sk_lookup"])
        fd = os.open(netns_path, os.O_RDONLY)
        try:
            ids = bpfsys.prog_query(fd, bpfsys.SK_LOOKUP)
        finally:
            os.close(fd)
        return [i for i in ids if i != ours and bpfsys.prog_name(i) == HOOKS["sk_lookup"].prog]

    def detach(self, owner: str) -> None:
        for name in self.pinned_links():
            if _link_owner(name) == owner:
                self._drop_link(name)

    def owners(self) -> set[str]:
        return {_link_owner(name) for name in self.pinned_links()}

    def _drop_link(self, name: str) -> None:
        pin = self._pin("links", name)
        fd = bpfsys.obj_get(pin)
        try:
            bpfsys.link_detach(fd)
        except OSError as e:
            log.debug("detach %s: %s (cgroup already gone?)", name, e)
        finally:
            os.close(fd)
        os.unlink(pin)

    def link_cgroup_ids(self) -> dict[str, int]:
        out = {}
        for name in self.pinned_links():
            fd = bpfsys.obj_get(self._pin("links", name))
            try:
                out[name] = bpfsys.link_info(fd).cgroup_id
            finally:
                os.close(fd)
        return out

    def foreign_programs(self, cgroup_path: str, hooks) -> dict[str, list[int]]:
        """Programs someone else attached to a cgroup on our hooks (a CNI, say):
        they keep running beside ours; status shows them."""
        ours = {bpfsys.prog_id(fd) for fd in self.progs.values()}
        out = {}
        fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for h in hooks:
                other = [i for i in bpfsys.prog_query(fd, HOOKS[h].attach_type) if i not in ours]
                if other:
                    out[h] = other
        finally:
            os.close(fd)
        return out

    # -- map contents ---------------------------------------------------------
    def set_settings(self, outbound_port: int, inbound_port: int) -> None:
        bpfsys.map_update(self.maps["settings"], struct.pack("<I", 0),
                          struct.pack("<HHI", outbound_port, inbound_port, 0))

    def set_workload_ids(self, ids: dict[int, int]) -> None:
        """cgroup id -> workload id; entries not in `ids` are removed."""
        fd = self.maps["workload_ids"]
        want = {struct.pack("<Q", cg): struct.pack("<I", wl) for cg, wl in ids.items()}
        for k in bpfsys.map_keys(fd, 8):
            if k not in want:
                bpfsys.map_delete(fd, k)
        for k, v in want.items():
            bpfsys.map_update(fd, k, v)

    def set_exclusions(self, ports: dict[int, set[int]], cidrs: dict[int, set]) -> None:
        """Exclusions by workload id (0 = every workload): ports and networks."""
        want_ports = {struct.pack("<IHH", wl, p, 0) for wl, ps in ports.items() for p in ps}
        want4, want6 = set(), set()
        for wl, nets in cidrs.items():
            for n in nets:
                n = ipaddress.ip_network(n, strict=False)
                wlb = struct.pack(">I", wl)
                if n.version == 4:
                    want4.add(struct.pack("<I", 32 + n.prefixlen) + wlb + n.network_address.packed)
                else:
                    want6.add(struct.pack("<I", 32 + n.prefixlen) + wlb + n.network_address.packed)
        for name, want, ksize in (("excluded_ports", want_ports, 8),
                                  ("excluded_cidr4", want4, 12),
                                  ("excluded_cidr6", want6, 24)):
            fd = self.maps[name]
            for k in bpfsys.map_keys(fd, ksize):
                if k not in want:
                    bpfsys.map_delete(fd, k)
            for k in want:
                bpfsys.map_update(fd, k, b"\x01")

    def set_inbound(self, explicit: dict[int, set[int]], auto: set[int],
                    excluded: dict[int, set[int]], discovered: dict[int, set[int]]) -> None:
        """Inbound ports by workload id. `explicit` workloads get exactly their listed
        ports; `auto` ones get whatever they listen on (sockops adds ports on listen(),
        `discovered` adds those that were already listening). `excluded`: 0 = all."""
        flags_fd, ports_fd = self.maps["workload_flags"], self.maps["inbound_ports"]
        for wl in range(1, MAX_WORKLOADS):
            flag = 1 if wl in explicit else 0
            cur = bpfsys.map_lookup(flags_fd, struct.pack("<I", wl), 4)
            if cur is not None and struct.unpack("<I", cur)[0] != flag:
                bpfsys.map_update(flags_fd, struct.pack("<I", wl), struct.pack("<I", flag))
        want = {p: wl for wl, ports in explicit.items() for p in ports}
        for wl, ports in discovered.items():
            if wl in auto:
                want.update({p: wl for p in ports})
        for k in bpfsys.map_keys(ports_fd, 2):
            v = bpfsys.map_lookup(ports_fd, k, 4)
            wl = struct.unpack("<I", v)[0] if v else 0
            port = struct.unpack("<H", k)[0]
            if wl not in auto and want.get(port) != wl:
                bpfsys.map_delete(ports_fd, k)   # workload gone, or explicit list changed
        for port, wl in want.items():
            bpfsys.map_update(ports_fd, struct.pack("<H", port), struct.pack("<I", wl))
        want_ex = {struct.pack("<IHH", wl, p, 0) for wl, ps in excluded.items() for p in ps}
        fd = self.maps["excluded_in_ports"]
        for k in bpfsys.map_keys(fd, 8):
            if k not in want_ex:
                bpfsys.map_delete(fd, k)
        for k in want_ex:
            bpfsys.map_update(fd, k, b"\x01")

    def set_route_sources(self, sources: dict) -> None:
        """Destination network -> the source address the kernel would pick for
        it (meshd.sources), for getsockname on steered sockets."""
        want4, want6 = {}, {}
        for net, src in sources.items():
            if net.version == 4:
                want4[struct.pack("<I", net.prefixlen) + net.network_address.packed] = src.packed
            else:
                want6[struct.pack("<I", net.prefixlen) + net.network_address.packed] = src.packed
        for name, want, ksize in (("route_src4", want4, 8), ("route_src6", want6, 20)):
            fd = self.maps[name]
            for k in bpfsys.map_keys(fd, ksize):
                if k not in want:
                    bpfsys.map_delete(fd, k)
            for k, v in want.items():
                bpfsys.map_update(fd, k, v)

    def inbound_ports(self) -> dict[int, list[int]]:
        """Meshed inbound ports by workload id."""
        fd, out = self.maps["inbound_ports"], {}
        for k in bpfsys.map_keys(fd, 2):
            v = bpfsys.map_lookup(fd, k, 4)
            if v:
                out.setdefault(struct.unpack("<I", v)[0], []).append(struct.unpack("<H", k)[0])
        return {wl: sorted(ps) for wl, ps in out.items()}

    def counters(self, workload_ids=range(MAX_WORKLOADS)) -> dict[int, dict[str, int]]:
        """Counter values summed over CPUs, by workload id (non-zero rows only).
        Pass the ids in use: each row costs one lookup per counter."""
        fd = self.maps["counters"]
        ncpu = bpfsys.possible_cpus()
        out: dict[int, dict[str, int]] = {}
        for wl in workload_ids:
            row = {}
            for slot, name in enumerate(COUNTERS):
                raw = bpfsys.map_lookup(fd, struct.pack("<I", wl * NR_COUNTERS + slot), 8 * ncpu)
                row[name] = sum(struct.unpack(f"<{ncpu}Q", raw)) if raw else 0
            if any(row.values()):
                out[wl] = row
        return out

    def envoy_listening(self) -> dict[str, bool]:
        """Which of Envoy's listeners are in the SOCKMAP (i.e. alive).

        A SOCKMAP lookup from user space returns the socket cookie."""
        fd = self.maps["envoy_listeners"]
        return {slot: bpfsys.map_lookup(fd, struct.pack("<I", i), 8) is not None
                for i, slot in enumerate(("ipv4", "ipv6", "inbound_ipv4", "inbound_ipv6"))}

    def tracked_connections(self) -> int:
        return len(bpfsys.map_keys(self.maps["cookie_dst"], 8))

    # -- teardown -------------------------------------------------------------
    def close(self) -> None:
        """Forget our fds; pins (and so the data path) stay."""
        for fd in list(self.maps.values()) + list(self.progs.values()):
            os.close(fd)
        self.maps, self.progs = {}, {}

    def cleanup(self) -> None:
        """Detach every link we pinned and remove every pin (meshd cleanup)."""
        for name in self.pinned_links():
            self._drop_link(name)
        self.close()
        self._remove_pins()
        parent = os.path.dirname(self.root)
        try:
            os.rmdir(parent)  # the instance's bpffs dir, if nothing else is in it
        except OSError:
            pass
