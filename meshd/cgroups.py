"""cgroup2 facts: where the hierarchy is mounted, cgroup ids, unit lookup.

The mount point differs between hosts (/sys/fs/cgroup on a pure cgroup2 host,
/sys/fs/cgroup/unified on a hybrid one), so it is always read from
/proc/self/mountinfo, never assumed.
"""
from __future__ import annotations

import os

from . import mounts

UNIT_SUFFIXES = (".service", ".scope", ".slice", ".socket")


class CgroupError(Exception):
    pass


def cgroup2_mount(mountinfo: str = mounts.MOUNTINFO) -> str:
    point = mounts.first_of_type("cgroup2", mountinfo)
    if point is not None:
        return point
    raise CgroupError("no cgroup2 hierarchy is mounted here (meshd needs cgroup v2: "
                      "mount -t cgroup2 none /sys/fs/cgroup); under `ip netns exec`, which "
                      "mounts a /sys without it, run meshd in the host's mounts with "
                      "mesh.netns = \"/run/netns/NAME\" instead")


def path_of(root: str, rel: str) -> str:
    """Absolute directory of a cgroup given relative to the cgroup2 root."""
    return os.path.join(root, rel.lstrip("/"))


def cgroup_id(path: str) -> int:
    """The kernel's cgroup id is the cgroup directory's inode number."""
    return os.stat(path).st_ino


def ensure(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def remove_tree(path: str) -> None:
    """rmdir a cgroup and its children, deepest first (cgroups are removed with rmdir)."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass


def kill_tree(path: str, timeout: float = 5.0, on_wait=None) -> None:
    """SIGKILL every process in a cgroup tree, then remove the tree.

    cgroup.kill (Linux >= 5.14) kills atomically, so nothing forks away; older
    kernels get a SIGKILL per listed process. on_wait runs while waiting (a
    caller that is the processes' parent reaps them there)."""
    import signal
    import time
    if not os.path.isdir(path):
        return
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        for dirpath, _, _ in os.walk(path):
            for pid in procs(dirpath):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    deadline = time.monotonic() + timeout
    while True:
        if on_wait:
            on_wait()
        try:
            remove_tree(path)
            return
        except OSError:   # EBUSY: processes still exiting
            if time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup {path}: processes are still in it")
            time.sleep(0.05)


def procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def find_unit(root: str, unit: str, max_depth: int = 4) -> str | None:
    """The cgroup of a systemd unit, relative to the root, or None if not running.

    systemd names a unit's cgroup after the unit, below its slice (default
    system.slice); search the slices breadth-first rather than asking systemd,
    so this works the same with or without systemd as PID 1.
    """
    for e in walk(root, max_depth, lambda e: e.name.endswith(".slice")):
        if e.name == unit:
            return "/" + os.path.relpath(e.path, root)
    return None


def walk(root: str, max_depth: int, descend):
    """The cgroup directories below root, breadth-first, in name order within
    a directory, entering only those descend(entry) accepts."""
    level = [root]
    for _ in range(max_depth):
        nxt = []
        for d in level:
            try:
                entries = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for e in sorted(entries, key=lambda e: e.name):
                yield e
                if descend(e):
                    nxt.append(e.path)
        level = nxt


def nearest_existing(root: str, rel: str) -> str:
    """The deepest existing directory on the way to a cgroup (to watch for it)."""
    path = path_of(root, rel)
    while not os.path.isdir(path) and path != root:
        path = os.path.dirname(path)
    return path


def listening_ports(path: str) -> set[int]:
    """TCP ports that processes of a cgroup tree already listen on.

    Ports opened later are seen by sockops at listen(); this finds the ones
    that were open before the workload was enrolled."""
    inodes: dict[int, set[str]] = {}   # pid -> socket inodes
    for dirpath, _, _ in os.walk(path):
        for pid in procs(dirpath):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            socks = set()
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    socks.add(link[8:-1])
            if socks:
                inodes[pid] = socks
    ports = set()
    for pid, socks in inodes.items():
        for table in ("tcp", "tcp6"):   # the process's own network namespace's view
            try:
                with open(f"/proc/{pid}/net/{table}") as f:
                    next(f)
                    for line in f:
                        cols = line.split()
                        if cols[3] == "0A" and cols[9] in socks:   # 0A = LISTEN
                            ports.add(int(cols[1].rsplit(":", 1)[1], 16))
            except OSError:
                continue
    return ports
