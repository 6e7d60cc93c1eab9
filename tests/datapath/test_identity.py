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
from fleet import TRUST_DOMAIN, Capture, Fleet

PAYLOAD_PATH = "/payload"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/workload/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/workload/server"


def payload():
    import random
    return random.Random(20261126).randbytes(256 * 1024)


@pytest.fixture
def fleet(prefix, cgroups):
    f = Fleet(prefix, cgroups, names=("a", "b"))
    try:
        yield f.start()
    finally:
        if os.environ.get("MESHD_TEST_SHOW_LOG"):
            for m in f.hosts.values():
                print(m.log_text())
        f.stop()


def two_hosts(fleet, server_extra="", **mesh_extra):
    """A's "client" and B's "server" (an HTTP echo server on a fresh port),
    registered in etcd; returns (a, b, port)."""
    port = free_port()
    a = fleet.configure("a", "client", http_ports=[port], **mesh_extra)
    b = fleet.configure("b", "server", server_extra, http_ports=[port], **mesh_extra)
    a.start()
    b.start()
    fleet.server("b", "--http", port)
    fleet.wait_remote("a", "b", port)
    return a, b, port


def echo(a, url, **kw):
    r = a.curl(url, **kw)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_calls_b_with_mtls(fleet):
    """The server sees A's verified SPIFFE ID; the bytes between the hosts are
    TLS; the response is byte-exact."""
    a, b, port = two_hosts(fleet)
    url = f"http://{fleet.ip['b']}:{port}"
    with Capture(fleet.lan, fleet.veth_on_lan("b")) as cap:
        r = a.curl(url + PAYLOAD_PATH)
        got = echo(a, url + "/echo")
    assert r.returncode == 0, r.stderr
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
    # the access log names the caller
    log = open(os.path.join(b.state_dir, "access.log")).read()
    assert CLIENT_ID in log
