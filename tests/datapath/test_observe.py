"""Observability end to end: a real Prometheus scrapes meshd's metrics, the flow
log (file form) has every connection and request, and `meshd observe --follow`
streams them (docs/observability.md)."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import HTTP_PORT, MESHD, TCP_PORT, free_port, preexec, wait_for

PROMETHEUS = "/usr/bin/prometheus"


def _curl_codes(mesh, url_base: str, paths: list[str], cgroup=None) -> list[int]:
    """One curl per path (a connection and a request each); the status codes."""
    codes = []
    for p in paths:
        r = mesh.run_in("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                        "10", url_base + p, cgroup=cgroup)
        codes.append(int(r.stdout or 0))
    return codes


class Prometheus:
    """Debian's prometheus in the mesh's namespace, scraping meshd every second."""

    def __init__(self, mesh, target: str):
        self.mesh, self.port = mesh, free_port()
        d = Path(mesh.tmp, "prometheus")
        d.mkdir()
        cfg = d / "prometheus.yml"
        cfg.write_text(json.dumps({   # YAML's JSON subset
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "meshd",
                                "static_configs": [{"targets": [target]}]}]}))
        self.log = open(d / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={d / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=preexec(netns=mesh.netns))

    def wait_ready(self) -> None:
        """Until /-/ready answers 200: Prometheus listens before its storage is open,
        and answers every query with 503 "Service Unavailable" until then."""
        url = f"http://127.0.0.1:{self.port}/-/ready"
        wait_for(lambda: self.mesh.ns_run("curl", "-sf", "--max-time", "5", url,
                                          check=False).returncode == 0,
                 timeout=30, what="Prometheus ready")

    def query(self, q: str, time: float | None = None) -> dict:
        """Instant query (now, or at `time`) -> {labels tuple: value}. Once ready
        (wait_ready), Prometheus answers every query: an error is a failure."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?query=" + urllib.parse.quote(q)
        if time is not None:
            url += f"&time={time:.3f}"
        r = self.mesh.ns_run("curl", "-sS", "--max-time", "10", url, check=False)
        assert r.returncode == 0, f"{q}: {r.stderr}"
        doc = json.loads(r.stdout)
        assert doc["status"] == "success", doc
        return {tuple(sorted(x["metric"].items())): float(x["value"][1])
                for x in doc["data"]["result"]}

    def by(self, q: str, label: str = "workload", **kw) -> dict:
        return {dict(k).get(label, ""): v for k, v in self.query(q, **kw).items()}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def two_workloads(mesh, server):
    """meshd with workloads wl and wl2 (both send HTTP to the server host),
    metrics on a test port in the mesh's namespace, the flow log in a file."""
    metrics, app_port = f"127.0.0.1:{free_port()}", free_port()
    wl2 = mesh.cg.make("wl2")
    mesh.configure_mesh(http_ports=[app_port], metrics_address=metrics, flow_logs="file")
    mesh.write("10-workloads.toml", f'[workload.wl]\ncgroup = "{mesh.workload}"\n'
                                    f'[workload.wl2]\ncgroup = "{wl2}"\n')
    mesh.start()
    wait_for(lambda: sum(1 for w in mesh.status()["workloads"] if w["enrolled_since"]) == 2,
             what="both workloads enrolled")
    return mesh, server, metrics, wl2, app_port


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="Debian's prometheus is not installed")
def test_prometheus_scrapes_per_workload_requests_and_forgets_removed(two_workloads):
    mesh, server, metrics, wl2, _ = two_workloads
    base = f"http://{server.ip4}:{HTTP_PORT}"
    total = 'sum by (workload) (meshd_workload_requests_total{direction="outbound"})'
    prom = Prometheus(mesh, metrics)
    try:
        prom.wait_ready()
        # Before the traffic: Prometheus holds both workloads at zero.
        wait_for(lambda: prom.by(total) == {"wl": 0.0, "wl2": 0.0}, timeout=30,
                 what="a scrape with both workloads at zero")
        t0 = time.time()
        # Counted on the client side: what each workload sent and what came back.
        sent = {
            "wl": _curl_codes(mesh, base, ["/echo"] * 12 + ["/status/503"] * 4 + ["/x"] * 2),
            "wl2": _curl_codes(mesh, base, ["/echo"] * 5 + ["/status/500"], cgroup=wl2),
        }
        assert sent["wl"].count(200) == 12 and sent["wl"].count(503) == 4
        assert sent["wl"].count(404) == 2 and sent["wl2"].count(500) == 1
        want = {w: float(len(c)) for w, c in sent.items()}
        wait_for(lambda: prom.by(total) == want, timeout=30, what=f"{total} == {want}")
        # The request rate since t0, exactly (no extrapolation: @ instead of rate()) ...
        t = time.time()
        at_t0 = (f'sum by (workload) (meshd_workload_requests_total{{direction="outbound"}} '
                 f'@ {t0:.3f})')
        rate = prom.by(f"({total} - {at_t0}) / {t - t0:.3f}", time=t)
        assert rate.keys() == want.keys()
        for w, n in want.items():
            assert rate[w] == pytest.approx(n / round(t - t0, 3), rel=1e-9)
        # ... and as docs/observability.md writes it: rate() sees both.
        assert all(v > 0 for v in prom.by(
            "sum by (workload) (rate(meshd_workload_requests_total[1m]))").values())
        # The error ratio (5xx over all), as docs/observability.md writes it, over the totals.
        ratio = prom.by('sum by (workload) (meshd_workload_requests_total{response_class="5xx"})'
                        ' / sum by (workload) (meshd_workload_requests_total)')
        assert ratio == {w: sum(c >= 500 for c in codes) / len(codes)
                         for w, codes in sent.items()}
        # Envoy's own statistics, re-exported with the workload's name.
        hist = "sum by (workload) (envoy_http_downstream_rq_time_count)"
        wait_for(lambda: prom.by(hist) == want, timeout=30, what=f"{hist} == {want}")
        assert prom.by("sum by (workload) (meshd_datapath_redirected_total)")["wl"] >= 18
        assert prom.query("meshd_envoy_state") and prom.by(
            'meshd_envoy_state == 1', "state") == {"running": 1.0}
        # No address or port in any label of any series.
        series = prom.query('{job="meshd"}')
        for labels, _ in series.items():
            for k, v in labels:
                if k not in ("instance", "__name__"):
                    assert server.ip4 not in v and str(HTTP_PORT) not in v, (k, v)

        # wl2 goes away: its series stop being exported.
        mesh.write("10-workloads.toml", f'[workload.wl]\ncgroup = "{mesh.workload}"\n')
        wait_for(lambda: "wl2" not in prom.by(total) and "wl2" not in prom.by(hist)
                 and "wl2" not in prom.by("sum by (workload) (meshd_workload_enrolled)"),
                 timeout=30, what="wl2's series gone")
        assert prom.by(total)["wl"] == want["wl"]
    finally:
        prom.stop()


