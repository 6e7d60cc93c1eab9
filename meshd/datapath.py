"""The eBPF data path: adopt the pins, attach, and the maps' contents.

Everything lives under <bpffs_dir>/v1/ (maps/, progs/, links/). Pinned links
keep the programs attached when the daemon exits or is killed; a new daemon
adopts the pins instead of reloading, so traffic never notices a restart.
When the pins are missing or of another build, a short-lived child
(meshd.compile) compiles and installs this build (a hitless upgrade over an
older one) and the daemon then adopts it: BCC never loads in the daemon.
Only cleanup() removes the pins.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

from . import bpfsys, maplayout, mounts
from .bpfmap import Map, sync
from .maplayout import COUNTERS, MAX_WORKLOADS, NR_COUNTERS

log = logging.getLogger("meshd.datapath")

LAYOUT = "v1"  # bump when a map's layout or a pin name changes
SOURCES = ("connect.c", "sockops.c", "getsockopt.c", "getpeername.c", "getsockname.c",
           "sk_lookup.c", "sk_msg.c")
MAPS = tuple(maplayout.MAPS)


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
    # attached to the accel_socks map, not to a cgroup (open() does it)
    "sk_msg": Hook("meshd_sk_msg", bpfsys.PROG_SK_MSG, bpfsys.SK_MSG_VERDICT),
}
WORKLOAD_HOOKS = ("connect4", "connect6", "getpeername4", "getpeername6", "getsockname4",
                  "getsockname6", "sockops")
ENVOY_HOOKS = ("envoy_sockops", "getsockopt")


class DatapathError(Exception):
    pass


def default_bpf_dir() -> str:
    """bpf/ next to the package in a checkout, else where the .deb puts it."""
    env = os.environ.get("MESHD_BPF_DIR")
    if env:
        return env
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf")
    return here if os.path.isfile(os.path.join(here, "meshd.h")) else "/usr/share/meshd/bpf"


def program_text(bpf_dir: str, sizes: maplayout.MapSizes = maplayout.MapSizes()) -> str:
    """One compilation unit: the shared constants (map sizes included), the
    header once with the layout checks after it, then every hook file. Its
    hash names the build (meshd.compile prepends the pin paths, unhashed).

    BCC only rewrites map calls (m.lookup() ...) in the main file, not in
    included headers, so the header is inlined instead of #included."""
    with open(os.path.join(bpf_dir, "meshd.h")) as f:
        parts = [maplayout.c_prelude(sizes), f.read(), maplayout.c_asserts()]
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
    return mounts.fstype_at(probe) == "bpf"


def _link_name(owner: str, hook: str) -> str:
    # bpffs refuses names with a dot (reserved for its own files)
    return f"{owner}:{hook}".replace(".", "%")


def _link_owner(name: str) -> str:
    return name.replace("%", ".").rsplit(":", 1)[0]


def link_hook(name: str) -> str:
    """The hook of a link pin's name (<owner>:<hook>)."""
    return name.rsplit(":", 1)[1]


