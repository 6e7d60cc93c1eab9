#!/usr/bin/env python3
"""Timings the test suite only asserts the order and outcome of: how long a config change
takes to reach the data path, and how long a request takes while Envoy is down (fail open).

Run as root from the repository root:  .venv/bin/python bench/timings.py [--reps 10]

Topology (prefix "mb" + 6 hex digits; removed on exit, on error and on Ctrl-C/SIGTERM): a
client namespace <prefix>c served by one meshd (workload cgroup /<prefix>/wl), joined by a
veth to a server namespace <prefix>s running tests/helpers/echo_server.py on two HTTP ports
(both declared "http", so Envoy marks the requests it carries with x-forwarded-proto).

- reload: a client in the workload loops requests to the second port; the script rewrites
  00-mesh.toml (as an editor would, via rename) to exclude that port, then to include it
  again. Figure: from the rename to the start of the first request that took the new path
  (an upper bound: it includes up to one request's duration of polling).
- fail open: meshd is stopped (SIGSTOP, so it cannot restart Envoy), Envoy is killed, and
  once its listener has left the SOCKMAP one request is timed inside the client (connect +
  request + response) to the first port; then meshd continues and Envoy comes back.
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

from common import (REPO, take_charge, BenchBase, MeshdInstance, arg_parser, log,  # noqa: E402
                    save_results, wait_for)
from meshd import bpfsys  # noqa: E402

ECHO_SERVER = REPO / "tests" / "helpers" / "echo_server.py"
PORT, TOGGLED = 8080, 2222
VIA_ENVOY = "x-forwarded-proto"
# Requests to host:port, `count` of them (0 = until killed): one JSON line each with the
# wall-clock start and end and whether the request went through Envoy.
CLIENT = r"""
import http.client, json, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
n = 0
while count == 0 or n < count:
    n += 1
    rec = {"t0": time.time()}
    try:
        c = http.client.HTTPConnection(host, port, timeout=10)
        c.request("GET", "/echo")
        rec["via"] = "x-forwarded-proto" in json.loads(c.getresponse().read())["headers"]
        c.close()
    except Exception as e:
        rec["error"] = repr(e)
    rec["t1"] = time.time()
    print(json.dumps(rec), flush=True)
"""


class Timings(BenchBase):
    name = "timings"

    def setup(self):
        self.ns_c, self.ns_s = f"{self.prefix}c", f"{self.prefix}s"
        self.ip_c, self.ip_s = self.two_hosts(self.ns_c, self.ns_s, "10.237", f"{self.prefix}x")
        self.wl = self.cg_make("wl")
        server = self.cg_make("server")
        self.spawn_server(server, self.ns_s, sys.executable, ECHO_SERVER,
                          "--http", PORT, "--http", TOGGLED)
        self.mesh = MeshdInstance(self, "", self.wl, netns=self.ns_c, http_ports=[PORT, TOGGLED])
        self.meshds.append(self.mesh)
        self.mesh.start()
        self.mesh.wait_running()
        self.mesh_toml = Path(self.mesh.config_dir, "00-mesh.toml").read_text()
        wait_for(lambda: self.request(PORT).get("via"), 20, what="a request through Envoy")

    def client(self, port: int, count: int, **kw) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CLIENT, self.ip_s, str(port), str(count)],
                                preexec_fn=self.preexec(self.wl, netns=self.ns_c),
                                stdout=subprocess.PIPE, text=True, **kw)

    def request(self, port: int) -> dict:
        out, _ = self.client(port, 1).communicate(timeout=30)
        return json.loads(out)

    def write_mesh(self, extra: str) -> float:
        path = Path(self.mesh.config_dir, "00-mesh.toml")
        tmp = path.with_name(".00-mesh.toml.tmp")
        tmp.write_text(self.mesh_toml + extra)
        t = time.time()
        os.rename(tmp, path)
        return t

    def reload(self, reps: int) -> list[float]:
        poller = self.client(TOGGLED, 0)
        self.servers.append(poller)          # killed by cleanup if we fail
        took = []
        try:
            for rep in range(reps):
                for excluded in (True, False):
                    t = self.write_mesh(f"exclude_outbound_ports = [22, {TOGGLED}]\n"
                                        if excluded else "")
                    while True:
                        rec = json.loads(poller.stdout.readline())
                        if rec["t0"] > t and rec.get("via") is (not excluded):
                            took.append(rec["t0"] - t)
                            break
                    time.sleep(0.2)
        finally:
            poller.kill()
            poller.wait()
        return took

    def listener_up(self) -> bool:
        fd = bpfsys.obj_get(os.path.join(self.mesh.bpffs_dir, "v1", "maps", "envoy_listeners"))
        try:
            return bpfsys.map_lookup(fd, (0).to_bytes(4, "little"), 8) is not None
        finally:
            os.close(fd)

    def fail_open(self, reps: int) -> list[float]:
        took = []
        for rep in range(reps):
            pid = int(Path(self.mesh.state_dir, "envoy.pid").read_text())
            self.mesh.proc.send_signal(signal.SIGSTOP)
            try:
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not self.listener_up(), 10, what="Envoy's listener gone")
                rec = self.request(PORT)
                if "error" in rec or rec["via"]:
                    raise RuntimeError(f"the request did not fail open: {rec}")
                took.append(rec["t1"] - rec["t0"])
            finally:
                self.mesh.proc.send_signal(signal.SIGCONT)
            wait_for(self.listener_up, 30, what="Envoy back")
            wait_for(lambda: self.request(PORT).get("via"), 20, what="steered again")
        return took


def figures(xs: list[float]) -> dict:
    ms = sorted(x * 1000 for x in xs)
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 2),
            "min_ms": round(ms[0], 2), "max_ms": round(ms[-1], 2)}


def main() -> int:
    ap = arg_parser(__doc__)
    ap.set_defaults(reps=10)
    args = ap.parse_args()
    if not take_charge("timings.py"):
        return 1
    bench = Timings(args)
    try:
        bench.setup()
        log(f"prefix {bench.prefix}: reload x{2 * args.reps}")
        reload = bench.reload(args.reps)
        log(f"fail open x{args.reps}")
        fail_open = bench.fail_open(args.reps)
    finally:
        bench.cleanup()
    result = {"reload (rename -> new path)": figures(reload),
              "fail-open request (Envoy down)": figures(fail_open)}
    out = save_results(args.out, "timings", {"raw_s": {"reload": reload, "fail_open": fail_open},
                                             "figures": result})
    print("| timing | n | median ms | min ms | max ms |\n|---|---|---|---|---|")
    for k, f in result.items():
        print(f"| {k} | {f['n']} | {f['median_ms']} | {f['min_ms']} | {f['max_ms']} |")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
