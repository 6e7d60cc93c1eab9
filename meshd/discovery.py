"""Finding what exists: each configured workload's cgroup (unit or path), its
cgroup id, the TCP ports it already listens on, and the directories inotify
must watch so a cgroup that appears or goes away is seen.

Read-only: it looks at the cgroup2 tree and /proc and returns plain data; the
plan (meshd/plan.py) decides what to do with it. Podman containers join here:
the recorded ones, and every Podman container cgroup (for selection by name,
label or unit, meshd/podmanselect.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import cgroups
from .config import Workload
from .containers import NetnsFacts, Record, netns_facts
from .podmanlookup import container_id_of


@dataclass(frozen=True)
class Found:
    """A workload's cgroup as it exists now."""
    rel: str        # relative to the cgroup2 root, "/system.slice/web.service"
    path: str       # absolute directory
    id: int         # the kernel's cgroup id (the directory's inode)


@dataclass(frozen=True)
class ContainerFound:
    """A recorded container whose cgroup exists; netns None = it shares the
    served network namespace (--network host)."""
    record: Record
    cgroup: Found
    netns: NetnsFacts | None = None
    error: str = ""          # its namespace could not be read


@dataclass(frozen=True)
class World:
    """What discovery saw: by workload name, the cgroups that exist and (for
    the ones asked for) the ports their processes already listen on; by id,
    the recorded containers that still exist."""
    cgroups: dict[str, Found] = field(default_factory=dict)
    listening: dict[str, frozenset[int]] = field(default_factory=dict)
    ipv6_loopback: bool = True
    containers: dict[str, ContainerFound] = field(default_factory=dict)


def ipv6_loopback() -> bool:
    """Whether this network namespace has ::1 (Envoy's listeners follow it)."""
    try:
        with open("/proc/net/if_inet6") as f:
            return any(line.startswith("00000000000000000000000000000001") for line in f)
    except OSError:
        return False


class Discovery:
    def __init__(self, cg_root: str, own_netns_inode: int = 0):
        self.cg_root = cg_root
        self.own_netns_inode = own_netns_inode
        self._netns: dict[tuple[str, str], NetnsFacts] = {}   # (id, path) -> facts

    def find(self, w: Workload) -> Found | None:
        """The workload's cgroup if it exists now (a bare workload has none:
        it selects containers only)."""
        rel = w.cgroup or (cgroups.find_unit(self.cg_root, w.unit) if w.unit else None)
        return self.found(rel) if rel else None

    def found(self, rel: str) -> Found | None:
        path = cgroups.path_of(self.cg_root, rel)
        try:
            return Found(rel, path, cgroups.cgroup_id(path)) if os.path.isdir(path) else None
        except OSError:   # gone between the two looks
            return None

    def scan(self, workloads: Iterable[Workload],
             ports_wanted: Callable[[str, int], bool] = lambda name, cgid: False,
             containers: Iterable[Record] = ()) -> World:
        """Every workload's cgroup; listening ports only where ports_wanted(name,
        cgroup id) says so (the /proc scan is the expensive part); every
        recorded container whose cgroup still exists, with its namespace."""
        found, listening = {}, {}
        for w in workloads:
            f = self.find(w)
            if f is None:
                continue
            found[w.name] = f
            if ports_wanted(w.name, f.id):
                listening[w.name] = frozenset(cgroups.listening_ports(f.path))
        return World(found, listening, ipv6_loopback(), self.scan_containers(containers))

    def scan_containers(self, records: Iterable[Record]) -> dict[str, ContainerFound]:
        out, seen = {}, set()
        for rec in records:
            f = self.found(rec.cgroup)
            if f is None:
                continue
            seen.add((rec.id, rec.netns))
            if not rec.netns:
                out[rec.id] = ContainerFound(rec, f)
                continue
            facts = self._netns.get((rec.id, rec.netns))
            try:
                if facts is None:   # read once per container: a namespace never changes
                    facts = self._netns[(rec.id, rec.netns)] = netns_facts(rec.netns)
            except OSError as e:
                out[rec.id] = ContainerFound(rec, f, error=f"cannot enter its network "
                                             f"namespace {rec.netns}: {e.strerror or e}")
                continue
            # --network host, or a path that names the served namespace
            out[rec.id] = ContainerFound(rec, f, None if facts.inode == self.own_netns_inode
                                         else facts)
        self._netns = {k: v for k, v in self._netns.items() if k in seen}
        return out

    def watch_dirs(self, workloads: Iterable[Workload]) -> set[str]:
        """Where each configured cgroup is, or will appear: a path's nearest
        existing ancestor and its parent; for units, the root and system.slice."""
        want = set()
        for w in workloads:
            if w.cgroup:
                want.add(cgroups.nearest_existing(self.cg_root, w.cgroup))
                want.add(os.path.dirname(cgroups.path_of(self.cg_root, w.cgroup)))
            elif w.unit:
                want.add(self.cg_root)
                want.add(cgroups.path_of(self.cg_root, "system.slice"))
        return {d for d in want if os.path.isdir(d)}

    def podman_cgroups(self, max_depth: int = 6) -> tuple[dict[str, str], set[str]]:
        """Every Podman container cgroup (container id -> path relative to the
        cgroup2 root), wherever it is: libpod-<id> below /libpod_parent or a
        --cgroup-parent, libpod-<id>.scope below /machine.slice or a pod's
        machine-libpod_pod_<pod>.slice, libpod-payload-<id> below a unit's
        cgroup (--cgroups=split); and the directories to watch for more."""
        found, parents = {}, set()
        # not below a container's cgroup: its own sub-cgroups
        for e in cgroups.walk(self.cg_root, max_depth, lambda e: not container_id_of(e.name)):
            cid = container_id_of(e.name)
            if cid:
                found[cid] = "/" + os.path.relpath(e.path, self.cg_root)
                parents.add(os.path.dirname(e.path))
            elif e.name in ("libpod_parent", "machine.slice") or e.name.startswith(
                    "machine-libpod_pod_"):
                parents.add(e.path)   # where containers will appear
        return found, parents

    def container_watch_dirs(self, records: Iterable[Record]) -> set[str]:
        """The parents of recorded containers' cgroups: their removal is the
        container stopping."""
        dirs = {os.path.dirname(cgroups.path_of(self.cg_root, r.cgroup)) for r in records}
        return {d for d in dirs if os.path.isdir(d)}
