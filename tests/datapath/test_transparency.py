"""Transparency: an application gets through meshd exactly what it gets without it.

Each case runs the same real client against the same real server twice in one
test: direct (the client in a cgroup meshd does not enroll, or a server instance
outside the workload) and through meshd (Envoy's counters prove the path), then
compares what the client observed: bytes, how the connection ended, errors,
addresses. Egress and ingress, IPv4 and IPv6. The one place timing is compared
is a server that speaks first, against the direct run of the same test (the old
protocol sniffer held such connections for a second).

Topology: the meshd host is a network namespace of the test's own; a peer
namespace behind a veth pair holds the egress servers and the ingress clients.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid

import pytest

from conftest import (REPO, Cgroups, Mesh, ServerHost, free_port, host_netns_footprint,
                      netns_add, netns_del, wait_for)
from helpers.common import run_in_netns
from helpers.tcpprobe import MODES, port_of

PROBE = str(REPO / "tests" / "helpers" / "tcpprobe.py")
L7APPS = str(REPO / "tests" / "helpers" / "l7apps.py")
pytestmark = pytest.mark.root


class Topology:
    """The `mesh` fixture's meshd on the test's host namespace, and the `server`
    fixture's namespace behind a veth pair as the peer: tcpprobe servers in the
    peer (egress targets), on the host in the workload (meshed ingress) and
    outside it (direct ingress)."""

    def __init__(self, mesh, server):
        self.mesh, self.server = mesh, server
        self.host, self.peer = mesh.netns, server.ns
        self.ip4 = {self.host: server.host_ip4, self.peer: server.ip4}
        self.ip6 = {self.host: server.host_ip6, self.peer: server.ip6}
        self.procs: list[subprocess.Popen] = []
        self.peer_base, self.wl_base, self.out_base = (free_port(len(MODES)) for _ in range(3))

    def start(self, mesh_extra: str = ""):
        m = self.mesh
        m.write("00-mesh.toml", m.mesh_toml() + mesh_extra)
        m.write("10-workloads.toml", f'[workload.wl]\ncgroup = "{m.workload}"\n')
        m.start()
        self.serve(self.server.popen, sys.executable, PROBE, "serve", self.peer_base)
        for cgroup, base in ((m.workload, self.wl_base), (m.outside, self.out_base)):
            self.serve(m.popen_in, sys.executable, PROBE, "serve", base, cgroup=cgroup)
        want = {port_of(self.wl_base, mode) for mode in MODES}
        wait_for(lambda: want <= set(m.status()["workloads"][0]["inbound_ports"]),
                 what="the workload's ports meshed")
        return self

    def serve(self, popen, *cmd, **kw):
        """A server process (popen: where it runs), once it says it is ready."""
        p = popen(*map(str, cmd), stdout=subprocess.PIPE, text=True, **kw)
        self.procs.append(p)
        assert p.stdout.readline().strip() == "ready"

    def run(self, ns, *cmd, cgroup=None, **kw) -> subprocess.CompletedProcess:
        """A client: in the peer, or on the host in a test cgroup."""
        kw.setdefault("timeout", 20)
        if ns == self.peer:
            return run_in_netns(self.peer, *cmd, check=False, **kw)
        return self.mesh.run_in(*map(str, cmd), cgroup=cgroup, text=True, **kw)

    def probe(self, ns, host, port, *args, cgroup=None) -> dict:
        r = self.run(ns, sys.executable, PROBE, "probe", host, port, *args, cgroup=cgroup,
                     timeout=30 + IDLE)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture
def topo(mesh, server):
    t = Topology(mesh, server)
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture(scope="module")
def shared_topo():
    """One started Topology (meshd as configured by default) for every test of
    the `path` form: they only make connections and compare Envoy's counters
    before and after, so each need not start a meshd of its own (~3 s each, 56
    of them). Made and checked as the netns, cgroups, mesh and server fixtures
    make theirs, under a prefix of its own."""
    prefix = "mt" + uuid.uuid4().hex[:6]
    before = host_netns_footprint(prefix)
    ns = netns_add(f"{prefix}h")
    cg = Cgroups(prefix, ns)
    mesh = server = t = None
    try:
        mesh = Mesh(prefix, cg, netns=ns)
        server = ServerHost(prefix, ns)
        server.start()
        t = Topology(mesh, server)
        yield t.start()
    finally:
        for done in (t and t.stop, server and server.stop, mesh and mesh.teardown, cg.cleanup):
            if done:
                done()
        netns_del(ns)
    assert host_netns_footprint(prefix) == before, "the host's network namespace changed"


class Path:
    """One direction and family: how to reach a mode's server direct and meshed."""

    def __init__(self, topo: Topology, direction: str, family: int):
        self.t, self.direction = topo, direction
        addr = topo.ip4 if family == 4 else topo.ip6
        if direction == "egress":   # clients on the host, servers in the peer
            self.client_ns, self.server = topo.host, addr[topo.peer]
            self.stat = "tcp.outbound_tcp.downstream_cx_total"
        else:                       # clients in the peer, servers on the host
            self.client_ns, self.server = topo.peer, addr[topo.host]
            self.stat = "tcp.inbound_tcp.downstream_cx_total"

    def target(self, mode: str, meshed: bool) -> tuple[dict, int]:
        t = self.t
        if self.direction == "egress":
            return (dict(cgroup=t.mesh.workload if meshed else t.mesh.outside),
                    port_of(t.peer_base, mode))
        return {}, port_of(t.wl_base if meshed else t.out_base, mode)

    def both(self, mode: str, *args) -> tuple[dict, dict]:
        """(direct, meshed) observations of one probe; asserts the meshed one
        went through Envoy and the direct one did not."""
        out = []
        for meshed in (False, True):
            where, port = self.target(mode, meshed)
            before = self.t.mesh.stat(self.stat)
            out.append(self.t.probe(self.client_ns, self.server, port, *args, **where))
            if meshed:
                wait_for(lambda: self.t.mesh.stat(self.stat) > before,
                         what=f"Envoy counted the {self.direction} connection")
            else:
                assert self.t.mesh.stat(self.stat) == before, "the direct run went through Envoy"
        return out[0], out[1]


