"""Transparent ingress on one host: sk_lookup hands inbound connections for an
enrolled workload's ports to Envoy's inbound listener."""
from __future__ import annotations

import json
import subprocess
import random
import sys

import pytest

from conftest import SSH_PORT, VIA_ENVOY, free_port, wait_for

PAYLOAD = random.Random(20261126).randbytes(256 * 1024)
IN_RQ = "http.inbound_http.downstream_rq_total"
IN_CX = ("http.inbound_http.downstream_cx_total", "tcp.inbound_tcp.downstream_cx_total")


def start_app(mesh, *ports_args, cgroup=None):
    """tests/helpers/echo_server.py as a process of the workload cgroup."""
    return mesh.echo_server(*ports_args, cgroup=cgroup)


@pytest.fixture
def inbound(mesh, server):
    """meshd on this host with a server workload; `server`'s namespace is the client host."""
    http, excluded, tcp = free_port(), free_port(), free_port()
    mesh.configure(workload_extra=f"exclude_inbound_ports = [{excluded}]\n",
                   http_ports=[http, excluded])
    mesh.start()
    app = start_app(mesh, "--http", str(http), "--http", str(excluded), "--tcp", str(tcp))
    try:
        wait_for(lambda: set(mesh.status()["workloads"][0]["inbound_ports"]) >= {http, tcp},
                 what="workload ports discovered")
        yield mesh, server, http, excluded, tcp
    finally:
        app.kill()
        app.wait()


def client_curl(server, url, *extra):
    """curl from the other host (the server fixture's namespace)."""
    return server.curl(url, *extra)


def test_inbound_http_goes_through_envoy(inbound):
    mesh, server, http, _, _ = inbound
    before = mesh.stat("http.inbound_http.downstream_rq_total")
    r = client_curl(server, f"http://{server.host_ip4}:{http}/payload")
    assert r.returncode == 0, r.stderr
    assert r.stdout == PAYLOAD
    assert mesh.stat("http.inbound_http.downstream_rq_total") == before + 1
    echo = json.loads(client_curl(server, f"http://{server.host_ip4}:{http}/echo").stdout)
    # Envoy connects to the app from the client's own address (original_src) ...
    assert echo["client"] == server.ip4
    assert VIA_ENVOY in echo["headers"]
    assert "x-forwarded-for" not in echo["headers"]    # not asked for (http_forwarded_for)
    # ... and the flow log has it too (a file here: meshd is not under systemd).
    def flows():   # the file appears with the first record (Envoy sends every 0.2 s)
        try:
            return [json.loads(l) for l in open(f"{mesh.state_dir}/flows.log") if server.ip4 in l]
        except FileNotFoundError:
            return []
    log = wait_for(flows, what="flow log line")
    assert log[-1]["peer"].startswith(server.ip4 + ":")
    assert log[-1]["destination"] == f"{server.host_ip4}:{http}"


def test_inbound_tcp_and_ipv6(inbound):
    mesh, server, http, _, tcp = inbound
    before = mesh.stat("tcp.inbound_tcp.downstream_cx_total")
    hello = server.run(sys.executable, "-c",
                       "import socket,sys; s=socket.create_connection((sys.argv[1], "
                       "int(sys.argv[2])), timeout=5); print(s.recv(100).decode().strip())",
                       server.host_ip4, tcp)
    assert hello.stdout.strip() == f"hello {server.ip4}", hello.stderr
    wait_for(lambda: mesh.stat("tcp.inbound_tcp.downstream_cx_total") == before + 1,
             what="inbound tcp counted")
    before = mesh.stat("http.inbound_http.downstream_rq_total")
    r = client_curl(server, f"http://[{server.host_ip6}]:{http}/echo")
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert VIA_ENVOY in echo["headers"]
    assert echo["client"] == server.ip6
    assert mesh.stat("http.inbound_http.downstream_rq_total") == before + 1


def test_excluded_inbound_port_goes_direct(inbound):
    mesh, server, _, excluded, _ = inbound
    before = mesh.stat("http.inbound_http.downstream_rq_total")
    echo = json.loads(client_curl(server, f"http://{server.host_ip4}:{excluded}/echo").stdout)
    assert echo["client"] == server.ip4      # straight from the client
    assert VIA_ENVOY not in echo["headers"]
    assert mesh.stat("http.inbound_http.downstream_rq_total") == before


def inbound_connections(mesh) -> int:
    return sum(mesh.stat(name) for name in IN_CX)


