"""Finding what exists: each configured workload's cgroup (unit or path), its
cgroup id, the TCP ports it already listens on, and the directories inotify
must watch so a cgroup that appears or goes away is seen.

Read-only: it looks at the cgroup2 tree and /proc and returns plain data; the
plan (meshd/plan.py) decides what to do with it. Podman containers join here.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import cgroups
from .config import Workload


@dataclass(frozen=True)
class Found:
    """A workload's cgroup as it exists now."""
    rel: str        # relative to the cgroup2 root, "/system.slice/web.service"
    path: str       # absolute directory
    id: int         # the kernel's cgroup id (the directory's inode)


@dataclass(frozen=True)
class World:
    """What discovery saw: by workload name, the cgroups that exist and (for
    the ones asked for) the ports their processes already listen on."""
    cgroups: dict[str, Found] = field(default_factory=dict)
    listening: dict[str, frozenset[int]] = field(default_factory=dict)
    ipv6_loopback: bool = True


def ipv6_loopback() -> bool:
    """Whether this network namespace has ::1 (Envoy's listeners follow it)."""
    try:
        with open("/proc/net/if_inet6") as f:
            return any(line.startswith("00000000000000000000000000000001") for line in f)
    except OSError:
        return False


class Discovery:
    def __init__(self, cg_root: str):
        self.cg_root = cg_root

    def find(self, w: Workload) -> Found | None:
        """The workload's cgroup if it exists now."""
        rel = w.cgroup or cgroups.find_unit(self.cg_root, w.unit)
        if not rel:
            return None
        path = cgroups.path_of(self.cg_root, rel)
        try:
            return Found(rel, path, cgroups.cgroup_id(path)) if os.path.isdir(path) else None
        except OSError:   # gone between the two looks
            return None

    def scan(self, workloads: Iterable[Workload],
             ports_wanted: Callable[[str, int], bool] = lambda name, cgid: False) -> World:
        """Every workload's cgroup; listening ports only where ports_wanted(name,
        cgroup id) says so (the /proc scan is the expensive part)."""
        found, listening = {}, {}
        for w in workloads:
            f = self.find(w)
            if f is None:
                continue
            found[w.name] = f
            if ports_wanted(w.name, f.id):
                listening[w.name] = frozenset(cgroups.listening_ports(f.path))
        return World(found, listening, ipv6_loopback())

    def watch_dirs(self, workloads: Iterable[Workload]) -> set[str]:
        """Where each configured cgroup is, or will appear: a path's nearest
        existing ancestor and its parent; for units, the root and system.slice."""
        want = set()
        for w in workloads:
            if w.cgroup:
                want.add(cgroups.nearest_existing(self.cg_root, w.cgroup))
                want.add(os.path.dirname(cgroups.path_of(self.cg_root, w.cgroup)))
            else:
                want.add(self.cg_root)
                want.add(cgroups.path_of(self.cg_root, "system.slice"))
        return {d for d in want if os.path.isdir(d)}