PATHS = [("egress", 4), ("egress", 6), ("ingress", 4), ("ingress", 6)]


@pytest.fixture(params=PATHS, ids=[f"{d}-ipv{f}" for d, f in PATHS])
def path(request, shared_topo):
    return Path(shared_topo, *request.param)


def same(direct: dict, meshed: dict, *fields):
    for f in fields or ("connect", "received", "end"):
        assert meshed.get(f) == direct.get(f), f"{f}: direct {direct.get(f)!r}, meshed {meshed.get(f)!r}"


def test_half_close_right_after_the_request(path):
    """A client that writes and shuts down its side at once (nc -N) gets the
    server's answer, which the server sends only after reading EOF."""
    for args, size in ((["--send", b"a short line\n".hex()], 13), (["--random", "100000"], 100000)):
        d, m = path.both("eofreply", *args, "--half-close")
        assert d["received"].startswith(f"got {size} ")
        same(d, m)


def test_netcat_half_close(path):
    """The same with a real client: printf ... | nc -N."""
    outs = []
    for meshed in (False, True):
        where, port = path.target("eofreply", meshed)
        r = path.t.run(path.client_ns, "sh", "-c",
                       f"printf 'hello mesh' | nc -N {path.server} {port}", **where)
        outs.append((r.returncode, r.stdout))
    assert outs[0] == (0, f"got 10 {__import__('hashlib').sha256(b'hello mesh').hexdigest()[:16]}\n")
    assert outs[1] == outs[0]


def test_server_speaks_first_without_delay(path):
    d, m = path.both("banner", "--read-first", "--send", b"ping".hex(), "--half-close")
    same(d, m)
    assert d["received"] == "220 tcpprobe ready\r\nping"
    # No protocol sniffing holds the connection: the banner comes as fast as
    # direct, give or take scheduling (the sniffer used to add a full second).
    assert m["first_byte_ms"] < d["first_byte_ms"] + 300, (d, m)


def test_first_write_without_newline_and_large_binary(path):
    for args in (["--send", b"hello".hex()], ["--random", "70000"]):
        d, m = path.both("eofreply", *args, "--half-close")
        assert d["received"].startswith("got ")
        same(d, m)


