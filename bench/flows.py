#!/usr/bin/env python3
"""Flow records under load: 1,000 short connections a second (one HTTP request each, so
one flow record each) through meshd for a minute. Does meshd's CPU or memory grow, and is
any request slowed by the records?

Run as root from the repository root:  .venv/bin/python bench/flows.py [--duration 60]

Topology (prefix "mb" + 6 hex digits; removed on exit, on error and on Ctrl-C/SIGTERM): a
client namespace <prefix>c served by one meshd (workload cgroup /<prefix>/wl, port 80
declared "http", `flow_logs = "file"`), joined by a veth to a server namespace <prefix>s
running nginx-light (1 KiB file). An open-loop client in the workload cgroup starts a new
connection every 1/--rate s (GET, Connection: close) and times each (connect to last byte).

Phases, back to back:
- off (--baseline s): `flow_logs = "off"`: Envoy has no access logger at all;
- on (--duration s): records streamed to meshd, written to flows.log, kept for observe;
  meshd's CPU and RSS are sampled every --window s;
- stalled (--stalled s): the same, with meshd stopped (SIGSTOP): nobody reads the records.
Latency is compared across the three: the records cost what "on" minus "off" shows, and
"stalled" shows that traffic never waits for meshd.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (CLK_TCK, FILE_NAME, BenchBase, MeshdInstance, arg_parser, log,  # noqa: E402
                    nginx_conf, rss_mb, save_results, sh, take_charge, wait_for, write_www)

# Open loop: a connection every 1/rate s whatever the previous ones do; one line per
# connection: start time, latency in ms (-1: failed).
CLIENT = r"""
import asyncio, sys, time
host, path, rate, duration = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
out = []
async def one(t0):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, 80), 10)
        w.write(req)
        while await asyncio.wait_for(r.read(65536), 10):
            pass
        w.close()
        out.append((t0, (time.time() - t0) * 1000))
    except Exception:
        out.append((t0, -1.0))
