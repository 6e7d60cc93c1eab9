"""One instance's footprint on the host, owned in one place: its state files,
the lock/PID file, the pinned data path, its cgroup tree, the network
namespace it serves (entered first) and the policy routing there.

`meshd run` (meshd/daemon.py) sets it up through here; `meshd cleanup` removes
all of it through here.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import time

from . import cgroups, routing, statefiles
from .config import MeshConfig
from .datapath import Datapath
from .maplayout import MapSizes
from .envoy import process as envoy_process, systemd_unit

NETNS_SELF = "/proc/self/ns/net"


class FootprintError(Exception):
    pass


def alive(pid) -> bool:
    """A running process (a zombie waiting for its parent to reap it is not)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError, TypeError, IndexError):
        return False


def _say(msg: str, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout)


class Footprint:
    def __init__(self, mesh: MeshConfig):
        self.mesh = mesh
        self._pid_fd: int | None = None

    def path(self, name: str) -> str:
        """A file of statefiles.py in this instance's state directory."""
        return statefiles.path(self.mesh.state_dir, name)

    # -- where the instance lives ---------------------------------------------
    def enter_netns(self) -> None:
        """Serve the configured network namespace (one meshd per simulated host).
        Done first, so Envoy, the sk_lookup link, the routing and every socket
        live there."""
        if not self.mesh.netns:
            return
        from pyroute2 import netns
        try:
            fd = os.open(self.mesh.netns, os.O_RDONLY)
            try:
                netns.setns(fd, flags=0)   # an fd: never creates a namespace
            finally:
                os.close(fd)
        except OSError as e:
            raise FootprintError(f"cannot enter network namespace {self.mesh.netns}: "
                                 f"{e.strerror or e}") from None

    def lock(self) -> None:
        """One daemon per state directory: hold a lock on the PID file for life."""
        os.makedirs(self.mesh.state_dir, mode=0o755, exist_ok=True)
        self._pid_fd = os.open(self.path(statefiles.MESHD_PID),
                               os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self._pid_fd, 32, 0).decode().strip() or "?"
            raise FootprintError(
                f"another meshd (pid {other}) already runs with state directory "
                f"{self.mesh.state_dir}; give this instance its own mesh.state_dir") from None
        os.ftruncate(self._pid_fd, 0)
        os.pwrite(self._pid_fd, f"{os.getpid()}\n".encode(), 0)

    def daemon_pid(self) -> int:
        try:
            with open(self.path(statefiles.MESHD_PID)) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def envoy_binary(self) -> str:
        """The Envoy this instance runs (mesh.envoy_binary, else found)."""
        try:
            return envoy_process.find_envoy(self.mesh.envoy_binary)
        except envoy_process.EnvoyNotFound as e:
            raise FootprintError(str(e)) from None

    def datapath(self) -> Datapath:
        m = self.mesh
        return Datapath(m.bpffs_dir, sizes=MapSizes(connections=m.max_connections,
                                                    exclusions=m.max_exclusions,
                                                    inbound_ports=m.max_inbound_ports))

    def cgroup_tree(self, cg_root: str | None = None) -> str:
        """The instance's own cgroup tree (Envoy runs below it), absolute."""
        return cgroups.path_of(cg_root or cgroups.cgroup2_mount(), self.mesh.cgroup_root)

    def policy_routing(self, on: bool) -> int:
        """Install (or remove, when switched off or left by an earlier run) the
        routing that lets applications see client addresses; returns the mark
        Envoy must set (0 when off)."""
        if on:
            routing.install(self.mesh.state_dir)   # before Envoy uses the mark
            return routing.MARK
        routing.remove(self.mesh.state_dir)
        return 0

    # -- removing it ----------------------------------------------------------
    def cleanup(self, say=_say) -> None:
        """Stop the daemon and Envoy, detach and unpin the data path, remove the
        policy routing (unless another meshd serves the namespace), the cgroup
        tree and the state files."""
        mesh = self.mesh
        pid = self.daemon_pid()
        if pid and alive(pid) and pid != os.getpid():
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not alive(pid):
                    break
                time.sleep(0.05)
            say(f"stopped meshd (pid {pid})")
        unit = systemd_unit.unit_name_for(mesh.state_dir)
        if systemd_unit.stop_unit(unit):   # False at once without systemd
            say(f"stopped Envoy ({unit})")
        if envoy_process.stop_from_pidfile(mesh.state_dir):
            say("stopped Envoy")
        self.enter_netns()   # the routing below lives in the instance's namespace
        dp = self.datapath()
        links = dp.pinned_links()
        dp.cleanup()
        say(f"detached {len(links)} link(s), removed pins under {mesh.bpffs_dir}")
        # The policy routing belongs to the namespace: leave it to the instance
        # that (still) serves it, if any.
        if dp.other_meshd_in_netns(NETNS_SELF):
            say("left the policy routing in place: another meshd serves this network namespace")
        else:
            self.policy_routing(False)
        own = self.cgroup_tree()
        left = [p for d, _, _ in os.walk(own) for p in cgroups.procs(d)]
        if left:   # only Envoy ever runs there: anything left is ours
            say(f"killing processes left in {own}: {left}", err=True)
        try:
            cgroups.kill_tree(own)
        except cgroups.CgroupError as e:
            say(f"warning: {e}", err=True)
        for name in statefiles.FILES:
            try:
                os.unlink(self.path(name))
            except FileNotFoundError:
                pass
        for name in statefiles.DIRS:
            shutil.rmtree(self.path(name), ignore_errors=True)
        try:
            os.rmdir(mesh.state_dir)
        except OSError:
            pass
