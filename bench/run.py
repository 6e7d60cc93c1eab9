#!/usr/bin/env python3
"""The meshd performance suite: every path, every mode, interleaved in one run.

Run as root from the repository root:
    .venv/bin/python bench/run.py            # full: 5 reps, ~15 min
    .venv/bin/python bench/run.py --quick    # development: 1 rep, short runs, ~4 min
It writes the Markdown tables into bench/README.md (between the RESULTS markers) and the
raw JSON to bench/results/run-<timestamp>.json and, beside the README, bench/run.json
(`--no-readme` leaves both alone).

Topology (every name carries a random prefix "mb" + 6 hex digits; all of it is removed at
exit, on error and on Ctrl-C/SIGTERM): two network namespaces joined by a veth, as in
tests/datapath/test_two_hosts.py. Host A (<prefix>a) runs the clients of the egress,
ingress and two-host paths; host B (<prefix>b) runs nginx (ports 80, 8080, 8081) and
iperf3 -s (5201, 5202, 5203) in meshd B's workload cgroup, and the same-host clients.
meshd A serves A, meshd B serves B (8080/8081/5202/5203 are excluded inbound ports). A
plain Envoy per host (bench/plain_envoy.py) is the iptables anchor's proxy.

Modes per path (the client binary is the same in each; only its cgroup, target port and
the rules in force differ):
  direct       no proxy (B:8080/5202, excluded from meshd B)
  iptables     nat REDIRECT to the host's plain Envoy (Istio/Consul's datapath), only while
               measured: OUTPUT -m cgroup (egress, same-host, two-host's A) and PREROUTING
               (ingress, two-host's B), target B:8081/5203
  meshd        meshd's eBPF steering into meshd's Envoy (B:80/5201 when B meshes it)
  meshd-accel  meshd with `[mesh] acceleration = "force"` (written live, removed after; forced: the kernel is not on meshd's allowlist);
               "not available" when this meshd rejects the key
Figures per measurement: req/s (wrk c=16), CPU per request (all CPUs; own cgroups),
p50/p99 at c=1 and under load, new connections/s (one request per connection), iperf3.
Then connect cost at 1 / 1,000 / 10,000 excluded CIDRs, excluded ports and workloads
(bench/connect_cost.py), and the resident memory of every meshd and Envoy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402
from common import (take_charge, FILE_NAME, FILE_SIZE, MESHD, MESHD_VERSION, REPO, BenchBase,  # noqa: E402
                    Client, MeshdInstance, drop_nat_table, find_envoy, flush_conntrack, free_port,
                    log, nginx_conf, rss_mb, sh, wait_for, write_www)
from plain_envoy import PlainEnvoy  # noqa: E402
import connect_cost  # noqa: E402

MODES = ("direct", "iptables", "meshd", "meshd-accel")
PATHS = ("egress", "ingress", "same-host", "two-host")
# B's ports: (http, iperf3). DIRECT and ANCHOR ports are excluded from meshd B's inbound.
MESHED, DIRECT_PORTS, ANCHOR_PORTS = (80, 5201), (8080, 5202), (8081, 5203)
HTTP_PORTS = (80, 8080, 8081)
ACCEL_FILE = "20-acceleration.toml"
STATUS_REFRESH_S = 1.2   # meshd rewrites status.json every second
# The counters of the path check: name -> (owner, stat)
RQ, TCP = "http.{}_http.downstream_rq_total", "tcp.{}_tcp.downstream_cx_total"
RESULTS_BEGIN, RESULTS_END = "<!-- RESULTS BEGIN (bench/run.py) -->", "<!-- RESULTS END -->"


class Unit:
    """What one (path, mode) measurement runs: client cgroup and netns, target ports,
    iptables rules, meshd instances to accelerate, Envoy counters that must move."""

    def __init__(self, path, mode, cgroup, netns, ports, rules=(), accel=(), through=()):
        self.path, self.mode, self.cgroup, self.netns = path, mode, cgroup, netns
        self.ports, self.rules, self.accel, self.through = ports, rules, accel, through

    @property
    def key(self) -> str:
        return f"{self.path}/{self.mode}"


class Suite(BenchBase):
    name = "run"

    def __init__(self, args):
        super().__init__(args)
        self.ns_a, self.ns_b = f"{self.prefix}a", f"{self.prefix}b"
        self.rules_on: list[tuple] = []
        self.accel_available, self.accel_error = False, ""

    # ---------------------------------------------------------------- setup
    def setup(self):
        for tool in ("wrk", "iperf3", "nginx", "iptables", "ip", "curl", "bpftool"):
            if not shutil.which(tool):
                raise SystemExit(f"{tool} not found: run scripts/setup.sh")
        self.cg = {n: self.cg_make(n) for n in
                   ("aplain", "aipt", "awl", "bwl", "bplain", "bipt", "bcl")}
        excluded = sorted(set(DIRECT_PORTS + ANCHOR_PORTS))
        self.mesh_a = MeshdInstance(self, "a", self.cg["awl"], netns=self.ns_a,
                                    http_ports=HTTP_PORTS)
        self.mesh_b = MeshdInstance(self, "b", self.cg["bwl"], netns=self.ns_b,
                                    http_ports=HTTP_PORTS,
                                    workload_extra=f"exclude_inbound_ports = {excluded}\n"
                                    f'[workload.client]\ncgroup = "{self.cg["bcl"]}"\n')
        self.meshds += [self.mesh_a, self.mesh_b]
        self.ip_a, self.ip_b = self.two_hosts(self.ns_a, self.ns_b, "10.235", f"{self.prefix}v")
        for m in self.meshds:          # BCC compiles while the servers start
            m.start()
        self.plain = {h: PlainEnvoy(self, f"p{h}", ns, HTTP_PORTS, free_port)
                      for h, ns in (("a", self.ns_a), ("b", self.ns_b))}
        for p in self.plain.values():
            p.start(find_envoy())
        self._servers()
        for m in self.meshds:
            m.wait_running()
        self.path.counters = {
            "a_out_rq": (self.mesh_a, RQ.format("outbound")),
            "a_out_tcp": (self.mesh_a, TCP.format("outbound")),
            "b_in_rq": (self.mesh_b, RQ.format("inbound")),
            "b_in_tcp": (self.mesh_b, TCP.format("inbound")),
            "b_out_rq": (self.mesh_b, RQ.format("outbound")),
            "b_out_tcp": (self.mesh_b, TCP.format("outbound")),
            "pa_out_rq": (self.plain["a"], RQ.format("anchor_out")),
            "pa_out_tcp": (self.plain["a"], TCP.format("anchor_out")),
            "pb_in_rq": (self.plain["b"], RQ.format("anchor_in")),
            "pb_in_tcp": (self.plain["b"], TCP.format("anchor_in")),
            "pb_out_rq": (self.plain["b"], RQ.format("anchor_out")),
            "pb_out_tcp": (self.plain["b"], TCP.format("anchor_out")),
        }
        wait_for(lambda: set(self._b_workload("bench").get("inbound_ports", [])) >= set(MESHED),
                 30, what="meshd B discovers the server ports", interval=0.2)
        self._check_acceleration()
        self.units = self._units()
        for u in self.units.values():
            if u.mode != "meshd-accel":
                self._wait_through(u)
        self.memory_start = self.memory()

    def _b_workload(self, name):
        st = self.mesh_b.status() or {}
        return next((w for w in st.get("workloads", []) if w.get("name") == name), {})

    def _servers(self):
        write_www(self.tmp)
        conf = Path(self.tmp, "nginx.conf")
        conf.write_text(nginx_conf(self.tmp, [(self.ip_b, p) for p in HTTP_PORTS]))
        self.spawn_server(self.cg["bwl"], self.ns_b, "nginx", "-e",
                          f"{self.tmp}/nginx-error.log", "-p", self.tmp, "-c", conf)
        iperf_ports = (MESHED[1], DIRECT_PORTS[1], ANCHOR_PORTS[1])
        for port in iperf_ports:
            self.spawn_server(self.cg["bwl"], self.ns_b, "iperf3", "-s", "-B", self.ip_b,
                              "-p", port)

        def up():
            self.check_servers()
            r = sh("ip", "netns", "exec", self.ns_b, "ss", "-Hltn", check=False).stdout
            return all(f"{self.ip_b}:{p} " in r for p in HTTP_PORTS + iperf_ports)
        wait_for(up, 10, what="nginx and iperf3 in netns b")

    def _check_acceleration(self):
        """Does this meshd accept `[mesh] acceleration = "force"`? (`meshd check` on a copy
        of A's config plus that file.)"""
        with tempfile.TemporaryDirectory(prefix=f"{self.prefix}-chk") as d:
            for f in Path(self.mesh_a.config_dir).glob("*.toml"):
                shutil.copy(f, d)
            Path(d, ACCEL_FILE).write_text("[mesh]\nacceleration = \"force\"\n")
            r = sh(MESHD, "check", "--config-dir", d, check=False)
        self.accel_available = r.returncode == 0
        self.accel_error = "" if self.accel_available else (r.stdout + r.stderr).strip() \
            .replace(d, "<config>")
        log("acceleration: " + ("available" if self.accel_available
                                else f"not available ({self.accel_error})"))

    # ---------------------------------------------------------------- units
    def _units(self) -> dict[str, Unit]:
        a, b, cg = self.ns_a, self.ns_b, self.cg
        egress_rule = ("a", "OUTPUT", cg["aipt"])
        in_rule = ("b", "PREROUTING", None)
        u = [
            # one direct measurement serves egress, ingress and two-host (same client,
            # same namespaces, same server port): see report_paths()
            Unit("a-b", "direct", cg["aplain"], a, DIRECT_PORTS),
            Unit("egress", "iptables", cg["aipt"], a, DIRECT_PORTS, rules=[egress_rule],
                 through=["pa_out"]),
            Unit("egress", "meshd", cg["awl"], a, DIRECT_PORTS, through=["a_out"]),
            Unit("egress", "meshd-accel", cg["awl"], a, DIRECT_PORTS, accel=[self.mesh_a],
                 through=["a_out"]),
            Unit("ingress", "iptables", cg["aplain"], a, ANCHOR_PORTS, rules=[in_rule],
                 through=["pb_in"]),
            Unit("ingress", "meshd", cg["aplain"], a, MESHED, through=["b_in"]),
            Unit("ingress", "meshd-accel", cg["aplain"], a, MESHED, accel=[self.mesh_b],
                 through=["b_in"]),
            Unit("same-host", "direct", cg["bplain"], b, DIRECT_PORTS),
            Unit("same-host", "iptables", cg["bipt"], b, ANCHOR_PORTS,
                 rules=[("b", "OUTPUT", cg["bipt"])], through=["pb_out"]),
            Unit("same-host", "meshd", cg["bcl"], b, MESHED, through=["b_out"]),
            Unit("same-host", "meshd-accel", cg["bcl"], b, MESHED, accel=[self.mesh_b],
                 through=["b_out"]),
            Unit("two-host", "iptables", cg["aipt"], a, ANCHOR_PORTS,
                 rules=[egress_rule, in_rule], through=["pa_out", "pb_in"]),
            Unit("two-host", "meshd", cg["awl"], a, MESHED, through=["a_out", "b_in"]),
            Unit("two-host", "meshd-accel", cg["awl"], a, MESHED,
                 accel=[self.mesh_a, self.mesh_b], through=["a_out", "b_in"]),
        ]
        return {x.key: x for x in u}

    def wanted(self) -> list[Unit]:
        paths, modes = set(self.args.paths.split(",")), set(self.args.modes.split(","))
        out = []
        for u in self.units.values():
            in_path = u.path in paths or (u.path == "a-b" and paths & {"egress", "ingress",
                                                                       "two-host"})
            if in_path and u.mode in modes and \
                    (u.mode != "meshd-accel" or self.accel_available):
                out.append(u)
        return out

    def client(self, u: Unit) -> Client:
        http, iperf = u.ports
        return Client(cgroup=u.cgroup, url=f"http://{self.ip_b}:{http}/{FILE_NAME}",
                      iperf_host=self.ip_b, iperf_port=iperf, netns=u.netns)

    def own_cgroups(self, u: Unit) -> list[str]:
        return [u.cgroup, self.cg["bwl"], self.mesh_a.envoy_cg, self.mesh_b.envoy_cg] + \
            [p.cgroup for p in self.plain.values()]

    # ---------------------------------------------------------------- per-mode state
    def _ipt(self, host, *args, check=True):
        ns = self.ns_a if host == "a" else self.ns_b
        return sh("ip", "netns", "exec", ns, "iptables", "-w", "-t", "nat", *args, check=check)

    def _rule_args(self, rule) -> list[str]:
        host, chain, cgroup = rule
        p = self.plain[host]
        if chain == "OUTPUT":   # Istio's 15001: the app's outbound connections
            return ["-p", "tcp", "-d", self.ip_b, "-m", "cgroup", "--path", cgroup,
                    "-j", "REDIRECT", "--to-ports", str(p.outbound_port)]
        http, iperf = ANCHOR_PORTS   # Istio's 15006: inbound connections to the app
        return ["-p", "tcp", "-d", self.ip_b, "-m", "multiport", "--dports", f"{http},{iperf}",
                "-j", "REDIRECT", "--to-ports", str(p.inbound_port)]

    def unit_on(self, u: Unit):
        for ns in (self.ns_a, self.ns_b):   # no entry of an earlier mode decides for this one
            flush_conntrack(ns)
        for rule in u.rules:
            self._ipt(rule[0], "-A", rule[1], *self._rule_args(rule))
            self.rules_on.append(rule)
        for m in u.accel:
            m.write_conf(ACCEL_FILE, "[mesh]\nacceleration = \"force\"\n")
        for m in u.accel:
            m.wait_config(ACCEL_FILE, True,
                          until=lambda st: st.get("acceleration", {}).get("active"))

    def unit_off(self, u: Unit):
        for rule in list(self.rules_on):
            self._ipt(rule[0], "-D", rule[1], *self._rule_args(rule), check=False)
            self.rules_on.remove(rule)
        for host in {r[0] for r in u.rules}:
            # a nat table makes conntrack run for every connection of the namespace,
            # which the other modes must not pay
            drop_nat_table(self.ns_a if host == "a" else self.ns_b)
        for m in u.accel:
            m.remove_conf(ACCEL_FILE)
        for m in u.accel:
            m.wait_config(ACCEL_FILE, False)

    def extra_cleanup(self, step):
        for rule in list(self.rules_on):
            step("iptables", lambda rule=rule: self._ipt(rule[0], "-D", rule[1],
                                                         *self._rule_args(rule), check=False))

    # ---------------------------------------------------------------- path check
    def check_path(self, u: Unit, d: dict, m: dict) -> bool:
        """Every counter of u.through rose by at least what the clients did; every other
        counter did not move (no mode went through an Envoy it should not)."""
        want = {"c16": m["requests"], "c1": m["c1_requests"], "newconn": m["newconn_requests"]}
        ok = True
        for name in ("a_out", "b_in", "b_out", "pa_out", "pb_in", "pb_out"):
            through = name in u.through
            for run, n in want.items():
                got = d[run][name + "_rq"]
                # 1 %: with one request per connection wrk counted a few more than the
                # plain Envoy did (measured: 5,204 vs 5,187); a mode that missed its
                # Envoy shows 0
                ok &= got >= 0.99 * n if through else got == 0
            got = d["iperf"][name + "_tcp"]
            ok &= got >= 2 if through else got == 0
        return ok

    def _wait_through(self, u: Unit):
        c = self.client(u)

        def ok():
            s0 = self.path.sample()
            got = self.curl(c)
            s1 = self.path.sample()
            moved = {k[:-3] for k in s0 if k.endswith("_rq") and s1[k] > s0[k]}
            return got == f"200 {FILE_SIZE}" and moved == set(u.through)
        self.unit_on(u)
        try:
            wait_for(ok, 20, what=f"{u.key}: a request through {u.through or 'no Envoy'}",
                     interval=0.3)
        finally:
            self.unit_off(u)

    @staticmethod
    def accel_counters(meshds) -> dict:
        return {m.name: dict((m.status() or {}).get("acceleration", {}).get("counters", {}))
                for m in meshds}

    def measure_unit(self, u: Unit, rep: int) -> dict:
        self.unit_on(u)
        try:
            a0 = self.accel_counters(u.accel)
            m, d = self.measure(self.client(u), self.own_cgroups(u), self.path)
            if u.accel:
                time.sleep(STATUS_REFRESH_S)   # status.json's counters are a second old
            a1 = self.accel_counters(u.accel)
        finally:
            self.unit_off(u)
        m.update(rep=rep, path=u.path, mode=u.mode, stat_deltas=d)
        m["through_envoy_ok"] = self.check_path(u, d, m)
        if u.accel:
            # the accelerated legs carried bytes: what status shows for acceleration
            m["accel_deltas"] = {n: {k: a1[n].get(k, 0) - v for k, v in a0[n].items()}
                                 for n in a0}
            m["accel_ok"] = all(x.get("bytes_redirected", 0) > 0
                                for x in m["accel_deltas"].values())
        return m

    # ---------------------------------------------------------------- memory
    def memory(self) -> dict:
        out = {}
        for m in self.meshds:
            for what, pid in m.pids().items():
                out[f"meshd {m.name.upper()}: {what}"] = rss_mb(pid)
        for h, p in self.plain.items():
            out[f"plain Envoy {h.upper()} (anchor)"] = rss_mb(p.pid)
        return out


# -------------------------------------------------------------------- driver
def report_paths(results: list[dict], paths) -> tuple[list[dict], dict]:
    """Give each path its rows: the shared A->B direct measurement is every A->B path's
    direct. Returns (rows, path -> modes present)."""
    rows = []
    for r in results:
        if r["path"] == "a-b":
            rows += [dict(r, path=p) for p in ("egress", "ingress", "two-host") if p in paths]
        else:
            rows.append(r)
    present = {p: [m for m in MODES if any(r["path"] == p and r["mode"] == m for r in rows)]
               for p in PATHS if p in paths}
    return rows, present


def progress(u: Unit, rep: int, m: dict) -> str:
    line = (f"rep {rep + 1} {u.key:22s} {m['rps']:7.0f} req/s {m['cpu_us_per_req']:6.1f} µs "
            f"CPU/req  p50 {m['p50_us']} p99 {m['p99_us']} µs  {m['newconn_rps'] or 0:6.0f} "
            f"conn/s  {m['iperf_gbps'] or 0:.2f} Gbit/s  foreign {m['foreign_cpu_cores']:.2f}  ")
    if "accel_deltas" in m:
        line += "accel " + ", ".join(
            f"{n}: +{x.get('pairs', 0)} pairs +{x.get('bytes_redirected', 0) / 1e6:.0f} MB "
            f"+{x.get('fallbacks', 0)} fallbacks" for n, x in m["accel_deltas"].items()) + "  "
    return line + ("ok" if m["through_envoy_ok"] else
                   f"PATH CHECK FAILED, counter deltas: {m['stat_deltas']}")


def path_failures(doc: dict) -> str:
    bad = [r for r in doc.get("results", []) if not r["through_envoy_ok"]]
    return (f"**failed** in {len(bad)} of {len(doc.get('results', []))} measurements ("
            + ", ".join(f"{r['path']}/{r['mode']} rep {r['rep'] + 1}" for r in bad)
            + "), which are left out of the medians (n in the column heads)")


def accel_lines(results: list[dict]) -> list[str]:
    """Per path: in how many meshd-accel measurements every accelerated meshd redirected
    bytes, and the median pairs / MB redirected / fallbacks per measurement."""
    out = []
    for path in PATHS:
        rs = [r for r in results if r["path"] == path and "accel_deltas" in r]
        if not rs:
            continue
        per = [{k: sum(x.get(k, 0) for x in r["accel_deltas"].values())
                for k in ("pairs", "bytes_redirected", "fallbacks")} for r in rs]
        med = {k: report.median([p[k] for p in per]) for k in per[0]}
        out.append(f"- {path}: bytes redirected in {sum(r['accel_ok'] for r in rs)} of "
                   f"{len(rs)} measurements; per measurement (median) {med['pairs']:,.0f} "
                   f"pairs, {med['bytes_redirected'] / 1e6:,.0f} MB redirected, "
                   f"{med['fallbacks']:,.0f} fallbacks")
    return out


def render_markdown(doc: dict) -> str:
    c = doc["conditions"]
    parts = [f"Run {doc['started']} (`{doc['json']}`), "
             f"{'quick form' if c.get('quick') else 'full form'}; medians of {c['reps']} "
             f"interleaved repetitions (mode order rotated each rep). Path check "
             f"{'passed in every measurement' if doc['path_ok'] else path_failures(doc)}"
             f"; wrk errors: {doc['wrk_errors']}.", "", "Conditions:", "",
             report.conditions_text(c), ""]
    if not c.get("acceleration_available"):
        parts += [f"`meshd-accel`: **not available** — this meshd rejects "
                  f"`[mesh] acceleration = \"force\"` (`{c.get('acceleration_error', '')}`).", ""]
    accel = accel_lines(doc.get("results", []))
    if accel:
        parts += ["Acceleration in the `meshd-accel` measurements (meshd's counters, "
                  "status.json before and after each):", ""] + accel + [""]
    for path, modes in doc["modes"].items():
        parts += [f"#### {path}", "", report.path_table(doc["summary"][path], modes), ""]
    if doc.get("connect"):
        parts += ["#### Connect cost against configuration size", "",
                  report.connect_table(doc["connect"]), ""]
        if doc.get("connect_notes"):
            parts += [f"- {n}" for n in doc["connect_notes"]] + [""]
    parts += ["#### Resident memory (end of run)", "", report.memory_table(doc["memory"]), "",
              "#### Targets", "", report.targets_table(doc["targets"]), ""]
    return "\n".join(parts)


def write_readme(md: str) -> None:
    path = REPO / "bench" / "README.md"
    text = path.read_text()
    block = f"{RESULTS_BEGIN}\n{md}\n{RESULTS_END}"
    if RESULTS_BEGIN in text:
        text = re.sub(re.escape(RESULTS_BEGIN) + ".*?" + re.escape(RESULTS_END),
                      lambda _: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    path.write_text(text)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="development form: 1 rep, 1 s wrk/iperf3 runs, no idle wait, "
                         "connect cost at 1 and 1,000 entries, 1 rep")
    ap.add_argument("--reps", type=int, help="interleaved repetitions (default 5)")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 2)")
    ap.add_argument("--iperf-duration", type=int, help="seconds per iperf3 run (default 2)")
    ap.add_argument("--settle", type=float, default=0.2, help="pause between runs (s)")
    ap.add_argument("--idle-wait", type=float,
                    help="wait up to this many s before each measurement for the machine to "
                         "be idle (default 3; quick: 0)")
    ap.add_argument("--idle-threshold", type=float, default=0.15,
                    help="'idle' = at most this share of all CPUs busy over 0.5 s")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    ap.add_argument("--entries", help="connect cost sizes (default 1,1000,10000; quick: "
                                      "1,1000); empty: skip")
    ap.add_argument("--connect-reps", type=int, help="connect cost reps (default 3)")
    ap.add_argument("--only-connect", action="store_true",
                    help="measure the connect cost only and replace that part of the "
                         "latest results (bench/run.json, README)")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: summarize bench/run.json's raw results again and "
                         "rewrite its tables (README) with this code")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="JSON directory")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    a = ap.parse_args(argv)
    defaults = dict(reps=(1, 5), duration=(1, 2), iperf_duration=(1, 2), idle_wait=(0, 3),
                    entries=("1,1000", "1,1000,10000"), connect_reps=(1, 3))
    for k, (quick, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    return a


def main() -> int:
    args = parse_args()
    if args.render_only:
        return render_only(args)
    if not take_charge("run.py"):
        return 1

    started, load_start = datetime.datetime.now(), os.getloadavg()
    suite = Suite(args)
    results, connect, notes = [], {}, []
    try:
        suite.setup()
        units = suite.wanted()
        log(f"prefix {suite.prefix}: {len(units)} measurements per rep: "
            f"{', '.join(u.key for u in units)}")
        if not args.only_connect:
            results = suite.interleaved(units, args.reps, suite.unit_on, suite.unit_off,
                                        suite.measure_unit, progress)
        memory = suite.memory()
        sizes = [int(n) for n in args.entries.split(",") if n]
        if sizes:
            connect, notes = connect_cost.run(suite, sizes, args.connect_reps)
    finally:
        suite.cleanup()

    if args.only_connect:
        return replace_connect(args, started, connect, notes)
    rows, present = report_paths(results, set(args.paths.split(",")))
    summary = report.summarize(measured(rows), present)
    foreign = [r["foreign_cpu_cores"] for r in results]
    cond = dict(
        base_conditions(), quick=args.quick, reps=args.reps, duration_s=args.duration,
        iperf_duration_s=args.iperf_duration, idle_wait_s=args.idle_wait,
        acceleration_available=suite.accel_available, acceleration_error=suite.accel_error,
        acceleration="available" if suite.accel_available else "not available",
        foreign_cpu_cores_median=round(report.median(foreign), 2) if foreign else None,
        foreign_cpu_cores_max=round(max(foreign), 2) if foreign else None,
        # the machine's load (1/5/15 min) at start and end: other people's tests share it
        load_average=" / ".join(" ".join(f"{x:.2f}" for x in la)
                                for la in (load_start, os.getloadavg())),
        elapsed_s=round((datetime.datetime.now() - started).total_seconds()),
        iptables_rules={k: suite._rule_args(r) for k, r in (
            ("OUTPUT (A, B)", ("a", "OUTPUT", "<client cgroup>")),
            ("PREROUTING (B)", ("b", "PREROUTING", None)))},
    )
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out, f"run-{started:%Y%m%d-%H%M%S}.json")
    doc = {"started": started.isoformat(timespec="seconds"), "json": "bench/run.json",
           "conditions": cond, "path_ok": all(r["through_envoy_ok"] for r in results),
           "wrk_errors": sum(r["errors"] for r in results), "modes": present,
           "summary": summary, "connect": connect, "connect_notes": notes,
           "memory": memory, "memory_after_start": suite.memory_start,
           "targets": report.targets(summary, connect), "results": results}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    md = render_markdown(doc)
    print(md)
    if not args.no_readme:
        write_readme(md)
        shutil.copy(out, REPO / "bench" / "run.json")   # the README's raw numbers, committed
    print(f"\nresults: {out}")
    return 0 if doc["path_ok"] else 1


