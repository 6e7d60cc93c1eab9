"""A fleet on one machine for the identity tests: a LAN (a network namespace with
a bridge), a 3-member etcd cluster (Debian's etcd-server) on addresses of that
LAN, and meshd hosts, each serving its own network namespace plugged into the
LAN, with certificates from one test root CA (meshd ca).

Every name carries the test's prefix; stop() removes everything, also after a
failure."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from conftest import ECHO_SERVER, MESHD, Mesh, free_port, netns_add, netns_del, sh, wait_for
from helpers.common import preexec, run_in_netns

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
TRUST_DOMAIN = "fleet.test"
CLIENT_PORT, PEER_PORT = 2379, 2380


class Etcd:
    """Three etcd members in the LAN namespace, one address each."""

    def __init__(self, lan: str, ips: list[str], tmp: str, token: str):
        self.lan, self.ips, self.tmp, self.token = lan, ips, tmp, token
        self.procs: dict[int, subprocess.Popen] = {}
        self.cluster = ",".join(f"m{i}=http://{ip}:{PEER_PORT}" for i, ip in enumerate(ips))

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{ip}:{CLIENT_PORT}" for ip in self.ips]

    def start_member(self, i: int, state: str = "new") -> None:
        ip = self.ips[i]
        log = open(os.path.join(self.tmp, f"etcd{i}.log"), "a")
        self.procs[i] = subprocess.Popen(
            [ETCD, "--name", f"m{i}", "--data-dir", os.path.join(self.tmp, f"etcd{i}"),
             "--listen-client-urls", f"http://{ip}:{CLIENT_PORT}",
             "--advertise-client-urls", f"http://{ip}:{CLIENT_PORT}",
             "--listen-peer-urls", f"http://{ip}:{PEER_PORT}",
             "--initial-advertise-peer-urls", f"http://{ip}:{PEER_PORT}",
             "--initial-cluster", self.cluster, "--initial-cluster-state", state,
             "--initial-cluster-token", self.token, "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec(netns=self.lan))

    def start(self) -> "Etcd":
        for i in range(len(self.ips)):
            self.start_member(i)
        wait_for(self.healthy, timeout=30, what="etcd cluster healthy")
        return self

    def healthy(self, i: int | None = None) -> bool:
        for j in ([i] if i is not None else range(len(self.ips))):
            r = run_in_netns(self.lan, "curl", "-sS", "--max-time", "2",
                             f"{self.endpoints[j]}/health", timeout=10, check=False)
            if '"health":"true"' not in r.stdout:
                return False
        return True

    def get_prefix(self, prefix: str) -> dict[str, str]:
        """The keys below prefix, read from any live member (etcdctl)."""
        live = [self.endpoints[i] for i, p in self.procs.items() if p.poll() is None]
        r = run_in_netns(self.lan, "env", "ETCDCTL_API=3", "etcdctl", "--endpoints",
                         ",".join(live), "get", "--prefix", prefix, "-w", "json", timeout=20, check=False)
        import base64
        doc = json.loads(r.stdout or "{}")
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
                for kv in doc.get("kvs", [])}

    def kill(self, i: int) -> None:
        p = self.procs.get(i)
        if p and p.poll() is None:
            p.kill()
            p.wait()

    def stop(self) -> None:
        for i in list(self.procs):
            self.kill(i)


class Fleet:
    def __init__(self, prefix: str, cgroups, names=("a", "b", "c"), cert_lifetime: int = 3600):
        self.prefix, self.cgroups, self.names = prefix, cgroups, names
        n = random.randint(1, 250)
        self.net = f"10.233.{n}"
        self.lan = f"{prefix}n"
        self.bridge = f"{prefix}br"
        self.tmp = tempfile.mkdtemp(prefix=f"{prefix}f-")
        self.ca_dir = os.path.join(self.tmp, "root")
        self.cert_lifetime = cert_lifetime
        self.hosts: dict[str, Mesh] = {}
        self.ns: dict[str, str] = {}
        self.ip: dict[str, str] = {}
        self.etcd: Etcd | None = None
        self.apps: list[subprocess.Popen] = []

    # -- the LAN --
    def _plug(self, name: str, index: int) -> None:
        ns = netns_add(f"{self.prefix}h{name}")
        self.ns[name], self.ip[name] = ns, f"{self.net}.{index}"
        veth = f"{self.prefix}{name}"
        sh("ip", "link", "add", veth, "netns", ns, "type", "veth", "peer", "name", veth + "p",
           "netns", self.lan)
        sh("ip", "-n", self.lan, "link", "set", veth + "p", "master", self.bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.ip[name]}/24", "dev", veth)
        sh("ip", "-n", ns, "link", "set", veth, "up")

    def veth_on_lan(self, name: str) -> str:
        """Host `name`'s cable as the LAN sees it (capture here)."""
        return f"{self.prefix}{name}p"

    def start(self, trust_domains: dict[str, str] | None = None) -> "Fleet":
        netns_add(self.lan)
        sh("ip", "-n", self.lan, "link", "add", self.bridge, "type", "bridge")
        etcd_ips = [f"{self.net}.{11 + i}" for i in range(3)]
        for ip in etcd_ips:
            sh("ip", "-n", self.lan, "addr", "add", f"{ip}/24", "dev", self.bridge)
        sh("ip", "-n", self.lan, "link", "set", self.bridge, "up")
        self.etcd = Etcd(self.lan, etcd_ips, self.tmp, self.prefix).start()
        trust_domains = trust_domains or {}
        for i, name in enumerate(self.names, 1):
            self._plug(name, i)
            td = trust_domains.get(name, TRUST_DOMAIN)
            root = self.ca_dir if td == TRUST_DOMAIN else os.path.join(self.tmp, f"root-{td}")
            if not os.path.exists(os.path.join(root, "root.crt")):
                sh(*MESHD, "ca", "init", "--trust-domain", td, "--dir", root)
            ident = os.path.join(self.tmp, f"id-{name}")
            sh(*MESHD, "ca", "issue-intermediate", "--dir", root, "--host", name, "--out", ident)
            m = Mesh(self.prefix, self.cgroups, name, netns=self.ns[name])
            m.identity_dir, m.trust_domain, m.host = ident, td, name
            m.mtls_port = free_port()
            self.hosts[name] = m
        return self

    def configure(self, name: str, workload: str, workload_extra: str = "", http_ports=(),
                  catalog: bool = True, **mesh_extra) -> Mesh:
        m = self.hosts[name]
        mesh_extra.setdefault("trust_domain", m.trust_domain)
        mesh_extra.setdefault("identity_dir", m.identity_dir)
        mesh_extra.setdefault("mtls_port", m.mtls_port)
        mesh_extra.setdefault("cert_lifetime", self.cert_lifetime)
        m.configure_mesh(http_ports, **mesh_extra)
        m.write("10-workloads.toml",
                f'[workload.{workload}]\ncgroup = "{m.workload}"\n{workload_extra}')
        if catalog:
            m.write("20-catalog.toml", self.catalog_toml(name))
        return m

    def catalog_toml(self, name: str, lease_ttl: int = 3) -> str:
        return ("[catalog]\n" + f"endpoints = {json.dumps(self.etcd.endpoints)}\n"
                f'host_name = "{name}"\nlease_ttl = {lease_ttl}\n')

    def server(self, name: str, *port_args) -> subprocess.Popen:
        """tests/helpers/echo_server.py as host `name`'s workload."""
        p = self.hosts[name].echo_server(*port_args)
        self.apps.append(p)
        return p

    def wait_remote(self, caller: str, callee: str, port: int, timeout: float = 30) -> None:
        """Until `caller` has callee's port in its catalog (calls will be mTLS)."""
        def seen():
            st = self.hosts[caller].status() or {}
            ident = st.get("identity", {})
            return callee in ident.get("catalog_hosts", ()) and self._has_port(caller, callee, port)
        wait_for(seen, timeout, what=f"{callee}:{port} in {caller}'s catalog")

    def wait_mtls(self, caller: str, callee: str, port: int, timeout: float = 30) -> None:
        """Until both Envoys serve the port with mTLS: the caller's Envoy has the
        cluster to callee:port, the callee's its chain for the port (Envoy's
        config_dump: what Envoy really runs, not the files meshd wrote)."""
        self.wait_remote(caller, callee, port, timeout)
        want = {caller: f"_mtls_{self.ip[callee]}_{port}\"", callee: f"\"{port}.mtls.meshd\""}
        cluster = f"_{self.ip[callee]}_{port}::"
        wait_for(lambda: all(text in envoy_active_listeners(self.hosts[n])
                             for n, text in want.items())
                 and cluster in envoy_clusters(self.hosts[caller]),
                 timeout, what=f"mTLS for {callee}:{port} in both Envoys")

    def _has_port(self, caller: str, callee: str, port: int) -> bool:
        from meshd.catalog import load_saved
        hosts, _ = load_saved(self.hosts[caller].state_dir)
        return any(port in w.get("ports", ()) for w in hosts.get(callee, {}).get("workloads", {}).values())

    def stop(self) -> None:
        for p in self.apps:
            p.kill()
            p.wait()
        for m in self.hosts.values():
            m.teardown()
        if self.etcd:
            self.etcd.stop()
        for ns in self.ns.values():
            netns_del(ns)
        netns_del(self.lan)
        shutil.rmtree(self.tmp, ignore_errors=True)


