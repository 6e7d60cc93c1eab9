"""Identities between hosts (docs/identity.md), with real etcd and real TLS.

The fleet (tests/datapath/fleet.py): a LAN namespace with a 3-member etcd
cluster, and meshd hosts in their own namespaces with certificates from one
test root. Host A's workload "client" calls host B's workload "server"."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ECHO_SERVER, free_port, wait_for
from fleet import TRUST_DOMAIN, Capture, Fleet, envoy_clusters

PAYLOAD_PATH = "/payload"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/workload/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/workload/server"


def payload():
    import random
    return random.Random(20261126).randbytes(256 * 1024)


def _fleet(prefix, cgroups, names=("a", "b"), **kw):
    f = Fleet(prefix, cgroups, names=names, **kw)
    try:
        yield f.start()
    finally:
        if os.environ.get("MESHD_TEST_SHOW_LOG"):
            for m in f.hosts.values():
                print(m.log_text())
        f.stop()


@pytest.fixture
def fleet(prefix, cgroups):
    yield from _fleet(prefix, cgroups)


def two_hosts(fleet, server_extra="", **mesh_extra):
    """A's "client" and B's "server" (an HTTP echo server on a fresh port),
    registered in etcd; returns (a, b, port)."""
    port = free_port()
    a = fleet.configure("a", "client", http_ports=[port], **mesh_extra)
    b = fleet.configure("b", "server", server_extra, http_ports=[port], **mesh_extra)
    a.start()
    b.start()
    fleet.server("b", "--http", port)
    fleet.wait_mtls("a", "b", port)
    return a, b, port


def echo(a, url, *extra, **kw):
    r = a.curl(url, *extra, **kw)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_calls_b_with_mtls(fleet):
    """The server sees A's verified SPIFFE ID; the bytes between the hosts are
    TLS; the response is byte-exact. A destination outside the mesh on the
    same host stays plain."""
    a, b, port = two_hosts(fleet)
    url = f"http://{fleet.ip['b']}:{port}"
    outside_port = free_port()       # a server on B outside the mesh: not in the catalog
    fleet.apps.append(b.echo_server("--http", outside_port, cgroup=b.outside))
    with Capture(fleet.lan, fleet.veth_on_lan("b")) as cap:
        r = a.curl(url + PAYLOAD_PATH)
        got = echo(a, url + "/echo")
        outside = echo(a, f"http://{fleet.ip['b']}:{outside_port}/echo")
    assert r.returncode == 0, r.stderr
    # the destination outside the mesh: plain, straight to its port
    assert "x-forwarded-client-cert" not in outside["headers"]
    assert b"GET /echo" in cap.tcp_payloads(outside_port)
    assert r.stdout == payload()
    xfcc = got["headers"].get("x-forwarded-client-cert", "")
    assert f"URI={CLIENT_ID}" in xfcc and f"By={SERVER_ID}" in xfcc, got["headers"]
    assert got["client"] == fleet.ip["a"]                  # the app still sees host A
    # on the wire: only B's mTLS port, TLS records, not one byte of the payload
    wire = cap.tcp_payloads(b.mtls_port)
    assert port not in cap.ports()
    assert len(wire) > len(payload())
    assert wire[:1] == b"\x16"                             # a TLS handshake record
    assert payload()[:4096] not in wire and b"GET /payload" not in wire
    # B's status: the certificate and its expiry; the catalog has both hosts
    st = wait_for(lambda: (s := b.status())["identity"]["catalog_hosts"] == ["a", "b"] and s,
                  what="B's catalog: both hosts")
    w = st["workloads"][0]
    assert w["spiffe_id"] == SERVER_ID and w["cert_not_after"] > time.time()
    assert st["identity"]["catalog"] == "connected"
    # the flow log names the caller (a file here: meshd is not under systemd)
    wait_for(lambda: CLIENT_ID in _flow_log(b), what="the caller's ID in B's flow log")


def _flow_log(host) -> str:
    try:
        return open(os.path.join(host.state_dir, "flows.log")).read()
    except FileNotFoundError:   # written with the first record
        return ""


TCP_HELLO = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"ping\\n")
data = b""
try:
    while len(data) < 6 + len(sys.argv[1]) + 5:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except OSError as e:
    print("error", e)
print(repr(data))
"""


