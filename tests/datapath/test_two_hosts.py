"""Two hosts on one machine: two meshd instances, each serving its own network
namespace (joined by a veth pair), with its own cgroups, pins, state and Envoy.
A client workload on host A calls a server workload on host B: the request
passes A's outbound Envoy and B's inbound Envoy."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from conftest import ECHO_SERVER, VIA_ENVOY, Mesh, free_port, netns_add, netns_del, reap, sh, wait_for

PAYLOAD = random.Random(20261126).randbytes(256 * 1024)


class Hosts:
    def __init__(self, prefix, cgroups):
        n = random.randint(1, 250)
        self.a, self.b = f"{prefix}ha", f"{prefix}hb"
        self.ip4 = {self.a: f"10.232.{n}.1", self.b: f"10.232.{n}.2"}
        self.ip6 = {self.a: f"fd00:232:{n:x}::1", self.b: f"fd00:232:{n:x}::2"}
        self.veth = f"{prefix}x"
        self.prefix, self.cgroups = prefix, cgroups
        self.mesh_a = self.mesh_b = self.app = None

    def start(self):
        for ns in (self.a, self.b):
            netns_add(ns)
        sh("ip", "link", "add", self.veth, "netns", self.a, "type", "veth", "peer", "name",
           self.veth + "p", "netns", self.b)
        for ns, dev in ((self.a, self.veth), (self.b, self.veth + "p")):
            sh("ip", "-n", ns, "addr", "add", f"{self.ip4[ns]}/24", "dev", dev)
            sh("ip", "-n", ns, "-6", "addr", "add", f"{self.ip6[ns]}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        self.mesh_a = Mesh(self.prefix, self.cgroups, "a", netns=self.a)
        self.mesh_b = Mesh(self.prefix, self.cgroups, "b", netns=self.b)
        self.port = free_port()
        for m in (self.mesh_a, self.mesh_b):
            m.configure(http_ports=[self.port])
            m.start()
        # the server workload on host B: in B's namespace and B's workload cgroup
        self.app = self.mesh_b.popen_in(sys.executable, ECHO_SERVER, "--http", self.port,
                                        stdout=subprocess.PIPE, text=True)
        assert self.app.stdout.readline().strip() == "ready"
        wait_for(lambda: self.port in self.mesh_b.status()["workloads"][0]["inbound_ports"],
                 what="B's server port meshed")
        return self

    def curl_from_a(self, url, cgroup=None):
        """curl as a process of host A's client workload (in A's namespace)."""
        return self.mesh_a.curl(url, cgroup=cgroup)

    def stop(self):
        if self.app:
            self.app.kill()
            self.app.wait()
        for m in (self.mesh_a, self.mesh_b):
            if m:
                m.teardown()
        netns_del(self.a)
        netns_del(self.b)


@pytest.fixture
def hosts(prefix, cgroups):
    h = Hosts(prefix, cgroups)
    try:
        yield h.start()
    finally:
        h.stop()


def counts(h):
    return (h.mesh_a.stat("http.outbound_http.downstream_rq_total"),
            h.mesh_b.stat("http.inbound_http.downstream_rq_total"))


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_request_passes_both_envoys(hosts, family):
    h = hosts
    ip = h.ip4[h.b] if family == "ipv4" else f"[{h.ip6[h.b]}]"
    a0, b0 = counts(h)
    r = h.curl_from_a(f"http://{ip}:{h.port}/payload")
    assert r.returncode == 0, r.stderr
    assert r.stdout == PAYLOAD
    assert counts(h) == (a0 + 1, b0 + 1)
    echo = json.loads(h.curl_from_a(f"http://{ip}:{h.port}/echo").stdout)
    client_ip = h.ip4[h.a] if family == "ipv4" else h.ip6[h.a]
    assert echo["client"] == client_ip                       # the server sees host A
    assert VIA_ENVOY in echo["headers"]
    # each instance only counted its own side
    assert h.mesh_a.stat("http.inbound_http.downstream_rq_total") == 0
    assert h.mesh_b.stat("http.outbound_http.downstream_rq_total") == 0


def test_envoy_restart_on_b_and_cleanup_of_a(hosts):
    h = hosts
    url = f"http://{h.ip4[h.b]}:{h.port}/echo"
    # stop B's meshd from restarting Envoy, kill B's Envoy: inbound fails open
    h.mesh_b.proc.send_signal(signal.SIGSTOP)
    try:
        old = h.mesh_b.envoy_pid()
        os.kill(old, signal.SIGKILL)
        reap()
        # (from a process of host A outside the mesh: A's Envoy would keep pooling
        # the direct upstream connection after B's Envoy is back)
        r = h.curl_from_a(url, cgroup=h.mesh_a.outside)
        assert r.returncode == 0, r.stderr
        echo = json.loads(r.stdout)
        assert VIA_ENVOY not in echo["headers"]              # B's Envoy was bypassed
        assert echo["client"] == h.ip4[h.a]                 # straight to the app
    finally:
        h.mesh_b.proc.send_signal(signal.SIGCONT)
    # B's meshd restarts Envoy; steering is back without restarting meshd
    wait_for(lambda: (st := h.mesh_b.status())["envoy"]["listeners"].get("inbound_ipv4")
             and st["envoy"]["pid"] not in (None, old), what="B's Envoy back in the data path")
    b0 = h.mesh_b.stat("http.inbound_http.downstream_rq_total")
    echo = json.loads(h.curl_from_a(url).stdout)
    assert echo["client"] == h.ip4[h.a]
    assert h.mesh_b.stat("http.inbound_http.downstream_rq_total") == b0 + 1

    # kill -9 of B's meshd: inbound stays steered (the sk_lookup link is pinned)
    h.mesh_b.kill()
    b0 = h.mesh_b.stat("http.inbound_http.downstream_rq_total")
    echo = json.loads(h.curl_from_a(url).stdout)
    assert echo["client"] == h.ip4[h.a]
    assert h.mesh_b.stat("http.inbound_http.downstream_rq_total") == b0 + 1
    h.mesh_b.start()

    # cleanup of A leaves B working
    assert h.mesh_a.cli("cleanup").returncode == 0
    assert not os.path.exists(h.mesh_a.bpffs_dir)
    b0 = h.mesh_b.stat("http.inbound_http.downstream_rq_total")
    echo = json.loads(h.curl_from_a(url).stdout)
    assert echo["client"] == h.ip4[h.a]                     # the app sees host A ...
    assert VIA_ENVOY in echo["headers"]                     # ... through B's Envoy (A's is gone)
    assert h.mesh_b.stat("http.inbound_http.downstream_rq_total") == b0 + 1
    assert h.mesh_b.status()["state"] == "running"


def test_second_instance_in_the_same_namespace_is_refused(mesh, cgroups, prefix):
    """Two instances in one network namespace would fight over its ports and
    policy routing: the second one says so and exits, the first keeps working."""
    mesh.configure()
    mesh.start()
    second = Mesh(prefix, cgroups, "x", netns=mesh.netns)
    try:
        second.configure()
        second.start(wait=False)
        assert second.proc.wait(30) == 1
        assert "another meshd instance already serves this network namespace" in second.log_text()
        assert mesh.status()["state"] == "running"
    finally:
        second.teardown()
    assert mesh.status()["state"] == "running" and mesh.proc.poll() is None
    # the refused instance's cleanup left the namespace's policy routing to the first
    assert "lookup 19795" in mesh.ns_run("ip", "rule").stdout