def measured(rows: list[dict]) -> list[dict]:
    """What the medians are of: a measurement whose path check failed did not measure its
    mode (its requests went past the mode's proxy), so it is left out (and listed)."""
    return [r for r in rows if r["through_envoy_ok"]]


LATEST = REPO / "bench" / "run.json"


def republish(args, doc: dict) -> int:
    """The latest results, changed: rendered, and (unless --no-readme) written back to
    bench/run.json and the README."""
    md = render_markdown(doc)
    print(md)
    if not args.no_readme:
        LATEST.write_text(json.dumps(doc, indent=1) + "\n")
        write_readme(md)
    return 0


def render_only(args) -> int:
    """--render-only: bench/run.json summarized and rendered again."""
    doc = json.loads(LATEST.read_text())
    rows, present = report_paths(doc["results"], set(doc["modes"]))
    doc["summary"] = report.summarize(measured(rows), present)
    doc["targets"] = report.targets(doc["summary"], doc.get("connect", {}))
    return republish(args, doc)


def replace_connect(args, started, connect, notes) -> int:
    """--only-connect: the latest full results with this run's connect cost."""
    doc = json.loads(LATEST.read_text())
    doc.update(connect=connect, connect_notes=notes,
               targets=report.targets(doc["summary"], connect))
    doc["conditions"]["connect_cost_run"] = started.isoformat(timespec="seconds")
    return republish(args, doc)


def base_conditions() -> dict:
    import platform

    def ver(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:
            return None
    envoy = ver([find_envoy(), "--version"]) or ""
    return {
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo")
                           .read_text().splitlines() if ln.startswith("model name")), None),
        "meshd": MESHD_VERSION, "envoy": envoy.split("version:")[-1].strip()[:60],
        # every Envoy here runs with Envoy's default --concurrency: one worker per CPU
        "envoy_concurrency": f"{os.cpu_count()} workers (Envoy's default: one per CPU)",
        "nginx": ver(["nginx", "-v"]), "wrk": ver(["wrk", "-v"]),
        "iperf3": ver(["iperf3", "-v"]), "iptables": ver(["iptables", "-V"]),
    }


if __name__ == "__main__":
    sys.exit(main())
