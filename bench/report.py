"""The benchmark's arithmetic and its Markdown: medians, ratios, per-rep spread, targets.

Pure functions over plain dicts, so they are unit-tested (tests/unit/test_bench_report.py)
without root. A measurement is a dict with "rep", "path", "mode" and one value per figure
key of FIGURES (None when not measured).
"""
from __future__ import annotations

import statistics

# key, heading, format, higher is better
FIGURES = (
    ("rps", "req/s (wrk c=16)", "{:,.0f}", True),
    ("cpu_us_per_req", "CPU µs/req (all CPUs)", "{:.1f}", False),
    ("cpu_us_per_req_own", "CPU µs/req (own cgroups)", "{:.1f}", False),
    ("c16_p50_us", "p50 µs under load (c=16)", "{:.0f}", False),
    ("c16_p99_us", "p99 µs under load (c=16)", "{:.0f}", False),
    ("p50_us", "p50 µs (c=1)", "{:.0f}", False),
    ("p99_us", "p99 µs (c=1)", "{:.0f}", False),
    ("newconn_rps", "new connections/s (1 req/conn, c=16)", "{:,.0f}", True),
    ("iperf_gbps", "bulk Gbit/s (iperf3)", "{:.2f}", True),
    ("foreign_cpu_cores", "foreign CPU load (cores) during c=16", "{:.2f}", None),
)
FIGURE_KEYS = tuple(f[0] for f in FIGURES)
NOISE_GAUGES = {"foreign_cpu_cores"}   # reported, never divided

