"""Fixtures for the root tiers: real network namespaces, cgroups, meshd and Envoy.

Every name carries a per-test prefix ("mt" + 6 hex digits) and every fixture
removes what it made in a finalizer, so a failing test leaves nothing behind.
Every meshd a test starts serves a network namespace the test made (`<prefix>h`
by default), and every process a test puts in a test cgroup runs in that
namespace: the host's namespace, and a meshd that may serve it, stay untouched.
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
HTTP_PORT, EXCLUDED_PORT, TCP_PORT, SSH_PORT = 8080, 2222, 9000, 22
# The header Envoy's HTTP handling adds to every request on a port declared "http"
# (meshd adds no other): a request the server saw it on went through Envoy.
VIA_ENVOY = "x-forwarded-proto"

from helpers.common import (cgroup2_root, free_port, host_netns_footprint,  # noqa: F401,E402
                            kill_cgroup, netns_add, netns_del, netns_path, preexec, reap,
                            run_in_netns, sh, wait_for)

# Orphans (Envoy outliving a killed meshd) are re-parented to us, not to PID 1,
# so the tests can reap them (PR_SET_CHILD_SUBREAPER).
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)


@pytest.fixture
def prefix():
    return "mt" + uuid.uuid4().hex[:6]


@pytest.fixture
def netns(prefix):
    """The test's own network namespace ("<prefix>h", loopback up): the `mesh`
    fixture's meshd serves it. On the way out it checks that the host's namespace
    has the same policy routing, sysctl and sk_lookup programs as before, and no
    interface of the test."""
    before = host_netns_footprint(prefix)
    name = netns_add(f"{prefix}h")
    try:
        yield name
    finally:
        netns_del(name)
    assert host_netns_footprint(prefix) == before, "the host's network namespace changed"


class Cgroups:
    """Test cgroups below /<prefix>/ in the cgroup2 hierarchy. Processes started
    through it join a cgroup and then `netns` (an `ip netns` name) before exec."""

    def __init__(self, prefix: str, netns: str = ""):
        self.root = cgroup2_root()
        self.base = f"/{prefix}"
        self.netns = netns

    def in_netns(self, netns: str) -> "Cgroups":
        """The same cgroups, with processes started in another network namespace."""
        view = Cgroups.__new__(Cgroups)
        view.root, view.base, view.netns = self.root, self.base, netns
        return view

    def make(self, name: str) -> str:
        rel = f"{self.base}/{name}"
        os.makedirs(os.path.join(self.root, rel.lstrip("/")), exist_ok=True)
        return rel

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel.lstrip("/"))

    def preexec(self, rel: str):
        return preexec(os.path.join(self.path(rel), "cgroup.procs"), self.netns)

    def run(self, rel: str, *cmd, **kw) -> subprocess.CompletedProcess:
        """Run a command as a process of that cgroup, in the namespace (both joined
        before exec)."""
        kw.setdefault("timeout", 20)
        return subprocess.run([str(c) for c in cmd], preexec_fn=self.preexec(rel),
                              capture_output=True, **kw)

    def popen(self, rel: str, *cmd, **kw) -> subprocess.Popen:
        return subprocess.Popen([str(c) for c in cmd], preexec_fn=self.preexec(rel), **kw)

    def cleanup(self):
        kill_cgroup(self.path(self.base))


@pytest.fixture
def cgroups(prefix, netns):
    cg = Cgroups(prefix, netns)
    yield cg
    cg.cleanup()


class ServerHost:
    """Another host: a network namespace joined to `host_netns` (the mesh's) by a
    veth pair, running tests/helpers/echo_server.py on HTTP_PORT, EXCLUDED_PORT,
    SSH_PORT (HTTP) and TCP_PORT (raw TCP echo)."""

    def __init__(self, prefix: str, host_netns: str, index: int = 1):
        self.ns = f"{prefix}s{index}"
        self.host_netns = host_netns
        self.veth = f"{prefix}v{index}"          # in host_netns; the peer "<veth>p" in ns
        n = random.randint(1, 250)
        self.host_ip4, self.ip4 = f"10.231.{n}.1", f"10.231.{n}.2"
        self.host_ip6, self.ip6 = f"fd00:231:{n:x}::1", f"fd00:231:{n:x}::2"
        self.proc = None

    def start(self):
        peer = self.veth + "p"
        netns_add(self.ns)
        sh("ip", "link", "add", self.veth, "netns", self.host_netns, "type", "veth",
           "peer", "name", peer, "netns", self.ns)
        for ns, dev, ip4, ip6 in ((self.host_netns, self.veth, self.host_ip4, self.host_ip6),
                                  (self.ns, peer, self.ip4, self.ip6)):
            sh("ip", "-n", ns, "addr", "add", f"{ip4}/24", "dev", dev)
            sh("ip", "-n", ns, "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        self.proc = self.popen(
            sys.executable, ECHO_SERVER, "--http", HTTP_PORT, "--http", EXCLUDED_PORT,
            "--http", SSH_PORT, "--tcp", TCP_PORT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def popen(self, *cmd, **kw) -> subprocess.Popen:
        """A process on this host (in its namespace, not in any test cgroup)."""
        return subprocess.Popen([str(c) for c in cmd], preexec_fn=preexec(netns=self.ns), **kw)

    def run(self, *cmd, timeout=20) -> subprocess.CompletedProcess:
        return run_in_netns(self.ns, *cmd, timeout=timeout)

    def curl(self, url: str, *extra) -> subprocess.CompletedProcess:
        """curl from this host (bytes out: payloads are binary)."""
        return subprocess.run(["curl", "-sS", "--max-time", "10", *extra, url],
                              preexec_fn=preexec(netns=self.ns), capture_output=True,
                              timeout=20)

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
        sh("ip", "-n", self.host_netns, "link", "del", self.veth, check=False)
        netns_del(self.ns)


@pytest.fixture
def server(prefix, netns):
    s = ServerHost(prefix, netns)
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
    """One meshd instance with its own config dir, pins, state dir, cgroups and ports,
    serving a network namespace of the test: `netns` (an `ip netns` name), or, when
    not given, one it makes ("<prefix><name>h") and removes in teardown()."""

    def __init__(self, prefix: str, cgroups: Cgroups, name: str = "", netns: str = ""):
        """name: distinguishes several instances in one test."""
        self.own_netns = not netns
        self.netns = netns or netns_add(f"{prefix}{name}h")
        self.prefix = prefix
        self.cg = cgroups.in_netns(self.netns)   # its processes run in its namespace
        self.tmp = tempfile.mkdtemp(prefix=f"{prefix}{name}-")  # short: AF_UNIX paths are limited
        os.chmod(self.tmp, 0o755)   # Envoy runs as meshd-envoy: it must reach the state dir
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
                 f'state_dir = "{self.state_dir}"', f'cgroup_root = "{self.cgroup_root}"',
                 f'netns = "{netns_path(self.netns)}"']
        lines += [f"{k} = {toml_value(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def write(self, name: str, text: str) -> str:
        """Write a config file atomically (as an operator's editor would, via rename)."""
        path = os.path.join(self.config_dir, name)
        tmp = os.path.join(self.config_dir, f".{name}.tmp")
        Path(tmp).write_text(text)
        os.rename(tmp, path)
        return path

    def configure_mesh(self, http_ports=(), **mesh_extra):
        """00-mesh.toml as the HTTP tests want it: the server's HTTP ports (HTTP_PORT,
        EXCLUDED_PORT, SSH_PORT) and `http_ports` declared "http", so Envoy counts
        their requests and marks them (VIA_ENVOY). A test passing `protocols` decides."""
        mesh_extra.setdefault("protocols", {p: "http" for p in sorted(
            {HTTP_PORT, EXCLUDED_PORT, SSH_PORT, *map(int, http_ports)})})
        self.write("00-mesh.toml", self.mesh_toml(**mesh_extra))

    def configure(self, workload_extra: str = "", http_ports=(), **mesh_extra):
        """configure_mesh(), and the `wl` workload on self.workload."""
        self.configure_mesh(http_ports, **mesh_extra)
        self.write("10-workloads.toml",
                   f'[workload.wl]\ncgroup = "{self.workload}"\n{workload_extra}')

    # -- process --
    def env(self) -> dict:
        """meshd's environment: the system bus a test set up, else none at all, so a
        meshd on the host (which owns io.meshd.Mesh1 there) is never asked or disturbed."""
        env = dict(os.environ)
        env.setdefault("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={self.tmp}/no-system-bus")
        return env

    def start(self, wait=True):
        self.proc = subprocess.Popen(MESHD + ["run", "--config-dir", self.config_dir],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env())
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
        return sh(*MESHD, *args, "--config-dir", self.config_dir, check=check, env=self.env())

    # -- Envoy --
    def envoy_pid(self) -> int:
        return int(Path(self.state_dir, "envoy.pid").read_text())

    def stats(self) -> dict[str, int]:
        from meshd.envoy import stats
        from meshd.envoy_config import admin_socket_path
        return stats(admin_socket_path(self.state_dir))

    def stat(self, name: str) -> int:
        """Summed over the per-workload filter chains (meshd.envoy.total)."""
        from meshd.envoy import total
        return total(self.stats(), name)

    # -- the namespace it serves --
    def ns_run(self, *cmd, **kw) -> subprocess.CompletedProcess:
        """A command in the mesh's namespace, outside the test cgroups (`ip rule`, `ss`)."""
        return run_in_netns(self.netns, *cmd, **kw)

    def netns_fd(self) -> int:
        return os.open(netns_path(self.netns), os.O_RDONLY)

    # -- workloads --
    def run_in(self, *cmd, cgroup=None, **kw) -> subprocess.CompletedProcess:
        """Run a command in the mesh's namespace as a process of a test cgroup
        (default: the enrolled workload; `mesh.outside` is not enrolled)."""
        return self.cg.run(cgroup or self.workload, *cmd, **kw)

    def popen_in(self, *cmd, cgroup=None, **kw) -> subprocess.Popen:
        return self.cg.popen(cgroup or self.workload, *cmd, **kw)

    def echo_server(self, *port_args, cgroup=None) -> subprocess.Popen:
        """tests/helpers/echo_server.py (`--http P`, `--tcp P`) in the mesh's namespace
        as a process of a test cgroup (default: the workload), once it listens. The
        cgroups fixture kills it at the end if the test did not."""
        p = self.popen_in(sys.executable, ECHO_SERVER, *port_args, cgroup=cgroup,
                          stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        return p

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
        if self.own_netns:
            netns_del(self.netns)


@pytest.fixture
def mesh(prefix, cgroups, netns):
    m = Mesh(prefix, cgroups, netns=netns)
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


@pytest.fixture(scope="session")
def debs(tmp_path_factory) -> tuple[Path, Path]:
    """(meshd's .deb, meshd-envoy's .deb), built once per session by
    scripts/build-deb.sh into a directory of their own (it installs the build
    dependencies if missing): tests/datapath/test_deb.py inspects them, the system
    tier installs them in its guests."""
    out = tmp_path_factory.mktemp("deb")
    env = dict(os.environ)
    env.pop("DEB_BUILD_OPTIONS", None)   # built as an operator would
    r = subprocess.run([str(REPO / "scripts" / "build-deb.sh"), str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    paths = [Path(p) for p in r.stdout.split()]
    assert [p.name.split("_")[0] for p in paths] == ["meshd", "meshd-envoy"], paths
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def podman_store():
    """Podman's storage, run root and test image for the session (helpers/podman.py)."""
    from helpers.podman import PodmanStore
    store = PodmanStore()
    try:
        yield store
    finally:
        store.remove()


@pytest.fixture
def podman(podman_store, prefix, mesh):
    """Podman in the `mesh` fixture's namespace, with a hooks dir pointing at this
    checkout's meshd and the mesh's config; removes the test's containers."""
    from helpers.podman import Podman
    p = Podman(podman_store, prefix, mesh.netns, mesh.config_dir, MESHD[0], mesh.tmp)
    try:
        yield p
    finally:
        p.cleanup()
