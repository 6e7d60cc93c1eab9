#!/usr/bin/env python3
"""Egress benchmark: direct vs iptables REDIRECT vs meshd (eBPF), same Envoy.

Run as root from the repository root:  .venv/bin/python bench/egress.py [--reps 5] [--duration 3]

Everything lives inside names carrying a random prefix ("mb" + 6 hex digits): a client
network namespace <prefix>c (the meshed host: clients, meshd and its Envoy) joined by a
veth to a server namespace <prefix>s (nginx and iperf3), cgroups under /<prefix>/ in the
cgroup2 hierarchy, one meshd instance serving <prefix>c (pins under /sys/fs/bpf/<prefix>,
state in a temp dir) and, only while the iptables mode is measured, one nat OUTPUT jump
into a chain of our own inside <prefix>c. Nothing touches the host's network namespace
(a meshd installed on the host may serve it). All of it is removed on exit, on error and
on Ctrl-C/SIGTERM.

Modes (the client is the same wrk/iperf3 binary each time, only its cgroup differs):
  direct    client in a plain cgroup -> nginx (no proxy)
  iptables  client in a plain cgroup matched by `-m cgroup --path` in nat OUTPUT,
            -j REDIRECT to meshd's Envoy outbound port (Istio/Consul style; Envoy learns
            the original destination from conntrack via SO_ORIGINAL_DST)
  meshd     client in meshd's enrolled workload cgroup (cgroup/connect4 + sockops +
            cgroup/getsockopt steer it to the same Envoy)

Figures per measurement: wrk c=16 t=2 req/s, CPU µs per request over that run
(/proc/stat, all CPUs, user+nice+system+irq+softirq; plus the part charged to our own
cgroups), wrk c=1 t=1 p50/p99 latency, iperf3 bulk Gbit/s. Repetitions are interleaved
(every rep measures every mode, the mode order rotating per rep) and medians reported.
The shared machinery lives in bench/common.py (also used by bench/inbound.py).
"""
from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (FILE_NAME, FILE_SIZE, BenchBase, Client, MeshdInstance,  # noqa: E402
                    arg_parser, drop_nat_table, log, nginx_conf, run_suite, sh, wait_for,
                    write_www)

MODES = ("direct", "iptables", "meshd")
HTTP_PORT, IPERF_PORT = 80, 5201
RQ_STAT = "http.outbound_http.downstream_rq_total"
TCP_STAT = "tcp.outbound_tcp.downstream_cx_total"


