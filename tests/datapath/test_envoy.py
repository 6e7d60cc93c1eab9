"""Real Envoy: config validation and the supervisor (spawn, cgroup, restart, adopt, stop).

Each test runs in the network namespace the `netns` fixture made (the test's thread
enters it, so Envoy and every socket the test opens live there, never in the host's)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from helpers.envoy_validate import validate
from meshd import envoy_config
from meshd.envoy import admin, process, supervisor
from meshd.envoy.child import EnvoySupervisor

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("needs root (cgroups)", allow_module_level=True)

try:
    ENVOY = process.find_envoy("")
except process.EnvoyNotFound as e:
    pytest.skip(str(e), allow_module_level=True)

GLib = pytest.importorskip("gi.repository.GLib")

from helpers.common import cgroup2_root, free_port, inside_netns  # noqa: E402


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def run_until(pred, timeout=10.0):
    """Iterate the default GLib main context until pred() is true."""
    ctx = GLib.MainContext.default()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        ctx.iteration(False)
        time.sleep(0.01)
    return pred()


def alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Env:
    def __init__(self, prefix: str, name: str = ""):
        self.state_dir = tempfile.mkdtemp(prefix=f"{prefix}{name}-")
        self.cgroup = os.path.join(cgroup2_root(), f"{prefix}-envoy{name}")
        os.mkdir(self.cgroup)
        self.port = free_port()
        self.ipv6 = ipv6_loopback()
        # one port declared HTTP, so the config has Envoy's HTTP handling too
        files = envoy_config.render(self.port, free_port(), self.state_dir, self.ipv6,
                                    protocols={80: "http"})
        envoy_config.write_config(self.state_dir, files)
        self.bootstrap = envoy_config.bootstrap_path(self.state_dir)
        self.admin = envoy_config.admin_socket_path(self.state_dir)
        self.sups = []

    def supervisor(self):
        states = []
        sup = EnvoySupervisor(ENVOY, self.state_dir, self.cgroup, "info", states.append)
        sup.states = states
        self.sups.append(sup)
        return sup

    def cleanup(self):
        for sup in self.sups:
            try:
                sup.detach()
            except Exception:
                pass
        # Kill whatever is left in the cgroup (Envoy, restarted or adopted), then rmdir it.
        deadline = time.monotonic() + 5
        while os.path.isdir(self.cgroup):
            try:
                with open(os.path.join(self.cgroup, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except FileNotFoundError:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            try:
                os.rmdir(self.cgroup)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        shutil.rmtree(self.state_dir, ignore_errors=True)


@pytest.fixture
def in_netns(netns):
    with inside_netns(netns):
        yield netns


@pytest.fixture
def env(in_netns, prefix):
    e = Env(prefix)
    try:
        yield e
    finally:
        e.cleanup()


def cgroup_of(pid) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return ""


def test_rendered_config_validates(env):
    ok, out = validate(ENVOY, env.bootstrap)
    assert ok, out


def test_validate_catches_bad_lds(env):
    lds = os.path.join(envoy_config.config_dir(env.state_dir), "lds.json")
    with open(lds) as f:
        text = f.read()
    with open(lds, "w") as f:
        f.write(text.replace('"codec_type": "AUTO"', '"codec_type": "NOPE"'))
    ok, out = validate(ENVOY, env.bootstrap)
    assert not ok
    assert "NOPE" in out


def test_supervisor_lifecycle(env):
    sup = env.supervisor()
    sup.start()
    assert sup.states == ["starting"]
    assert run_until(lambda: sup.state == "running", 15), (sup.states, open(sup.log_path).read())
    pid1 = sup.pid
    assert pid1 and alive(pid1)
    assert not sup.adopted
    with open(process.pid_file_path(env.state_dir)) as f:
        assert int(f.read()) == pid1

    # in its own cgroup, its own session
    want_cgroup = "/" + os.path.relpath(env.cgroup, cgroup2_root())
    assert cgroup_of(pid1) == want_cgroup
    assert os.getsid(pid1) == pid1

    # the listener answers on both loopbacks
    with socket.create_connection(("127.0.0.1", env.port), timeout=2) as c:
        # A direct connection has no original destination: the miss chain must fail it
        # loudly (blackhole) rather than forward it anywhere.
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert c.recv(100) == b""
        except ConnectionResetError:
            pass
    if env.ipv6:
        with socket.create_connection(("::1", env.port), timeout=2):
            pass

    # admin over the UNIX socket
    status, body = admin.get(env.admin, "/ready")
    assert (status, body.strip()) == (200, b"LIVE")
    st = admin.stats(env.admin)
    assert st["server.state"] == 0  # LIVE
    assert "cluster.meshd_original_dst.upstream_cx_total" in st
    # ... and it was counted as a miss (so was the IPv6 one: no listener filter waits
    # for data before a filter chain is chosen)
    misses = 1 + env.ipv6
    assert run_until(lambda: admin.stats(env.admin).get(
        "tcp.outbound_miss.downstream_cx_total") == misses, 10), admin.stats(env.admin)
    st = admin.stats(env.admin)
    assert st.get("cluster.meshd_blackhole.upstream_cx_none_healthy") == misses
    assert st.get("tcp.outbound_tcp.downstream_cx_total", 0) == 0

    # kill -9: the supervisor restarts it
    os.kill(pid1, signal.SIGKILL)
    assert run_until(lambda: sup.state == "running" and sup.pid not in (None, pid1), 15), sup.states
    pid2 = sup.pid
    assert "restarting" in sup.states
    assert sup.states[-3:] == ["restarting", "starting", "running"]
    assert not alive(pid1)
    assert cgroup_of(pid2) == want_cgroup
    with socket.create_connection(("127.0.0.1", env.port), timeout=2):
        pass

    # meshd "exits": detach; Envoy keeps running; a new supervisor adopts it
    sup.detach()
    assert alive(pid2)
    sup2 = env.supervisor()
    sup2.start()
    assert sup2.adopted
    assert sup2.pid == pid2
    assert run_until(lambda: sup2.state == "running", 10), sup2.states
    assert sup2.pid == pid2

    # filesystem xDS: an atomic rename of lds.json moves the listener, no restart
    new_port = free_port()
    files = envoy_config.render(new_port, free_port(), env.state_dir, env.ipv6)
    assert envoy_config.write_config(env.state_dir, files) == ["lds.json"]

    def listening(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    assert run_until(lambda: listening(new_port) and not listening(env.port), 10)
    assert sup2.pid == pid2 and alive(pid2)

    # stop() ends it and removes the PID file
    sup2.stop()
    assert sup2.states[-1] == "stopped"
    assert run_until(lambda: not alive(pid2), 5)
    assert not os.path.exists(process.pid_file_path(env.state_dir))
    assert sup2.pid is None


def test_stale_pidfile_is_not_adopted(env):
    # a PID file naming a live process that is not our Envoy (ourselves) is ignored
    with open(process.pid_file_path(env.state_dir), "w") as f:
        f.write(f"{os.getpid()}\n")
    sup = env.supervisor()
    sup.start()
    assert not sup.adopted
    assert sup.pid != os.getpid()
    assert run_until(lambda: sup.state == "running", 15), sup.states
    # stop_from_pidfile (meshd cleanup, no supervisor object) stops it
    pid = sup.pid
    sup.detach()
    assert process.stop_from_pidfile(env.state_dir)
    assert not alive(pid)
    assert not os.path.exists(process.pid_file_path(env.state_dir))
    assert process.stop_from_pidfile(env.state_dir) is False


def test_two_envoys_coexist(in_netns, prefix):
    """--disable-hot-restart lets several Envoys run on one host."""
    a, b = Env(prefix, "a"), Env(prefix, "b")
    try:
        sa, sb = a.supervisor(), b.supervisor()
        sa.start()
        sb.start()
        assert run_until(lambda: sa.state == sb.state == "running", 15), (sa.states, sb.states)
        assert sa.pid != sb.pid and alive(sa.pid) and alive(sb.pid)
        sa.stop()
        sb.stop()
    finally:
        a.cleanup()
        b.cleanup()


def test_spawn_failure_backs_off(env, monkeypatch):
    """Envoy must never start outside its cgroup: a missing cgroup is a failed start,
    retried with exponential backoff."""
    monkeypatch.setattr(supervisor, "BACKOFF_INITIAL", 0.05)
    states = []
    sup = EnvoySupervisor(ENVOY, env.state_dir, env.cgroup + "-missing", "info",
                          states.append)
    env.sups.append(sup)
    sup._backoff = supervisor.BACKOFF_INITIAL
    sup.start()
    assert run_until(lambda: sup.restarts >= 3, 5), states
    assert sup.pid is None
    assert sup._backoff == pytest.approx(0.05 * 2 ** 3)
    assert states[:4] == ["starting", "restarting", "starting", "restarting"]
    assert not os.path.exists(process.pid_file_path(env.state_dir))
    sup.stop()
    assert states[-1] == "stopped"
    restarts = sup.restarts
    assert not run_until(lambda: sup.restarts > restarts, 0.5)  # stop() cancelled the retry


DAEMON = """
import sys
from gi.repository import GLib
from meshd.envoy.child import EnvoySupervisor
binary, state_dir, cgroup = sys.argv[1:4]
loop = GLib.MainLoop()
def changed(state):
    if state == "running":
        print(sup.pid, flush=True)
sup = EnvoySupervisor(binary, state_dir, cgroup, "info", changed)
sup.start()
loop.run()
"""


def test_envoy_survives_sigkill_of_meshd(env):
    """meshd killed with SIGKILL: Envoy keeps serving; the next meshd adopts it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, ENVOY, env.state_dir, env.cgroup],
                              stdout=subprocess.PIPE, cwd=root)
    try:
        line = daemon.stdout.readline()
        assert line, "daemon died before Envoy was running"
        pid = int(line)
    finally:
        daemon.kill()
        daemon.wait()
    time.sleep(0.2)
    assert alive(pid)
    assert socket.create_connection(("127.0.0.1", env.port), timeout=2)
    sup = env.supervisor()
    sup.start()
    assert sup.adopted and sup.pid == pid
    assert run_until(lambda: sup.state == "running", 10), sup.states
    sup.stop()
    assert not alive(pid)