def _flows(mesh) -> list[dict]:
    try:
        text = Path(mesh.state_dir, "flows.log").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def test_flow_log_has_every_request_and_connection(two_workloads):
    mesh, server, _, wl2, app_port = two_workloads
    base = f"http://{server.ip4}:{HTTP_PORT}"
    paths = [f"/status/{200 + i}" for i in range(5)] + ["/status/503", "/payload"]
    codes = _curl_codes(mesh, base, paths)
    tcp = mesh.run_in("sh", "-c", f"echo ping | nc -N -w 5 {server.ip4} {TCP_PORT}")
    assert tcp.returncode == 0, tcp.stderr
    app = mesh.echo_server("--http", str(app_port))   # wl serves: inbound
    try:
        wait_for(lambda: app_port in mesh.status()["workloads"][0]["inbound_ports"],
                 what="the workload's port meshed")
        r = server.curl(f"http://{server.host_ip4}:{app_port}/echo")
        assert r.returncode == 0, r.stderr
    finally:
        app.kill()
        app.wait()

    def found():
        recs = _flows(mesh)
        http = [r for r in recs if r["direction"] == "outbound" and r["protocol"] == "http"]
        conns = [r for r in recs if r["protocol"] == "tcp" and r["workload"] == "wl"]
        inbound = [r for r in recs if r["direction"] == "inbound"]
        return len(http) >= len(paths) and conns and inbound and (http, conns, inbound)
    http, conns, inbound = wait_for(found, timeout=15, what="flow log records")
    assert sorted((r["path"], r["status"]) for r in http) == sorted(
        (p, str(c)) for p, c in zip(paths, codes))
    for r in http:
        assert r["workload"] == "wl" and r["method"] == "GET"
        assert r["peer"] == r["destination"] == f"{server.ip4}:{HTTP_PORT}"
        # HTTP records count body bytes (as Envoy's access log does): a GET sends none.
        assert r["bytes_sent"] == 0 and r["duration_ms"] >= 0
        assert r["bytes_received"] == (256 * 1024 if r["path"] == "/payload" else 0)
    (c,) = conns
    assert c["direction"] == "outbound" and c["peer"] == f"{server.ip4}:{TCP_PORT}"
    assert c["status"] == "ok"
    assert c["bytes_sent"] == len("ping\n")
    assert c["bytes_received"] == len(f"hello {server.host_ip4}\n") + len("ping\n")
    (i,) = inbound
    assert i["workload"] == "wl" and i["path"] == "/echo" and i["status"] == "200"
    assert i["peer"].startswith(server.ip4 + ":")        # who talked to wl
    assert i["destination"] == f"{server.host_ip4}:{app_port}"
    assert i["bytes_sent"] > 0 and i["bytes_received"] == 0   # the JSON answer; a GET


def test_observe_follow_json_shows_each_request(meshed):
    mesh, server = meshed
    proc = subprocess.Popen(MESHD + ["observe", "--config-dir", mesh.config_dir, "--json",
                                     "--follow", "--workload", "wl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mesh.env())
    seen: dict[str, float] = {}

    def read():
        for line in proc.stdout:
            seen[json.loads(line)["path"]] = time.monotonic()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: os.path.exists(os.path.join(mesh.state_dir, "observe.sock")),
                 what="observe socket")
        time.sleep(0.2)   # observe has connected (it exits 3 if it could not)
        assert proc.poll() is None, proc.stderr.read()
        lags = []
        for i in range(5):
            path = f"/status/{200 + i}?n={i}"
            sent = time.monotonic()
            (code,) = _curl_codes(mesh, f"http://{server.ip4}:{HTTP_PORT}", [path])
            assert code == 200 + i
            wait_for(lambda: path in seen, timeout=10, what=f"{path} in meshd observe")
            lags.append(seen[path] - sent)
        print(f"meshd observe lag per request (s): {[round(x, 3) for x in lags]}")
    finally:
        proc.terminate()
        proc.wait(10)
    # Without --follow: what the daemon keeps, filtered.
    r = mesh.cli("observe", "--json", "--status", "2xx")
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and len(recs) == 5
    assert all(x["workload"] == "wl" and x["status"].startswith("2") for x in recs)
    text = mesh.cli("observe", "--status", "203").stdout
    assert "GET /status/203?n=3 203" in text and f"wl -> {server.ip4}:{HTTP_PORT}" in text
