"""Fixtures for the root tiers: real network namespaces, cgroups, meshd and Envoy.

Every name carries a per-test prefix ("mt" + 6 hex digits) and every fixture
removes what it made in a finalizer, so a failing test leaves nothing behind.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MESHD = [str(VENV_BIN / "meshd")]
ECHO_SERVER = REPO / "tests" / "helpers" / "echo_server.py"
HTTP_PORT, EXCLUDED_PORT, TCP_PORT = 8080, 2222, 9000

from helpers.common import (cgroup2_root, free_port, kill_cgroup, reap,  # noqa: F401
                            sh, wait_for)

# Orphans (Envoy outliving a killed meshd) are re-parented to us, not to PID 1,
# so the tests can reap them (PR_SET_CHILD_SUBREAPER).
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)








@pytest.fixture
def prefix():
    return "mt" + uuid.uuid4().hex[:6]


class Cgroups:
    """Test cgroups below /<prefix>/ in the cgroup2 hierarchy."""

    def __init__(self, prefix: str):
        self.root = cgroup2_root()
        self.base = f"/{prefix}"

    def make(self, name: str) -> str:
        rel = f"{self.base}/{name}"
        os.makedirs(os.path.join(self.root, rel.lstrip("/")), exist_ok=True)
        return rel

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel.lstrip("/"))

    def preexec(self, rel: str):
        procs = os.path.join(self.path(rel), "cgroup.procs")
        return lambda: Path(procs).write_text("0")

    def run(self, rel: str, *cmd, **kw) -> subprocess.CompletedProcess:
        """Run a command as a process of that cgroup (moved in before exec)."""
        kw.setdefault("timeout", 20)
        return subprocess.run([str(c) for c in cmd], preexec_fn=self.preexec(rel),
                              capture_output=True, **kw)

    def popen(self, rel: str, *cmd, **kw) -> subprocess.Popen:
        return subprocess.Popen([str(c) for c in cmd], preexec_fn=self.preexec(rel), **kw)

    def cleanup(self):
        kill_cgroup(self.path(self.base))


@pytest.fixture
def cgroups(prefix):
    cg = Cgroups(prefix)
    yield cg
    cg.cleanup()


class ServerHost:
    """A network namespace behind a veth pair, running tests/helpers/echo_server.py."""

    def __init__(self, prefix: str, index: int = 1):
        self.ns = f"{prefix}s{index}"
        self.veth = f"{prefix}v{index}"
        n = random.randint(1, 250)
        self.host_ip4, self.ip4 = f"10.231.{n}.1", f"10.231.{n}.2"
        self.host_ip6, self.ip6 = f"fd00:231:{n:x}::1", f"fd00:231:{n:x}::2"
        self.proc = None

    def start(self):
        peer = self.veth + "p"
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip4}/24", "dev", self.veth)
        sh("ip", "-6", "addr", "add", f"{self.host_ip6}/64", "dev", self.veth, "nodad")
        sh("ip", "link", "set", self.veth, "up")
        ns = ["ip", "-n", self.ns]
        sh(*ns, "addr", "add", f"{self.ip4}/24", "dev", peer)
        sh(*ns, "-6", "addr", "add", f"{self.ip6}/64", "dev", peer, "nodad")
        sh(*ns, "link", "set", peer, "up")
        sh(*ns, "link", "set", "lo", "up")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, str(ECHO_SERVER),
             "--http", str(HTTP_PORT), "--http", str(EXCLUDED_PORT), "--tcp", str(TCP_PORT)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
        sh("ip", "link", "del", self.veth, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


@pytest.fixture
def server(prefix):
    s = ServerHost(prefix)
    try:
        yield s.start()
    finally:
        s.stop()


def toml_value(v) -> str:
    """A TOML value: JSON's scalars and arrays are TOML too; a dict becomes an
    inline table, e.g. protocols={8080: "http"} -> { 8080 = "http" }."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


