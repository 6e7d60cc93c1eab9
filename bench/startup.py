#!/usr/bin/env python3
"""meshd's start-up: how long from `meshd run` to running, and how much memory the daemon
keeps, for a cold start (nothing pinned, no Envoy: the data path is compiled) and a warm one
(pins and Envoy left by the previous meshd: adopted).

Run as root from the repository root:  .venv/bin/python bench/startup.py [--reps 5]

One client namespace <prefix>c served by one meshd with one workload cgroup (prefix "mb" +
6 hex digits; everything removed on exit, on error and on Ctrl-C/SIGTERM). Each repetition:
`meshd cleanup` (stops meshd and Envoy, removes the pins), start, time until status.json says
running; sleep --settle seconds, read the daemon's VmRSS and whether it maps libbcc; then
SIGTERM (pins and Envoy stay), start again, the same figures for the warm start.
Figures are per start: the time includes the compile child (cold) and Envoy's start (cold).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (MESHD, BenchBase, MeshdInstance, arg_parser, log, rss_mb,  # noqa: E402
                    save_results, sh)


def maps_bcc(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libbcc" in f.read()


class Startup(BenchBase):
    name = "startup"

    def setup(self):
        ns = f"{self.prefix}c"
        self.netns_add(ns)
        self.mesh = MeshdInstance(self, "", self.cg_make("wl"), netns=ns)
        self.meshds.append(self.mesh)

    def start(self) -> dict:
        m = self.mesh
        shutil.rmtree(m.config_dir, ignore_errors=True)   # start() writes it afresh
        t0 = time.monotonic()
        m.start()
        st = m.wait_running()
        took = time.monotonic() - t0
        time.sleep(self.args.settle)
        return {"start_s": took, "rss_mb": rss_mb(m.proc.pid), "libbcc": maps_bcc(m.proc.pid),
                "adopted": st["datapath"]["adopted"]}

    def stop(self) -> None:
        self.mesh.proc.send_signal(signal.SIGTERM)
        self.mesh.proc.wait(20)

    def rep(self) -> tuple[dict, dict]:
        if os.path.isdir(self.mesh.config_dir):
            sh(MESHD, "cleanup", "--config-dir", self.mesh.config_dir, check=False, timeout=60)
        cold = self.start()
        self.stop()
        warm = self.start()
        self.stop()
        return cold, warm


def figures(recs: list[dict]) -> dict:
    def med(k):
        return round(statistics.median(r[k] for r in recs), 2)
    return {"n": len(recs), "start_s_median": med("start_s"),
            "start_s_max": round(max(r["start_s"] for r in recs), 2),
            "rss_mb_median": med("rss_mb"), "rss_mb_max": round(max(r["rss_mb"] for r in recs), 1),
            "libbcc_mapped": any(r["libbcc"] for r in recs)}


def main() -> int:
    ap = arg_parser(__doc__)
    ap.set_defaults(reps=5, settle=1.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/startup.py needs root (netns, cgroups, BPF)", file=sys.stderr)
        return 1
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: reap orphaned Envoys

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, on_signal)
    bench = Startup(args)
    cold, warm = [], []
    try:
        bench.setup()
        for i in range(args.reps):
            log(f"prefix {bench.prefix}: rep {i + 1}/{args.reps}")
            c, w = bench.rep()
            if c["adopted"] or not w["adopted"]:
                raise RuntimeError(f"cold start adopted or warm start loaded: {c} {w}")
            cold.append(c)
            warm.append(w)
    finally:
        bench.cleanup()
    result = {"cold (compile child, Envoy started)": figures(cold),
              "warm (pins and Envoy adopted)": figures(warm)}
    out = save_results(args.out, "startup", {"raw": {"cold": cold, "warm": warm},
                                             "figures": result})
    print("| start | n | to running, median s | max s | meshd RSS median MB | max MB | libbcc mapped |")
    print("|---|---|---|---|---|---|---|")
    for k, f in result.items():
        print(f"| {k} | {f['n']} | {f['start_s_median']} | {f['start_s_max']} | "
              f"{f['rss_mb_median']} | {f['rss_mb_max']} | {'yes' if f['libbcc_mapped'] else 'no'} |")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