class Datapath:
    def __init__(self, bpffs_dir: str, bpf_dir: str | None = None,
                 sizes: maplayout.MapSizes = maplayout.MapSizes()):
        self.root = os.path.join(bpffs_dir, LAYOUT)
        self.bpf_dir = bpf_dir or default_bpf_dir()
        self.sizes = sizes
        self.maps: dict[str, int] = {}
        self.progs: dict[str, int] = {}
        self.adopted = False

    # -- loading and adopting -------------------------------------------------
    def open(self) -> str:
        """Adopt the pinned programs and maps when they are this build's;
        otherwise install this build first (install()). Returns "adopted",
        "loaded" (nothing was pinned) or "upgraded" (another build was)."""
        if not is_bpffs(os.path.dirname(self.root)):
            raise DatapathError(f"{os.path.dirname(self.root)} is not on a bpf filesystem: "
                                "mount -t bpf bpf /sys/fs/bpf")
        want = source_hash(program_text(self.bpf_dir, self.sizes))
        if self._try_adopt(want):
            self.adopted = True
            how = "adopted"
        else:
            how = self.install()
            if not self._try_adopt(want):
                raise DatapathError(f"the pins under {self.root} are not this build's after "
                                    "installing it (another meshd on the same bpffs_dir?)")
        self._check_maps()
        # sk_msg runs on the sends of sockets sockops puts in accel_socks; the
        # map holds the attachment (pinned with it), so this only matters
        # after a load, and repeating it on adoption changes nothing.
        bpfsys.prog_attach(self.progs["sk_msg"], self.maps["accel_socks"],
                           bpfsys.SK_MSG_VERDICT)
        return how

    def install(self) -> str:
        """Compile this build and install it under the pins, in a short-lived
        child (python -m meshd.compile): BCC's compiler never stays in this
        process. Running links switch to the new programs atomically and the
        maps keep their contents (see meshd/compile.py)."""
        cmd = [sys.executable, "-m", "meshd.compile", "--root", self.root,
               "--bpf-dir", self.bpf_dir, "--sizes", json.dumps(asdict(self.sizes))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        for line in r.stderr.splitlines():
            if line and not line.startswith("error: "):
                log.info("compile: %s", line)
        if r.returncode != 0:
            errors = [ln[7:] for ln in r.stderr.splitlines() if ln.startswith("error: ")]
            raise DatapathError(errors[-1] if errors else
                                f"{' '.join(cmd[:3])} exited {r.returncode}: {r.stderr.strip()}")
        return r.stdout.strip().splitlines()[-1]

    def _pin(self, kind: str, name: str) -> str:
        return os.path.join(self.root, kind, name)

    def _map(self, name: str) -> Map:
        return Map(self.maps[name], maplayout.MAPS[name])

    def _check_maps(self) -> None:
        """Every map's type, key and value sizes, max_entries and flags are what
        maplayout declares (the structs themselves are checked when the
        programs are compiled)."""
        for name, spec in maplayout.MAPS.items():
            m, info = self._map(name), bpfsys.map_info(self.maps[name])
            single = m.value_size // bpfsys.possible_cpus() if spec.percpu else m.value_size
            if (info.key_size, info.value_size) != (m.key_size, single):
                raise DatapathError(
                    f"map {name}: key/value sizes {info.key_size}/{info.value_size} in the "
                    f"kernel, {m.key_size}/{single} in meshd/maplayout.py")
            want = (maplayout.MAP_TYPES[spec.kind], spec.max_entries(self.sizes), spec.flags)
            if (info.type, info.max_entries, info.map_flags) != want:
                raise DatapathError(
                    f"map {name}: type/max_entries/flags {info.type}/{info.max_entries}/"
                    f"{info.map_flags} in the kernel, {'/'.join(map(str, want))} in "
                    "meshd/maplayout.py")

    def _try_adopt(self, want_hash: int) -> bool:
        paths = [self._pin("maps", m) for m in MAPS] + [self._pin("progs", h) for h in HOOKS]
        if not all(os.path.exists(p) for p in paths):
            if os.path.exists(self.root):
                log.warning("pins under %s are incomplete; installing the programs", self.root)
            return False
        maps = {m: bpfsys.obj_get(self._pin("maps", m)) for m in MAPS}
        if Map(maps["meta"], maplayout.MAPS["meta"]).get(0) != want_hash:
            log.info("pinned programs are another build's (BPF sources or map sizes differ)")
            for fd in maps.values():
                os.close(fd)
            return False
        self.maps = maps
        self.progs = {h: bpfsys.obj_get(self._pin("progs", h)) for h in HOOKS}
        return True

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

    def attach_netns(self, netns_path: str, owner: str = "netns") -> None:
        """Link sk_lookup to a network namespace, pinned as links/<owner>:sk_lookup
        (the served namespace's owner is "netns"; a container's, its own)."""
        ns_fd = os.open(netns_path, os.O_RDONLY)
        try:
            # for a netns link, the link info's union starts with the netns inode (u32)
            self._ensure_link(_link_name(owner, "sk_lookup"), "sk_lookup", ns_fd,
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
        and its policy routing. Before open() (or after close()) every meshd
        sk_lookup program there counts as another's."""
        ours = bpfsys.prog_id(self.progs["sk_lookup"]) if "sk_lookup" in self.progs else None
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
    def set_settings(self, outbound_port: int, inbound_port: int,
                     acceleration: bool = False) -> None:
        """Envoy's ports, and whether sockops/sk_msg accelerate local pairs
        (off: no socket joins accel_socks and sends take the TCP path)."""
        flags = maplayout.MESH_F_ACCEL if acceleration else 0
        self._map("settings").set(0, maplayout.MeshSettings(
            outbound_port=outbound_port, inbound_port=inbound_port, flags=flags))

    def set_workload_ids(self, ids: dict[int, int]) -> None:
        """cgroup id -> workload id; entries not in `ids` are removed."""
        sync(self._map("workload_ids"), ids)

    def set_containers(self, netns: dict[int, tuple[int, str]]) -> None:
        """Container namespaces (netns cookie -> (index, IPv4 address)); entries
        not given are removed, and their listening ports with them."""
        sync(self._map("container_netns"), {
            cookie: maplayout.CtrNetns(index=i, addr4=maplayout.route_source(ip))
            for cookie, (i, ip) in netns.items()})
        addrs = {maplayout.route_source(ip): cookie for cookie, (_, ip) in netns.items()}
        sync(self._map("container_addr4"), addrs)
        sync(self._map("ctr_inbound_ports"), {}, keep=lambda k, wl: k.addr4 in addrs)

    def container_ports(self) -> dict[str, list[int]]:
        """The ports each container (by IPv4 address) listens on, via Envoy."""
        out: dict[str, list[int]] = {}
        for k, _ in self._map("ctr_inbound_ports").items():
            out.setdefault(str(ipaddress.IPv4Address(k.addr4.to_bytes(4, sys.byteorder))),
                           []).append(k.port)
        return {a: sorted(p) for a, p in out.items()}

    def container_listening(self, netns_cookie: int, slot: str = "OUT_V4") -> bool:
        """Is Envoy's listener inside this container namespace in the data path?"""
        i = [c for c, _ in maplayout.LISTENER_SLOTS].index(slot)
        return self._map("netns_listeners").get(
            maplayout.NetnsSlot(netns=netns_cookie, slot=i)) is not None

    def set_exclusions(self, ports: dict[int, set[int]], cidrs: dict[int, set]) -> None:
        """Exclusions by workload id (0 = every workload): ports and networks."""
        sync(self._map("excluded_ports"), _port_keys(ports))
        self._sync_families(("excluded_cidr4", "excluded_cidr6"),
                            {maplayout.cidr_key(wl, n): 1 for wl, nets in cidrs.items()
                             for n in nets})

    def _sync_families(self, names: tuple[str, str], want: dict) -> None:
        """Sync a pair of maps (IPv4, IPv6) from one dict: each entry goes to the
        map whose key type it has."""
        for name in names:
            key_type = maplayout.MAPS[name].key
            sync(self._map(name), {k: v for k, v in want.items() if isinstance(k, key_type)})

    def set_inbound(self, explicit: dict[int, set[int]], auto: set[int],
                    excluded: dict[int, set[int]], discovered: dict[int, set[int]]) -> None:
        """Inbound ports by workload id. `explicit` workloads get exactly their listed
        ports; `auto` ones get whatever they listen on (sockops adds ports on listen(),
        `discovered` adds those that were already listening). `excluded`: 0 = all."""
        sync(self._map("workload_flags"), {wl: maplayout.WL_EXPLICIT_PORTS for wl in explicit})
        want = {p: wl for wl, ports in explicit.items() for p in ports}
        for wl, ports in discovered.items():
            if wl in auto:
                want.update({p: wl for p in ports})
        # a port an auto workload listens on stays (sockops put it there and
        # removes it); one of a workload gone or of a changed explicit list goes
        sync(self._map("inbound_ports"), want, keep=lambda port, wl: wl in auto)
        sync(self._map("excluded_in_ports"), _port_keys(excluded))

    def set_route_sources(self, sources: dict) -> None:
        """Destination network -> the source address the kernel would pick for
        it (meshd.sources), for getsockname on steered sockets."""
        self._sync_families(("route_src4", "route_src6"),
                            {maplayout.route_key(net): maplayout.route_source(src)
                             for net, src in sources.items()})

    def inbound_ports(self) -> dict[int, list[int]]:
        """Meshed inbound ports by workload id."""
        out: dict[int, list[int]] = {}
        for port, wl in self._map("inbound_ports").items():
            out.setdefault(wl, []).append(port)
        return {wl: sorted(ps) for wl, ps in out.items()}

    def counters(self, workload_ids=range(MAX_WORKLOADS)) -> dict[int, dict[str, int]]:
        """Counter values summed over CPUs, by workload id (non-zero rows only).
        Pass the ids in use: each row costs one lookup per counter."""
        m = self._map("counters")
        out: dict[int, dict[str, int]] = {}
        for wl in workload_ids:
            row = {name: sum(m.get(wl * NR_COUNTERS + slot) or ())
                   for slot, name in enumerate(COUNTERS)}
            if any(row.values()):
                out[wl] = row
        return out

    def accel_counters(self) -> dict[str, int]:
        """Acceleration's counters (maplayout.ACCEL_COUNTERS), summed over CPUs."""
        m = self._map("accel_counters")
        return {name: sum(m.get(slot) or ()) for slot, name in
                enumerate(maplayout.ACCEL_COUNTERS)}

    def envoy_listening(self) -> dict[str, bool]:
        """Which of Envoy's listeners are in the SOCKMAP (i.e. alive).

        A SOCKMAP lookup from user space returns the socket cookie."""
        m = self._map("envoy_listeners")
        return {name: m.get(i) is not None for i, (_, name) in enumerate(maplayout.LISTENER_SLOTS)}

    def tracked_connections(self) -> int:
        return len(self._map("cookie_dst").keys())

    def map_fill(self, tracked: int) -> dict[str, tuple[int, int]]:
        """(entries, max_entries) of the maps that fill with use: connections
        (tracked_connections(), passed in: it was just counted), workload ids
        and inbound ports. For the metrics (meshd/metrics.py)."""
        if not hasattr(self, "_capacity"):
            self._capacity = {n: bpfsys.map_info(self.maps[n]).max_entries
                              for n in ("cookie_dst", "workload_ids", "inbound_ports")}
        return {"cookie_dst": (tracked, self._capacity["cookie_dst"]),
                "workload_ids": (len(self._map("workload_ids").keys()),
                                 self._capacity["workload_ids"]),
                "inbound_ports": (len(self._map("inbound_ports").keys()),
                                  self._capacity["inbound_ports"])}

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


def _port_keys(ports: dict[int, set[int]]) -> dict:
    """excluded_ports / excluded_in_ports entries: by workload id (0 = all)."""
    return {maplayout.PortKey(workload=wl, port=p): 1 for wl, ps in ports.items() for p in ps}