def test_reset_by_the_server_reaches_the_client_as_a_reset(path):
    for mode in ("rst", "rstread"):
        d, m = path.both(mode, "--send", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".hex())
        assert d["end"] == "ECONNRESET"
        same(d, m)


def test_addresses_the_application_sees(path):
    """getpeername is the real peer and getsockname the address the kernel would
    have chosen, on both ends: nothing in the path is visible."""
    d, m = path.both("whoami")
    same(d, m, "connect", "end", "sockname")
    assert m["peername"][0].removeprefix("::ffff:") == path.server
    # the server saw the client's own address (not Envoy's)
    assert m["received"].split()[0] == d["received"].split()[0] == m["sockname"]


def test_http_by_default_is_bytes_untouched(path):
    """An undeclared port is plain TCP: an HTTP exchange (odd reason phrase,
    mixed-case headers, a control character) comes back byte for byte."""
    req = (b"get /x HTTP/1.1\r\nHost: x\r\nX-Odd : \x01value\r\n"
           b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    d, m = path.both("http", "--send", req.hex())
    assert d["received"].startswith("HTTP/1.1 200 Fine Thanks\r\n")
    same(d, m)


def test_connection_refused_is_documented(topo):
    """Unavoidable with a proxy in the path (README, Transparency): the client's
    connect() succeeds at Envoy, and the refusal arrives as an immediate close
    without a byte, never an HTTP error page. Direct it is ECONNREFUSED."""
    topo.start()
    closed = free_port()
    d = topo.probe(topo.host, topo.ip4[topo.peer], closed, cgroup=topo.mesh.outside)
    m = topo.probe(topo.host, topo.ip4[topo.peer], closed, cgroup=topo.mesh.workload)
    assert d["connect"] == "ECONNREFUSED"
    assert m["connect"] == "ok" and m["received"] == "" and m["end"] in ("EOF", "ECONNRESET")


def test_declared_http_port_keeps_what_envoy_can_keep(topo):
    """A port declared "http" gets Envoy's HTTP handling (per-request numbers);
    even then the reason phrase, header case and the request's own headers
    pass, and meshd adds no x-request-id or x-forwarded-for."""
    http_port = port_of(topo.peer_base, "http")
    topo.start(f'protocols = {{ {http_port} = "http" }}\n')
    outs = []
    for cg in (topo.mesh.outside, topo.mesh.workload):
        before = topo.mesh.stat("http.outbound_http.downstream_rq_total")
        r = topo.run(topo.host, "curl", "-sS", "-i", "--max-time", "10", "-H", "X-Client-Case: Yes",
                     f"http://{topo.ip4[topo.peer]}:{http_port}/p", cgroup=cg)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
        counted = topo.mesh.stat("http.outbound_http.downstream_rq_total") - before
        assert counted == (1 if cg == topo.mesh.workload else 0)
    direct, meshed = outs
    # (curl's output is read as text: line ends are "\n" here)
    assert meshed.startswith("HTTP/1.1 200 Fine Thanks\n")
    assert "X-Mixed-Case: yes" in meshed and "X-Client-Case: Yes" in meshed
    for added in ("x-request-id", "x-forwarded-for", "x-envoy-"):
        assert added not in meshed.lower()
    body = lambda r: r.split("\n\n", 1)[1]
    # what the server received differs only by the documented x-forwarded-proto
    assert body(meshed).replace("\nx-forwarded-proto: http", "") == body(direct)


CURL_CASES = {
    "mixed-case-header": ["-H", "X-Client-Case: Yes"],
    "80KiB-header": ["-H", "X-Big: " + "b" * 80 * 1024],
    "120-headers": [a for i in range(120) for a in ("-H", f"X-H{i}: v")],
    "http1.0": ["--http1.0"],
    "lower-case-method": ["-X", "get"],
    "absolute-form": ["-x", "{server}", "http://other.example:8080/abs"],
    "connect": ["-p", "-x", "{server}", "http://other.example/"],
}


@pytest.mark.parametrize("case", CURL_CASES)
def test_curl_sees_the_same(path, case):
    """curl against a server that answers with the request head it received
    (under "200 Fine Thanks"): byte for byte the same, on an undeclared port."""
    outs = []
    for meshed in (False, True):
        where, port = path.target("http", meshed)
        server = f"http://{path.server}:{port}" if ":" not in path.server else \
            f"http://[{path.server}]:{port}"
        args = [a.replace("{server}", server) for a in CURL_CASES[case]]
        url = [] if "-x" in args else [f"{server}/p"]
        r = path.t.run(path.client_ns, "curl", "-sS", "-i", "--max-time", "10", *args, *url,
                       **where)
        outs.append((r.returncode, r.stdout.replace(f":{port}", ":PORT"), r.stderr))
    assert outs[1] == outs[0]
    assert "Fine Thanks" in outs[0][1] or case == "connect"   # curl keeps a CONNECT's answer to itself


def test_redis_cli(topo):
    """A real client and server of a binary request/response protocol."""
    topo.start()
    port = free_port()
    topo.procs.append(topo.server.popen(
        "redis-server", "--port", port, "--bind", "0.0.0.0", "::", "--save", "",
        "--appendonly", "no", "--protected-mode", "no", stdout=subprocess.DEVNULL))
    for ip in (topo.ip4[topo.peer], topo.ip6[topo.peer]):
        wait_for(lambda: topo.run(topo.host, "redis-cli", "-h", ip, "-p", port, "PING",
                                  cgroup=topo.mesh.outside).stdout == "PONG\n", what="redis up")
        outs = []
        for cg in (topo.mesh.outside, topo.mesh.workload):
            before = topo.mesh.stat("tcp.outbound_tcp.downstream_cx_total")
            script = "SET k v\nGET k\nAPPEND k w\nGET k\nDEL k\nGET k\n"
            r = topo.run(topo.host, "redis-cli", "-h", ip, "-p", port, input=script, cgroup=cg)
            outs.append(r.stdout)
            grew = topo.mesh.stat("tcp.outbound_tcp.downstream_cx_total") > before
            assert grew == (cg == topo.mesh.workload)
        assert outs[0] == "OK\nv\n2\nvw\n1\n\n"
        assert outs[1] == outs[0]


def test_websocket_and_grpc_on_declared_ports(topo):
    """Ports declared http and grpc go through Envoy's HTTP handling (counted
    per request); a WebSocket (text, 1 MiB binary, idle without pings, close
    frame) and gRPC (unary, server stream, bidi, an error status) see the same
    as direct."""
    ws_port, grpc_port = free_port(), free_port()
    topo.start(f'protocols = {{ {ws_port} = "http", {grpc_port} = "grpc" }}\n')
    for cmd, port in (("ws-serve", ws_port), ("grpc-serve", grpc_port)):
        topo.serve(topo.server.popen, sys.executable, L7APPS, cmd, port)
    peer = topo.ip4[topo.peer]
    for cmd, target in (("ws-client", f"ws://{peer}:{ws_port}/"),
                        ("grpc-client", f"{peer}:{grpc_port}")):
        outs = []
        for cg in (topo.mesh.outside, topo.mesh.workload):
            before = topo.mesh.stat("http.outbound_http.downstream_rq_total")
            r = topo.run(topo.host, sys.executable, L7APPS, cmd, target, cgroup=cg)
            assert r.returncode == 0, (cg, r.stderr[-600:])
            outs.append(json.loads(r.stdout))
            counted = topo.mesh.stat("http.outbound_http.downstream_rq_total") - before
            assert (counted > 0) == (cg == topo.mesh.workload), cmd
        assert outs[1] == outs[0]
    assert outs[0]["error"] == ["PERMISSION_DENIED", "not you"]
    assert outs[0]["stream"] == ["x0", "x1", "x2"]


# Envoy's own defaults cut a quiet TCP connection after 1 h and a quiet HTTP
# stream after 5 min; meshd turns both off. The short form here checks a quiet
# spell passes; MESHD_TEST_IDLE_SECONDS=330 runs it past Envoy's 5 minutes.
IDLE = float(os.environ.get("MESHD_TEST_IDLE_SECONDS", "3"))


def test_quiet_connections_are_not_cut(topo):
    poll = port_of(topo.peer_base, "longpoll")
    topo.start(f'protocols = {{ {poll} = "http" }}\n')
    path = Path(topo, "egress", 4)
    # The long poll (a port declared "http": Envoy's HTTP counters) is quiet while
    # the plain TCP probes (TCP counters) are.
    before = topo.mesh.stat("http.outbound_http.downstream_rq_total")
    curl = topo.mesh.popen_in("curl", "-sS", "--max-time", str(IDLE + 30),
                              f"http://{topo.ip4[topo.peer]}:{poll}/sleep/{IDLE}",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        d, m = path.both("echo", "--send", b"ping".hex(), "--idle", str(IDLE), "--half-close")
        out, err = curl.communicate(timeout=IDLE + 40)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    assert d["received"] == "pingping" and d["end"] == "EOF"
    same(d, m)
    assert (curl.returncode, out) == (0, "late"), err
    assert topo.mesh.stat("http.outbound_http.downstream_rq_total") == before + 1


def test_forwarded_for_is_an_operators_choice(topo):
    """http_forwarded_for = true: an application behind a port declared http
    gets X-Forwarded-For with the client's address, and nothing else of Envoy's."""
    port = port_of(topo.wl_base, "http")
    topo.start(f'protocols = {{ {port} = "http" }}\nhttp_forwarded_for = true\n')
    before = topo.mesh.stat("http.inbound_http.downstream_rq_total")
    r = topo.run(topo.peer, "curl", "-sS", "--max-time", "10", f"http://{topo.ip4[topo.host]}:{port}/")
    assert r.returncode == 0, r.stderr
    assert f"x-forwarded-for: {topo.ip4[topo.peer]}" in r.stdout.lower()
    assert "x-envoy" not in r.stdout.lower() and "x-request-id" not in r.stdout.lower()
    assert topo.mesh.stat("http.inbound_http.downstream_rq_total") == before + 1