def tcp_hello(m, ip, port, cgroup=None) -> str:
    """What a raw TCP client in `m` reads from the echo server (hello + echo)."""
    r = m.run_in(sys.executable, "-c", TCP_HELLO, ip, port, cgroup=cgroup)
    return r.stdout.decode() + r.stderr.decode()


def test_permissive_then_strict(fleet):
    """permissive: a client outside the mesh is served in plaintext; strict
    (a live reload): it is refused, while the meshed caller still gets in."""
    a, b, port = two_hosts(fleet)
    url = f"http://{fleet.ip['b']}:{port}/echo"
    plain = echo(a, url, cgroup=a.outside)                    # not enrolled on A: plaintext
    assert "x-forwarded-client-cert" not in plain["headers"]
    assert plain["client"] == fleet.ip["a"]
    b.configure_mesh([port], trust_domain=b.trust_domain, identity_dir=b.identity_dir,
                     mtls_port=b.mtls_port, cert_lifetime=fleet.cert_lifetime,
                     inbound_mode="strict")
    wait_for(lambda: a.curl(url, cgroup=a.outside).returncode != 0, what="plaintext refused")
    refused = a.curl(url, cgroup=a.outside)
    assert refused.returncode != 0 and refused.stdout == b""
    got = echo(a, url)                                         # mTLS from A's workload
    assert f"URI={CLIENT_ID}" in got["headers"]["x-forwarded-client-cert"]
    assert b.stat("tcp.inbound_refused_1.downstream_cx_total") >= 1