ANCHOR = "iptables"
DIRECT = "direct"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(num, den):
    """num / den, or None when either is missing or den is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def rotated(modes: list, rep: int) -> list:
    """The mode order of repetition `rep`: rotated by one each rep, so drift and
    background load do not always hit the same mode first."""
    if not modes:
        return []
    k = rep % len(modes)
    return list(modes[k:]) + list(modes[:k])


def summarize(results: list[dict], paths: dict[str, list[str]]) -> dict:
    """Per path and mode: median, min and max of each figure and the number of reps;
    ratios of medians against direct and the anchor; per-rep paired ratios against the
    anchor (their min-max is the spread a single median hides)."""
    out: dict = {}
    for path, modes in paths.items():
        med: dict = {}
        for mode in modes:
            rows = [r for r in results if r["path"] == path and r["mode"] == mode]
            m = {"n": len(rows)}
            for k in FIGURE_KEYS:
                vals = [r.get(k) for r in rows if r.get(k) is not None]
                m[k] = median(vals)
                m[k + "_min"] = min(vals) if vals else None
                m[k + "_max"] = max(vals) if vals else None
            med[mode] = m
        ratios: dict = {}
        for mode in modes:
            for den in (DIRECT, ANCHOR, "meshd"):
                if den == mode or den not in med or mode == DIRECT or \
                        (den == "meshd" and mode != "meshd-accel"):
                    continue
                ratios[f"{mode}/{den}"] = {k: ratio(med[mode][k], med[den][k])
                                           for k in FIGURE_KEYS if k not in NOISE_GAUGES}
        paired: dict = {}
        for mode in modes:
            if mode in (DIRECT, ANCHOR) or ANCHOR not in med:
                continue
            per = {k: [] for k in FIGURE_KEYS if k not in NOISE_GAUGES}
            for rep in sorted({r["rep"] for r in results if r["path"] == path}):
                by = {r["mode"]: r for r in results if r["path"] == path and r["rep"] == rep}
                if mode in by and ANCHOR in by:
                    for k in per:
                        v = ratio(by[mode].get(k), by[ANCHOR].get(k))
                        if v is not None:
                            per[k].append(v)
            paired[f"{mode}/{ANCHOR}"] = per
        out[path] = {"medians": med, "ratios": ratios, "paired": paired}
    return out


def _fmt(fmt: str, v) -> str:
    return fmt.format(v) if v is not None else "–"


def path_table(path_summary: dict, modes: list[str]) -> str:
    """One Markdown table for one path: medians per mode, then ratios of medians, then
    the per-rep min–max of each mode's ratio to the anchor."""
    med, ratios, paired = (path_summary[k] for k in ("medians", "ratios", "paired"))
    rks = [k for k in ratios if k.split("/")[0] in modes]
    pks = [k for k in paired if k.split("/")[0] in modes]
    head = ["figure"] + [f"{m} (n={med[m]['n']})" for m in modes] + \
        [f"**{k}**" if k.endswith("/" + ANCHOR) else k for k in rks] + \
        [f"{k} per rep" for k in pks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, title, fmt, _ in FIGURES:
        cells = [title] + [_fmt(fmt, med[m].get(k)) for m in modes]
        for rk in rks:
            cells.append(_fmt("{:.2f}", ratios[rk].get(k)))
        for pk in pks:
            p = paired[pk].get(k) or []
            cells.append(f"{min(p):.2f}–{max(p):.2f}" if p else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ targets
def _target(name, value, ok_fn, goal) -> dict:
    if value is None:
        return {"target": name, "goal": goal, "value": None, "met": None}
    return {"target": name, "goal": goal, "value": round(value, 3), "met": bool(ok_fn(value))}


def targets(summary: dict, connect: dict | None = None) -> list[dict]:
    """The issue's targets, evaluated on one run's medians. `met` is None when the run
    did not measure the figure (a mode not available, a path not run)."""
    out = []
    for path in ("egress", "ingress"):
        for mode in ("meshd", "meshd-accel"):
            r = summary.get(path, {}).get("ratios", {}).get(f"{mode}/{ANCHOR}")
            if r is None:
                continue
            out.append(_target(f"{path} {mode}/{ANCHOR} req/s", r.get("rps"),
                               lambda v: v >= 1.2, ">= 1.20"))
            out.append(_target(f"{path} {mode}/{ANCHOR} CPU/req (all CPUs)",
                               r.get("cpu_us_per_req"), lambda v: v <= 0.85, "<= 0.85"))
            out.append(_target(f"{path} {mode}/{ANCHOR} CPU/req (own cgroups)",
                               r.get("cpu_us_per_req_own"), lambda v: v <= 0.85, "<= 0.85"))
            for k, what in (("p99_us", "p99 c=1"), ("c16_p99_us", "p99 c=16")):
                out.append(_target(f"{path} {mode}/{ANCHOR} {what}", r.get(k),
                                   lambda v: v <= 1.0, "<= 1.00"))
    same = summary.get("same-host", {}).get("ratios", {}).get("meshd-accel/meshd")
    if same is not None:
        out.append(_target("same-host meshd-accel/meshd p50 c=1", same.get("p50_us"),
                           lambda v: v <= 0.85, "<= 0.85"))
    for path, s in summary.items():
        r = s.get("ratios", {}).get("meshd-accel/meshd")
        if r is not None:
            out.append(_target(f"{path} meshd-accel/meshd bulk", r.get("iperf_gbps"),
                               lambda v: v >= 1.0, ">= 1.00"))
    for kind, sizes in (connect or {}).items():
        done = {int(n): e for n, e in sizes.items()
                if e.get("applied", True) and e.get("bpf_ns_per_connect") is not None}
        big = max(done, default=None)
        if big and big > 1 and 1 in done:
            out.append(_target(f"connect cost {kind}: {big:,} / 1 entries (BPF ns per connect)",
                               ratio(done[big]["bpf_ns_per_connect"],
                                     done[1]["bpf_ns_per_connect"]),
                               lambda v: v <= 1.05, "<= 1.05"))
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | goal | this run | met |", "|---|---|---|---|"]
    for t in rows:
        v = "–" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {v} | {met} |")
    return "\n".join(lines)


def connect_table(connect: dict) -> str:
    """kind -> size -> {"bpf_ns_per_connect", "newconn_rps", "applied", "error"}."""
    sizes = sorted({int(n) for s in connect.values() for n in s})
    head = ["entries of"] + [f"{n:,}" for n in sizes] + [f"{sizes[-1]:,} ÷ 1" if sizes else ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, by in connect.items():
        for key, title, fmt in (("bpf_ns_per_connect", "BPF ns per connect", "{:.0f}"),
                                ("newconn_rps", "new connections/s", "{:,.0f}")):
            cells = [f"{kind}: {title}"]
            for n in sizes:
                e = by.get(str(n)) or by.get(n) or {}
                cells.append(_fmt(fmt, e.get(key)) if e.get("applied", True)
                             else f"not applied: {str(e.get('error', '?'))[:90]}")
            one = (by.get("1") or by.get(1) or {}).get(key)
            top = (by.get(str(sizes[-1])) or by.get(sizes[-1]) or {}).get(key) if sizes else None
            cells.append(_fmt("{:.3f}", ratio(top, one)))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(memory: dict) -> str:
    """process name -> resident MB."""
    lines = ["| process | resident MB |", "|---|---|"]
    for name, mb in memory.items():
        lines.append(f"| {name} | {_fmt('{:.1f}', mb)} |")
    return "\n".join(lines)


def conditions_text(c: dict) -> str:
    keys = (("cpus", "CPUs"), ("cpu_model", "CPU"), ("kernel", "kernel"), ("envoy", "Envoy"),
            ("envoy_concurrency", "Envoy workers"), ("meshd", "meshd"), ("nginx", "nginx"),
            ("wrk", "wrk"), ("iperf3", "iperf3"), ("iptables", "iptables"),
            ("reps", "repetitions"), ("duration_s", "s per wrk run"),
            ("iperf_duration_s", "s per iperf3 run"), ("acceleration", "acceleration"),
            ("foreign_cpu_cores_median", "foreign CPU load (median cores)"),
            ("foreign_cpu_cores_max", "foreign CPU load (max cores)"),
            ("load_average", "load average (1/5/15 min) at start / end"),
            ("elapsed_s", "run time s"),
            ("connect_cost_run", "connect cost measured in a later run started"))
    return "\n".join(f"- {title}: {c[k]}" for k, title in keys if c.get(k) is not None)