def test_non_enrolled_server_is_untouched(inbound):
    mesh, server, http, *_ = inbound
    port = free_port()
    other = start_app(mesh, "--http", str(port), cgroup=mesh.outside)
    try:
        before = inbound_connections(mesh)
        echo = json.loads(client_curl(server, f"http://{server.host_ip4}:{port}/echo").stdout)
        assert echo["client"] == server.ip4
        assert VIA_ENVOY not in echo["headers"]                # Envoy never saw it
        assert inbound_connections(mesh) == before
        assert port not in mesh.status()["workloads"][0]["inbound_ports"]
        # ...while the enrolled app next to it is meshed
        echo = json.loads(client_curl(server, f"http://{server.host_ip4}:{http}/echo").stdout)
        assert VIA_ENVOY in echo["headers"]
        assert inbound_connections(mesh) == before + 1
    finally:
        other.kill()
        other.wait()


def test_http_forwarded_for(mesh, server):
    """http_forwarded_for = true: inbound HTTP requests get the client's address in
    X-Forwarded-For (IPv4 and IPv6), also when the app sees Envoy's own address."""
    http = free_port()
    mesh.configure(http_ports=[http], http_forwarded_for=True, preserve_client_address=False)
    mesh.start()
    start_app(mesh, "--http", str(http))
    wait_for(lambda: http in mesh.status()["workloads"][0]["inbound_ports"], what="port")
    for host, client in ((server.host_ip4, server.ip4), (f"[{server.host_ip6}]", server.ip6)):
        echo = json.loads(client_curl(server, f"http://{host}:{http}/echo").stdout)
        assert echo["headers"].get("x-forwarded-for") == client, echo


def test_ports_opened_after_enrollment_and_explicit_lists(mesh, server):
    late, listed, unlisted = free_port(), free_port(), free_port()
    mesh.configure(http_ports=[late, listed, unlisted])
    mesh.start()
    app = start_app(mesh, "--http", str(late))          # listen() after enrollment: sockops sees it
    try:
        echo = json.loads(client_curl(server, f"http://{server.host_ip4}:{late}/echo").stdout)
        assert VIA_ENVOY in echo["headers"]                       # through Envoy
    finally:
        app.kill()
        app.wait()
    # the port is forgotten when the listener closes
    wait_for(lambda: late not in mesh.status()["workloads"][0]["inbound_ports"],
             what="closed port forgotten")
    # explicit list: only the listed port goes through Envoy
    mesh.write("10-workloads.toml", f'[workload.wl]\ncgroup = "{mesh.workload}"\n'
                                    f"inbound_ports = [{listed}]\n")
    wait_for(lambda: mesh.status()["workloads"][0]["inbound_ports"] == [listed],
             what="explicit inbound ports applied")
    app = start_app(mesh, "--http", str(listed), "--http", str(unlisted))
    try:
        a = json.loads(client_curl(server, f"http://{server.host_ip4}:{listed}/echo").stdout)
        b = json.loads(client_curl(server, f"http://{server.host_ip4}:{unlisted}/echo").stdout)
        assert VIA_ENVOY in a["headers"] and VIA_ENVOY not in b["headers"]
    finally:
        app.kill()
        app.wait()


def test_envoy_source_mode(mesh, server):
    """preserve_client_address = false: Istio's default; the app sees 127.0.0.6
    (::1 for IPv6), and no policy routing is installed."""
    http = free_port()
    mesh.configure(preserve_client_address=False, http_ports=[http])
    mesh.start()
    app = start_app(mesh, "--http", str(http))
    try:
        wait_for(lambda: http in mesh.status()["workloads"][0]["inbound_ports"], what="port")
        echo = json.loads(client_curl(server, f"http://{server.host_ip4}:{http}/echo").stdout)
        assert echo["client"] == "127.0.0.6"
        assert VIA_ENVOY in echo["headers"]
        echo = json.loads(client_curl(server, f"http://[{server.host_ip6}]:{http}/echo").stdout)
        assert echo["client"] == "::1"
        assert "19795" not in mesh.ns_run("ip", "rule").stdout
    finally:
        app.kill()
        app.wait()


