#!/usr/bin/env python3
"""What meshd's rendered Envoy config costs per request, against a plain Envoy config,
behind the same redirect.

Run as root from the repository root:  .venv/bin/python bench/envoy_cost.py [--quick]

One client namespace <prefix>c and one server namespace <prefix>s (nginx, 1 KiB file),
joined by a veth; every Envoy variant runs in <prefix>c in a cgroup of its own, and an
iptables nat OUTPUT REDIRECT (-m cgroup: the client's) sends the client to the variant
being measured, so every variant sees the same redirect and the same conntrack answer to
SO_ORIGINAL_DST. Figures per variant: req/s (wrk c=16 keep-alive), the variant's Envoy
cgroup CPU µs per request (Envoy alone: other people's load does not enter it), all-CPU
µs per request, p50 at c=1. Variants are interleaved per repetition, order rotated.

Variants:
  plain            bench/plain_envoy.py (HCM + router, ORIGINAL_DST cluster, defaults)
  meshd            meshd/envoy_config.py's render() for one workload, port 80 "http"
  meshd-nolog      meshd with flow records off (`flow_logs = "off"`): the cost of one
                   record per request streamed to meshd
  meshd+dynstats   meshd with the router's dynamic cluster statistics back on (Envoy's
                   default; meshd's config before they were cut): their cost per request
  meshd-casefmt    meshd without the preserve_case header formatter (header names and
                   the reason phrase as written: a transparency feature)
  meshd-sharedpool meshd with Envoy's shared upstream pool instead of one per client
                   connection (a transparency feature: the cost of it)
  meshd-1worker    meshd with --concurrency 1
  plain-1worker    plain with --concurrency 1

--perf VARIANT[,VARIANT]: after the measurements, `perf record` of that variant's Envoy
over one more wrk c=16 run; the top entries (by DSO and symbol; Envoy's binary is
stripped, so its own code shows as one DSO, the kernel's and the allocator's by name)
are printed and stored in the JSON.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402
from common import (take_charge, CLK_TCK, FILE_NAME, FILE_SIZE, REPO, BenchBase, Client,  # noqa: E402
                    drop_nat_table, find_envoy, flush_conntrack, free_port, nginx_conf, proc_stat_busy,
                    rss_mb, sh, wait_for, write_www)
from meshd import envoy_config as ec  # noqa: E402
from meshd.envoy.admin import stats as envoy_stats, total  # noqa: E402
from plain_envoy import PlainEnvoy  # noqa: E402

VARIANTS = ("plain", "meshd", "meshd-nolog", "meshd+dynstats", "meshd-casefmt",
            "meshd-sharedpool", "meshd-1worker", "plain-1worker")


def _hcms(lds: dict):
    for res in lds["resources"]:
        for ch in res.get("filter_chains", []) + [res.get("default_filter_chain", {})]:
            for f in ch.get("filters", []):
                if f["name"] == "envoy.filters.network.http_connection_manager":
                    yield f["typed_config"]


def meshd_files(state_dir: str, port: int, variant: str) -> dict:
    """meshd's rendered config (one workload, port 80 declared http), changed as the
    variant says."""
    files = ec.render(port, free_port(), state_dir, ipv6=False, workload_ports={1: []},
                      protocols={80: "http"}, access_log=variant != "meshd-nolog")
    files = copy.deepcopy(files)
    lds, cds = files[ec.LDS], files[ec.CDS]
    if variant == "meshd+dynstats":
        for hcm in _hcms(lds):
            for f in hcm["http_filters"]:
                f["typed_config"].pop("dynamic_stats", None)
    if variant == "meshd-sharedpool":
        for c in cds["resources"]:
            c.pop("connection_pool_per_downstream_connection", None)
    if variant == "meshd-casefmt":
        for hcm in _hcms(lds):
            hcm["http_protocol_options"].pop("header_key_format", None)
        for c in cds["resources"]:
            for opts in c.get("typed_extension_protocol_options", {}).values():
                opts["use_downstream_protocol_config"]["http_protocol_options"] = {}
    return files


class EnvoyCost(BenchBase):
    name = "envoy_cost"

    def setup(self):
        self.ns_c, self.ns_s = f"{self.prefix}c", f"{self.prefix}s"
        self.ip_c, self.ip_s = self.two_hosts(self.ns_c, self.ns_s, "10.236", f"{self.prefix}v")
        self.client_cg, server_cg = self.cg_make("client"), self.cg_make("server")
        write_www(self.tmp)
        conf = Path(self.tmp, "nginx.conf")
        conf.write_text(nginx_conf(self.tmp, [(self.ip_s, 80)]))
        self.spawn_server(server_cg, self.ns_s, "nginx", "-e", f"{self.tmp}/nginx-error.log",
                          "-p", self.tmp, "-c", conf)
        self.server_cg = server_cg
        self.envoys, self.flow_sockets = {}, []
        binary = find_envoy()
        for v in self.args.variants.split(","):
            workers = ["--concurrency", "1"] if v.endswith("-1worker") else []
            if v.startswith("plain"):
                p = PlainEnvoy(self, f"v{len(self.envoys)}", self.ns_c, [80], free_port)
                p.start(binary, workers)
                self.envoys[v] = dict(port=p.outbound_port, cgroup=p.cgroup, pid=lambda p=p: p.pid,
                                      stats=p.stats, stat="http.anchor_out_http.downstream_rq_total")
                continue
            state = os.path.join(self.tmp, f"m{len(self.envoys)}")
            port = free_port()
            files = meshd_files(state, port, v.replace("-1worker", ""))
            ec.write_config(state, files)
            cg = self.cg_make(f"m{len(self.envoys)}envoy")
            logf = open(os.path.join(state, "envoy.log"), "a")
            proc = subprocess.Popen([binary, "-c", ec.bootstrap_path(state), "-l", "warning",
                                     "--disable-hot-restart", *workers], stdout=logf,
                                    stderr=logf, preexec_fn=self.preexec(cg, netns=self.ns_c))
            self.servers.append(proc)
            admin = ec.admin_socket_path(state)
            self.drain_flows(ec.flows_socket_path(state))
            self.envoys[v] = dict(port=port, cgroup=cg, pid=lambda proc=proc: proc.pid,
                                  stats=lambda admin=admin: envoy_stats(admin),
                                  stat="http.outbound_http.downstream_rq_total")
        self.the_client = Client(cgroup=self.client_cg, url=f"http://{self.ip_s}/{FILE_NAME}",
                                 iperf_host=self.ip_s, iperf_port=0, netns=self.ns_c)
        for v in self.envoys:
            self.on(v)
            try:
                wait_for(lambda: self.curl(self.the_client) == f"200 {FILE_SIZE}", 30,
                         what=f"a request through Envoy variant {v}", interval=0.3)
            finally:
                self.off(v)

    def drain_flows(self, path: str) -> None:
        """Read and drop the flow records Envoy streams to meshd's socket, as meshd would
        (without a reader Envoy would only buffer them, and sending would not be counted)."""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(16)
        self.flow_sockets.append(srv)

        def serve():
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                threading.Thread(target=lambda c=conn: [None for _ in iter(
                    lambda: c.recv(65536), b"")], daemon=True).start()
        threading.Thread(target=serve, daemon=True).start()

    def perf(self, v: str, seconds: float, out_dir: str) -> dict:
        """`perf record` of variant v's Envoy over one wrk c=16 run: the top entries by
        DSO and by symbol (share of Envoy's samples)."""
        data = os.path.join(out_dir, f"perf-{v}.data")
        self.on(v)
        try:
            rec = subprocess.Popen(["perf", "record", "-q", "-F", "2999", "-o", data, "-p",
                                    str(self.envoys[v]["pid"]())],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            w = self.wrk(self.the_client, 16, 2, seconds)
            rec.send_signal(signal.SIGINT)
            rec.wait(timeout=60)
        finally:
            self.off(v)

        def top(sort: str, limit: int) -> list[tuple[float, str]]:
            r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                                "--sort", sort, "--percent-limit", "0.5"],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True)
            rows = []
            for line in r.stdout.splitlines():
                line = line.strip()
                if line and not line.startswith("#") and line.split()[0].endswith("%"):
                    pct, rest = line.split(None, 1)
                    rows.append((float(pct.rstrip("%")), " ".join(rest.split())))
            return rows[:limit]
        return {"variant": v, "requests": w["requests"], "by_dso": top("dso", 8),
                "by_symbol": top("dso,sym", 25)}

    def client(self, _variant) -> Client:
        return self.the_client

    def _rule(self, v):
        return ["-p", "tcp", "-d", self.ip_s, "-m", "cgroup", "--path", self.client_cg,
                "-j", "REDIRECT", "--to-ports", str(self.envoys[v]["port"])]

    def on(self, v):
        sh("ip", "netns", "exec", self.ns_c, "iptables", "-w", "-t", "nat", "-A", "OUTPUT",
           *self._rule(v))
        self.rule = v

    def off(self, v):
        sh("ip", "netns", "exec", self.ns_c, "iptables", "-w", "-t", "nat", "-D", "OUTPUT",
           *self._rule(v), check=False)
        self.rule = None
        drop_nat_table(self.ns_c)
        flush_conntrack(self.ns_c)   # every variant is reached at the same address and port

    def extra_cleanup(self, step):
        if getattr(self, "rule", None):
            step("iptables", lambda: self.off(self.rule))
        for srv in getattr(self, "flow_sockets", []):
            step("flow record socket", srv.close)

    def measure_variant(self, v, rep) -> dict:
        e = self.envoys[v]
        self.idle_wait()
        self.on(v)
        try:
            s0 = total(e["stats"](), e["stat"])
            busy0, _ = proc_stat_busy()
            cg0, own0 = self.cg_cpu_usec([e["cgroup"]]), self.cg_cpu_usec(
                [e["cgroup"], self.client_cg, self.server_cg])
            w16 = self.wrk(self.the_client, 16, 2, self.args.duration)
            busy1, _ = proc_stat_busy()
            cg1, own1 = self.cg_cpu_usec([e["cgroup"]]), self.cg_cpu_usec(
                [e["cgroup"], self.client_cg, self.server_cg])
            s1 = total(e["stats"](), e["stat"])
            w1 = self.wrk(self.the_client, 1, 1, self.args.duration)
            c0 = self.cg_cpu_usec([e["cgroup"]])
            wnc = self.wrk(self.the_client, 16, 2, self.args.duration, close=True)
            c1 = self.cg_cpu_usec([e["cgroup"]])
        finally:
            self.off(v)
        reqs = w16["requests"]
        busy_us = (busy1 - busy0) / CLK_TCK * 1e6
        return {"rep": rep, "path": "envoy", "mode": v, "rps": reqs / (w16["duration_us"] / 1e6),
                "envoy_cpu_us_per_req": (cg1 - cg0) / reqs, "cpu_us_per_req_own": (own1 - own0) / reqs,
                "cpu_us_per_req": busy_us / reqs, "p50_us": w1["p50_us"], "p99_us": w1["p99_us"],
                "foreign_cpu_cores": (busy_us - (own1 - own0)) / w16["duration_us"],
                "newconn_rps": wnc["requests"] / (wnc["duration_us"] / 1e6),
                "envoy_cpu_us_per_conn": (c1 - c0) / wnc["requests"] if wnc["requests"] else None,
                "envoy_rss_mb": rss_mb(e["pid"]()), "through_envoy_ok": s1 - s0 >= reqs,
                "envoy_rq_delta": s1 - s0,
                "errors": w16["errors"] + w1["errors"] + wnc["errors"]}


