"""Connect cost against configuration size: 1 / 1,000 / 10,000 excluded CIDRs, excluded
ports and workloads on meshd A, measured on the egress path (bench/run.py's topology).

Per size the entries are written as one live config file, and once meshd has applied it
(status.json lists it; the BPF map holds the entries) two figures are taken:
- BPF ns per connect: with the kernel's BPF run-time statistics on (BPF_ENABLE_STATS,
  held only for this phase), the run time of every meshd program over a wrk run of one
  request per connection, divided by the connections; and connect4's ns per call;
- new connections/s of that wrk run (one request per connection, c=16).
The measured destination (B:8080) is itself one of the entries (its /32 among the CIDRs,
its port among the ports; with the workloads, port 8080 is excluded), so every connect
does the lookups of its kind against a full map and then goes direct: the figure is the
lookups' cost, without Envoy's or bpf_bind's (whose cost depends on how many sockets are
bound, not on the configuration). Sizes are interleaved per repetition (order rotated),
and the time meshd took to apply each size is recorded. Workloads stop at meshd's limit
of 255 (ids 1..255 are the last byte of 127.77.0.<id>); larger sizes are reported as over
the limit without being tried.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import time

import report
from common import ConfigRejected, log, sh, wait_for

ENTRIES_FILE = "30-entries.toml"
BPF_ENABLE_STATS, BPF_STATS_RUN_TIME, NR_BPF = 32, 0, 321   # x86-64
MAX_WORKLOADS = 255                                           # meshd/maplayout.py
DIRECT_PORT = 8080    # bench/run.py's B:8080, which meshd B does not intercept


def cidrs(n: int) -> list[str]:
    """n distinct /24 and /32 prefixes spread over unicast space, none covering 10/8
    or 127/8 (the bench's addresses)."""
    r, out = random.Random(n), set()
    while len(out) < n:
        a = r.choice([x for x in range(1, 224) if x not in (10, 127)])
        if r.random() < 0.5:
            out.add(f"{a}.{r.randrange(256)}.{r.randrange(256)}.0/24")
        else:
            out.add(f"{a}.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}/32")
    return sorted(out)


def excluded_ports(n: int, target_port: int, avoid=()) -> list[int]:
    """n distinct ports, the target first, none of `avoid` (Envoy's own listener ports,
    which meshd refuses to exclude)."""
    skip = set(avoid) | {target_port}
    return [target_port] + [p for p in range(30000, 30000 + n + len(skip))
                            if p not in skip][:n - 1]


def entries_conf(kind: str, n: int, target_ip: str, target_port: int,
                 extra_cgroups: list[str], avoid=()) -> str:
    """The config file holding n entries of a kind, one of which excludes the target
    (n=1: that one alone; workloads: the bench workload and n-1 others)."""
    if kind == "excluded CIDRs":
        return "[mesh]\nexclude_outbound_cidrs = [" + ", ".join(
            f'"{c}"' for c in [f"{target_ip}/32"] + cidrs(n - 1)) + "]\n"
    if kind == "excluded ports":
        return "[mesh]\nexclude_outbound_ports = " + str(
            excluded_ports(n, target_port, avoid)) + "\n"
    return f"[mesh]\nexclude_outbound_ports = [{target_port}]\n" + "".join(
        f'[workload.extra{i}]\ncgroup = "{cg}"\n' for i, cg in enumerate(extra_cgroups[:n - 1]))


MAP_OF = {"excluded CIDRs": "excluded_cidr4", "excluded ports": "excluded_ports",
          "workloads": "workload_ids"}


class BpfStats:
    """The kernel's BPF run-time statistics, on while this object is open."""

    def __enter__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        attr = (ctypes.c_uint32 * 4)(BPF_STATS_RUN_TIME)
        self.fd = libc.syscall(NR_BPF, BPF_ENABLE_STATS, ctypes.byref(attr), 16)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def prog_stats(bpffs_dir: str) -> dict[str, tuple[int, int]]:
    """hook -> (run_time_ns, run_cnt) of every pinned meshd program."""
    out = {}
    d = os.path.join(bpffs_dir, "v1", "progs")
    for name in sorted(os.listdir(d)):
        r = sh("bpftool", "-j", "prog", "show", "pinned", os.path.join(d, name), check=False)
        if r.returncode == 0:
            info = json.loads(r.stdout)
            out[name] = (info.get("run_time_ns", 0), info.get("run_cnt", 0))
    return out


def map_count(bpffs_dir: str, name: str) -> int:
    r = sh("bpftool", "-j", "map", "dump", "pinned",
           os.path.join(bpffs_dir, "v1", "maps", name), check=False)
    return len(json.loads(r.stdout)) if r.returncode == 0 and r.stdout.strip() else -1


def excluded_count(mesh) -> int:
    st = mesh.status() or {}
    return sum(w.get("counters", {}).get("excluded", 0) for w in st.get("workloads", [])
               if w.get("name") == "bench")


def run(suite, sizes: list[int], reps: int) -> tuple[dict, list[str]]:
    mesh = suite.mesh_a
    unit = suite.units["egress/meshd"]
    client = suite.client(unit)
    kinds = {k: sorted(set(sizes)) for k in MAP_OF}
    over = [n for n in sizes if n > MAX_WORKLOADS]
    if over:   # the most workloads one meshd takes
        kinds["workloads"] = sorted({n for n in sizes if n <= MAX_WORKLOADS} | {MAX_WORKLOADS})
    extra = [suite.cg_make(f"cc{i}") for i in range(min(max(sizes), MAX_WORKLOADS) - 1)]
    raw: dict = {k: {str(n): [] for n in ns} for k, ns in kinds.items()}
    base = {k: map_count(mesh.bpffs_dir, m) for k, m in MAP_OF.items()}
    suite.connect_base = base
    notes = []
    # One-request-per-connection runs leave tens of thousands of TIME_WAIT sockets; without
    # reuse and a wide port range the next run's connects find the ports taken and the rate
    # flips to a slow state that is neither the size's nor the map's (the spread of earlier
    # runs). Only for this phase, after every mode's measurements: with iptables NAT a
    # reused port can meet a conntrack entry of an earlier mode.
    for ns in (suite.ns_a, suite.ns_b):
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
           "net.ipv4.ip_local_port_range=10000 65000")
    with BpfStats():
        for rep in range(reps):
            for kind, ns in kinds.items():
                for n in report.rotated(ns, rep):
                    raw[kind][str(n)].append(measure(suite, mesh, client, kind, n, extra))
    out = {}
    for kind, by in raw.items():
        out[kind] = {}
        for n, ms in by.items():
            ok = [m for m in ms if m.get("applied")]
            e = {"applied": bool(ok), "reps": len(ok)}
            if ok:
                for k in ("bpf_ns_per_connect", "connect4_ns", "newconn_rps", "apply_s"):
                    e[k] = report.median([m[k] for m in ok])
                e["map_entries"] = ok[0]["map_entries"]
            else:
                e["error"] = ms[0].get("error", "?") if ms else "?"
            out[kind][n] = e
            if any(not m.get("excluded_ok", True) for m in ok):
                notes.append(f"{n} {kind}: connect4 did not count every connection excluded")
    for n in over:
        out["workloads"][str(n)] = {"applied": False, "reps": 0,
                                    "error": f"over meshd's limit of {MAX_WORKLOADS} workloads"}
    return out, notes