def envoy_admin_text(m: Mesh, path: str) -> str:
    from meshd.envoy import admin
    try:
        code, body = admin.get(os.path.join(m.state_dir, "envoy-admin.sock"), path)
    except OSError:
        return ""
    return body.decode(errors="replace") if code == 200 else ""


def envoy_config_dump(m: Mesh) -> str:
    return envoy_admin_text(m, "/config_dump")


def envoy_active_listeners(m: Mesh) -> str:
    """The listeners Envoy serves new connections with (not those it warms,
    drains, or was offered and rejected), as JSON text."""
    try:
        dump = json.loads(envoy_admin_text(m, "/config_dump?resource=dynamic_listeners"))
    except ValueError:
        return ""
    return json.dumps([c.get("active_state") for c in dump.get("configs", [])])


def envoy_clusters(m: Mesh) -> str:
    """Envoy's active clusters, one "<name>::<field>::..." line each."""
    return envoy_admin_text(m, "/clusters")


class Capture:
    """Every frame on one interface of a namespace (a raw AF_PACKET socket), while
    the `with` block runs."""

    def __init__(self, netns: str, ifname: str):
        self.netns, self.ifname = netns, ifname
        self.frames: list[bytes] = []
        self._stop = threading.Event()

    def __enter__(self):
        from helpers.common import inside_netns
        with inside_netns(self.netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.bind((self.ifname, 0))
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except socket.timeout:
                continue

    def __exit__(self, *exc):
        time.sleep(0.3)
        self._stop.set()
        self.thread.join()
        self.sock.close()

    def tcp_payloads(self, port: int) -> bytes:
        """The TCP payload bytes of IPv4 frames to or from `port`, concatenated."""
        out = []
        for f in self.frames:
            if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:
                continue
            ihl = (f[14] & 0x0F) * 4
            tcp = f[14 + ihl:]
            sport, dport = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
            if port in (sport, dport):
                out.append(tcp[(tcp[12] >> 4) * 4:])
        return b"".join(out)

    def ports(self) -> set[int]:
        """Every TCP port seen (either side)."""
        out = set()
        for f in self.frames:
            if len(f) >= 34 and f[12:14] == b"\x08\x00" and f[23] == 6:
                ihl = (f[14] & 0x0F) * 4
                tcp = f[14 + ihl:]
                out |= {int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")}
        return out