def test_ssh_port_excluded_inbound_by_default(mesh, server):
    http = free_port()
    mesh.configure(http_ports=[http])   # nothing excluded by the test: the default applies
    mesh.start()
    start_app(mesh, "--http", str(SSH_PORT), "--http", str(http))
    wait_for(lambda: http in mesh.status()["workloads"][0]["inbound_ports"], what="port")
    before = mesh.stat(IN_RQ)
    for host in (server.host_ip4, f"[{server.host_ip6}]"):
        echo = json.loads(client_curl(server, f"http://{host}:{SSH_PORT}/echo").stdout)
        assert VIA_ENVOY not in echo["headers"]
    assert mesh.stat(IN_RQ) == before
    echo = json.loads(client_curl(server, f"http://{server.host_ip4}:{http}/echo").stdout)
    assert VIA_ENVOY in echo["headers"]                       # the same app's other port
    assert mesh.stat(IN_RQ) == before + 1


def test_ports_open_before_enrollment_are_steered(mesh, server):
    """A workload already listening when meshd starts: meshd finds the port."""
    http = free_port()
    mesh.configure(http_ports=[http])
    start_app(mesh, "--http", str(http))          # listen() before meshd runs
    mesh.start()
    wait_for(lambda: http in mesh.status()["workloads"][0]["inbound_ports"],
             what="the port open before enrollment discovered")
    before = mesh.stat(IN_RQ)
    echo = json.loads(client_curl(server, f"http://{server.host_ip4}:{http}/echo").stdout)
    assert VIA_ENVOY in echo["headers"]
    assert echo["client"] == server.ip4
    assert mesh.stat(IN_RQ) == before + 1


def test_policy_routing_removed_by_cleanup(mesh, server):
    mesh.configure()
    mesh.start()
    # IPv4 and IPv6: replies to a client's address Envoy connected from go back to Envoy
    for fam in ("-4", "-6"):
        assert "fwmark 0x4d53 lookup 19795" in mesh.ns_run("ip", fam, "rule").stdout
        assert "local default dev lo" in mesh.ns_run("ip", fam, "route", "show", "table",
                                                     "19795").stdout
    assert mesh.ns_run("sysctl", "-n", "net.ipv4.tcp_fwmark_accept").stdout.strip() == "1"
    assert mesh.cli("cleanup").returncode == 0
    for fam in ("-4", "-6"):
        assert "19795" not in mesh.ns_run("ip", fam, "rule").stdout
        assert mesh.ns_run("ip", fam, "route", "show", "table", "19795",
                           check=False).stdout.strip() == ""



# A client of the other host holds one connection through Envoy, then opens a second
# one from the very port Envoy's connection to the app uses: the client's kernel does
# not know that port is taken in ours (with the client's address preserved a client
# may pick it by chance, and anyone may on purpose).
COLLIDING_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
a = socket.create_connection((host, port), timeout=10)
print(a.recv(100).decode().strip(), flush=True)
src_port = int(sys.stdin.readline())
b = socket.socket()
b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
b.bind(("", src_port))
b.settimeout(4)
try:
    b.connect((host, port))
    print(b.recv(100).decode().strip(), flush=True)
except OSError as e:
    print(f"second connection: {e}", flush=True)
"""


def test_a_client_on_envoys_upstream_port_still_goes_through_envoy(inbound):
    """A new connection whose 4-tuple is that of Envoy's live connection to the app
    (original_src) is answered, through Envoy, like any other (never let through to
    the application as if it were Envoy's own)."""
    mesh, server, _, _, tcp = inbound
    before = inbound_connections(mesh)
    client = server.popen(sys.executable, "-c", COLLIDING_CLIENT, server.host_ip4, str(tcp),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == f"hello {server.ip4}"
        assert inbound_connections(mesh) == before + 1
        # Envoy's connection to the app, from the client's address, in our namespace
        ss = mesh.ns_run("ss", "-tnH", "state", "established", "src", server.ip4,
                         "dst", f"{server.host_ip4}:{tcp}").stdout.split()
        (port,) = {int(f.rsplit(":", 1)[1]) for f in ss if f.startswith(server.ip4 + ":")}
        client.stdin.write(f"{port}\n")
        client.stdin.flush()
        second = client.stdout.readline().strip()
        if second == "second connection: timed out":
            # only this outcome is the known one; anything else fails the test
            pytest.xfail("known loss (bench/README.md, 'Known loss without a fault'): the "
                         "SYN meets the app's side of Envoy's live connection, the connect "
                         "hangs; preserve_client_address = false avoids it")
        assert second == f"hello {server.ip4}"
        assert inbound_connections(mesh) == before + 2
    finally:
        client.kill()
        client.wait()
