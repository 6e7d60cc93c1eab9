"""Helpers shared by every test tier (plain functions, no fixtures)."""
from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import time


def reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def sh(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)


def cgroup2_root() -> str:
    from meshd.cgroups import cgroup2_mount
    return cgroup2_mount()


_HANDED_OUT: set[int] = set()


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive ports that are free here and were never
    handed out before in this process: a test's own listeners (Envoy's ports, its
    servers) live in one namespace and must not collide with each other."""
    while True:
        first = random.randint(20000, 40000 - count)
        ports = set(range(first, first + count))
        if ports & _HANDED_OUT or not all(map(_bindable, ports)):
            continue
        _HANDED_OUT.update(ports)
        return first


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for(pred, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def kill_cgroup(path: str) -> None:
    """Kill every process in a cgroup tree and remove it (reaping our children)."""
    from meshd.cgroups import kill_tree
    kill_tree(path, on_wait=reap)


# -- network namespaces --------------------------------------------------------------
# Every meshd a test (or bench/) starts serves a namespace it made, never the host's:
# a meshd running on the host already owns the host's namespace (one per namespace).

def netns_add(name: str) -> str:
    """A new named network namespace (`ip netns`) with its loopback up."""
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


def netns_del(name: str) -> None:
    sh("ip", "netns", "del", name, check=False)


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def enter_netns(name: str) -> None:
    """Move the calling thread into a named namespace (flags=0: never create one)."""
    from pyroute2.netns import setns
    setns(name, flags=0)


@contextlib.contextmanager
def inside_netns(name: str):
    """Run the calling thread (and what it forks) in a named namespace for a while."""
    from pyroute2.netns import setns
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(name, flags=0)
        yield
    finally:
        setns(home, flags=0)
        os.close(home)


def preexec(cgroup_procs: str = "", netns: str = ""):
    """For subprocess' preexec_fn: join a cgroup (its cgroup.procs path), then a network
    namespace, before exec: the process is enrolled and in the namespace from its first
    instruction."""
    from pyroute2.netns import setns   # imported here, not in the forked child

    def enter():
        if cgroup_procs:
            with open(cgroup_procs, "w") as f:
                f.write("0")
        if netns:
            setns(netns, flags=0)
    return enter


def run_in_netns(netns: str, *cmd, **kw) -> subprocess.CompletedProcess:
    """A command inside a network namespace, like `ip netns exec` (output as text)."""
    return sh(*cmd, preexec_fn=preexec(netns=netns), **kw)


def host_netns_footprint(prefix: str) -> dict:
    """What a meshd changes in the namespace it serves, read in this process's own
    (the host's) namespace, plus any interface named with the test's prefix: a test
    compares it before and after to prove it left the host's namespace alone."""
    from meshd import bpfsys
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        sk_lookup = sorted(bpfsys.prog_query(fd, bpfsys.SK_LOOKUP))
    finally:
        os.close(fd)
    with open("/proc/sys/net/ipv4/tcp_fwmark_accept") as f:
        fwmark_accept = f.read().strip()
    out = {"sk_lookup": sk_lookup, "tcp_fwmark_accept": fwmark_accept,
           "links": [line for line in sh("ip", "-o", "link").stdout.splitlines()
                     if prefix in line]}
    for fam in ("-4", "-6"):
        out[f"rules{fam}"] = sh("ip", fam, "rule").stdout
        out[f"table{fam}"] = sh("ip", fam, "route", "show", "table", "19795",
                                check=False).stdout
    return out