async def main():
    start = time.time()
    tasks, n = set(), 0
    while True:
        t = start + n / rate
        if t - start >= duration:
            break
        delay = t - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(time.time()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    await asyncio.gather(*tasks)
asyncio.run(main())
sys.stdout.write("".join(f"{t:.4f} {ms:.3f}\n" for t, ms in out))
"""


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime + stime, all threads


def latency(rows: list[tuple[float, float]]) -> dict:
    ok = sorted(ms for _, ms in rows if ms >= 0)
    if not ok:
        return {"n": len(rows), "failed": len(rows)}
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else [ok[0]] * 99
    return {"n": len(rows), "failed": len(rows) - len(ok), "p50_ms": round(q[49], 2),
            "p99_ms": round(q[98], 2), "max_ms": round(ok[-1], 2)}


class Flows(BenchBase):
    name = "flows"

    def setup(self):
        self.ns_c, self.ns_s = f"{self.prefix}c", f"{self.prefix}s"
        self.ip_c, self.ip_s = self.two_hosts(self.ns_c, self.ns_s, "10.236", f"{self.prefix}x")
        for ns in (self.ns_c, self.ns_s):   # 60,000+ short connections a minute: room for them
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
               "net.ipv4.ip_local_port_range=10000 65000")
        self.wl = self.cg_make("wl")
        server = self.cg_make("server")
        write_www(self.tmp)
        conf = Path(self.tmp, "nginx.conf")
        conf.write_text(nginx_conf(self.tmp, [(self.ip_s, 80)]))
        self.spawn_server(server, self.ns_s, "nginx", "-c", conf)
        self.mesh = MeshdInstance(self, "", self.wl, netns=self.ns_c, http_ports=[80],
                                  mesh_extra='flow_logs = "off"\n')
        self.meshds.append(self.mesh)
        self.mesh.start()
        self.mesh.wait_running()
        self.mesh_toml = Path(self.mesh.config_dir, "00-mesh.toml").read_text()
        self.flows_log = Path(self.mesh.state_dir, "flows.log")
        wait_for(lambda: self.load(50, 0.2) and self.mesh.stat(
            "http.outbound_http.downstream_rq_total") > 0, 30, what="requests through Envoy")

    def set_flow_logs(self, mode: str) -> None:
        path = Path(self.mesh.config_dir, "00-mesh.toml")
        tmp = path.with_name(".00-mesh.toml.tmp")
        tmp.write_text(self.mesh_toml.replace('flow_logs = "off"', f'flow_logs = "{mode}"'))
        os.rename(tmp, path)
        lds = Path(self.mesh.state_dir, "envoy", "lds.json")
        wait_for(lambda: ("fluentd" in lds.read_text()) == (mode != "off"), 10,
                 what=f"Envoy's listeners with flow_logs = {mode}")
        time.sleep(2)   # Envoy has loaded them (and drained the old ones)

    def load(self, rate: float, duration: float) -> list[tuple[float, float]]:
        r = subprocess.run([sys.executable, "-c", CLIENT, self.ip_s, f"/{FILE_NAME}",
                            str(rate), str(duration)],
                           preexec_fn=self.preexec(self.wl, netns=self.ns_c),
                           capture_output=True, text=True, timeout=duration + 60)
        return [(float(a), float(b)) for a, b in (line.split() for line in r.stdout.splitlines())]

    def records(self) -> int:
        try:
            with open(self.flows_log, "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def phase_on(self, rate: float, duration: float, window: float) -> tuple[list, list]:
        """The load in the background; meshd sampled every `window` s meanwhile."""
        pid = self.mesh.proc.pid
        envoy = self.mesh.envoy_pid
        client = subprocess.Popen([sys.executable, "-c", CLIENT, self.ip_s, f"/{FILE_NAME}",
                                   str(rate), str(duration)],
                                  preexec_fn=self.preexec(self.wl, netns=self.ns_c),
                                  stdout=subprocess.PIPE, text=True)
        self.servers.append(client)
        samples = []
        t_start = time.time()
        prev = (t_start, proc_cpu_s(pid), proc_cpu_s(envoy), self.records())
        while client.poll() is None and time.time() - t_start < duration + 60:
            time.sleep(window)
            now = (time.time(), proc_cpu_s(pid), proc_cpu_s(envoy), self.records())
            dt = now[0] - prev[0]
            samples.append({"t_s": round(now[0] - t_start, 1),
                            "meshd_cpu_pct": round(100 * (now[1] - prev[1]) / dt, 1),
                            "meshd_rss_mb": round(rss_mb(pid) or 0, 1),
                            "envoy_cpu_pct": round(100 * (now[2] - prev[2]) / dt, 1),
                            "records_per_s": round((now[3] - prev[3]) / dt)})
            prev = now
        out, _ = client.communicate(timeout=120)
        rows = [(float(a), float(b)) for a, b in (line.split() for line in out.splitlines())]
        return rows, samples


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--rate", type=float, default=1000, help="new connections a second (1000)")
    ap.set_defaults(duration=60)
    ap.add_argument("--baseline", type=float, default=20, help="seconds with flow_logs off (20)")
    ap.add_argument("--stalled", type=float, default=15, help="seconds with meshd stopped (15)")
    ap.add_argument("--window", type=float, default=10, help="sampling window, s (10)")
    args = ap.parse_args()
    if not take_charge("flows.py"):
        return 1
    bench = Flows(args)
    try:
        bench.setup()
        log(f"prefix {bench.prefix}: off {args.baseline:g} s at {args.rate:g}/s")
        off = bench.load(args.rate, args.baseline)
        bench.set_flow_logs("file")
        log(f"on {args.duration} s")
        on, samples = bench.phase_on(args.rate, args.duration, args.window)
        windows = {}
        t0 = on[0][0] if on else 0
        for t, ms in on:
            windows.setdefault(int((t - t0) // args.window), []).append((t, ms))
        log(f"stalled {args.stalled:g} s (meshd SIGSTOP)")
        bench.mesh.proc.send_signal(signal.SIGSTOP)
        try:
            stalled = bench.load(args.rate, args.stalled)
        finally:
            bench.mesh.proc.send_signal(signal.SIGCONT)
        written = bench.records()
    finally:
        bench.cleanup()
    result = {
        "rate_per_s": args.rate,
        "latency": {"off": latency(off), "on": latency(on), "stalled": latency(stalled)},
        "on_windows": [dict(latency(rows), window=k) for k, rows in sorted(windows.items())],
        "meshd_samples": samples,
        "records_written": written, "requests_on": len(on),
    }
    out = save_results(args.out, "flows", result)
    print("| phase | requests | failed | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|")
    for k, f in result["latency"].items():
        print(f"| {k} | {f['n']} | {f['failed']} | {f.get('p50_ms')} | {f.get('p99_ms')} | "
              f"{f.get('max_ms')} |")
    print("\n| t (s) | meshd CPU % | meshd RSS MB | Envoy CPU % | records/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for s, w in zip(samples, result["on_windows"]):
        print(f"| {s['t_s']} | {s['meshd_cpu_pct']} | {s['meshd_rss_mb']} | {s['envoy_cpu_pct']} "
              f"| {s['records_per_s']} | {w.get('p50_ms')} | {w.get('p99_ms')} |")
    print(f"\nrecords written {written} for {len(on)} requests while on; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
