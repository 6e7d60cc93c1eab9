#!/usr/bin/env python3
"""Egress benchmark: direct vs iptables REDIRECT vs meshd (eBPF), same Envoy.

Run as root from the repository root:  .venv/bin/python bench/egress.py [--reps 5] [--duration 3]

Everything lives inside names carrying a random prefix ("mb" + 6 hex digits): one network
namespace with nginx and iperf3 behind a veth, cgroups under /<prefix>/ in the cgroup2
hierarchy, one meshd instance (pins under /sys/fs/bpf/<prefix>, state in a temp dir) and,
only while the iptables mode is measured, one nat OUTPUT jump into a chain of our own.
All of it is removed on exit, on error and on Ctrl-C/SIGTERM.

Modes (the client is the same wrk/iperf3 binary each time, only its cgroup differs):
  direct    client in a plain cgroup -> nginx (no proxy)
  iptables  client in a plain cgroup matched by `-m cgroup --path` in nat OUTPUT,
            -j REDIRECT to meshd's Envoy outbound port (Istio/Consul style; Envoy learns
            the original destination from conntrack via SO_ORIGINAL_DST)
  meshd     client in meshd's enrolled workload cgroup (cgroup/connect4 + sockops +
            cgroup/getsockopt steer it to the same Envoy)

Figures per measurement: wrk c=16 t=2 req/s, CPU µs per request over that run
(/proc/stat, all CPUs, user+nice+system+irq+softirq; plus the part charged to our own
cgroups), wrk c=1 t=1 p50/p99 latency, iperf3 bulk Gbit/s. Repetitions are interleaved
(every rep measures every mode, the mode order rotating per rep) and medians reported.
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshd import __version__ as MESHD_VERSION  # noqa: E402
from meshd.cgroups import cgroup2_mount  # noqa: E402
from meshd.envoy import find_envoy, stats as envoy_stats  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MESHD = str(VENV_BIN / "meshd")
MODES = ("direct", "iptables", "meshd")
HTTP_PORT, IPERF_PORT = 80, 5201
FILE_NAME, FILE_SIZE = "1k.bin", 1024
RQ_STAT = "http.outbound_http.downstream_rq_total"
TCP_STAT = "tcp.outbound_tcp.downstream_cx_total"
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
        listen {ip}:{port};
        root {tmp}/www;
    }}
}}
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)


def reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def free_port() -> int:
    while True:
        p = random.randint(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return p
            except OSError:
                continue


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


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


class Bench:
    def __init__(self, args):
        self.args = args
        self.prefix = "mb" + uuid.uuid4().hex[:6]
        self.cg_root = cgroup2_mount()
        self.cg_base = f"/{self.prefix}"
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")  # short: admin socket path
        os.chmod(self.tmp, 0o755)
        self.ns = f"{self.prefix}s"
        self.veth = f"{self.prefix}v"
        n = random.randint(1, 250)
        self.host_ip, self.ip = f"10.233.{n}.1", f"10.233.{n}.2"
        self.chain = self.prefix.upper()
        self.outbound_port, self.inbound_port = free_port(), free_port()
        self.config_dir = os.path.join(self.tmp, "etc")
        self.state_dir = os.path.join(self.tmp, "run")
        self.bpffs_dir = f"/sys/fs/bpf/{self.prefix}"
        self.meshd_proc: subprocess.Popen | None = None
        self.meshd_log = None
        self.servers: list[subprocess.Popen] = []
        self.made_netns = self.made_veth = False
        self.nat_table_preexisted = True
        self.rule_installed = False
        self.chain_made = False
        self.match = ["-m", "cgroup", "--path"]   # + the iptables client's cgroup path
        self.client_uid: int | None = None       # set if we must fall back to -m owner
        self._cleaned = False

    # ---------------------------------------------------------------- cgroups
    def cg_path(self, rel: str) -> str:
        return os.path.join(self.cg_root, rel.lstrip("/"))

    def cg_make(self, name: str) -> str:
        rel = f"{self.cg_base}/{name}"
        os.makedirs(self.cg_path(rel), exist_ok=True)
        return rel

    def preexec(self, rel: str, uid: int | None = None):
        procs = os.path.join(self.cg_path(rel), "cgroup.procs")

        def fn():
            Path(procs).write_text("0")
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

    # ---------------------------------------------------------------- setup
    def setup(self):
        for tool in ("wrk", "iperf3", "nginx", "iptables", "ip", "curl"):
            if not shutil.which(tool):
                raise SystemExit(f"{tool} not found: run scripts/setup.sh")
        self.cg = {m: self.cg_make(m) for m in ("direct", "iptables", "wl", "server")}
        self.cg["meshd"] = self.cg["wl"]
        self.meshd_cg_root = f"{self.cg_base}/meshd"
        self.envoy_cg = f"{self.meshd_cg_root}/envoy"
        self._netns()
        self._servers()
        self._meshd()
        self._check_iptables_match()

    def _netns(self):
        peer = self.veth + "p"
        sh("ip", "netns", "add", self.ns)
        self.made_netns = True
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer)
        self.made_veth = True
        sh("ip", "link", "set", peer, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        ns = ["ip", "-n", self.ns]
        sh(*ns, "addr", "add", f"{self.ip}/24", "dev", peer)
        sh(*ns, "link", "set", peer, "up")
        sh(*ns, "link", "set", "lo", "up")

    def _servers(self):
        www = Path(self.tmp, "www")
        www.mkdir()
        (www / FILE_NAME).write_bytes(random.Random(1).randbytes(FILE_SIZE))
        conf = Path(self.tmp, "nginx.conf")
        conf.write_text(NGINX_CONF.format(tmp=self.tmp, ip=self.ip, port=HTTP_PORT))
        errlog = open(os.path.join(self.tmp, "servers.log"), "a")
        exec_ns = ["ip", "netns", "exec", self.ns]
        self.servers.append(subprocess.Popen(
            exec_ns + ["nginx", "-e", f"{self.tmp}/nginx-error.log", "-p", self.tmp, "-c", str(conf)],
            preexec_fn=self.preexec(self.cg["server"]), stdout=errlog, stderr=errlog))
        self.servers.append(subprocess.Popen(
            exec_ns + ["iperf3", "-s", "-B", self.ip, "-p", str(IPERF_PORT)],
            preexec_fn=self.preexec(self.cg["server"]), stdout=errlog, stderr=errlog))

        def up():
            for p in self.servers:
                if p.poll() is not None:
                    raise RuntimeError(f"server {p.args} exited {p.returncode}: "
                                       f"{Path(self.tmp, 'servers.log').read_text()[-2000:]}")
            ok = 0
            for port in (HTTP_PORT, IPERF_PORT):
                with socket.socket() as s:
                    s.settimeout(0.5)
                    ok += s.connect_ex((self.ip, port)) == 0
            return ok == 2
        wait_for(up, 10, "nginx and iperf3 in the netns")
        r = self.client("direct", "curl", "-sS", "--max-time", "5", "-o", "/dev/null",
                        "-w", "%{http_code} %{size_download}", self.url())
        if r.stdout.strip() != f"200 {FILE_SIZE}":
            raise RuntimeError(f"nginx does not serve the file: {r.stdout!r} {r.stderr!r}")

    def _meshd(self):
        os.makedirs(self.config_dir)
        Path(self.config_dir, "00-mesh.toml").write_text(
            "[mesh]\n"
            f"outbound_port = {self.outbound_port}\n"
            f"inbound_port = {self.inbound_port}\n"
            f'bpffs_dir = "{self.bpffs_dir}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'cgroup_root = "{self.meshd_cg_root}"\n')
        Path(self.config_dir, "10-workloads.toml").write_text(
            f'[workload.bench]\ncgroup = "{self.cg["wl"]}"\n')
        self.meshd_log = open(os.path.join(self.tmp, "meshd.log"), "a+")
        self.meshd_proc = subprocess.Popen([MESHD, "run", "--config-dir", self.config_dir],
                                           stdout=self.meshd_log, stderr=subprocess.STDOUT)

        def running():
            if self.meshd_proc.poll() is not None:
                self.meshd_log.flush()
                raise RuntimeError(f"meshd exited {self.meshd_proc.returncode}:\n"
                                   f"{Path(self.meshd_log.name).read_text()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                st = json.loads(Path(self.state_dir, "status.json").read_text())
                return st.get("state") == "running" and st
        st = wait_for(running, 60, "meshd running")
        self.meshd_status = st
        self.admin = os.path.join(self.state_dir, "envoy-admin.sock")
        self.envoy_pid = int(Path(self.state_dir, "envoy.pid").read_text())
        wait_for(lambda: self.client("meshd", "curl", "-sS", "--max-time", "2", "-o", "/dev/null",
                                     "-w", "%{http_code}", self.url()).stdout == "200",
                 20, "a request through meshd's Envoy", interval=0.2)

    def stat(self, name: str) -> int:
        return envoy_stats(self.admin).get(name, 0)

    # ---------------------------------------------------------------- iptables
    def _nat_table_exists(self) -> bool:
        return sh("nft", "list", "table", "ip", "nat", check=False).returncode == 0 \
            if shutil.which("nft") else True

    def rule_on(self):
        if self.rule_installed:
            return
        if not self.chain_made:
            self.nat_table_preexisted = self.nat_table_preexisted and self._nat_table_exists()
            sh("iptables", "-w", "-t", "nat", "-N", self.chain)
            self.chain_made = True
        sh("iptables", "-w", "-t", "nat", "-F", self.chain)
        target = (self.match + [self.cg["iptables"]]) if self.client_uid is None \
            else ["-m", "owner", "--uid-owner", str(self.client_uid)]
        sh("iptables", "-w", "-t", "nat", "-A", self.chain, "-p", "tcp", "-d", self.ip, *target,
           "-j", "REDIRECT", "--to-ports", self.outbound_port)
        sh("iptables", "-w", "-t", "nat", "-I", "OUTPUT", "-j", self.chain)
        self.rule_installed = True

    def rule_off(self, final=False):
        if self.rule_installed:
            sh("iptables", "-w", "-t", "nat", "-D", "OUTPUT", "-j", self.chain, check=False)
            self.rule_installed = False
        if not self.chain_made:
            return
        sh("iptables", "-w", "-t", "nat", "-F", self.chain, check=False)
        # Between iptables measurements the chain goes too, and the nat table as well if it
        # did not exist before and holds nothing else: a nat table switches conntrack on for
        # every connection on the host, which the other modes must not pay.
        sh("iptables", "-w", "-t", "nat", "-X", self.chain, check=False)
        self.chain_made = False
        if not self.nat_table_preexisted:
            rules = sh("iptables", "-w", "-t", "nat", "-S", check=False).stdout.split("\n")
            if not [r for r in rules if r.startswith(("-A", "-N"))]:
                sh("nft", "delete", "table", "ip", "nat", check=False)

    def _check_iptables_match(self):
        """Does `-m cgroup --path` match here (hybrid layout)? Else fall back to -m owner."""
        for attempt in ("cgroup", "owner"):
            if attempt == "owner":
                self.client_uid = 60000 + random.randint(0, 4999)
                log(f"-m cgroup --path did not steer the client; falling back to "
                    f"-m owner --uid-owner {self.client_uid}")
            before = self.stat(RQ_STAT)
            self.rule_on()
            try:
                r = self.client("iptables", "curl", "-sS", "--max-time", "5", "-o", "/dev/null",
                                "-w", "%{http_code}", self.url())
            finally:
                self.rule_off()
            if r.stdout == "200" and self.stat(RQ_STAT) > before:
                self.iptables_match = attempt
                log(f"iptables mode steers with -m {attempt}")
                return
        raise RuntimeError("the iptables REDIRECT mode does not reach Envoy")

    # ---------------------------------------------------------------- clients
    def url(self) -> str:
        return f"http://{self.ip}:{HTTP_PORT}/{FILE_NAME}"

    def client(self, mode: str, *cmd, timeout=60) -> subprocess.CompletedProcess:
        uid = self.client_uid if mode == "iptables" else None
        return subprocess.run([str(c) for c in cmd], preexec_fn=self.preexec(self.cg[mode], uid),
                              capture_output=True, text=True, timeout=timeout)

    def wrk(self, mode: str, conns: int, threads: int, duration: float) -> dict:
        lua = os.path.join(self.tmp, "report.lua")
        if not os.path.exists(lua):
            Path(lua).write_text(WRK_LUA)
            os.chmod(lua, 0o644)
        r = self.client(mode, "wrk", "-c", conns, "-t", threads, "-d", f"{duration}s",
                        "--timeout", "5s", "-s", lua, self.url(), timeout=duration + 30)
        for line in r.stdout.splitlines():
            if line.startswith("WRKJSON "):
                return json.loads(line[8:])
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout}\n{r.stderr}")

    def iperf(self, mode: str, duration: float) -> float:
        r = self.client(mode, "iperf3", "-c", self.ip, "-p", IPERF_PORT, "-t", duration, "-J",
                        timeout=duration + 30)
        try:
            doc = json.loads(r.stdout)
            return doc["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError) as e:
            raise RuntimeError(f"iperf3 failed ({r.returncode}): {r.stdout[-1500:]} {r.stderr}") from e

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

    def measure(self, mode: str, rep: int) -> dict:
        a = self.args
        waited, idle_share = self.idle_wait()
        if mode == "iptables":
            self.rule_on()
        try:
            time.sleep(a.settle)
            rq0, cx0 = self.stat(RQ_STAT), self.stat(TCP_STAT)
            cgs = [self.cg[mode], self.cg["server"], self.envoy_cg]
            busy0, tot0 = proc_stat_busy()
            cg0 = self.cg_cpu_usec(cgs)
            w16 = self.wrk(mode, 16, 2, a.duration)
            busy1, tot1 = proc_stat_busy()
            cg1 = self.cg_cpu_usec(cgs)
            rq1 = self.stat(RQ_STAT)
            time.sleep(a.settle)
            w1 = self.wrk(mode, 1, 1, a.duration)
            rq2 = self.stat(RQ_STAT)
            time.sleep(a.settle)
            bps = self.iperf(mode, a.iperf_duration)
            cx1 = self.stat(TCP_STAT)
        finally:
            if mode == "iptables":
                self.rule_off()
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
            "envoy_rq_delta_c16": rq1 - rq0, "envoy_rq_delta_c1": rq2 - rq1,
            "envoy_tcp_cx_delta_iperf": cx1 - cx0,
        }
        if mode == "direct":
            m["through_envoy_ok"] = m["envoy_rq_delta_c16"] == 0 and m["envoy_rq_delta_c1"] == 0 \
                and m["envoy_tcp_cx_delta_iperf"] == 0
        else:
            m["through_envoy_ok"] = m["envoy_rq_delta_c16"] >= reqs and \
                m["envoy_rq_delta_c1"] >= w1["requests"] and m["envoy_tcp_cx_delta_iperf"] >= 2
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

        step("iptables", lambda: self.rule_off(final=True))
        if self.meshd_proc is not None:
            def stop_meshd():
                if self.meshd_proc.poll() is None:
                    self.meshd_proc.terminate()
                    try:
                        self.meshd_proc.wait(10)
                    except subprocess.TimeoutExpired:
                        self.meshd_proc.kill()
                        self.meshd_proc.wait(5)
            step("stop meshd", stop_meshd)
        if os.path.isdir(self.config_dir):
            step("meshd cleanup", lambda: sh(MESHD, "cleanup", "--config-dir", self.config_dir,
                                             check=False, timeout=60))
        for p in self.servers:
            step("servers", lambda p=p: (p.kill(), p.wait(5)))
        step("cgroups", lambda: kill_cgroup(self.cg_path(self.cg_base)))
        if self.made_veth:
            step("veth", lambda: sh("ip", "link", "del", self.veth, check=False))
        if self.made_netns:
            step("netns", lambda: sh("ip", "netns", "del", self.ns, check=False))
        if os.path.exists(self.bpffs_dir):
            step("pins", lambda: shutil.rmtree(self.bpffs_dir))
        if self.meshd_log:
            with contextlib.suppress(Exception):
                self.meshd_log.close()
        if self.args.keep_tmp:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        reap()
        for e in errors:
            log(f"cleanup: {e}")


def kill_cgroup(path: str) -> None:
    if not os.path.isdir(path):
        return
    kill = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill):
        with contextlib.suppress(OSError):
            Path(kill).write_text("1")
    for dirpath, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            for pid in Path(dirpath, "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    for _ in range(100):
        reap()
        try:
            for dirpath, _, _ in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
                os.rmdir(dirpath)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"could not remove cgroup {path}")


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


RATIOS = (("iptables", "direct"), ("meshd", "direct"), ("meshd", "iptables"))


def summarize(results: list[dict], modes) -> dict:
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
    for num, den in RATIOS:
        if num not in med or den not in med:
            continue
        ratios[f"{num}/{den}"] = {k: (med[num][k] / med[den][k]) if med[num][k] and med[den][k] else None
                                  for k, *_ in FIGURES}
    # per-rep meshd/iptables ratios (paired within a rep) show the spread of the key figure
    paired = {k: [] for k, *_ in FIGURES}
    reps = sorted({r["rep"] for r in results})
    for rep in reps:
        by = {r["mode"]: r for r in results if r["rep"] == rep}
        if "meshd" in by and "iptables" in by:
            for k, *_ in FIGURES:
                if by["meshd"][k] and by["iptables"][k]:
                    paired[k].append(by["meshd"][k] / by["iptables"][k])
    return {"medians": med, "ratios": ratios, "paired_meshd_over_iptables": paired}


def markdown(summary: dict, modes) -> str:
    med, ratios, paired = summary["medians"], summary["ratios"], summary["paired_meshd_over_iptables"]
    rks = [f"{a}/{b}" for a, b in RATIOS if f"{a}/{b}" in ratios]
    head = ["figure"] + list(modes) + [f"**{r}**" if r == "meshd/iptables" else r for r in rks]
    if "meshd/iptables" in ratios:
        head.append("meshd/iptables per rep (min–max)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, title, fmt, _ in FIGURES:
        cells = [title]
        for mode in modes:
            v = med[mode][k]
            cells.append(fmt.format(v) if v is not None else "–")
        for rk in rks:
            v = ratios[rk][k] if k != "foreign_cpu_cores" else None   # a noise gauge, not a figure
            cells.append(f"{v:.2f}" if v is not None else "–")
        if "meshd/iptables" in ratios:
            p = paired[k] if k != "foreign_cpu_cores" else []
            cells.append(f"{min(p):.2f}–{max(p):.2f}" if p else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conditions(args, bench: Bench) -> dict:
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
        "iptables_match": getattr(bench, "iptables_match", None),
        "iptables_rule": f"nat OUTPUT -j {bench.chain}; {bench.chain}: -p tcp -d {bench.ip} "
                         f"-m cgroup --path {bench.cg.get('iptables')} -j REDIRECT --to-ports "
                         f"<envoy outbound>" if getattr(bench, "iptables_match", None) == "cgroup"
                         else "-m owner --uid-owner (fallback)",
        "nat_table_preexisted": bench.nat_table_preexisted,
        "idle_wait_s": args.idle_wait, "idle_threshold": args.idle_threshold,
        "reps": args.reps, "duration_s": args.duration, "iperf_duration_s": args.iperf_duration,
        "file_bytes": FILE_SIZE,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run (default 3)")
    ap.add_argument("--iperf-duration", type=int, default=3, help="seconds per iperf3 run (default 3)")
    ap.add_argument("--settle", type=float, default=0.3, help="pause between runs (default 0.3 s)")
    ap.add_argument("--idle-wait", type=float, default=20,
                    help="before each measurement wait up to this many seconds for the machine "
                         "to be idle (default 20; 0 = don't wait)")
    ap.add_argument("--idle-threshold", type=float, default=0.15,
                    help="'idle' = at most this share of all CPUs busy over 0.5 s (default 0.15)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of modes")
    ap.add_argument("--no-rotate", action="store_true",
                    help="fixed mode order in every rep (default: rotate the order per rep)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="results directory")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs) at the end")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/egress.py needs root (netns, cgroups, BPF, iptables)", file=sys.stderr)
        return 1
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        ap.error(f"unknown modes: {set(modes) - set(MODES)}")

    # Envoy outlives meshd by design and is re-parented to us, so we can reap it.
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    bench = Bench(args)
    atexit.register(bench.cleanup)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    results: list[dict] = []
    started = datetime.datetime.now()
    try:
        log(f"prefix {bench.prefix}: netns {bench.ns} ({bench.ip}), cgroups {bench.cg_base}, "
            f"Envoy outbound port {bench.outbound_port}")
        bench.setup()
        cond = conditions(args, bench)
        log(f"warm-up ({', '.join(modes)})")
        for mode in modes:
            if mode == "iptables":
                bench.rule_on()
            try:
                bench.wrk(mode, 16, 2, 1)
            finally:
                bench.rule_off()
        for rep in range(args.reps):
            order = modes if args.no_rotate else modes[rep % len(modes):] + modes[:rep % len(modes)]
            for mode in order:
                m = bench.measure(mode, rep)
                results.append(m)
                log(f"rep {rep + 1}/{args.reps} {mode:8s} {m['rps']:8.0f} req/s  "
                    f"{m['cpu_us_per_req']:6.1f} µs CPU/req  p50 {m['p50_us']} µs  "
                    f"p99 {m['p99_us']} µs  {m['iperf_gbps']:.2f} Gbit/s  "
                    f"envoy Δrq {m['envoy_rq_delta_c16']}  "
                    f"foreign {m['foreign_cpu_cores']:.2f} cores  "
                    f"{'ok' if m['through_envoy_ok'] else 'PATH CHECK FAILED'}")
    finally:
        bench.cleanup()

    present = [m for m in MODES if m in modes]
    summary = summarize(results, present)
    table = markdown(summary, present)
    path_ok = all(r["through_envoy_ok"] for r in results)
    errors = sum(r["errors_c16"] + r["errors_c1"] for r in results)
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out, f"egress-{started.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round((datetime.datetime.now() - started).total_seconds(), 1),
        "conditions": cond, "path_ok": path_ok, "wrk_errors": errors,
        "summary": summary, "results": results}, indent=2) + "\n")
    print(f"\nmeshd egress benchmark, {started:%Y-%m-%d %H:%M}, kernel {cond['kernel']}, "
          f"{cond['cpus']} CPUs, Envoy {cond['envoy']}; medians of {args.reps} interleaved reps, "
          f"wrk {args.duration:g} s, iperf3 {args.iperf_duration} s\n")
    print(table)
    print(f"\nresults: {out}")
    if not path_ok:
        print("WARNING: the Envoy counter check failed for some measurement "
              "(direct went through Envoy, or a proxied mode did not)", file=sys.stderr)
    if errors:
        print(f"WARNING: wrk reported {errors} socket/status errors", file=sys.stderr)
    return 0 if path_ok else 1


if __name__ == "__main__":
    sys.exit(main())
