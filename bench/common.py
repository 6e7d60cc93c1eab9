"""Shared machinery of the meshd benchmarks (bench/egress.py, bench/inbound.py).

Helpers (processes, cgroups, namespaces, CPU accounting), a meshd instance, the client
runners (wrk with a Lua JSON report, iperf3 -J), one measurement of a mode (wrk c=16, wrk
c=1, iperf3, Envoy counter deltas, CPU), and the driver: interleaved repetitions with
rotating order, medians, ratios, a Markdown table and a JSON file.

A suite subclasses `BenchBase` and provides, per mode, a `Client` (cgroup, netns, URL,
iperf3 target) and a path check over Envoy counter deltas; optional `mode_on`/`mode_off`
install and remove per-mode state (iptables rules) around each measurement.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshd import __version__ as MESHD_VERSION  # noqa: E402
from meshd.cgroups import cgroup2_mount  # noqa: E402
from meshd.envoy.admin import stats as envoy_stats, total  # noqa: E402
from meshd.envoy.process import find_envoy  # noqa: E402
from meshd import envoy_config  # noqa: E402

# reap, free_port, kill_cgroup and wait_for are the test suite's own (tests/helpers/common.py)
sys.path.insert(0, str(REPO / "tests"))
from helpers.common import (free_port, kill_cgroup, netns_add, netns_del,  # noqa: E402,F401
                            preexec, reap, wait_for)

VENV_BIN = Path(sys.executable).parent
MESHD = str(VENV_BIN / "meshd")
FILE_NAME, FILE_SIZE = "1k.bin", 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":%d,"status_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    default_type application/octet-stream;
    server {{
{listen}
        root {tmp}/www;
    }}
}}
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)





def proc_stat_busy() -> tuple[int, int]:
    """(busy, total) CPU ticks over all CPUs: busy = user+nice+system+irq+softirq."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None



def drop_nat_table(netns: str) -> None:
    """Remove the nat table from one of our namespaces between iptables measurements:
    while it exists conntrack runs for every connection there, which the other modes
    must not pay. Needs `nft` (iptables-nft cannot delete a table); without it the
    table stays and the JSON says so (`nat_table_dropped_between_runs`)."""
    if shutil.which("nft"):
        sh("ip", "netns", "exec", netns, "nft", "delete", "table", "ip", "nat", check=False)


def nginx_conf(tmp: str, listens: list[tuple[str, int]]) -> str:
    return NGINX_CONF.format(tmp=tmp, listen="\n".join(f"        listen {ip}:{port};"
                                                        for ip, port in listens))


def write_www(tmp: str) -> None:
    www = Path(tmp, "www")
    www.mkdir(exist_ok=True)
    (www / FILE_NAME).write_bytes(random.Random(1).randbytes(FILE_SIZE))


