"""Transparent egress, end to end: real eBPF, real Envoy, a server in its own
network namespace, clients inside and outside an enrolled cgroup."""
from __future__ import annotations

import json
import random
import sys

import pytest

from conftest import EXCLUDED_PORT, HTTP_PORT, TCP_PORT, wait_for

PAYLOAD = random.Random(20261126).randbytes(256 * 1024)   # as tests/helpers/echo_server.py

PEER_CLIENT = r"""
import socket, sys, json
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=10)
hello = s.makefile("rb").readline().decode().strip()
print(json.dumps({"peer": list(s.getpeername()[:2]), "hello": hello}))
"""


def workload_counter(mesh, name: str) -> int:
    return mesh.status()["workloads"][0]["counters"].get(name, 0)


@pytest.fixture
def meshed(mesh, server):
    mesh.configure()
    mesh.start()
    return mesh, server


def test_curl_in_workload_goes_through_envoy(meshed):
    mesh, server = meshed
    before = mesh.stat("http.outbound_http.downstream_rq_total")
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/payload")
    assert r.returncode == 0, r.stderr
    assert r.stdout == PAYLOAD                      # byte-exact through Envoy
    assert mesh.stat("http.outbound_http.downstream_rq_total") == before + 1
    assert mesh.stat("cluster.meshd_original_dst.upstream_rq_total") >= 1

    echo = json.loads(mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo").stdout)
    assert "x-request-id" in echo["headers"]        # added by Envoy's HTTP connection manager
    assert echo["headers"]["x-forwarded-proto"] == "http"
    assert echo["headers"]["host"] == f"{server.ip4}:{HTTP_PORT}"


def test_python_client_sees_original_peer(meshed):
    mesh, server = meshed
    r = mesh.run_in(sys.executable, "-c", PEER_CLIENT, server.ip4, TCP_PORT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["peer"] == [server.ip4, TCP_PORT]     # getpeername hides Envoy
    assert out["hello"] == f"hello {server.host_ip4}"
    assert mesh.stat("tcp.outbound_tcp.downstream_cx_total") >= 1
    # the BPF counters (refreshed into the status every second) saw it too
    wait_for(lambda: workload_counter(mesh, "redirected") >= 1 and
             workload_counter(mesh, "answered") >= 1 and
             workload_counter(mesh, "peername") >= 1, what="BPF counters")


def test_outside_cgroup_goes_direct(meshed):
    mesh, server = meshed
    before = mesh.stat("http.outbound_http.downstream_rq_total")
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo", cgroup=mesh.outside)
    assert r.returncode == 0, r.stderr
    assert "x-request-id" not in json.loads(r.stdout)["headers"]
    assert mesh.stat("http.outbound_http.downstream_rq_total") == before


def test_ipv6_egress(meshed):
    mesh, server = meshed
    before = mesh.stat("http.outbound_http.downstream_rq_total")
    r = mesh.curl(f"http://[{server.ip6}]:{HTTP_PORT}/payload")
    assert r.returncode == 0, r.stderr
    assert r.stdout == PAYLOAD
    assert mesh.stat("http.outbound_http.downstream_rq_total") == before + 1
    r = mesh.run_in(sys.executable, "-c", PEER_CLIENT, server.ip6, TCP_PORT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["peer"] == [server.ip6, TCP_PORT]


def test_excluded_port_goes_direct(mesh, server):
    mesh.configure(exclude_outbound_ports=[22, EXCLUDED_PORT])
    mesh.start()
    before = mesh.stat("http.outbound_http.downstream_rq_total")
    r = mesh.curl(f"http://{server.ip4}:{EXCLUDED_PORT}/echo")
    assert r.returncode == 0, r.stderr
    assert "x-request-id" not in json.loads(r.stdout)["headers"]
    assert mesh.stat("http.outbound_http.downstream_rq_total") == before
    # ...while the other port of the same server is still meshed
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    assert "x-request-id" in json.loads(r.stdout)["headers"]


def test_per_workload_excluded_cidr(mesh, server):
    mesh.configure(workload_extra=f'exclude_outbound_cidrs = ["{server.ip4}/32"]\n')
    mesh.start()
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    assert "x-request-id" not in json.loads(r.stdout)["headers"]
    r = mesh.curl(f"http://[{server.ip6}]:{HTTP_PORT}/echo")   # IPv6 still meshed
    assert "x-request-id" in json.loads(r.stdout)["headers"]
    wait_for(lambda: workload_counter(mesh, "excluded") >= 1, what="excluded counter")