def test_allow_from(fleet):
    """A caller not in allow_from: HTTP 403, TCP closed; counted and logged with
    its identity. Then allowed by name."""
    port, tcp_port = free_port(), free_port()
    a = fleet.configure("a", "client", http_ports=[port])
    b = fleet.configure("b", "server", 'allow_from = ["someone-else"]\n', http_ports=[port])
    a.start()
    b.start()
    fleet.server("b", "--http", port, "--tcp", tcp_port)
    fleet.wait_mtls("a", "b", port)
    fleet.wait_mtls("a", "b", tcp_port)
    r = a.curl(f"http://{fleet.ip['b']}:{port}/echo", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.stdout == b"403"
    assert b.stat("http.inbound_http_1.rbac.denied") == 1
    records = wait_for(lambda: [r for r in map(json.loads, _flow_log(b).splitlines())
                                if r["peer_id"] == CLIENT_ID and r["status"] == "403"],
                       what="the denied request in B's flow log")
    assert records[0]["workload"] == "server"
    assert records[0]["denied"] == "rbac_access_denied_matched_policy[none]"
    # TCP: refused in the TLS handshake, before the server's first byte could leave
    assert "hello" not in tcp_hello(a, fleet.ip["b"], tcp_port)
    stats = b.stats()
    assert sum(v for k, v in stats.items() if k.endswith("ssl.fail_verify_san")) >= 1, \
        {k: v for k, v in stats.items() if "ssl" in k}
    # logged with the caller's identity (its certificate, refused) and why
    refused = wait_for(lambda: [r for r in map(json.loads, _flow_log(b).splitlines())
                                if r["protocol"] == "tcp"],
                       what="the refused handshake in B's flow log")
    assert refused[0]["peer_id"] == CLIENT_ID and refused[0]["status"] == "denied", refused
    assert "CERTIFICATE_VERIFY_FAILED" in refused[0]["tls_failure"], refused
    # allowed by name (a live reload)
    b.write("10-workloads.toml", f'[workload.server]\ncgroup = "{b.workload}"\n'
                                 'allow_from = ["client"]\n')
    wait_for(lambda: a.curl(f"http://{fleet.ip['b']}:{port}/echo").returncode == 0 and
             b"x-forwarded-client-cert" in a.curl(f"http://{fleet.ip['b']}:{port}/echo").stdout,
             what="allowed after reload")
    assert f"hello {fleet.ip['a']}" in tcp_hello(a, fleet.ip["b"], tcp_port)


TLS_CLIENT = """
import json, socket, ssl, sys
ip, port, mtls_port, cert, key, ca = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
try:
    with socket.create_connection((ip, int(mtls_port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=f"{port}.mtls.meshd") as s:
            s.sendall(b"GET /echo HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    print(json.dumps({"ok": True, "response": data.decode(errors="replace")}))
except (OSError, ssl.SSLError) as e:
    print(json.dumps({"ok": False, "error": str(e)}))
"""


def _leaf_files(tmp, intermediate_dir, spiffe):
    """A workload certificate issued from a host CA directory, as PEM files."""
    from meshd import ca, identity
    host = ca.load_host_ca(intermediate_dir, identity.parse_spiffe_id(spiffe)[0])
    leaf = identity.issue_leaf(host.key, host.chain, spiffe, 600)
    paths = [os.path.join(tmp, n) for n in ("leaf.crt", "leaf.key")]
    for p, data in zip(paths, (leaf.chain_pem, leaf.key_pem)):
        with open(p, "wb") as f:
            f.write(data)
    return paths


def test_foreign_trust_domain_refused(fleet, tmp_path):
    """A client presenting a certificate from another trust domain's CA is
    refused at the handshake; the same client with a certificate of this trust
    domain is served (so the test can tell the two apart)."""
    a, b, port = two_hosts(fleet)
    from meshd import ca as meshca
    other_root, other_host = str(tmp_path / "oroot"), str(tmp_path / "ohost")
    meshca.init_root(other_root, "other.test")
    meshca.issue_intermediate(other_root, other_host, "x")
    bundle = os.path.join(b.identity_dir, "bundle.crt")
    args = [fleet.ip["b"], port, b.mtls_port]

    def call(cert, key):
        r = a.run_in(sys.executable, "-c", TLS_CLIENT, *args, cert, key, bundle,
                     cgroup=a.outside)
        return json.loads(r.stdout)
    foreign = call(*_leaf_files(str(tmp_path), other_host, "spiffe://other.test/workload/client"))
    assert not foreign["ok"], foreign
    os.makedirs(tmp_path / "own")
    own = call(*_leaf_files(str(tmp_path / "own"), a.identity_dir, CLIENT_ID))
    assert own["ok"] and f"URI={CLIENT_ID}" in own["response"], own


LOAD_CLIENT = """
import http.client, json, os, sys, time
ip, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ok = failed = 0
errors = []
kept = http.client.HTTPConnection(ip, port, timeout=10)   # one connection across renewals
print("ready", flush=True)
end = time.time() + 300          # a bound, should the test never say stop
while not os.path.exists(stop) and time.time() < end:
    for conn in (http.client.HTTPConnection(ip, port, timeout=10), kept):  # new + kept
        try:
            conn.request("GET", "/echo")
            r = conn.getresponse()
            body = r.read()
            good = r.status == 200 and b"x-forwarded-client-cert" in body
            ok, failed = ok + good, failed + (not good)
        except Exception as e:
            failed += 1
            errors.append(repr(e))
        if conn is not kept:
            conn.close()
    time.sleep(0.05)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
"""


def test_short_lived_certificates_renew_under_load(fleet, tmp_path):
    """20 s certificates, renewed at half-life, under steady load (new and
    long-lived connections): zero failed requests, and the certificates did
    change. The load runs until both hosts renewed and B answered requests on
    the renewed certificates. Short form: one renewal; MESHD_TEST_FULL=1: 8
    renewals (4 lifetimes)."""
    fleet.cert_lifetime = 20
    a, b, port = two_hosts(fleet)
    renewals = 8 if os.environ.get("MESHD_TEST_FULL") == "1" else 1
    before = {m: m.status()["workloads"][0]["cert_not_after"] for m in (a, b)}
    stop = str(tmp_path / "stop")
    client = a.popen_in(sys.executable, "-c", LOAD_CLIENT, fleet.ip["b"], port, stop,
                        stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        seen = {a: {before[a]}, b: {before[b]}}

        def renewed():
            for m in seen:
                seen[m].add(m.status()["workloads"][0]["cert_not_after"])
            return all(len(v) > renewals for v in seen.values())
        wait_for(renewed, timeout=10 + 12 * renewals, interval=0.5,
                 what=f"{renewals} renewals on both hosts")
        served = b.stat("http.inbound_http_1.downstream_rq_total")
        wait_for(lambda: b.stat("http.inbound_http_1.downstream_rq_total") >= served + 20,
                 what="requests on the renewed certificates")
    finally:
        open(stop, "w").close()
        out, _ = client.communicate(timeout=30)
    result = json.loads(out)
    assert result["failed"] == 0 and result["ok"] > 20, result
    for m in (a, b):   # renewed (a later expiry), while the load ran
        assert m.status()["workloads"][0]["cert_not_after"] > before[m]
    assert a.envoy_pid() and b.envoy_pid()
    assert b.stat("http.inbound_http_1.downstream_rq_total") >= result["ok"]


def test_etcd_failures(fleet):
    """One member killed: nothing changes. All of etcd down: traffic keeps
    flowing on the last catalog, status says so, and a meshd restarted during
    the outage still serves it."""
    a, b, port = two_hosts(fleet)
    url = f"http://{fleet.ip['b']}:{port}/echo"
    fleet.etcd.kill(0)
    for _ in range(5):
        assert f"URI={CLIENT_ID}" in echo(a, url)["headers"]["x-forwarded-client-cert"]
    time.sleep(3)   # past a lease renewal (lease_ttl 3 s): both hosts stay registered
    assert sorted(fleet.etcd.get_prefix("/meshd/v1/hosts/")) == [
        "/meshd/v1/hosts/a", "/meshd/v1/hosts/b"]
    assert a.status()["identity"]["catalog"] == "connected"

    for i in (1, 2):
        fleet.etcd.kill(i)
    wait_for(lambda: a.status()["identity"]["catalog"] == "unreachable", timeout=20,
             what="A says etcd is unreachable")
    assert "UNREACHABLE" in a.cli("status").stdout
    assert f"URI={CLIENT_ID}" in echo(a, url)["headers"]["x-forwarded-client-cert"]
    # a restart during the outage serves the saved catalog
    a.kill()
    a.start()
    st = a.status()
    assert st["identity"]["catalog"] == "unreachable" and "b" in st["identity"]["catalog_hosts"]
    fleet.wait_mtls("a", "b", port)
    got = echo(a, url)
    assert f"URI={CLIENT_ID}" in got["headers"]["x-forwarded-client-cert"]


@pytest.fixture
def fleet3(prefix, cgroups):
    yield from _fleet(prefix, cgroups, names=("a", "b", "c"))


def test_host_killed_leaves_the_catalogs(fleet3):
    """Three hosts; host B's meshd is killed: its entries leave A's and C's
    catalogs when its lease expires (lease_ttl 3 s), and A stops using mTLS
    towards it (its Envoy drops the cluster)."""
    f = fleet3
    port = free_port()
    for name, wl in (("a", "client"), ("b", "server"), ("c", "third")):
        f.configure(name, wl, http_ports=[port]).start()
    f.server("b", "--http", port)
    f.wait_mtls("a", "b", port)
    f.wait_remote("c", "b", port)
    for n in ("a", "c"):
        wait_for(lambda: sorted(f.hosts[n].status()["identity"]["catalog_hosts"]) == ["a", "b", "c"],
                 what=f"{n} sees three hosts")
    f.hosts["b"].kill()
    for n in ("a", "c"):
        wait_for(lambda: "b" not in f.hosts[n].status()["identity"]["catalog_hosts"],
                 timeout=20, what=f"b gone from {n}'s catalog")
    assert "/meshd/v1/hosts/b" not in f.etcd.get_prefix("/meshd/v1/")
    # (the config dump would still show the old listener while it drains: ask /clusters)
    wait_for(lambda: f"_{f.ip['b']}_{port}::" not in envoy_clusters(f.hosts["a"]),
             what="A's mTLS cluster to B gone")


STREAMS_CLIENT = """
import http.client, json, os, random, socket, sys, time
ip, http_port, tcp_port, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
payload = random.Random(20261126).randbytes(256 * 1024)   # tests/helpers/echo_server.py's
rnd = random.Random(7)
out = {"tcp_bytes": 0, "http_requests": 0, "errors": [], "identities": set()}
tcp = socket.create_connection((ip, tcp_port), timeout=10)
hello = b""
while not hello.endswith(b"\\n"):
    hello += tcp.recv(1)
out["hello"] = hello.decode()
kept = http.client.HTTPConnection(ip, http_port, timeout=10)
kept.connect()
kept.auto_open = 0          # never reconnect behind our back: a closed connection is an error
ports = (tcp.getsockname()[1], kept.sock.getsockname()[1])
print("ready", flush=True)
while not os.path.exists(stop) and len(out["errors"]) < 5:
    try:
        chunk = rnd.randbytes(rnd.randint(1, 65536))
        tcp.sendall(chunk)
        got = b""
        while len(got) < len(chunk):
            data = tcp.recv(len(chunk) - len(got))
            if not data:
                raise ConnectionError("TCP stream closed")
            got += data
        if got != chunk:
            raise ValueError("TCP bytes differ")
        out["tcp_bytes"] += len(chunk)
        for path in ("/payload", "/echo"):
            kept.request("GET", path)
            r = kept.getresponse()
            body = r.read()
            if r.status != 200 or r.will_close:
                raise ValueError(f"{path}: {r.status} will_close={r.will_close}")
            if path == "/payload" and body != payload:
                raise ValueError("HTTP body differs")
            if path == "/echo":
                xfcc = json.loads(body)["headers"].get("x-forwarded-client-cert", "")
                out["identities"].add(xfcc.split("URI=")[-1])
            out["http_requests"] += 1
    except Exception as e:
        out["errors"].append(repr(e))
    time.sleep(0.05)
out["same_sockets"] = ports == (tcp.getsockname()[1], kept.sock.getsockname()[1] if kept.sock else None)
out["identities"] = sorted(out["identities"])
print(json.dumps(out), flush=True)
"""


def test_renewal_keeps_established_connections(fleet, tmp_path):
    """Short-lived certificates (8 s, renewed at half-life) renewed at least
    twice on both hosts while one TCP stream and one HTTP keep-alive connection
    between them carry traffic: both connections live on, every byte echoed
    exactly, zero errors; Envoy took every renewal (SDS) without restarting.
    MESHD_TEST_FULL=1: five renewals."""
    fleet.cert_lifetime = 8
    port, tcp_port = free_port(), free_port()
    a = fleet.configure("a", "client", http_ports=[port])
    b = fleet.configure("b", "server", http_ports=[port])
    a.start()
    b.start()
    fleet.server("b", "--http", port, "--tcp", tcp_port)
    fleet.wait_mtls("a", "b", port)
    fleet.wait_mtls("a", "b", tcp_port)
    pids = {m: m.envoy_pid() for m in (a, b)}
    sds = {m: m.stat(f"sds.meshd_wl_{w}.update_success") for m, w in ((a, "client"), (b, "server"))}
    stop = str(tmp_path / "stop")
    client = a.popen_in(sys.executable, "-c", STREAMS_CLIENT, fleet.ip["b"], port, tcp_port,
                        stop, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        renewals = 5 if os.environ.get("MESHD_TEST_FULL") == "1" else 2
        seen = {a: set(), b: set()}

        def renewed():
            for m in seen:
                seen[m].add(m.status()["workloads"][0]["cert_not_after"])
            # the first value is the certificate the connections began with
            return all(len(v) > renewals for v in seen.values())
        wait_for(renewed, timeout=20 * renewals, interval=0.5,
                 what=f"{renewals} renewals on both hosts")
        time.sleep(1)   # traffic after the last renewal, too
    finally:
        open(stop, "w").close()
        out, _ = client.communicate(timeout=30)
    result = json.loads(out)
    assert result["errors"] == [] and result["same_sockets"], result
    assert result["hello"] == f"hello {fleet.ip['a']}\n"
    assert result["tcp_bytes"] > 0 and result["http_requests"] > 10, result
    assert result["identities"] == [CLIENT_ID], result
    # Envoy read each renewal through SDS, in the same process
    for m, w in ((a, "client"), (b, "server")):
        assert m.envoy_pid() == pids[m]
        assert m.stat(f"sds.meshd_wl_{w}.update_success") >= sds[m] + renewals
    # the two connections are still the first ones: one mTLS stream each way on B
    assert b.stat("tcp.inbound_tcp_1.downstream_cx_total") == 1
    assert b.stat("http.inbound_http_1.downstream_cx_total") == 1


@pytest.fixture
def fleet6(prefix, cgroups):
    yield from _fleet(prefix, cgroups, ipv6=True)


def test_ipv6_stays_plain(fleet6):
    """IPv6 callers are not attributed to a workload (docs/identity.md), so a
    call to a meshed workload's IPv6 address stays plain even though the
    catalog lists that address: byte-exact, no identity, plaintext on the wire,
    while the same caller's IPv4 call is mTLS. A strict host refuses it as any
    plaintext from elsewhere."""
    f = fleet6
    a, b, port = two_hosts(f)
    from meshd.catalog import load_saved
    wait_for(lambda: f.ip6["b"] in load_saved(a.state_dir)[0]["b"]["workloads"]["server"]["addresses"],
             what="B's IPv6 address in A's catalog")
    url4, url6 = f"http://{f.ip['b']}:{port}", f"http://[{f.ip6['b']}]:{port}"
    with Capture(f.lan, f.veth_on_lan("b")) as cap:
        r = a.curl(url6 + PAYLOAD_PATH, "-g")
        plain = echo(a, url6 + "/echo", "-g")
        meshed = echo(a, url4 + "/echo")
    assert r.returncode == 0 and r.stdout == payload(), r.stderr
    assert "x-forwarded-client-cert" not in plain["headers"]
    assert plain["client"] == f.ip6["a"]
    assert f"URI={CLIENT_ID}" in meshed["headers"]["x-forwarded-client-cert"]
    # on the wire: IPv6 to the workload's own port, the payload in clear; mTLS only over IPv4
    assert payload()[:4096] in cap.tcp_payloads(port, family=6)
    assert b.mtls_port not in cap.ports(family=6) and b.mtls_port in cap.ports(family=4)
    assert port not in cap.ports(family=4)
    b.configure_mesh([port], trust_domain=b.trust_domain, identity_dir=b.identity_dir,
                     mtls_port=b.mtls_port, cert_lifetime=f.cert_lifetime, inbound_mode="strict")
    wait_for(lambda: a.curl(url6 + "/echo", "-g").returncode != 0, what="IPv6 plaintext refused")
    assert f"URI={CLIENT_ID}" in echo(a, url4 + "/echo")["headers"]["x-forwarded-client-cert"]


@pytest.fixture
def fleet_tls(prefix, cgroups):
    yield from _fleet(prefix, cgroups, etcd_tls=True)


def test_catalog_over_tls_with_client_certificates(fleet_tls):
    """etcd speaking TLS and requiring client certificates: with [catalog]'s
    ca_file/cert_file/key_file the hosts find each other and call with mTLS;
    without the client certificate etcd turns meshd away (status says so) and
    meshd serves the catalog it saved."""
    f = fleet_tls
    a, b, port = two_hosts(f)
    url = f"http://{f.ip['b']}:{port}/echo"
    assert f"URI={CLIENT_ID}" in echo(a, url)["headers"]["x-forwarded-client-cert"]
    st = a.status()["identity"]
    assert st["catalog"] == "connected" and st["catalog_endpoint"].startswith("https://")
    a.kill()
    a.write("20-catalog.toml", f.catalog_toml("a", client_cert=False))
    a.start()
    wait_for(lambda: (s := a.status()["identity"])["catalog"] == "unreachable"
             and s["catalog_error"], what="A turned away without a client certificate")
    assert "b" in a.status()["identity"]["catalog_hosts"]      # the saved catalog
    f.wait_mtls("a", "b", port)
    assert f"URI={CLIENT_ID}" in echo(a, url)["headers"]["x-forwarded-client-cert"]


def test_certificate_expiry_in_status_and_on_the_bus(fleet, monkeypatch):
    """`meshd status` and the D-Bus API (a private system bus with the shipped
    policy) show each workload's SPIFFE ID and certificate expiry, and the
    catalog's state."""
    from helpers.dbus import PrivateBus
    port = free_port()
    a = fleet.configure("a", "client", http_ports=[port])
    b = fleet.configure("b", "server", http_ports=[port])
    a.start()
    bus = PrivateBus().start()
    try:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)   # B's meshd only
        b.start()
        monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS")
        wait_for(lambda: "io.meshd.Mesh1" in bus.busctl("list", "--acquired").stdout,
                 what="B's meshd on the bus")
        wait_for(lambda: b.status()["identity"]["catalog_hosts"] == ["a", "b"], what="catalog")
        leaf = b.status()["workloads"][0]
        manager = ("io.meshd.Mesh1", "/io/meshd/Mesh1", "io.meshd.Mesh1.Manager")
        wl = ("io.meshd.Mesh1", "/io/meshd/Mesh1/workload/server", "io.meshd.Mesh1.Workload")

        def prop(obj, name):
            r = bus.busctl("get-property", *obj, name, "--json=short", user=65534)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)["data"]
        assert prop(wl, "SpiffeId") == SERVER_ID
        assert prop(wl, "CertificateNotAfter") == int(leaf["cert_not_after"] * 1e6)
        assert prop(wl, "CertificateRenewAt") == int(leaf["cert_renew_at"] * 1e6)
        assert prop(manager, "TrustDomain") == TRUST_DOMAIN
        assert prop(manager, "CatalogState") == "connected"
        assert sorted(prop(manager, "CatalogHosts")) == ["a", "b"]
        text = b.cli("status").stdout
        assert f"identity: {SERVER_ID}, certificate expires " in text, text
    finally:
        b.kill()
        bus.stop()
