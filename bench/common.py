"""Shared machinery of the meshd benchmarks (bench/run.py, bench/envoy_cost.py,
bench/timings.py).

Helpers (processes, cgroups, namespaces, CPU accounting), a meshd instance, a plain Envoy
(the iptables anchor's proxy), the client runners (wrk with a Lua JSON report, iperf3 -J),
one measurement of a client (wrk c=16, wrk c=1, wrk one request per connection, iperf3,
Envoy counter deltas, CPU) and cleanup of everything a run made. The arithmetic and the
Markdown live in bench/report.py.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402  (bench/, beside this file)
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





def save_results(out_dir: str, name: str, doc: dict) -> Path:
    """Write one run's raw figures as <out_dir>/<name>-<date-time>.json."""
    os.makedirs(out_dir, exist_ok=True)
    out = Path(out_dir, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def take_charge(script: str) -> bool:
    """Start of a measuring script: it needs root; it becomes the subreaper of what it
    starts (Envoy outlives meshd by design and is re-parented to us, so we can reap it);
    SIGTERM/SIGHUP/SIGINT raise SystemExit so the script's finally cleans up (SIGINT too:
    started from a non-interactive `cmd &` Python would inherit SIG_IGN for it)."""
    if os.geteuid() != 0:
        print(f"bench/{script} needs root (netns, cgroups, BPF, iptables)", file=sys.stderr)
        return False
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, on_signal)
    return True


