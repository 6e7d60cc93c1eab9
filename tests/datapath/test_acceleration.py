"""Socket acceleration (sockops + sk_msg), tested with it on: real clients and
servers (tests/helpers/accelprobe.py) through a real Envoy, checksums compared
on both ends, every socket life event the issue lists, and the counters that
prove the bytes really were redirected (without them every test here would
pass on the plain TCP path too).

The main path is same-host workload -> workload: the client connects to a
local (non-loopback) address of a server in the enrolled workload, so both
legs are local pairs: client -> Envoy's outbound listener, and Envoy -> the
server. The ingress test covers inbound Envoy -> local workload.

MESHD_TEST_FULL=1 adds the 3 GB single stream (it crosses 2 GiB, where a
kernel bug stalled sockmap streams).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_port, wait_for

from meshd import acceleration

PROBE = REPO / "tests" / "helpers" / "accelprobe.py"
LOCAL_IP = "10.77.9.1"      # a local, non-loopback address in the mesh's namespace (on lo)
MB = 1024 * 1024
FULL = os.environ.get("MESHD_TEST_FULL") == "1"
# Kernel bugs this suite shows, by kernel series: the test that shows one is an
# expected failure there (strict: once a kernel fixes it, the test passes, the
# run fails and says so, and that series can join the allowlist).
KERNEL_BUGS = {
    "6.18": "splice() from a socket reads only the TCP receive queue, not the bytes "
            "sk_msg redirected into it: a splice() reader sees the FIN (sent by TCP) "
            "first and reads EOF without the data",
}
# Measured there, not assumed: see the test that shows each.
KERNEL_BUGS_BACK_PRESSURE = {
    "6.18": "bytes redirected into a socket that is not read pile up in the kernel: the "
            "sender is not held back by the reader's receive buffer (with acceleration off "
            "the same test holds the sender back after about 19 MB of 256 MB)",
}
KERNEL = acceleration.kernel_series(os.uname().release)


class Accel:
    """A meshd with acceleration on, serving a namespace with a local address,
    and the probe server in the enrolled workload (its port meshed inbound)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.port = free_port(2)        # port + 1: the probe's late-accept listener

    def start(self, acceleration="force"):
        m = self.mesh
        m.ns_run("ip", "addr", "add", f"{LOCAL_IP}/32", "dev", "lo")
        m.configure(protocols={}, acceleration=acceleration)
        m.start()
        self.server = m.popen_in(sys.executable, PROBE, "server", self.port,
                                 stdout=subprocess.PIPE, text=True)
        assert self.server.stdout.readline().strip() == "ready"
        # sockops saw the listen(): the port is meshed (inbound_ports)
        wait_for(lambda: self.port in self.status()["workloads"][0]["inbound_ports"],
                 what="the probe's port meshed")
        return self

    def status(self) -> dict:
        return self.mesh.status()

    def counters(self) -> dict:
        return self.status()["acceleration"]["counters"]

    def client(self, mode, *args, port=None, timeout=60, cgroup=None) -> dict:
        r = self.mesh.run_in(sys.executable, PROBE, "client", LOCAL_IP, port or self.port,
                             mode, *args, timeout=timeout, cgroup=cgroup)
        assert r.returncode == 0, r.stderr.decode()
        return json.loads(r.stdout)

    def client_popen(self, mode, *args) -> subprocess.Popen:
        return self.mesh.popen_in(sys.executable, PROBE, "client", LOCAL_IP, self.port, mode,
                                  *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)

    def redirected_since(self, before: dict, at_least: int) -> dict:
        """Wait (status refreshes every second) until bytes_redirected grew by
        at_least; the counters then."""
        return wait_for(lambda: (c := self.counters())["bytes_redirected"]
                        - before["bytes_redirected"] >= at_least and c,
                        timeout=10, what=f">= {at_least} more bytes redirected")

    def set_acceleration(self, value) -> None:
        self.mesh.configure(protocols={}, acceleration=value)
        want = value == "force" or (value is True and acceleration.decide("on").active)
        wait_for(lambda: self.status()["acceleration"]["active"] == want,
                 what=f"acceleration {'on' if want else 'off'}")


@pytest.fixture
def accel(mesh):
    a = Accel(mesh).start()
    yield a
    a.server.kill()
    a.server.wait()


def assert_intact(out: dict, n: int) -> None:
    assert out["n"] == n, f"{out['n']} of {n} bytes arrived"
    assert out["sha"] == out["want_sha"], "the bytes that arrived differ from those sent"