def measure(suite, mesh, client, kind, n, extra) -> dict:
    base = suite.connect_base
    text = entries_conf(kind, n, suite.ip_b, DIRECT_PORT, extra,
                        avoid=(mesh.outbound_port, mesh.inbound_port))
    t0 = time.time()
    res: dict = {"kind": kind, "n": n}
    mesh.write_conf(ENTRIES_FILE, text)

    def in_status(st):   # meshd has read this very file (not the previous state)
        m = st.get("mesh", {})
        if kind == "excluded CIDRs":
            return len(m.get("exclude_outbound_cidrs", [])) == n
        if kind == "excluded ports":
            return sorted(m.get("exclude_outbound_ports", [])) == sorted(
                excluded_ports(n, DIRECT_PORT, (mesh.outbound_port, mesh.inbound_port)))
        wls = st.get("workloads", [])
        return len(wls) == n and all(w.get("enrolled_since") for w in wls)
    try:
        try:
            mesh.wait_config(ENTRIES_FILE, True, timeout=120, until=in_status)
            want = base[kind] + n - 1 if kind == "workloads" else n
            got = {}

            def filled():
                got["n"] = map_count(mesh.bpffs_dir, MAP_OF[kind])
                return got["n"] >= want
            wait_for(filled, 60, what=f"{n} {kind} in the map", interval=0.2)
        except (ConfigRejected, AssertionError, RuntimeError) as e:
            res.update(applied=False, error=str(e)[:300])
            log(f"connect cost: {n} {kind}: not applied: {str(e)[:200]}")
            return res
        res["apply_s"] = time.time() - t0
        res["map_entries"] = got["n"]
        time.sleep(0.3)
        ex0 = excluded_count(mesh)
        s0 = prog_stats(mesh.bpffs_dir)
        w = suite.wrk(client, 16, 2, suite.args.duration, close=True)
        s1 = prog_stats(mesh.bpffs_dir)
        conns = w["requests"]
        # connect4 counted them excluded: the lookups ran and the connections went direct
        try:
            wait_for(lambda: excluded_count(mesh) - ex0 >= conns, 10,
                     what="connect4's excluded counter", interval=0.3)
            res["excluded_ok"] = True
        except AssertionError:
            res["excluded_ok"] = False
        ns = sum(s1[h][0] - s0[h][0] for h in s1 if h in s0)
        c4 = (s1["connect4"][0] - s0["connect4"][0], s1["connect4"][1] - s0["connect4"][1])
        res.update(applied=True, newconn_rps=conns / (w["duration_us"] / 1e6),
                   bpf_ns_per_connect=ns / conns if conns else None,
                   connect4_ns=c4[0] / c4[1] if c4[1] else None, errors=w["errors"])
        log(f"connect cost: {n:>6} {kind:15s} {res['bpf_ns_per_connect']:.0f} BPF ns/connect "
            f"(connect4 {res['connect4_ns']:.0f} ns)  {res['newconn_rps']:.0f} conn/s  "
            f"applied in {res['apply_s']:.1f} s")
        return res
    finally:
        mesh.remove_conf(ENTRIES_FILE)
        try:
            mesh.wait_config(ENTRIES_FILE, False, timeout=120)
        except (ConfigRejected, AssertionError) as e:
            log(f"connect cost: removing {n} {kind}: {e}")