# -------------------------------------------------------------------- meshd instance
class MeshdInstance:
    """One `meshd run` with private ports, pins, state dir and cgroup root, serving a
    network namespace the bench made (`netns`, an `ip netns` name): never the host's,
    which a meshd installed there may already serve."""

    def __init__(self, base: "BenchBase", name: str, workload_cgroup: str, netns: str,
                 workload_extra: str = "", mesh_extra: str = "", http_ports=()):
        """http_ports: declared "http" (per-request numbers: the path check counts
        requests); every other port is plain TCP."""
        self.base, self.name, self.netns = base, name, netns
        self.workload_cgroup = workload_cgroup
        self.outbound_port, self.inbound_port = free_port(), free_port()
        self.config_dir = os.path.join(base.tmp, f"{name}etc")
        self.state_dir = os.path.join(base.tmp, f"{name}run")
        self.bpffs_dir = f"/sys/fs/bpf/{base.prefix}{name}"
        self.cg_root = f"{base.cg_base}/{name}meshd"
        self.envoy_cg = f"{self.cg_root}/envoy"
        self.admin = envoy_config.admin_socket_path(self.state_dir)
        self.workload_extra, self.mesh_extra = workload_extra, mesh_extra
        if http_ports:
            self.mesh_extra = "protocols = { " + ", ".join(
                f'{p} = "http"' for p in sorted(http_ports)) + " }\n" + mesh_extra
        self.proc: subprocess.Popen | None = None
        self.log = None

    def start(self) -> None:
        os.makedirs(self.config_dir)
        Path(self.config_dir, "00-mesh.toml").write_text(
            "[mesh]\n"
            f"outbound_port = {self.outbound_port}\n"
            f"inbound_port = {self.inbound_port}\n"
            f'bpffs_dir = "{self.bpffs_dir}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'cgroup_root = "{self.cg_root}"\n'
            + f'netns = "/run/netns/{self.netns}"\n'
            + self.mesh_extra)
        Path(self.config_dir, "10-workloads.toml").write_text(
            f'[workload.bench]\ncgroup = "{self.workload_cgroup}"\n{self.workload_extra}')
        self.log = open(os.path.join(self.base.tmp, f"{self.name}meshd.log"), "a+")
        # no system bus: a meshd on the host owns io.meshd.Mesh1 there
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={self.base.tmp}/no-bus")
        self.proc = subprocess.Popen([MESHD, "run", "--config-dir", self.config_dir],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_running(self, timeout: float = 90) -> dict:
        def running():
            if self.proc.poll() is not None:
                self.log.flush()
                raise RuntimeError(f"meshd {self.name} exited {self.proc.returncode}:\n"
                                   f"{Path(self.log.name).read_text()[-3000:]}")
            st = self.status()
            return st and st.get("state") == "running" and st
        st = wait_for(running, timeout, what=f"meshd {self.name or ''} running")
        self.envoy_pid = int(Path(self.state_dir, "envoy.pid").read_text())
        return st

    def status(self) -> dict | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(Path(self.state_dir, "status.json").read_text())
        return None

    def stats(self) -> dict[str, int]:
        return envoy_stats(self.admin)

    def stat(self, name: str) -> int:
        return total(self.stats(), name)   # summed over per-workload filter chains

    def cleanup(self, step) -> None:
        if self.proc is not None:
            def stop():
                if self.proc.poll() is None:
                    self.proc.terminate()
                    try:
                        self.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(5)
            step(f"stop meshd {self.name}", stop)
        if os.path.isdir(self.config_dir):
            # removes links/pins, the policy routing (inside its netns) and kills Envoy
            step(f"meshd {self.name} cleanup", lambda: sh(
                MESHD, "cleanup", "--config-dir", self.config_dir, check=False, timeout=60))
        if os.path.exists(self.bpffs_dir):
            step(f"pins {self.name}", lambda: shutil.rmtree(self.bpffs_dir))
        if self.log:
            with contextlib.suppress(Exception):
                self.log.close()


# -------------------------------------------------------------------- clients
@dataclass
class Client:
    """How a mode's client runs: its cgroup, network namespace, uid, and targets."""
    cgroup: str
    url: str
    iperf_host: str
    iperf_port: int
    netns: str = ""
    uid: int | None = None


@dataclass
class PathCheck:
    """Envoy counters sampled around each run: name -> (meshd instance, stat name)."""
    counters: dict = field(default_factory=dict)

    def sample(self) -> dict[str, int]:
        cache: dict[int, dict] = {}
        out = {}
        for name, (inst, stat) in self.counters.items():
            if id(inst) not in cache:
                cache[id(inst)] = inst.stats()
            out[name] = total(cache[id(inst)], stat)   # incl. per-workload chains
        return out


class BenchBase:
    name = "bench"
    modes: tuple[str, ...] = ()
    ratios: tuple[tuple[str, str], ...] = ()
    key_ratio: tuple[str, str] | None = None       # bold column + per-rep paired spread

    def __init__(self, args):
        self.args = args
        self.prefix = "mb" + uuid.uuid4().hex[:6]
        self.cg_root = cgroup2_mount()
        self.cg_base = f"/{self.prefix}"
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")  # short: admin socket path
        os.chmod(self.tmp, 0o755)
        self.servers: list[subprocess.Popen] = []
        self.meshds: list[MeshdInstance] = []
        self.netns_made: list[str] = []
        self.links_made: list[tuple[str, str]] = []   # (netns or "", ifname)
        self.path = PathCheck()
        self._cleaned = False

    # ---------------------------------------------------------------- cgroups
    def cg_path(self, rel: str) -> str:
        return os.path.join(self.cg_root, rel.lstrip("/"))

    def cg_make(self, name: str) -> str:
        rel = f"{self.cg_base}/{name}"
        os.makedirs(self.cg_path(rel), exist_ok=True)
        return rel

    def preexec(self, rel: str, uid: int | None = None, netns: str = ""):
        """Join the cgroup, then the network namespace, then drop to uid (setns needs
        root), all before exec."""
        join = preexec(os.path.join(self.cg_path(rel), "cgroup.procs"), netns)

        def fn():
            join()
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
        return fn

    def cg_cpu_usec(self, rels) -> int:
        total = 0
        for rel in rels:
            with contextlib.suppress(OSError):
                for line in Path(self.cg_path(rel), "cpu.stat").read_text().splitlines():
                    k, v = line.split()
                    if k == "usage_usec":
                        total += int(v)
        return total

    # ---------------------------------------------------------------- namespaces
    def netns_add(self, ns: str) -> None:
        self.netns_made.append(ns)
        netns_add(ns)

    def veth_add(self, name: str, ns: str | None, peer_ns: str) -> None:
        """veth `name` (in `ns`, None = this namespace) <-> `name`p in `peer_ns`."""
        cmd = ["ip", "link", "add", name]
        if ns:
            cmd += ["netns", ns]
        sh(*cmd, "type", "veth", "peer", "name", name + "p", "netns", peer_ns)
        self.links_made.append((ns or "", name))

    # ---------------------------------------------------------------- processes
    def spawn_server(self, cgroup: str, netns: str, *cmd) -> subprocess.Popen:
        errlog = open(os.path.join(self.tmp, "servers.log"), "a")
        p = subprocess.Popen([str(c) for c in cmd], preexec_fn=self.preexec(cgroup, netns=netns),
                             stdout=errlog, stderr=errlog)
        self.servers.append(p)
        return p

    def check_servers(self):
        for p in self.servers:
            if p.poll() is not None:
                raise RuntimeError(f"server {p.args} exited {p.returncode}: "
                                   f"{Path(self.tmp, 'servers.log').read_text()[-2000:]}")

    def run(self, c: Client, *cmd, timeout=60) -> subprocess.CompletedProcess:
        cmd = [str(x) for x in cmd]
        return subprocess.run(cmd, preexec_fn=self.preexec(c.cgroup, c.uid, c.netns),
                              capture_output=True, text=True, timeout=timeout)

    def curl(self, c: Client, url: str | None = None) -> str:
        r = self.run(c, "curl", "-sS", "--max-time", "5", "-o", "/dev/null",
                     "-w", "%{http_code} %{size_download}", url or c.url)
        return r.stdout.strip()

    def wrk(self, c: Client, conns: int, threads: int, duration: float) -> dict:
        lua = os.path.join(self.tmp, "report.lua")
        if not os.path.exists(lua):
            Path(lua).write_text(WRK_LUA)
            os.chmod(lua, 0o644)
        r = self.run(c, "wrk", "-c", conns, "-t", threads, "-d", f"{duration}s",
                     "--timeout", "5s", "-s", lua, c.url, timeout=duration + 30)
        for line in r.stdout.splitlines():
            if line.startswith("WRKJSON "):
                return json.loads(line[8:])
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout}\n{r.stderr}")

    def iperf(self, c: Client, duration: float) -> float:
        r = self.run(c, "iperf3", "-c", c.iperf_host, "-p", c.iperf_port, "-t", duration, "-J",
                     timeout=duration + 30)
        try:
            doc = json.loads(r.stdout)
            return doc["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError) as e:
            raise RuntimeError(f"iperf3 failed ({r.returncode}): {r.stdout[-1500:]} {r.stderr}") from e

    # ---------------------------------------------------------------- suite hooks
    def setup(self):
        raise NotImplementedError

    def client(self, mode: str) -> Client:
        raise NotImplementedError

    def own_cgroups(self, mode: str) -> list[str]:
        raise NotImplementedError

    def check_path(self, mode: str, m: dict, d16: dict, d1: dict, dip: dict,
                   reqs16: int, reqs1: int) -> bool:
        raise NotImplementedError

    def mode_on(self, mode: str) -> None:
        pass

    def mode_off(self, mode: str) -> None:
        pass

    def extra_cleanup(self, step) -> None:
        pass

    def conditions(self) -> dict:
        return {}

    # ---------------------------------------------------------------- one measurement
    def idle_wait(self) -> tuple[float, float]:
        """Wait (up to --idle-wait s) until the machine looks idle: other people's test
        suites on a 2-core VM swamp every figure. Returns (seconds waited, last busy share)."""
        t0 = time.time()
        while True:
            b0, t_0 = proc_stat_busy()
            time.sleep(0.5)
            b1, t_1 = proc_stat_busy()
            share = (b1 - b0) / max(1, t_1 - t_0)
            if share <= self.args.idle_threshold or time.time() - t0 >= self.args.idle_wait:
                return time.time() - t0, share

    def warm_up(self, mode: str) -> None:
        self.mode_on(mode)
        try:
            self.wrk(self.client(mode), 16, 2, 1)
        finally:
            self.mode_off(mode)

    def measure(self, mode: str, rep: int) -> dict:
        a = self.args
        c = self.client(mode)
        waited, idle_share = self.idle_wait()
        self.mode_on(mode)
        try:
            time.sleep(a.settle)
            s0 = self.path.sample()
            cgs = self.own_cgroups(mode)
            busy0, tot0 = proc_stat_busy()
            cg0 = self.cg_cpu_usec(cgs)
            w16 = self.wrk(c, 16, 2, a.duration)
            busy1, tot1 = proc_stat_busy()
            cg1 = self.cg_cpu_usec(cgs)
            s1 = self.path.sample()
            time.sleep(a.settle)
            w1 = self.wrk(c, 1, 1, a.duration)
            s2 = self.path.sample()
            time.sleep(a.settle)
            bps = self.iperf(c, a.iperf_duration)
            s3 = self.path.sample()
        finally:
            self.mode_off(mode)
        reqs = w16["requests"]
        m = {
            "rep": rep, "mode": mode,
            "rps": reqs / (w16["duration_us"] / 1e6),
            "requests": reqs,
            "errors_c16": w16["errors"], "errors_c1": w1["errors"],
            "cpu_us_per_req": (busy1 - busy0) / CLK_TCK * 1e6 / reqs if reqs else None,
            "cpu_us_per_req_own_cgroups": (cg1 - cg0) / reqs if reqs else None,
            "cpu_busy_fraction": (busy1 - busy0) / (tot1 - tot0) if tot1 > tot0 else None,
            # CPU used outside our client/server/Envoy cgroups during the c=16 run, in cores:
            # other people's work on the machine (plus meshd's 1 s status poll and softirq
            # work charged elsewhere). High values flag a disturbed measurement.
            "foreign_cpu_cores": ((busy1 - busy0) / CLK_TCK * 1e6 - (cg1 - cg0)) / w16["duration_us"],
            "idle_wait_s": round(waited, 2), "busy_share_before": round(idle_share, 3),
            "c16_p50_us": w16["p50_us"], "c16_p99_us": w16["p99_us"],
            "p50_us": w1["p50_us"], "p90_us": w1["p90_us"], "p99_us": w1["p99_us"],
            "c1_rps": w1["requests"] / (w1["duration_us"] / 1e6),
            "iperf_gbps": bps / 1e9,
        }
        d16 = {k: s1[k] - s0[k] for k in s0}
        d1 = {k: s2[k] - s1[k] for k in s0}
        dip = {k: s3[k] - s2[k] for k in s0}
        m["stat_deltas"] = {"c16": d16, "c1": d1, "iperf": dip}
        m["through_envoy_ok"] = bool(self.check_path(mode, m, d16, d1, dip, reqs, w1["requests"]))
        return m

    # ---------------------------------------------------------------- cleanup
    def cleanup(self):
        if self._cleaned:
            return
        self._cleaned = True
        errors = []

        def step(what, fn):
            try:
                fn()
            except Exception as e:  # keep cleaning
                errors.append(f"{what}: {e}")

        for mode in self.modes:
            step(f"mode_off {mode}", lambda mode=mode: self.mode_off(mode))
        self.extra_cleanup(step)
        for inst in self.meshds:
            inst.cleanup(step)
        for p in self.servers:
            step("servers", lambda p=p: (p.kill(), p.wait(5)))
        step("cgroups", lambda: kill_cgroup(self.cg_path(self.cg_base)))
        for ns, link in self.links_made:
            step(f"link {link}", lambda ns=ns, link=link: sh(
                *(["ip", "-n", ns] if ns else ["ip"]), "link", "del", link, check=False))
        for ns in self.netns_made:
            step(f"netns {ns}", lambda ns=ns: netns_del(ns))
        if self.args.keep_tmp:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        reap()
        for e in errors:
            log(f"cleanup: {e}")


# -------------------------------------------------------------------- report
FIGURES = [  # key, heading, format, higher is better
    ("rps", "wrk c=16 req/s", "{:,.0f}", True),
    ("cpu_us_per_req", "CPU µs/req (all CPUs)", "{:.1f}", False),
    ("cpu_us_per_req_own_cgroups", "CPU µs/req (own cgroups)", "{:.1f}", False),
    ("p50_us", "c=1 p50 µs", "{:.0f}", False),
    ("p99_us", "c=1 p99 µs", "{:.0f}", False),
    ("iperf_gbps", "iperf3 Gbit/s", "{:.2f}", True),
    ("foreign_cpu_cores", "foreign CPU (cores) during c=16", "{:.2f}", False),
]


def summarize(results: list[dict], modes, ratios_wanted, key_ratio) -> dict:
    med = {}
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        med[mode] = {k: median([r[k] for r in rows]) for k, *_ in FIGURES}
        med[mode]["n"] = len(rows)
        for k, *_ in FIGURES:
            vals = [r[k] for r in rows if r[k] is not None]
            med[mode][k + "_min"] = min(vals) if vals else None
            med[mode][k + "_max"] = max(vals) if vals else None
    ratios = {}
    for num, den in ratios_wanted:
        if num not in med or den not in med:
            continue
        ratios[f"{num}/{den}"] = {k: (med[num][k] / med[den][k]) if med[num][k] and med[den][k] else None
                                  for k, *_ in FIGURES}
    # per-rep ratios of the key pair (paired within a rep) show the spread of the key figure
    paired = {k: [] for k, *_ in FIGURES}
    if key_ratio:
        num, den = key_ratio
        for rep in sorted({r["rep"] for r in results}):
            by = {r["mode"]: r for r in results if r["rep"] == rep}
            if num in by and den in by:
                for k, *_ in FIGURES:
                    if by[num][k] and by[den][k]:
                        paired[k].append(by[num][k] / by[den][k])
    return {"medians": med, "ratios": ratios, "key_ratio": "/".join(key_ratio) if key_ratio else None,
            "paired_key_ratio": paired}


def markdown(summary: dict, modes, ratios_wanted) -> str:
    med, ratios, paired = summary["medians"], summary["ratios"], summary["paired_key_ratio"]
    key = summary["key_ratio"]
    rks = [f"{a}/{b}" for a, b in ratios_wanted if f"{a}/{b}" in ratios]
    head = ["figure"] + list(modes) + [f"**{r}**" if r == key else r for r in rks]
    show_paired = key in ratios
    if show_paired:
        head.append(f"{key} per rep (min–max)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, title, fmt, _ in FIGURES:
        cells = [title]
        for mode in modes:
            v = med[mode][k]
            cells.append(fmt.format(v) if v is not None else "–")
        for rk in rks:
            v = ratios[rk][k] if k != "foreign_cpu_cores" else None   # a noise gauge, not a figure
            cells.append(f"{v:.2f}" if v is not None else "–")
        if show_paired:
            p = paired[k] if k != "foreign_cpu_cores" else []
            cells.append(f"{min(p):.2f}–{max(p):.2f}" if p else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def base_conditions(args) -> dict:
    def ver(cmd):
        with contextlib.suppress(Exception):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        return None
    envoy_version = None
    with contextlib.suppress(Exception):
        envoy_version = ver([find_envoy(), "--version"]).split("version:")[-1].strip()
    return {
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                           .splitlines() if ln.startswith("model name")), None),
        "meshd": MESHD_VERSION, "envoy": envoy_version,
        "nginx": ver(["nginx", "-v"]), "wrk": ver(["wrk", "-v"]), "iperf3": ver(["iperf3", "-v"]),
        "iptables": ver(["iptables", "-V"]),
        "idle_wait_s": args.idle_wait, "idle_threshold": args.idle_threshold,
        "reps": args.reps, "duration_s": args.duration, "iperf_duration_s": args.iperf_duration,
        "file_bytes": FILE_SIZE,
    }


def arg_parser(doc: str, modes, idle_wait: float = 20) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run (default 3)")
    ap.add_argument("--iperf-duration", type=int, default=3, help="seconds per iperf3 run (default 3)")
    ap.add_argument("--settle", type=float, default=0.3, help="pause between runs (default 0.3 s)")
    ap.add_argument("--idle-wait", type=float, default=idle_wait,
                    help="before each measurement wait up to this many seconds for the machine "
                         f"to be idle (default {idle_wait:g}; 0 = don't wait)")
    ap.add_argument("--idle-threshold", type=float, default=0.15,
                    help="'idle' = at most this share of all CPUs busy over 0.5 s (default 0.15)")
    ap.add_argument("--modes", default=",".join(modes), help="comma-separated subset of modes")
    ap.add_argument("--no-rotate", action="store_true",
                    help="fixed mode order in every rep (default: rotate the order per rep)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="results directory")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs) at the end")
    return ap


def run_suite(cls, args, ap: argparse.ArgumentParser, script: str) -> int:
    """Set up, warm up, measure interleaved reps, clean up, report. Returns the exit code."""
    if os.geteuid() != 0:
        print(f"bench/{script}.py needs root (netns, cgroups, BPF, iptables)", file=sys.stderr)
        return 1
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(cls.modes):
        ap.error(f"unknown modes: {set(modes) - set(cls.modes)}")

    # Envoy outlives meshd by design and is re-parented to us, so we can reap it.
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    bench = cls(args)
    atexit.register(bench.cleanup)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    # SIGINT too: started from a non-interactive `cmd &`, Python would inherit SIG_IGN for
    # it and Ctrl-C/kill -INT would be ignored instead of cleaning up.
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, on_signal)

    results: list[dict] = []
    started = datetime.datetime.now()
    try:
        bench.setup()
        cond = dict(base_conditions(args), **bench.conditions())
        log(f"warm-up ({', '.join(modes)})")
        for mode in modes:
            bench.warm_up(mode)
        for rep in range(args.reps):
            order = modes if args.no_rotate else modes[rep % len(modes):] + modes[:rep % len(modes)]
            for mode in order:
                m = bench.measure(mode, rep)
                results.append(m)
                deltas = " ".join(f"{k} {v}" for k, v in m["stat_deltas"]["c16"].items())
                log(f"rep {rep + 1}/{args.reps} {mode:15s} {m['rps']:8.0f} req/s  "
                    f"{m['cpu_us_per_req']:6.1f} µs CPU/req  p50 {m['p50_us']} µs  "
                    f"p99 {m['p99_us']} µs  {m['iperf_gbps']:.2f} Gbit/s  "
                    f"Δ[{deltas}]  foreign {m['foreign_cpu_cores']:.2f} cores  "
                    f"{'ok' if m['through_envoy_ok'] else 'PATH CHECK FAILED'}")
    finally:
        bench.cleanup()

    present = [m for m in cls.modes if m in modes]
    summary = summarize(results, present, cls.ratios, cls.key_ratio)
    table = markdown(summary, present, cls.ratios)
    path_ok = all(r["through_envoy_ok"] for r in results)
    errors = sum(r["errors_c16"] + r["errors_c1"] for r in results)
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out, f"{script}-{started.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round((datetime.datetime.now() - started).total_seconds(), 1),
        "conditions": cond, "path_ok": path_ok, "wrk_errors": errors,
        "summary": summary, "results": results}, indent=2) + "\n")
    print(f"\nmeshd {script} benchmark, {started:%Y-%m-%d %H:%M}, kernel {cond['kernel']}, "
          f"{cond['cpus']} CPUs, Envoy {cond['envoy']}; medians of {args.reps} interleaved reps, "
          f"wrk {args.duration:g} s, iperf3 {args.iperf_duration} s\n")
    print(table)
    print(f"\nresults: {out}")
    if not path_ok:
        print("WARNING: the Envoy counter check failed for some measurement "
              "(a direct mode went through Envoy, or a proxied mode did not)", file=sys.stderr)
    if errors:
        print(f"WARNING: wrk reported {errors} socket/status errors", file=sys.stderr)
    return 0 if path_ok else 1