# -- transfers ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1 * MB, 3 * MB])
def test_transfer_both_directions_redirected(accel, size):
    """1 MB and 3 MB (truncated 1.5-2.6 MB responses were a kernel bug) each
    way, checksummed; both legs of each connection redirected."""
    before = accel.counters()
    assert_intact(accel.client("sink", size), size)       # client -> server, then half-close
    assert_intact(accel.client("source", size), size)     # server -> client (a response)
    after = accel.redirected_since(before, 2 * 2 * size)  # two legs, two directions
    assert after["pairs"] - before["pairs"] >= 4          # client-Envoy and Envoy-server, x2
    st = accel.status()["acceleration"]
    assert st["active"] and st["mode"] == "force"


@pytest.mark.skipif(not FULL, reason="3 GB stream: MESHD_TEST_FULL=1")
def test_3gb_single_stream_past_2gib(accel):
    size = 3 * 1024 * MB
    before = accel.counters()
    assert_intact(accel.client("source", size, timeout=900), size)
    accel.redirected_since(before, 2 * size)


def test_many_concurrent_connections(accel):
    before = accel.counters()
    n, size = 40, 256 * 1024
    procs = [accel.client_popen("echo", size) for _ in range(n)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert_intact(json.loads(out), size)
    accel.redirected_since(before, n * size * 2 * 2)


def test_half_close_each_way(accel):
    """sink: the client shuts down its write side and then still reads the
    server's answer; source: the server closes, the client reads to EOF."""
    before = accel.counters()
    assert_intact(accel.client("sink", 100_000), 100_000)
    assert_intact(accel.client("source", 100_000), 100_000)
    accel.redirected_since(before, 4 * 100_000)


def test_server_reset_reaches_the_client(accel):
    before = accel.counters()
    assert accel.client("reset")["result"] == "reset"
    accel.redirected_since(before, 1000)


@pytest.mark.xfail(KERNEL in KERNEL_BUGS_BACK_PRESSURE, strict=True,
                   reason=KERNEL_BUGS_BACK_PRESSURE.get(KERNEL, ""))
def test_back_pressure_then_resume(accel):
    """The server reads nothing for 5 s while the client sends 256 MB: the
    client must be held back (no byte accepted for a second) long before it
    has sent everything, and once the server reads, all bytes arrive in order."""
    before = accel.counters()
    size = 256 * MB
    out = accel.client("pause", 5, size, timeout=180)
    assert_intact(out, size)
    accel.redirected_since(before, size)
    assert out["blocked_at"] is not None and out["blocked_at"] < size // 2, (
        f"no back-pressure: {out['blocked_at']} of {size} bytes accepted while nobody read")


@pytest.mark.parametrize("how", ["sendfile", "splice"])
def test_sendfile_and_splice_senders(accel, how):
    size = 3 * MB
    before = accel.counters()
    assert_intact(accel.client(how, size), size)
    accel.redirected_since(before, 2 * size)


@pytest.mark.xfail(KERNEL in KERNEL_BUGS, strict=True, reason=KERNEL_BUGS.get(KERNEL, ""))
def test_splice_reader(accel):
    """The server reads through splice(socket -> pipe)."""
    size = 3 * MB
    before = accel.counters()
    assert_intact(accel.client("splicesink", size, timeout=30), size)
    accel.redirected_since(before, 2 * size)


def test_fionread_matches_what_is_readable(accel):
    before = accel.counters()
    out = accel.client("fionread", 50_000)
    assert out["read"] == 50_000
    assert out["fionread"] == out["read"], f"FIONREAD said {out['fionread']}, recv got {out['read']}"
    accel.redirected_since(before, 2 * 50_000)


def test_bytes_queued_before_accept_are_readable_at_once(accel):
    """The client sends 3 MB before the server accept()s (1 s late): the
    queued bytes must wake poll() at once and all arrive."""
    before = accel.counters()
    size = 3 * MB
    out = accel.client("late", size, port=accel.port + 1)
    assert out["ready"], "poll() did not report the queued bytes within 5 s"
    assert_intact(out, size)
    accel.redirected_since(before, size)


