#!/usr/bin/env python3
"""What a Podman container's traffic and a container namespace cost in meshd.

    sudo .venv/bin/python bench/podman_datapath.py          # short: 3 reps, 0/10/50 containers (~4 min)
    sudo .venv/bin/python bench/podman_datapath.py --full   # 5 reps, 0/10/50/100 containers

One meshd serving a network namespace this script makes (the "host"), real Podman
there (tests/helpers/podman.py: runc, the CNI bridge, the busybox image), and a server
namespace on a veth from the host running nginx (bench/common.py's, 1 KiB file).
Clients are bench/common.py's wrk runs; the client of a container runs in the
container's network namespace and cgroup (setns + cgroup.procs before exec, so the
container's connect4 and listeners apply); nginx in a container is the host's (its /usr
mounted, tests/helpers/podman.py's HOST_USR).

1. Per request, interleaved, reps rotated: container egress direct (unannotated
   container) and meshed (annotated: Envoy's listener inside the container's
   namespace), host egress direct and meshed (a host process in meshd's workload
   cgroup: Envoy's host listener), and inbound into a container (nginx in the
   container, a host process as client) direct and meshed (sk_lookup into Envoy's
   inbound listener in the container's namespace). Ratios meshed/direct of medians.
2. Per container namespace: Envoy's and meshd's resident memory and open fds with
   0, 10, 50 (--full: 100) idle annotated containers.
Prints Markdown; raw figures go to bench/results/podman_datapath-<time>.json.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402
from common import (FILE_NAME, FILE_SIZE, MESHD, BenchBase, Client, MeshdInstance,  # noqa: E402
                    arg_parser, log, nginx_conf, rss_mb, save_results, take_charge, wait_for,
                    write_www)
from helpers.podman import HOST_USR, Podman, PodmanStore  # noqa: E402
from meshd.containers import cgroup_of  # noqa: E402

PORT = 80
RQ = "http.{}_http.downstream_rq_total"   # summed over per-workload chains
# unit key -> (row title, the Envoy counter that must move, or None: none may)
UNITS = {
    "ctr-egress/direct": ("container → server, unannotated", None),
    "ctr-egress/meshd": ("container → server, annotated (listener in the container)", "out"),
    "host-egress/direct": ("host process → server, not enrolled", None),
    "host-egress/meshd": ("host process → server, enrolled (host egress)", "out"),
    "ctr-inbound/direct": ("host → nginx in an unannotated container", None),
    "ctr-inbound/meshd": ("host → nginx in an annotated container (sk_lookup)", "in"),
}
RATIOS = (("ctr-egress/meshd", "ctr-egress/direct"), ("host-egress/meshd", "host-egress/direct"),
          ("ctr-egress/meshd", "host-egress/meshd"), ("ctr-inbound/meshd", "ctr-inbound/direct"))
FIGS = (("rps", "req/s (c=16)", "{:,.0f}"), ("cpu_us_per_req", "CPU µs/req (all)", "{:.1f}"),
        ("cpu_us_per_req_own", "CPU µs/req (own cgroups)", "{:.1f}"),
        ("p50_us", "p50 µs (c=1)", "{:.0f}"), ("p90_us", "p90 µs (c=1)", "{:.0f}"),
        ("c16_p50_us", "p50 µs (c=16)", "{:.0f}"))


class PodBench(BenchBase):
    name = "podman_datapath"

    def setup(self):
        self.ns, self.ns_srv = f"{self.prefix}h", f"{self.prefix}s"
        self.cg = {n: self.cg_make(n) for n in ("hostwl", "hostplain", "srv")}
        self.host_ip, self.srv_ip = self.two_hosts(self.ns, self.ns_srv, "10.236",
                                                   f"{self.prefix}v")
        self.mesh = MeshdInstance(self, "h", self.cg["hostwl"], netns=self.ns,
                                  http_ports=(PORT,), workload_extra="[workload.web]\n")
        self.meshds.append(self.mesh)
        self.mesh.start()
        self.store = PodmanStore()
        self.podman = Podman(self.store, self.prefix, self.ns, self.mesh.config_dir, MESHD,
                             self.tmp)
        write_www(self.tmp)
        conf = Path(self.tmp, "nginx.conf")
        conf.write_text(nginx_conf(self.tmp, [(self.srv_ip, PORT)]))
        self.spawn_server(self.cg["srv"], self.ns_srv, "nginx", "-e",
                          f"{self.tmp}/nginx-error.log", "-p", self.tmp, "-c", conf)
        self.mesh.wait_running()
        self.path.counters = {k: (self.mesh, RQ.format(d))
                              for k, d in (("out", "outbound"), ("in", "inbound"))}
        # recorded, not checked: how many of the client's connections Envoy took in
        self.path.counters["in_cx"] = (self.mesh, "http.inbound_http.downstream_cx_total")
        self.ctr = {k: self.container(k, annotated) for k, annotated in
                    (("cd", False), ("cm", True))}
        self.srv = {k: self.ctr_server(k, annotated) for k, annotated in
                    (("sd", False), ("sm", True))}
        wait_for(lambda: any(c.get("inbound_ports") for c in
                             (self.mesh.status() or {}).get("containers", [])),
                 30, what="meshd sees the annotated container's port", interval=0.2)

    def container(self, name: str, annotated: bool, *command, options=()) -> dict:
        """A detached container; its network namespace (a /run/netns name: CNI's
        sandbox), its cgroup (relative to the cgroup2 root) and its address."""
        r = self.podman.run(name, *(command or ("sleep", "100000")), detach=True,
                            workload="web" if annotated else None,
                            options=options)
        if r.returncode != 0:
            raise RuntimeError(f"podman run {name}: {r.stderr.decode()}")
        info = self.podman.inspect(name)
        return {"netns": os.path.basename(info["NetworkSettings"]["SandboxKey"]),
                "cgroup": cgroup_of(info["State"]["Pid"]),
                "ip": info["NetworkSettings"]["IPAddress"]}

    def ctr_server(self, name: str, annotated: bool) -> dict:
        """nginx (the host's, through HOST_USR) in a container, its own directory
        mounted at the same path."""
        d = os.path.join(self.tmp, name)
        os.makedirs(d)
        write_www(d)
        conf = Path(d, "nginx.conf")
        conf.write_text(nginx_conf(d, [("0.0.0.0", PORT)]))
        c = self.container(name, annotated, "/usr/sbin/nginx", "-e", f"{d}/nginx-error.log",
                           "-p", d, "-c", str(conf),
                           options=[*HOST_USR, "--volume", f"{d}:{d}", "--volume",
                                    "/etc/passwd:/etc/passwd:ro", "--volume",
                                    "/etc/group:/etc/group:ro"])
        return c

    def client(self, key: str) -> Client:
        path, mode = key.split("/")
        if path == "ctr-inbound":
            return Client(self.cg["hostplain"], f"http://{self.srv[('sd', 'sm')[mode == 'meshd']]['ip']}"
                          f":{PORT}/{FILE_NAME}", "", 0, netns=self.ns)
        url = f"http://{self.srv_ip}:{PORT}/{FILE_NAME}"
        if path == "ctr-egress":
            c = self.ctr["cm" if mode == "meshd" else "cd"]
            return Client(c["cgroup"], url, "", 0, netns=c["netns"])
        return Client(self.cg["hostwl" if mode == "meshd" else "hostplain"], url, "", 0,
                      netns=self.ns)

    def own_cgroups(self, key: str) -> list[str]:
        server = self.cg["srv"]
        if key.startswith("ctr-inbound"):
            server = self.srv["sm" if key.endswith("meshd") else "sd"]["cgroup"]
        return [self.client(key).cgroup, server, self.mesh.envoy_cg]

    def check_through(self, key: str) -> None:
        """One request by curl: 200 and the key's counter, and only it, moved."""
        def ok():
            s0 = self.path.sample()
            got = self.curl(self.client(key))
            s1 = self.path.sample()
            moved = {k for k in ("out", "in") if s1[k] > s0[k]}
            return got == f"200 {FILE_SIZE}" and moved == ({UNITS[key][1]} - {None})
        wait_for(ok, 20, what=f"{key}: a request through {UNITS[key][1] or 'no Envoy'}",
                 interval=0.3)

    def measure_unit(self, key: str, rep: int) -> dict:
        m, d = self.measure(self.client(key), self.own_cgroups(key), self.path, iperf=False,
                            newconn=False)
        want = UNITS[key][1]
        ok = all((d[run][k] >= 0.99 * n) if k == want else d[run][k] == 0
                 for run, n in (("c16", m["requests"]), ("c1", m["c1_requests"]))
                 for k in ("out", "in"))
        m.update(rep=rep, key=key, stat_deltas=d, through_envoy_ok=ok)
        return m

    def footprint(self) -> dict:
        pids = self.mesh.pids()
        return {"envoy_rss_mb": rss_mb(pids["envoy"]), "meshd_rss_mb": rss_mb(pids["meshd"]),
                "envoy_fds": len(os.listdir(f"/proc/{pids['envoy']}/fd")),
                "meshd_fds": len(os.listdir(f"/proc/{pids['meshd']}/fd")),
                "envoy_listeners": self.mesh.stats().get("listener_manager.total_listeners_active")}

    def idle_containers(self, sizes: list[int], settle: float) -> list[dict]:
        """The datapath's containers removed, then idle annotated containers added up to
        each size; meshd's and Envoy's footprint once every one is enrolled."""
        for name in (*self.ctr, *self.srv):
            self.podman.rm(name)
        running, out = 0, []
        for n in sizes:
            t0 = time.monotonic()
            while running < n:
                r = self.podman.run(f"i{running}", "sleep", "100000", detach=True,
                                    workload="web")
                if r.returncode != 0:
                    raise RuntimeError(f"podman run: {r.stderr.decode()}")
                running += 1
            start_s = (time.monotonic() - t0) / max(1, n - (out[-1]["containers"] if out else 0))
            wait_for(lambda: len((self.mesh.status() or {}).get("containers", [])) == n, 60,
                     what=f"{n} containers enrolled", interval=0.5)
            time.sleep(settle)
            out.append(dict(self.footprint(), containers=n, start_s_each=round(start_s, 2)))
            log(f"{n} idle annotated containers: {out[-1]}")
        return out

    def extra_cleanup(self, step):
        if getattr(self, "podman", None):
            step("containers", self.podman.cleanup)
        if getattr(self, "store", None):
            step("podman storage", self.store.remove)


def table(results: list[dict]) -> str:
    med = {k: {f: report.median([r[f] for r in results if r["key"] == k and
                                 r["through_envoy_ok"]]) for f, _, _ in FIGS} for k in UNITS}
    n = {k: sum(r["key"] == k and r["through_envoy_ok"] for r in results) for k in UNITS}
    lines = ["| measurement | n | " + " | ".join(t for _, t, _ in FIGS) + " |",
             "|---|---:|" + "---:|" * len(FIGS)]
    for k, (title, _) in UNITS.items():
        if not any(r["key"] == k for r in results):
            continue     # not measured (--only)
        lines.append(f"| `{k}`: {title} | {n[k]} | " +
                     " | ".join(report._fmt(fmt, med[k][f]) for f, _, fmt in FIGS) + " |")
    for a, b in RATIOS:
        if not (n[a] and n[b]):
            continue
        lines.append(f"| **{a} ÷ {b}** | | " + " | ".join(
            report._fmt("{:.2f}", report.ratio(med[a][f], med[b][f])) for f, _, _ in FIGS)
            + " |")
    return "\n".join(lines)


def footprint_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["| idle annotated containers | Envoy RSS MB | Envoy fds | Envoy listeners "
             "| meshd RSS MB | meshd fds | `podman run -d` s each |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['containers']} | {r['envoy_rss_mb']:.1f} | {r['envoy_fds']} | "
                     f"{r['envoy_listeners']} | {r['meshd_rss_mb']:.1f} | {r['meshd_fds']} | "
                     f"{r['start_s_each']:.2f} |")
    if len(rows) > 1 and rows[-1]["containers"] > rows[0]["containers"]:
        a, b = rows[0], rows[-1]
        k = b["containers"] - a["containers"]
        lines.append(f"| **per container** ({a['containers']}→{b['containers']}) | "
                     f"{(b['envoy_rss_mb'] - a['envoy_rss_mb']) / k:.2f} | "
                     f"{(b['envoy_fds'] - a['envoy_fds']) / k:.1f} | "
                     f"{(b['envoy_listeners'] - a['envoy_listeners']) / k:.1f} | "
                     f"{(b['meshd_rss_mb'] - a['meshd_rss_mb']) / k:.2f} | "
                     f"{(b['meshd_fds'] - a['meshd_fds']) / k:.1f} | |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = arg_parser(__doc__, idle_wait=3)
    ap.add_argument("--full", action="store_true", help="5 reps, sizes 0,10,50,100")
    ap.add_argument("--sizes", help="idle container counts (default 0,10,50; --full: +100; "
                                    "empty: skip)")
    ap.add_argument("--only", default="", help="measure only the keys starting with one of "
                                               "these (comma-separated, e.g. ctr-inbound)")
    ap.set_defaults(reps=None)
    a = ap.parse_args(argv)
    a.reps = a.reps or (5 if a.full else 3)
    sizes = a.sizes if a.sizes is not None else "0,10,50,100" if a.full else "0,10,50"
    a.sizes = [int(x) for x in sizes.split(",") if x]
    return a


def main() -> int:
    args = parse_args()
    if not take_charge("podman_datapath.py"):
        return 1
    started, load0 = datetime.datetime.now(), os.getloadavg()
    bench = PodBench(args)
    try:
        bench.setup()
        keys = [k for k in UNITS if k.startswith(tuple(args.only.split(",")))]
        for k in keys:
            bench.check_through(k)
        log(f"prefix {bench.prefix}: {', '.join(keys)}")
        results = bench.interleaved(keys, args.reps, lambda k: None, lambda k: None,
                                    bench.measure_unit, lambda k, rep, m: (
                                        f"rep {rep + 1} {k:20s} {m['rps']:7.0f} req/s "
                                        f"{m['cpu_us_per_req']:6.1f} µs CPU/req p50 "
                                        f"{m['p50_us']} p90 {m['p90_us']} µs "
                                        f"{'ok' if m['through_envoy_ok'] else 'PATH CHECK FAILED'}"))
        sizes = bench.idle_containers(args.sizes, settle=2) if args.sizes else []
    finally:
        bench.cleanup()
    load = " / ".join(" ".join(f"{x:.2f}" for x in la) for la in (load0, os.getloadavg()))
    doc = {"started": started.isoformat(timespec="seconds"), "reps": args.reps,
           "duration_s": args.duration, "load_average": load, "results": results,
           "containers": sizes, "elapsed_s": round((datetime.datetime.now() - started)
                                                   .total_seconds())}
    out = save_results(args.out, "podman_datapath", doc)
    bad = [f"{r['key']} rep {r['rep'] + 1}" for r in results if not r["through_envoy_ok"]]
    print(f"Run {doc['started']}, {'full' if args.full else 'short'} form, {args.reps} "
          f"interleaved reps of {args.duration} s wrk runs, {doc['elapsed_s']} s in all; "
          f"load average (1/5/15 min) at start / end: {load}; path check "
          f"{'passed in every measurement' if not bad else 'failed: ' + ', '.join(bad)}.\n")
    print(table(results) + "\n")
    print(footprint_table(sizes))
    print(f"\nraw: {out}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
