#!/usr/bin/env python3
"""Inbound benchmark: direct vs iptables anchor (Istio's 15006 style) vs meshd sk_lookup,
and the two-host path (host A outbound + host B inbound), through meshd's Envoys.

Run as root from the repository root:  .venv/bin/python bench/inbound.py [--reps 5] [--duration 3]

Topology (every name carries a random prefix "mb" + 6 hex digits; all of it is removed on
exit, on error and on Ctrl-C/SIGTERM):
  netns <prefix>c  "host A" / client host: wrk, iperf3 -c; meshd A serves it
                   (workload cgroup /<prefix>/awl)
  netns <prefix>s  "host B" / server host: nginx (ports 80, 8080, 8081) and iperf3 -s
                   (5201, 5202, 5203), all in meshd B's workload cgroup /<prefix>/bwl;
                   8080/8081/5202/5203 are in the workload's exclude_inbound_ports
  joined by one veth pair (10.234.N.1 in c, 10.234.N.2 in s).

Modes (the client is the same wrk/iperf3 binary each time):
  direct       client in plain cgroup /<prefix>/client -> s:8080 / :5202 (excluded ports:
               sk_lookup passes them). Baseline of both the inbound and the two-host modes
               (same namespaces, client not enrolled, server port excluded).
  in-iptables  client plain -> s:8081 / :5203, nat PREROUTING in s sends them to meshd B's
               Envoy inbound listener (the Istio 15006 anchor); only while measured
  in-meshd     client plain -> s:80 / :5201: meshd B's sk_lookup hands them to Envoy B
  two-host     client in A's workload cgroup -> s:80 / :5201: Envoy A (outbound) then
               Envoy B (inbound, sk_lookup)
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

MODES = ("direct", "in-iptables", "in-meshd", "two-host")
PORTS = {  # mode -> (http port, iperf3 port) on the server host
    "direct": (8080, 5202), "in-iptables": (8081, 5203),
    "in-meshd": (80, 5201), "two-host": (80, 5201),
}
IN_RQ = "http.inbound_http.downstream_rq_total"
IN_TCP = "tcp.inbound_tcp.downstream_cx_total"
OUT_RQ = "http.outbound_http.downstream_rq_total"
OUT_TCP = "tcp.outbound_tcp.downstream_cx_total"


class Inbound(BenchBase):
    name = "inbound"
    modes = MODES
    ratios = (("in-iptables", "direct"), ("in-meshd", "direct"), ("two-host", "direct"),
              ("two-host", "in-meshd"), ("in-meshd", "in-iptables"))
    key_ratio = ("in-meshd", "in-iptables")

    def __init__(self, args):
        super().__init__(args)
        self.ns_c, self.ns_s = f"{self.prefix}c", f"{self.prefix}s"
        self.veth = f"{self.prefix}x"          # in c; the peer <veth>p is in s
        n = random.randint(1, 250)
        self.ip_c, self.ip_s = f"10.234.{n}.1", f"10.234.{n}.2"
        self.rule_installed = False
        self.anchor = None        # "redirect" (Istio's rule) or "dnat" (see _check_anchor)
        self.cg = {}

    # ---------------------------------------------------------------- setup
    def setup(self):
        for tool in ("wrk", "iperf3", "nginx", "iptables", "ip", "curl"):
            if not shutil.which(tool):
                raise SystemExit(f"{tool} not found: run scripts/setup.sh")
        self.cg = {m: self.cg_make(m) for m in ("client", "awl", "bwl")}
        excluded = sorted({p for m in ("direct", "in-iptables") for p in PORTS[m]})
        http = sorted({PORTS[m][0] for m in MODES})
        self.mesh_a = MeshdInstance(self, "a", self.cg["awl"], netns=self.ns_c, http_ports=http)
        self.mesh_b = MeshdInstance(self, "b", self.cg["bwl"], netns=self.ns_s, http_ports=http,
                                    workload_extra=f"exclude_inbound_ports = {excluded}\n")
        self.meshds += [self.mesh_a, self.mesh_b]
        log(f"prefix {self.prefix}: netns {self.ns_c} ({self.ip_c}) -> {self.ns_s} ({self.ip_s}), "
            f"cgroups {self.cg_base}, Envoy B inbound port {self.mesh_b.inbound_port}")
        self.path.counters = {
            "b_in_rq": (self.mesh_b, IN_RQ), "b_in_tcp": (self.mesh_b, IN_TCP),
            "a_out_rq": (self.mesh_a, OUT_RQ), "a_out_tcp": (self.mesh_a, OUT_TCP),
        }
        self._netns()
        for m in self.meshds:       # BCC compiles in parallel with the servers starting
            m.start()
        self._servers()
        for m in self.meshds:
            m.wait_running()
        wait_for(lambda: set((self.mesh_b.status() or {"workloads": [{}]})["workloads"][0]
                             .get("inbound_ports", [])) >= {80, 5201}, 20,
                 what="meshd B discovers the server ports", interval=0.2)
        for mode in ("in-meshd", "two-host"):
            self._wait_through(mode)
        self._check_anchor()

    def _netns(self):
        self.netns_add(self.ns_c)
        self.netns_add(self.ns_s)
        self.veth_add(self.veth, self.ns_c, self.ns_s)
        peer = self.veth + "p"
        for ns, dev, ip in ((self.ns_c, self.veth, self.ip_c), (self.ns_s, peer, self.ip_s)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # only used by the DNAT fallback of the iptables anchor (see _check_anchor)
        sh("ip", "netns", "exec", self.ns_s, "sh", "-c",
           f"echo 1 > /proc/sys/net/ipv4/conf/{peer}/route_localnet")

    def _servers(self):
        write_www(self.tmp)
        conf = Path(self.tmp, "nginx.conf")
        conf.write_text(nginx_conf(self.tmp, [(self.ip_s, p) for p in (80, 8080, 8081)]))
        self.spawn_server(self.cg["bwl"], self.ns_s, "nginx", "-e", f"{self.tmp}/nginx-error.log",
                          "-p", self.tmp, "-c", conf)
        for port in (5201, 5202, 5203):
            self.spawn_server(self.cg["bwl"], self.ns_s, "iperf3", "-s", "-B", self.ip_s,
                              "-p", port)

        def up():
            self.check_servers()
            r = sh("ip", "netns", "exec", self.ns_s, "ss", "-Hltn", check=False).stdout
            return all(f"{self.ip_s}:{p} " in r for p in (80, 8080, 8081, 5201, 5202, 5203))
        wait_for(up, 10, what="nginx and iperf3 in the server netns")
        got = self.curl(self.client("direct"))
        if got != f"200 {FILE_SIZE}":
            raise RuntimeError(f"nginx does not serve the file: {got!r}")

    def _wait_through(self, mode):
        def ok():
            s0 = self.path.sample()
            got = self.curl(self.client(mode))
            s1 = self.path.sample()
            return got == f"200 {FILE_SIZE}" and s1["b_in_rq"] > s0["b_in_rq"] and \
                (mode != "two-host" or s1["a_out_rq"] > s0["a_out_rq"])
        wait_for(ok, 20, what=f"a {mode} request through the Envoy(s)", interval=0.3)

    # ---------------------------------------------------------------- iptables anchor
    def _ipt(self, *args, check=True):
        return sh("ip", "netns", "exec", self.ns_s, "iptables", "-w", "-t", "nat", *args,
                  check=check)

    def _rule(self):
        http, iperf = PORTS["in-iptables"]
        match = ["-p", "tcp", "-d", self.ip_s, "-m", "multiport", "--dports", f"{http},{iperf}"]
        if self.anchor == "redirect":
            return match + ["-j", "REDIRECT", "--to-ports", str(self.mesh_b.inbound_port)]
        return match + ["-j", "DNAT", "--to-destination", f"127.0.0.1:{self.mesh_b.inbound_port}"]

    def rule_on(self):
        if not self.rule_installed:
            self._ipt("-A", "PREROUTING", *self._rule())
            self.rule_installed = True

    def rule_off(self):
        if self.rule_installed:
            self._ipt("-D", "PREROUTING", *self._rule(), check=False)
            self.rule_installed = False
        drop_nat_table(self.ns_s)

    def mode_on(self, mode):
        if mode == "in-iptables":
            self.rule_on()

    def mode_off(self, mode):
        if mode == "in-iptables":
            self.rule_off()

    def _check_anchor(self):
        """Istio's anchor is `-j REDIRECT --to-ports 15006` with Envoy listening on
        0.0.0.0:15006. meshd's inbound listener binds 127.0.0.1 only, which a PREROUTING
        REDIRECT (to the incoming interface's address) cannot reach; then the same
        listener is reached with `-j DNAT --to-destination 127.0.0.1:<inbound>` (plus
        route_localnet on the server's veth) — same NAT/conntrack machinery."""
        for anchor in ("redirect", "dnat"):
            self.anchor = anchor
            s0 = self.path.sample()
            self.rule_on()
            try:
                got = self.curl(self.client("in-iptables"))
            finally:
                self.rule_off()
            s1 = self.path.sample()
            if got == f"200 {FILE_SIZE}" and s1["b_in_rq"] > s0["b_in_rq"]:
                log(f"iptables anchor: {' '.join(self._rule())}")
                return
            log(f"iptables anchor with -j {anchor.upper()} does not reach Envoy's inbound "
                f"listener (curl: {got!r})" + ("; trying DNAT to 127.0.0.1" if anchor ==
                                                "redirect" else ""))
        raise RuntimeError("the iptables inbound anchor does not reach Envoy")

    # ---------------------------------------------------------------- suite hooks
    def client(self, mode: str) -> Client:
        http, iperf = PORTS[mode]
        return Client(cgroup=self.cg["awl" if mode == "two-host" else "client"],
                      url=f"http://{self.ip_s}:{http}/{FILE_NAME}", iperf_host=self.ip_s,
                      iperf_port=iperf, netns=self.ns_c)

    def own_cgroups(self, mode):
        return [self.client(mode).cgroup, self.cg["bwl"], self.mesh_a.envoy_cg,
                self.mesh_b.envoy_cg]

    def check_path(self, mode, m, d16, d1, dip, reqs16, reqs1):
        inbound = mode != "direct"
        outbound = mode == "two-host"

        def ok(d, key, want):
            return d[key] >= want if want else d[key] == 0
        return all([
            ok(d16, "b_in_rq", reqs16 if inbound else 0), ok(d1, "b_in_rq", reqs1 if inbound else 0),
            ok(dip, "b_in_tcp", 2 if inbound else 0),
            ok(d16, "a_out_rq", reqs16 if outbound else 0), ok(d1, "a_out_rq", reqs1 if outbound else 0),
            ok(dip, "a_out_tcp", 2 if outbound else 0),
        ])

    def conditions(self) -> dict:
        return {
            "iptables_anchor": self.anchor,
            "iptables_rule": f"(in netns s) nat PREROUTING {' '.join(self._rule())}"
                             if self.anchor else None,
            "ports": PORTS,
            "preserve_client_address": True,
            "nat_table_dropped_between_runs": bool(shutil.which("nft")),
        }


def main() -> int:
    # 4 modes x 5 reps: a shorter idle wait than egress.py's keeps the default run ~5 min
    ap = arg_parser(__doc__, MODES, idle_wait=5)
    args = ap.parse_args()
    return run_suite(Inbound, args, ap, "inbound")


if __name__ == "__main__":
    sys.exit(main())