# -- life events -------------------------------------------------------------------------
def test_envoy_restart_mid_stream(accel):
    """Envoy dies while a stream flows through it: the client sees the stream
    end (no hang), the sockets leave the map, and after the restart new
    connections are accelerated again."""
    mesh = accel.mesh
    p = accel.client_popen("stall", 2 * 1024 * MB)
    assert p.stdout.readline().strip() == "started"
    time.sleep(0.5)
    old = mesh.envoy_pid()
    os.kill(old, 9)
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err
    res = json.loads(out)
    assert res["result"] in ("eof", "reset"), res
    assert res["n"] < 2 * 1024 * MB

    def restarted() -> bool:
        try:
            return mesh.status()["envoy"]["state"] == "running" and mesh.envoy_pid() != old
        except FileNotFoundError:   # between Envoy's exit and its successor's PID file
            return False
    wait_for(restarted, timeout=30, what="Envoy restarted")
    wait_for(lambda: mesh.status()["envoy"]["listeners"]["ipv4"], what="Envoy listening")
    c = wait_for(lambda: (c := accel.counters())["closed"] > 0 and c, what="sockets closed")
    assert_intact(accel.client("source", MB), MB)
    after = accel.redirected_since(c, 2 * MB)
    assert after["pairs"] > c["pairs"]


def test_toggle_while_traffic_flows(accel):
    """Acceleration off and on again (live reloads, no restart) during a 2-way
    stream: every byte arrives in order; new connections follow the setting."""
    mesh = accel.mesh
    size = 256 * MB
    envoy = mesh.envoy_pid()
    p = accel.client_popen("echo", size)
    time.sleep(0.5)
    accel.set_acceleration(False)
    time.sleep(0.5)
    accel.set_acceleration("force")
    time.sleep(0.5)
    accel.set_acceleration(False)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert_intact(json.loads(out), size)
    # off: a new connection joins nothing
    c = accel.counters()
    assert_intact(accel.client("source", MB), MB)
    time.sleep(1.5)
    assert accel.counters()["sockets"] == c["sockets"]
    # on again: it does
    accel.set_acceleration("force")
    assert_intact(accel.client("source", MB), MB)
    accel.redirected_since(c, 2 * MB)
    assert mesh.envoy_pid() == envoy                        # live: Envoy kept running
    assert mesh.proc.poll() is None


# -- other legs, settings ----------------------------------------------------------------
def test_ingress_leg_envoy_to_local_workload(accel, server):
    """A client on another host -> sk_lookup -> inbound Envoy -> the workload:
    the Envoy -> workload pair is local and redirected."""
    mesh = accel.mesh
    before = accel.counters()
    size = 3 * MB
    r = server.run(sys.executable, PROBE, "client", server.host_ip4, accel.port, "source",
                   size, timeout=60)
    assert r.returncode == 0, r.stderr
    assert_intact(json.loads(r.stdout), size)
    wait_for(lambda: mesh.workload_counter("inbound") >= 1,     # it went through Envoy
             what="sk_lookup's inbound counter")
    accel.redirected_since(before, size)


def test_off_by_config_redirects_nothing(mesh):
    a = Accel(mesh).start(acceleration=False)
    try:
        assert_intact(a.client("source", MB), MB)
        time.sleep(1.5)
        st = a.status()["acceleration"]
        assert not st["active"] and st["mode"] == "off"
        assert st["counters"]["sockets"] == 0 and st["counters"]["bytes_redirected"] == 0
    finally:
        a.server.kill()
        a.server.wait()


def test_status_cli_shows_acceleration(accel):
    r = accel.mesh.cli("status")
    assert r.returncode == 0, r.stderr
    assert "accel:     active (mode force; " in r.stdout
    r = accel.mesh.cli("status", "--json")
    assert json.loads(r.stdout)["acceleration"]["kernel"] == os.uname().release


def test_true_on_a_kernel_off_the_allowlist_is_refused_loudly(mesh):
    """acceleration = true where the running kernel is not on the allowlist:
    meshd keeps it off, logs an error naming the kernel and the allowlist, and
    status says why; nothing joins the map."""
    if acceleration.decide("on").active:
        pytest.skip(f"this kernel ({os.uname().release}) is on the allowlist")
    a = Accel(mesh).start(acceleration=True)
    try:
        st = a.status()["acceleration"]
        assert st["mode"] == "on" and not st["active"]
        for text in (st["reason"], mesh.log_text()):
            assert os.uname().release in text and "allowlist" in text and '"force"' in text
        assert_intact(a.client("source", MB), MB)
        time.sleep(1.5)
        assert a.counters()["sockets"] == 0
    finally:
        a.server.kill()
        a.server.wait()