class Mesh:
    """One meshd instance with its own config dir, pins, state dir, cgroups and ports."""

    def __init__(self, prefix: str, cgroups: Cgroups, name: str = "", netns: str = ""):
        """name: distinguishes several instances in one test; netns: the network
        namespace (ip netns name) this instance serves, as a separate host."""
        self.prefix, self.cg, self.netns = prefix, cgroups, netns
        self.tmp = tempfile.mkdtemp(prefix=f"{prefix}{name}-")  # short: AF_UNIX paths are limited
        self.config_dir = os.path.join(self.tmp, "etc")
        self.state_dir = os.path.join(self.tmp, "run")
        self.bpffs_dir = f"/sys/fs/bpf/{prefix}{name}"
        self.cgroup_root = f"{cgroups.base}/{name}meshd"
        self.outbound_port, self.inbound_port = free_port(), free_port()
        self.workload = cgroups.make(f"{name}wl")
        self.outside = cgroups.make(f"{name}outside")
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(self.tmp, "meshd.log"), "a+")
        os.makedirs(self.config_dir)

    # -- configuration --
    def mesh_toml(self, **extra) -> str:
        lines = ["[mesh]", f"outbound_port = {self.outbound_port}",
                 f"inbound_port = {self.inbound_port}", f'bpffs_dir = "{self.bpffs_dir}"',
                 f'state_dir = "{self.state_dir}"', f'cgroup_root = "{self.cgroup_root}"']
        if self.netns:
            lines.append(f'netns = "/run/netns/{self.netns}"')
        lines += [f"{k} = {toml_value(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def write(self, name: str, text: str) -> str:
        """Write a config file atomically (as an operator's editor would, via rename)."""
        path = os.path.join(self.config_dir, name)
        tmp = os.path.join(self.config_dir, f".{name}.tmp")
        Path(tmp).write_text(text)
        os.rename(tmp, path)
        return path

    def configure(self, workload_extra: str = "", **mesh_extra):
        self.write("00-mesh.toml", self.mesh_toml(**mesh_extra))
        self.write("10-workloads.toml",
                   f'[workload.wl]\ncgroup = "{self.workload}"\n{workload_extra}')

    # -- process --
    def start(self, wait=True):
        self.proc = subprocess.Popen(MESHD + ["run", "--config-dir", self.config_dir],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_running()
        return self

    def wait_running(self, timeout=30):
        def ok():
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"meshd exited {self.proc.returncode}:\n{self.log_text()}")
            st = self.status()
            return st and st["state"] == "running" and st["pid"] == self.proc.pid and st
        return wait_for(ok, timeout, what="meshd running")

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def status(self) -> dict | None:
        try:
            return json.loads(Path(self.state_dir, "status.json").read_text())
        except (OSError, ValueError):
            return None

    def workload_counter(self, name: str, index: int = 0) -> int:
        """A BPF counter of a workload from the status (-1 while there is none)."""
        st = self.status()
        return st["workloads"][index]["counters"].get(name, 0) if st else -1

    def cli(self, *args, check=False) -> subprocess.CompletedProcess:
        return sh(*MESHD, *args, "--config-dir", self.config_dir, check=check)

    # -- Envoy --
    def envoy_pid(self) -> int:
        return int(Path(self.state_dir, "envoy.pid").read_text())

    def stats(self) -> dict[str, int]:
        from meshd.envoy import stats
        return stats(os.path.join(self.state_dir, "envoy-admin.sock"))

    def stat(self, name: str) -> int:
        """Summed over the per-workload filter chains (meshd.envoy.total)."""
        from meshd.envoy import total
        return total(self.stats(), name)

    # -- workloads --
    def run_in(self, *cmd, cgroup=None, **kw):
        return self.cg.run(cgroup or self.workload, *cmd, **kw)

    def curl(self, url: str, *extra, cgroup=None) -> subprocess.CompletedProcess:
        return self.run_in("curl", "-sS", "--max-time", "10", *extra, url, cgroup=cgroup)

    def teardown(self):
        self.kill()
        self.cli("cleanup")
        reap()
        if os.path.exists(self.bpffs_dir):  # a broken cleanup must not leak pins
            shutil.rmtree(self.bpffs_dir, ignore_errors=True)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def mesh(prefix, cgroups):
    m = Mesh(prefix, cgroups)
    try:
        yield m
    finally:
        if os.environ.get("MESHD_TEST_SHOW_LOG"):
            print(m.log_text())
        m.teardown()


@pytest.fixture
def meshed(mesh, server):
    """A running meshd with the `wl` workload enrolled, and a server host."""
    mesh.configure()
    mesh.start()
    return mesh, server