FIGS = (("rps", "req/s (c=16)", "{:,.0f}"), ("envoy_cpu_us_per_req", "Envoy CPU µs/req", "{:.1f}"),
        ("cpu_us_per_req_own", "CPU µs/req (client+Envoy+nginx)", "{:.1f}"),
        ("cpu_us_per_req", "CPU µs/req (all CPUs)", "{:.1f}"), ("p50_us", "p50 µs (c=1)", "{:.0f}"),
        ("newconn_rps", "new conn/s (1 req/conn)", "{:,.0f}"),
        ("envoy_cpu_us_per_conn", "Envoy CPU µs per new conn", "{:.1f}"),
        ("envoy_rss_mb", "Envoy RSS MB", "{:.1f}"), ("foreign_cpu_cores", "foreign load (cores)", "{:.2f}"))


def table(results, variants) -> str:
    head = ["variant"] + [t for _, t, _ in FIGS] + ["Envoy CPU/req ÷ plain", "÷ meshd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    med = {v: {k: report.median([r[k] for r in results if r["mode"] == v]) for k, _, _ in FIGS}
           for v in variants}
    for v in variants:
        cells = [v] + [f.format(med[v][k]) if med[v][k] is not None else "–" for k, _, f in FIGS]
        for base in ("plain", "meshd"):
            r = report.ratio(med[v]["envoy_cpu_us_per_req"], med.get(base, {}).get(
                "envoy_cpu_us_per_req"))
            cells.append(f"{r:.3f}" if r is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    # per-rep spread of the key figure
    spread = []
    for v in variants:
        xs = [r["envoy_cpu_us_per_req"] for r in results if r["mode"] == v]
        spread.append(f"{v} {min(xs):.1f}–{max(xs):.1f}" if xs else f"{v} –")
    return "\n".join(lines) + "\n\nEnvoy CPU µs/req per rep (min–max): " + "; ".join(spread)


def progress(v: str, rep: int, m: dict) -> str:
    return (f"rep {rep + 1} {v:16s} {m['rps']:7.0f} req/s  Envoy {m['envoy_cpu_us_per_req']:.1f} "
            f"µs/req  all {m['cpu_us_per_req']:.1f}  p50 {m['p50_us']}  {m['newconn_rps']:.0f} "
            f"conn/s  foreign {m['foreign_cpu_cores']:.2f}"
            f"{'' if m['through_envoy_ok'] else '  PATH CHECK FAILED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 rep, 1 s runs")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--duration", type=int)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--idle-wait", type=float, default=3)
    ap.add_argument("--idle-threshold", type=float, default=0.15)
    ap.add_argument("--settle", type=float, default=0.2)
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--perf", default="", help="variants to profile with perf record after the measurements")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    a.reps = a.reps or (1 if a.quick else 5)
    a.duration = a.duration or (1 if a.quick else 3)
    if not take_charge("envoy_cost.py"):
        return 1
    started = datetime.datetime.now()
    b = EnvoyCost(a)
    results, profiles = [], []
    try:
        b.setup()
        variants = list(b.envoys)
        results = b.interleaved(variants, a.reps, b.on, b.off, b.measure_variant, progress)
        os.makedirs(a.out, exist_ok=True)
        profiles = [b.perf(v, max(a.duration, 3), a.out) for v in a.perf.split(",") if v]
    finally:
        b.cleanup()
    md = table(results, variants)
    os.makedirs(a.out, exist_ok=True)
    out = Path(a.out, f"envoy_cost-{started:%Y%m%d-%H%M%S}.json")
    out.write_text(json.dumps({"started": started.isoformat(timespec="seconds"),
                               "reps": a.reps, "duration_s": a.duration, "cpus": os.cpu_count(),
                               "results": results, "table": md, "perf": profiles}, indent=1) + "\n")
    print(md)
    for prof in profiles:
        print(f"\nperf: {prof['variant']}'s Envoy, {prof['requests']:,} requests (share of its samples)")
        for title, key in (("DSO", "by_dso"), ("DSO and symbol", "by_symbol")):
            print(f"\n| % | {title} |\n|---:|---|")
            for pct, what in prof[key]:
                print(f"| {pct:.1f} | `{what}` |")
    print(f"\nresults: {out}")
    return 0 if all(r["through_envoy_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
