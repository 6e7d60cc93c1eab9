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


def etcd_certificates(d: str, ips: list[str]) -> dict[str, str]:
    """A CA, a server certificate for the members' addresses and a client
    certificate (openssl), as files in d: {"ca", "cert", "key", "client_cert",
    "client_key"}."""
    os.makedirs(d)
    p = {k: os.path.join(d, f) for k, f in (
        ("ca", "ca.crt"), ("ca_key", "ca.key"), ("cert", "server.crt"), ("key", "server.key"),
        ("client_cert", "client.crt"), ("client_key", "client.key"))}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sh("openssl", "req", "-x509", *ec, "-keyout", p["ca_key"], "-out", p["ca"], "-days", "2",
       "-subj", "/CN=meshd test etcd CA")
    for cert, key, cn, ext in (
            (p["cert"], p["key"], "etcd", "subjectAltName=" + ",".join(f"IP:{ip}" for ip in ips)
             # clientAuth too: etcd's HTTP gateway calls its own gRPC server
             # with the server certificate as its client certificate
             + "\nextendedKeyUsage=serverAuth,clientAuth"),
            (p["client_cert"], p["client_key"], "meshd", "extendedKeyUsage=clientAuth")):
        csr, extfile = cert + ".csr", cert + ".ext"
        with open(extfile, "w") as f:
            f.write(ext + "\n")
        sh("openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        sh("openssl", "x509", "-req", "-in", csr, "-CA", p["ca"], "-CAkey", p["ca_key"],
           "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", extfile)
    return p


class Etcd:
    """Three etcd members in the LAN namespace, one address each; tls: clients
    speak TLS and must present a client certificate (etcd_certificates())."""

    def __init__(self, lan: str, ips: list[str], tmp: str, token: str, tls: bool = False):
        self.lan, self.ips, self.tmp, self.token = lan, ips, tmp, token
        self.procs: dict[int, subprocess.Popen] = {}
        self.cluster = ",".join(f"m{i}=http://{ip}:{PEER_PORT}" for i, ip in enumerate(ips))
        self.tls = etcd_certificates(os.path.join(tmp, "etcd-tls"), ips) if tls else None

    @property
    def endpoints(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        return [f"{scheme}://{ip}:{CLIENT_PORT}" for ip in self.ips]

    def client_args(self) -> list[str]:
        """curl's and etcdctl's (the same flags)."""
        t = self.tls
        return ["--cacert", t["ca"], "--cert", t["client_cert"], "--key", t["client_key"]] if t else []

    def start_member(self, i: int, state: str = "new") -> None:
        ip = self.ips[i]
        log = open(os.path.join(self.tmp, f"etcd{i}.log"), "a")
        self.procs[i] = subprocess.Popen(
            [ETCD, "--name", f"m{i}", "--data-dir", os.path.join(self.tmp, f"etcd{i}"),
             "--listen-client-urls", self.endpoints[i],
             "--advertise-client-urls", self.endpoints[i],
             "--listen-peer-urls", f"http://{ip}:{PEER_PORT}",
             "--initial-advertise-peer-urls", f"http://{ip}:{PEER_PORT}",
             "--initial-cluster", self.cluster, "--initial-cluster-state", state,
             "--initial-cluster-token", self.token, "--log-level", "warn",
             *(["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                "--client-cert-auth", "--trusted-ca-file", self.tls["ca"]] if self.tls else [])],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec(netns=self.lan))

    def start(self) -> "Etcd":
        for i in range(len(self.ips)):
            self.start_member(i)
        wait_for(self.healthy, timeout=30, what="etcd cluster healthy")
        return self

    def healthy(self, i: int | None = None) -> bool:
        for j in ([i] if i is not None else range(len(self.ips))):
            r = run_in_netns(self.lan, "curl", "-sS", "--max-time", "2", *self.client_args(),
                             f"{self.endpoints[j]}/health", timeout=10, check=False)
            if '"health":"true"' not in r.stdout:
                return False
        return True

    def get_prefix(self, prefix: str) -> dict[str, str]:
        """The keys below prefix, read from any live member (etcdctl)."""
        live = [self.endpoints[i] for i, p in self.procs.items() if p.poll() is None]
        r = run_in_netns(self.lan, "env", "ETCDCTL_API=3", "etcdctl", "--endpoints",
                         ",".join(live), *self.client_args(), "get", "--prefix", prefix,
                         "-w", "json", timeout=20, check=False)
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
    def __init__(self, prefix: str, cgroups, names=("a", "b", "c"), cert_lifetime: int = 3600,
                 ipv6: bool = False, etcd_tls: bool = False):
        self.prefix, self.cgroups, self.names = prefix, cgroups, names
        self.etcd_tls = etcd_tls
        n = random.randint(1, 250)
        self.net = f"10.233.{n}"
        # ipv6: every host also gets fd00:233:<n>::<index>/64 (in self.ip6)
        self.net6 = f"fd00:233:{n:x}::" if ipv6 else ""
        self.ip6: dict[str, str] = {}
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
        if self.net6:   # nodad: usable at once
            self.ip6[name] = f"{self.net6}{index}"
            sh("ip", "-n", ns, "addr", "add", f"{self.ip6[name]}/64", "dev", veth, "nodad")
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
        self.etcd = Etcd(self.lan, etcd_ips, self.tmp, self.prefix, tls=self.etcd_tls).start()
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

    def catalog_toml(self, name: str, lease_ttl: int = 3, client_cert: bool = True) -> str:
        out = ("[catalog]\n" + f"endpoints = {json.dumps(self.etcd.endpoints)}\n"
               f'host_name = "{name}"\nlease_ttl = {lease_ttl}\n')
        if self.etcd.tls:
            out += f'ca_file = "{self.etcd.tls["ca"]}"\n'
            if client_cert:
                out += (f'cert_file = "{self.etcd.tls["client_cert"]}"\n'
                        f'key_file = "{self.etcd.tls["client_key"]}"\n')
        return out

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
    from meshd.envoy_config import admin_socket_path
    try:
        code, body = admin.get(admin_socket_path(m.state_dir), path)
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


SO_RCVBUFFORCE = 33   # <asm-generic/socket.h>; not in Python's socket module


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
        # Room for a burst (a 256 KiB response arrives in a few ms): a full
        # buffer drops frames, and a GSO frame may exceed 64 KiB
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(1 << 18))
            except socket.timeout:
                continue

    def __exit__(self, *exc):
        time.sleep(0.3)
        self._stop.set()
        self.thread.join()
        self.sock.close()

    def _segments(self, family: int | None = None):
        """(family, source port, destination port, payload) of each TCP frame
        (IPv4, and IPv6 without extension headers)."""
        for f in self.frames:
            if len(f) >= 34 and f[12:14] == b"\x08\x00" and f[23] == 6:
                fam, tcp = 4, f[14 + (f[14] & 0x0F) * 4:]
            elif len(f) >= 74 and f[12:14] == b"\x86\xdd" and f[20] == 6:
                fam, tcp = 6, f[54:]
            else:
                continue
            if family in (None, fam):
                yield (fam, int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big"),
                       tcp[(tcp[12] >> 4) * 4:])

    def tcp_payloads(self, port: int, family: int | None = None) -> bytes:
        """The TCP payload bytes of frames to or from `port`, concatenated."""
        return b"".join(data for _, sport, dport, data in self._segments(family)
                        if port in (sport, dport))

    def ports(self, family: int | None = None) -> set[int]:
        """Every TCP port seen (either side)."""
        out = set()
        for _, sport, dport, _ in self._segments(family):
            out |= {sport, dport}
        return out
