#!/usr/bin/env python3
"""The long run (issue #10): meshd's open file descriptors and resident memory across many
SIGHUP reloads and workload churns, as a curve.

    sudo .venv/bin/python bench/longrun.py            # full: 10,000 reloads, 1,000 churns
    sudo .venv/bin/python bench/longrun.py --short    # 200 reloads, 20 churns (~1 min)
    sudo .venv/bin/python bench/longrun.py --reloads 2000 --churns 200 --every 100

The scenario is tests/datapath/test_faults.py's long-run test (one source; its assertion
is that the fds do not grow): a test meshd in its own network namespace with a second
workload whose cgroup is removed and re-created for each churn; every reload and churn
is waited for in meshd's log before the next one. This script runs that test with the
counts given, then prints the curve (fds, RSS, elapsed time, sampled every `--every`
reloads and every `--every`/10 churns) and the growth from start to end, and writes
bench/results/longrun-<timestamp>.json. Run it under the shared test lock.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from faults import REPO, curve, run_suite  # noqa: E402

TEST = "fds_flat_across_reloads_and_workload_churn"


def growth(lr: dict) -> str:
    """One line: fds and RSS at the start, the largest sample, the end."""
    rows = lr["curve"]
    (_, _, fd0, rss0, *_), (_, _, fd1, rss1, *_) = rows[0], rows[-1]
    peak = max(r[3] for r in rows)
    return (f"open fds {fd0} -> {fd1} ({fd1 - fd0:+d}); RSS {rss0 / 1024:.1f} -> "
            f"{rss1 / 1024:.1f} MiB ({(rss1 - rss0) / 1024:+.1f} MiB, peak {peak / 1024:.1f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="200 reloads and 20 churns")
    ap.add_argument("--reloads", type=int)
    ap.add_argument("--churns", type=int)
    ap.add_argument("--every", type=int, help="sample every N reloads (default: reloads/20)")
    ap.add_argument("--out", help="where to write the curve (JSON)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, eBPF)")
    reloads = a.reloads or (200 if a.short else 10000)
    churns = a.churns if a.churns is not None else (20 if a.short else 1000)
    every = a.every or max(1, reloads // 20)
    fd, report = tempfile.mkstemp(prefix="meshd-longrun-", suffix=".jsonl")
    os.close(fd)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        rc = run_suite(report, False, TEST, {"MESHD_FAULTS_RELOADS": str(reloads),
                                             "MESHD_FAULTS_CHURNS": str(churns),
                                             "MESHD_FAULTS_SAMPLE_EVERY": str(every)})
        lines = [json.loads(line) for line in Path(report).read_text().splitlines() if line]
    finally:
        os.unlink(report)
    runs = [r["longrun"] for r in lines if "longrun" in r]
    print(f"\nmeshd long run, {started:%Y-%m-%d %H:%M} UTC, test exit {rc}\n")
    for lr in runs:
        print(curve(lr) + "\n\n" + growth(lr))
    out = Path(a.out) if a.out else REPO / "bench" / "results" / f"longrun-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(started=started.isoformat(), test_exit=rc, longrun=runs,
                                   load_avg=os.getloadavg()), indent=1))
    print(f"\ncurve: {out}", file=sys.stderr)
    return 0 if rc == 0 and runs else 1


if __name__ == "__main__":
    sys.exit(main())
