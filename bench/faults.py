#!/usr/bin/env python3
"""The fault figures: tests/datapath/test_faults.py in its full form, each test
appending what it measured, rendered as bench/README.md's fault table and the
long run's curve.

    sudo .venv/bin/python bench/faults.py              # full form (~15 min, the long run included)
    sudo .venv/bin/python bench/faults.py --short      # the CI counts (~1.5 min)
    sudo .venv/bin/python bench/faults.py -k envoy     # some faults only (pytest -k)

The fault suite is the one source of the scenarios: its assertions are the targets
(a fault that misses one still gets its row, and the script exits 1). It also runs
the no-fault control once with the client's address preserved (ingress through
original_src), whose loss is a known limitation (README, "Faults"). Raw rows go to
bench/results/faults-<timestamp>.json (git-ignored).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = "tests/datapath/test_faults.py"


def run_suite(report: str, full: bool, select: str, extra_env: dict | None = None) -> int:
    env = dict(os.environ, MESHD_FAULTS_REPORT=report, **(extra_env or {}))
    env.pop("MESHD_TEST_FULL", None)
    if full:
        env["MESHD_TEST_FULL"] = "1"
    cmd = [sys.executable, "-m", "pytest", SUITE, "-q", "-p", "no:cacheprovider"]
    if select:
        cmd += ["-k", select]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def table(rows: list[dict]) -> str:
    out = ["| fault | injections | requests sent | lost | connections dropped | "
           "closed cleanly by the peer | bytes verified | recovery | notes |",
           "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        out.append(f"| {r['fault']} | {r['injections']} | {r['sent']} | {r['lost']} | "
                   f"{r['dropped']} | {r['closed_by_peer']} | "
                   f"{r['bytes_verified']}/{r['bytes_sent']} | {r['recovery'] or '-'} | "
                   f"{r['note'] or '-'} |")
    return "\n".join(out)


def curve(longrun: dict) -> str:
    out = [f"{longrun['reloads']} SIGHUP reloads, then {longrun['churns']} workload cgroup "
           "churns (removed and re-created):", "",
           "| after | count | open fds | RSS (MiB) | s since start |", "|---|---:|---:|---:|---:|"]
    for phase, n, fds, rss, *t in longrun["curve"]:
        out.append(f"| {phase} | {n:,} | {fds} | {rss / 1024:.1f} | {t[0] if t else '-'} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="the CI counts, not the full form")
    ap.add_argument("-k", default="", help="pytest -k expression (some faults only)")
    ap.add_argument("--no-preserve-control", action="store_true",
                    help="skip the control run with the client's address preserved")
    ap.add_argument("--out", help="where to write the raw rows (JSON)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, eBPF)")
    fd, report = tempfile.mkstemp(prefix="meshd-faults-", suffix=".jsonl")
    os.close(fd)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        rc = run_suite(report, not a.short, a.k)
        if not a.no_preserve_control and (not a.k or "baseline" in a.k):
            run_suite(report, not a.short, "baseline", {"MESHD_FAULTS_PRESERVE_CLIENT": "1"})
        lines = [json.loads(line) for line in Path(report).read_text().splitlines() if line]
    finally:
        os.unlink(report)
    rows = [r for r in lines if "fault" in r]
    longruns = [r["longrun"] for r in lines if "longrun" in r]
    print(f"\nmeshd fault suite, {'short' if a.short else 'full'} form, "
          f"{started:%Y-%m-%d %H:%M} UTC, suite exit {rc}\n")
    print(table(rows))
    for lr in longruns:
        print("\n" + curve(lr))
    out = Path(a.out) if a.out else REPO / "bench" / "results" / f"faults-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(started=started.isoformat(), full=not a.short,
                                   suite_exit=rc, rows=rows, longrun=longruns), indent=1))
    print(f"\nraw rows: {out}", file=sys.stderr)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