class Bench(BenchBase):
    name = "egress"
    modes = MODES
    ratios = (("iptables", "direct"), ("meshd", "direct"), ("meshd", "iptables"))
    key_ratio = ("meshd", "iptables")

    def __init__(self, args):
        super().__init__(args)
        self.ns_c, self.ns = f"{self.prefix}c", f"{self.prefix}s"
        self.veth = f"{self.prefix}v"            # in ns_c; the peer <veth>p is in ns
        n = random.randint(1, 250)
        self.host_ip, self.ip = f"10.233.{n}.1", f"10.233.{n}.2"
        self.chain = self.prefix.upper()
        self.rule_installed = False
        self.match = ["-m", "cgroup", "--path"]   # + the iptables client's cgroup path
        self.client_uid: int | None = None       # set if we must fall back to -m owner
        self.cg = {}

    # ---------------------------------------------------------------- setup
    def setup(self):
        for tool in ("wrk", "iperf3", "nginx", "iptables", "ip", "curl"):
            if not shutil.which(tool):
                raise SystemExit(f"{tool} not found: run scripts/setup.sh")
        self.cg = {m: self.cg_make(m) for m in ("direct", "iptables", "wl", "server")}
        self.cg["meshd"] = self.cg["wl"]
        self.mesh = MeshdInstance(self, "", self.cg["wl"], netns=self.ns_c,
                                  http_ports=[HTTP_PORT])
        self.meshds.append(self.mesh)
        self.outbound_port = self.mesh.outbound_port
        log(f"prefix {self.prefix}: netns {self.ns_c} ({self.host_ip}) -> {self.ns} ({self.ip}), "
            f"cgroups {self.cg_base}, "
            f"Envoy outbound port {self.outbound_port}")
        self.path.counters = {"rq": (self.mesh, RQ_STAT), "tcp": (self.mesh, TCP_STAT)}
        self._netns()
        self._servers()
        self._meshd()
        self._check_iptables_match()

    def _netns(self):
        self.netns_add(self.ns_c)
        self.netns_add(self.ns)
        self.veth_add(self.veth, self.ns_c, self.ns)
        for ns, dev, ip in ((self.ns_c, self.veth, self.host_ip), (self.ns, self.veth + "p", self.ip)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")

    def _servers(self):
        write_www(self.tmp)
        conf = Path(self.tmp, "nginx.conf")
        conf.write_text(nginx_conf(self.tmp, [(self.ip, HTTP_PORT)]))
        self.spawn_server(self.cg["server"], self.ns, "nginx", "-e", f"{self.tmp}/nginx-error.log",
                          "-p", self.tmp, "-c", conf)
        self.spawn_server(self.cg["server"], self.ns, "iperf3", "-s", "-B", self.ip,
                          "-p", IPERF_PORT)

        def up():
            self.check_servers()
            r = sh("ip", "netns", "exec", self.ns, "ss", "-Hltn", check=False).stdout
            return all(f"{self.ip}:{p} " in r for p in (HTTP_PORT, IPERF_PORT))
        wait_for(up, 10, what="nginx and iperf3 in the netns")
        got = self.curl(self.client("direct"))
        if got != f"200 {FILE_SIZE}":
            raise RuntimeError(f"nginx does not serve the file: {got!r}")

    def _meshd(self):
        self.mesh.start()
        self.meshd_status = self.mesh.wait_running(60)
        self.admin = self.mesh.admin
        self.envoy_pid = self.mesh.envoy_pid
        wait_for(lambda: self.curl(self.client("meshd")).startswith("200"),
                 20, what="a request through meshd's Envoy", interval=0.2)

    def stat(self, name: str) -> int:
        return self.mesh.stat(name)

    # ---------------------------------------------------------------- iptables
    def _ipt(self, *args, check=True):
        """iptables in the client namespace (where the clients and Envoy are)."""
        return sh("ip", "netns", "exec", self.ns_c, "iptables", "-w", "-t", "nat", *args,
                  check=check)

    def rule_on(self):
        if self.rule_installed:
            return
        self._ipt("-N", self.chain)
        target = (self.match + [self.cg["iptables"]]) if self.client_uid is None \
            else ["-m", "owner", "--uid-owner", str(self.client_uid)]
        self._ipt("-A", self.chain, "-p", "tcp", "-d", self.ip, *target,
                  "-j", "REDIRECT", "--to-ports", self.outbound_port)
        self._ipt("-I", "OUTPUT", "-j", self.chain)
        self.rule_installed = True

    def rule_off(self):
        if self.rule_installed:
            self._ipt("-D", "OUTPUT", "-j", self.chain, check=False)
            self._ipt("-F", self.chain, check=False)
            self._ipt("-X", self.chain, check=False)
            self.rule_installed = False
        drop_nat_table(self.ns_c)

    def mode_on(self, mode):
        if mode == "iptables":
            self.rule_on()

    def mode_off(self, mode):
        if mode == "iptables":
            self.rule_off()

    def _check_iptables_match(self):
        """Does `-m cgroup --path` match here (hybrid layout)? Else fall back to -m owner."""
        for attempt in ("cgroup", "owner"):
            if attempt == "owner":
                self.client_uid = 60000 + random.randint(0, 4999)
                log(f"-m cgroup --path did not steer the client; falling back to "
                    f"-m owner --uid-owner {self.client_uid}")
            before = self.stat(RQ_STAT)
            self.rule_on()
            try:
                got = self.curl(self.client("iptables"))
            finally:
                self.rule_off()
            if got.startswith("200") and self.stat(RQ_STAT) > before:
                self.iptables_match = attempt
                log(f"iptables mode steers with -m {attempt}")
                return
        raise RuntimeError("the iptables REDIRECT mode does not reach Envoy")

    # ---------------------------------------------------------------- suite hooks
    def url(self) -> str:
        return f"http://{self.ip}:{HTTP_PORT}/{FILE_NAME}"

    def client(self, mode: str) -> Client:
        return Client(cgroup=self.cg[mode], url=self.url(), iperf_host=self.ip,
                      iperf_port=IPERF_PORT, netns=self.ns_c,
                      uid=self.client_uid if mode == "iptables" else None)

    def own_cgroups(self, mode):
        return [self.cg[mode], self.cg["server"], self.mesh.envoy_cg]

    def check_path(self, mode, m, d16, d1, dip, reqs16, reqs1):
        m["envoy_rq_delta_c16"], m["envoy_rq_delta_c1"] = d16["rq"], d1["rq"]
        m["envoy_tcp_cx_delta_iperf"] = dip["tcp"]
        if mode == "direct":
            return d16["rq"] == 0 and d1["rq"] == 0 and dip["tcp"] == 0
        return d16["rq"] >= reqs16 and d1["rq"] >= reqs1 and dip["tcp"] >= 2

    def conditions(self) -> dict:
        return {
            "iptables_match": getattr(self, "iptables_match", None),
            "iptables_rule": f"(in netns c) nat OUTPUT -j {self.chain}; {self.chain}: -p tcp -d {self.ip} "
                             f"-m cgroup --path {self.cg.get('iptables')} -j REDIRECT --to-ports "
                             f"<envoy outbound>" if getattr(self, "iptables_match", None) == "cgroup"
                             else "-m owner --uid-owner (fallback)",
            "nat_table_dropped_between_runs": bool(shutil.which("nft")),
        }


def main() -> int:
    ap = arg_parser(__doc__, MODES)
    args = ap.parse_args()
    return run_suite(Bench, args, ap, "egress")


if __name__ == "__main__":
    sys.exit(main())
