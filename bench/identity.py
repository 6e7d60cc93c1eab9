"""Two hosts: mTLS between meshd hosts against plaintext through the same two
Envoys, both as ratios to a direct connection (bench/README.md, "identity.py").

  sudo .venv/bin/python bench/identity.py [--reps 5] [--duration 5]

Builds the identity tests' fleet (tests/datapath/fleet.py: a LAN namespace with a
3-member etcd cluster, hosts A and B in their own namespaces), nginx-light on B
twice — in B's workload (meshed) and outside it (direct) — and runs wrk from A:
  direct     A (not enrolled)      -> B's unmeshed nginx
  plaintext  A's workload          -> A's Envoy -> B's Envoy -> B's workload (no catalog on A)
  mtls       A's workload          -> A's Envoy =mTLS=> B's Envoy -> B's workload
Per mode: requests/s at c=16, p50/p90/p99 at c=1, and CPU per request (CPU time of
both meshd cgroup trees (Envoy) and the nginx under test, over requests). The modes
alternate A's configuration (with and without the catalog), so the reps run
mode by mode in rotating order, each after A's restart settled. Each run checks
its path: mTLS runs must pass B's mTLS listener, plaintext and direct runs not.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "datapath"), str(REPO / "bench")]

from common import (WRK_LUA, FILE_NAME, log, nginx_conf, save_results, take_charge,  # noqa: E402
                    write_www)
from conftest import Cgroups, free_port  # noqa: E402
from fleet import Fleet  # noqa: E402

MODES = ("direct", "plaintext", "mtls")


def cpu_usec(cg: Cgroups, rels) -> int:
    total = 0
    for rel in rels:
        try:
            for line in open(os.path.join(cg.path(rel), "cpu.stat")):
                if line.startswith("usage_usec"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def wrk(m, cgroup, url, conns, duration, lua):
    r = m.run_in("wrk", "-c", conns, "-t", 1, "-d", f"{duration}s", "--timeout", "5s",
                 "-s", lua, url, cgroup=cgroup, timeout=duration + 30)
    for line in r.stdout.decode().splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[8:])
    raise RuntimeError(f"wrk failed: {r.stdout!r} {r.stderr!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions per mode (default 5)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="results directory")
    args = ap.parse_args()
    if not take_charge("identity.py"):
        return 1
    prefix = "mb" + uuid.uuid4().hex[:6]
    cg = Cgroups(prefix)
    fleet = Fleet(prefix, cg, names=("a", "b"))
    tmp = tempfile.mkdtemp(prefix=f"{prefix}-www-")
    nginx = []
    try:
        fleet.start()
        meshed_port, direct_port = free_port(), free_port()
        a = fleet.configure("a", "client", http_ports=[meshed_port])
        b = fleet.configure("b", "server", http_ports=[meshed_port])
        a.start()
        b.start()
        write_www(tmp)
        lua = os.path.join(tmp, "report.lua")
        Path(lua).write_text(WRK_LUA)
        for port, cgroup, sub in ((meshed_port, b.workload, "m"), (direct_port, b.outside, "d")):
            d = os.path.join(tmp, sub)
            os.makedirs(d)
            os.symlink(os.path.join(tmp, "www"), os.path.join(d, "www"))
            conf = os.path.join(d, "nginx.conf")
            Path(conf).write_text(nginx_conf(d, [("0.0.0.0", port)]))
            nginx.append(b.popen_in("nginx", "-c", conf, cgroup=cgroup))
        fleet.wait_mtls("a", "b", meshed_port)
        ip = fleet.ip["b"]
        urls = {"direct": f"http://{ip}:{direct_port}/{FILE_NAME}",
                "plaintext": f"http://{ip}:{meshed_port}/{FILE_NAME}",
                "mtls": f"http://{ip}:{meshed_port}/{FILE_NAME}"}
        trees = [a.cgroup_root, b.cgroup_root, b.workload, b.outside]
        mtls_stat = f"listener.0.0.0.0_{b.mtls_port}.downstream_cx_total"
        results = {m: [] for m in MODES}
        for rep in range(args.reps):
            order = MODES[rep % 3:] + MODES[:rep % 3]
            for mode in order:
                with_catalog = mode != "plaintext"
                if os.path.exists(os.path.join(a.config_dir, "20-catalog.toml")) != with_catalog:
                    a.kill()
                    if with_catalog:
                        a.write("20-catalog.toml", fleet.catalog_toml("a"))
                        a.start()
                        fleet.wait_mtls("a", "b", meshed_port)
                    else:
                        os.unlink(os.path.join(a.config_dir, "20-catalog.toml"))
                        a.start()
                        time.sleep(2)
                cgroup = a.outside if mode == "direct" else a.workload
                mtls0 = b.stats().get(mtls_stat, 0)
                cpu0 = cpu_usec(cg, trees)
                w16 = wrk(a, cgroup, urls[mode], 16, args.duration, lua)
                cpu = cpu_usec(cg, trees) - cpu0
                w1 = wrk(a, cgroup, urls[mode], 1, args.duration, lua)
                if w16["errors"] or w1["errors"]:
                    raise RuntimeError(f"{mode}: wrk errors {w16} {w1}")
                through_mtls = b.stats().get(mtls_stat, 0) - mtls0
                if (through_mtls > 0) != (mode == "mtls"):
                    raise RuntimeError(f"{mode}: {through_mtls} connections through B's mTLS port")
                results[mode].append({
                    "rps_c16": w16["requests"] / (w16["duration_us"] / 1e6),
                    "p50_us_c1": w1["p50_us"], "p90_us_c1": w1["p90_us"],
                    "p99_us_c1": w1["p99_us"],
                    "cpu_us_per_req": cpu / max(w16["requests"], 1)})
                log(f"rep {rep} {mode}: {results[mode][-1]}")
        med = {m: {k: statistics.median(r[k] for r in results[m]) for k in results[m][0]}
               for m in MODES}
        keys = ("rps_c16", "p50_us_c1", "p90_us_c1", "p99_us_c1", "cpu_us_per_req")
        print("| mode | req/s c=16 | ratio | p50 c=1 (µs) | ratio | p90 c=1 (µs) | ratio | "
              "p99 c=1 (µs) | ratio | CPU µs/req | ratio |")
        print("|" + " --- |" * 11)
        for m in MODES:
            row = [f"{med[m][k]:.0f} | {med[m][k] / med['direct'][k]:.2f}" for k in keys]
            print(f"| {m} | " + " | ".join(row) + " |")
        # Istio ambient's published cost is p90 added per pair of hops (ztunnel
        # to ztunnel): here one pair of Envoys, A's and B's
        added = {m: (med[m]["p90_us_c1"] - med["direct"]["p90_us_c1"]) / 1000
                 for m in ("plaintext", "mtls")}
        print(f"\np90 at c=1 added to direct: plaintext +{added['plaintext']:.3f} ms, "
              f"mTLS +{added['mtls']:.3f} ms (Istio ambient: +0.17 ms per pair of hops)")
        out = save_results(args.out, "identity", {
            "raw": results, "median": med, "added_p90_ms": added, "reps": args.reps,
            "duration_s": args.duration, "order": "modes rotate per rep",
            "cpus": os.cpu_count()})
        print(f"results: {out}")
        return 0
    finally:
        for p in nginx:
            p.kill()
            p.wait()
        fleet.stop()
        cg.cleanup()


if __name__ == "__main__":
    sys.exit(main())