def proc_stat_busy() -> tuple[int, int]:
    """(busy, total) CPU ticks over all CPUs: busy = user+nice+system+irq+softirq."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def drop_nat_table(netns: str) -> None:
    """Remove the nat table from one of our namespaces between iptables measurements:
    while it exists conntrack runs for every connection there, which the other modes
    must not pay. Needs `nft` (iptables-nft cannot delete a table); without it the
    table stays and the JSON says so (`nat_table_dropped_between_runs`)."""
    if shutil.which("nft"):
        sh("ip", "netns", "exec", netns, "nft", "delete", "table", "ip", "nat", check=False)


def flush_conntrack(netns: str) -> None:
    """Forget every conntrack entry of one of our namespaces. An entry outlives its
    connection (TIME_WAIT, 2 min) with its NAT binding, or with none; a later connection
    that reuses its ports goes where the entry says, not where this mode's rules say
    (seen as failed path checks: a direct mode's entries carried an iptables mode's
    connections past its Envoy, and one variant's to another's Envoy)."""
    sh("ip", "netns", "exec", netns, sys.executable, "-c",
       "from pyroute2 import Conntrack; list(Conntrack().flush())")


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

    def write_conf(self, name: str, text: str) -> None:
        """Add or replace one config file (meshd applies it live, inotify)."""
        tmp = Path(self.config_dir, f".{name}.tmp")
        tmp.write_text(text)
        os.rename(tmp, Path(self.config_dir, name))

    def remove_conf(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(self.config_dir, name))

    def wait_config(self, name: str, present: bool, timeout: float = 60, until=None) -> dict:
        """Until status.json lists (or no longer lists) config file `name`, names no
        config error and, if given, until(status) is true. Adding a file meshd rejects
        raises ConfigRejected with meshd's error text; after a removal the error of the
        removed file is waited out."""
        def applied():
            st = self.status() or {}
            files = [os.path.basename(f) for f in st.get("config_files", [])]
            if present and st.get("config_errors") and name in files:
                raise ConfigRejected(json.dumps(st["config_errors"])[:500])
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshd {self.name} exited {self.proc.returncode}")
            return (name in files) == present and not st.get("config_errors") and \
                (until is None or until(st)) and st
        return wait_for(applied, timeout, what=f"meshd {self.name} applies {name}",
                        interval=0.1)

    def pids(self) -> dict[str, int]:
        out = {}
        if self.proc is not None and self.proc.poll() is None:
            out["meshd"] = self.proc.pid
        with contextlib.suppress(OSError, ValueError):
            out["envoy"] = int(Path(self.state_dir, "envoy.pid").read_text())
        return out

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


class ConfigRejected(Exception):
    """meshd refused a config file (its error text)."""


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (VmRSS)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


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

    def two_hosts(self, ns_a: str, ns_b: str, net: str, veth: str) -> tuple[str, str]:
        """Two network namespaces joined by veth `veth` (in ns_a) <-> `veth`p (in ns_b),
        addressed <net>.N.1 and <net>.N.2 (N random), loopback up. Returns the two IPs."""
        n = random.randint(1, 250)
        ips = (f"{net}.{n}.1", f"{net}.{n}.2")
        self.netns_add(ns_a)
        self.netns_add(ns_b)
        self.veth_add(veth, ns_a, ns_b)
        for ns, dev, ip in ((ns_a, veth, ips[0]), (ns_b, veth + "p", ips[1])):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ips

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

    def wrk(self, c: Client, conns: int, threads: int, duration: float,
            close: bool = False) -> dict:
        """wrk against the client's URL; close=True: one request per connection."""
        lua = os.path.join(self.tmp, "report.lua")
        if not os.path.exists(lua):
            Path(lua).write_text(WRK_LUA)
            os.chmod(lua, 0o644)
        hdr = ["-H", "Connection: close"] if close else []
        r = self.run(c, "wrk", "-c", conns, "-t", threads, "-d", f"{max(1, round(duration))}s",
                     "--timeout", "5s", *hdr, "-s", lua, c.url, timeout=duration + 30)
        for line in r.stdout.splitlines():
            if line.startswith("WRKJSON "):
                return json.loads(line[8:])
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout}\n{r.stderr}")

    def iperf(self, c: Client, duration: float, tries: int = 2) -> float:
        """iperf3's received bits/s. One retry: the server of a port serves one test at a
        time, and a reset control connection (seen through two Envoys) is not a figure."""
        try:
            return self._iperf(c, duration)
        except RuntimeError as e:
            if tries <= 1:
                raise
            log(f"iperf3 failed, once more: {str(e)[-200:]}")
            time.sleep(1)
            return self.iperf(c, duration, tries - 1)

    def _iperf(self, c: Client, duration: float) -> float:
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

    def extra_cleanup(self, step) -> None:
        pass

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

    def measure(self, c: Client, own_cgroups: list[str], path: PathCheck, *,
                iperf: bool = True, newconn: bool = True) -> tuple[dict, dict]:
        """One measurement of one client: wrk c=16 (req/s, CPU, p50/p99 under load), wrk
        c=1 (p50/p99), wrk c=16 with one request per connection, iperf3. Returns the
        figures and the Envoy counter deltas of each run (for the caller's path check)."""
        a = self.args
        waited, idle_share = self.idle_wait()
        time.sleep(a.settle)
        s0 = path.sample()
        busy0, tot0 = proc_stat_busy()
        cg0 = self.cg_cpu_usec(own_cgroups)
        w16 = self.wrk(c, 16, 2, a.duration)
        busy1, tot1 = proc_stat_busy()
        cg1 = self.cg_cpu_usec(own_cgroups)
        s1 = path.sample()
        time.sleep(a.settle)
        w1 = self.wrk(c, 1, 1, a.duration)
        s2 = path.sample()
        wnc = None
        if newconn:
            time.sleep(a.settle)
            wnc = self.wrk(c, 16, 2, a.duration, close=True)
        s3 = path.sample()
        bps = None
        if iperf:
            time.sleep(a.settle)
            bps = self.iperf(c, a.iperf_duration)
        s4 = path.sample()
        reqs = w16["requests"]
        secs = w16["duration_us"] / 1e6
        busy_us = (busy1 - busy0) / CLK_TCK * 1e6
        m = {
            "rps": reqs / secs,
            "requests": reqs,
            "errors": w16["errors"] + w1["errors"] + (wnc["errors"] if wnc else 0),
            "cpu_us_per_req": busy_us / reqs if reqs else None,
            "cpu_us_per_req_own": (cg1 - cg0) / reqs if reqs else None,
            "cpu_busy_fraction": (busy1 - busy0) / (tot1 - tot0) if tot1 > tot0 else None,
            # CPU used outside our client/server/Envoy cgroups during the c=16 run, in
            # cores: other people's work (plus meshd's status poll and softirq work
            # charged elsewhere). High values flag a disturbed measurement.
            "foreign_cpu_cores": (busy_us - (cg1 - cg0)) / w16["duration_us"],
            "idle_wait_s": round(waited, 2), "busy_share_before": round(idle_share, 3),
            "c16_p50_us": w16["p50_us"], "c16_p99_us": w16["p99_us"],
            "p50_us": w1["p50_us"], "p90_us": w1["p90_us"], "p99_us": w1["p99_us"],
            "c1_requests": w1["requests"],
            "newconn_rps": wnc["requests"] / (wnc["duration_us"] / 1e6) if wnc else None,
            "newconn_requests": wnc["requests"] if wnc else 0,
            "iperf_gbps": bps / 1e9 if bps is not None else None,
        }
        deltas = {"c16": {k: s1[k] - s0[k] for k in s0}, "c1": {k: s2[k] - s1[k] for k in s0},
                  "newconn": {k: s3[k] - s2[k] for k in s0},
                  "iperf": {k: s4[k] - s3[k] for k in s0}}
        return m, deltas

    def interleaved(self, items: list, reps: int, on, off, measure, line) -> list[dict]:
        """Warm every item up (1 s of wrk c=16 through `client(item)`), then `reps`
        repetitions measuring every item, the order rotated by one each rep so drift and
        other people's load do not always hit the same item. on/off install and remove
        an item's state around each use; line(item, rep, m) is the progress log line."""
        for it in items:   # warm-up: Envoy's first connections, page cache, ARP
            on(it)
            try:
                self.wrk(self.client(it), 16, 2, 1)
            finally:
                off(it)
        results = []
        for rep in range(reps):
            for it in report.rotated(items, rep):
                m = measure(it, rep)
                results.append(m)
                log(line(it, rep, m))
        return results

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


def arg_parser(doc: str, idle_wait: float = 5) -> argparse.ArgumentParser:
    """The options every measuring script shares (bench/timings.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    ap.add_argument("--duration", type=int, default=2, help="seconds per wrk run (default 2)")
    ap.add_argument("--settle", type=float, default=0.2, help="pause between runs (s)")
    ap.add_argument("--idle-wait", type=float, default=idle_wait,
                    help="wait up to this many s for the machine to be idle before each "
                         f"measurement (default {idle_wait:g}; 0 = don't wait)")
    ap.add_argument("--idle-threshold", type=float, default=0.15,
                    help="'idle' = at most this share of all CPUs busy over 0.5 s")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="results directory")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs) at the end")
    return ap
