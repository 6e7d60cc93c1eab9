"""Prometheus metrics on `[mesh] metrics_address`, served by python3-prometheus-client
from a thread of its own (the GLib loop never waits for a scrape).

A scrape reads the last snapshot the daemon took (every status tick: the
status model, Envoy's counters and meshd's own health), so only what is
configured now is exported: a removed workload's series end with it. Envoy's
own statistics for meshd's filter chains (stat prefixes <direction>_<http|tcp>
[_<workload id>], meshd/envoy_config.py) are read from its admin socket at
scrape time and re-exported with the same workload/direction/protocol labels.
Labels are bounded: workload, direction, protocol, response class, a map or
state name; never an address or a port. docs/observability.md lists them.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Dict, Optional

from . import maplayout
from .envoy import admin as envoy_admin

log = logging.getLogger("meshd")

STATES = ("starting", "running", "degraded", "stopped")
ENVOY_STATES = ("starting", "running", "restarting", "stopped")
DIRECTIONS = ("outbound", "inbound")
KINDS = ("http", "tcp")
# Envoy's tag extraction turns http.<prefix>. and tcp.<prefix>. into these labels.
_ENVOY_PREFIX_LABELS = ("envoy_http_conn_manager_prefix", "envoy_tcp_prefix")
_MESHD_PREFIX = re.compile(r"^(outbound|inbound)_(http|tcp)(?:_(\d+))?$")


@dataclass(frozen=True)
class Snapshot:
    """What the daemon knew at its last tick."""
    status: object = None                      # meshd.status.Status
    envoy_stats: Dict[str, int] = field(default_factory=dict)
    reloads: Dict[str, int] = field(default_factory=dict)    # "ok"/"rejected" -> count
    maps: Dict[str, tuple] = field(default_factory=dict)     # name -> (entries, capacity)
    flows: Dict[str, int] = field(default_factory=dict)      # received, logged, log_failed


def parse_address(addr: str) -> tuple:
    """"127.0.0.1:9464", "[::1]:9464" -> (family, (host, port)); "unix:/path" ->
    (AF_UNIX, path). ValueError names what is wrong."""
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path.startswith("/"):
            raise ValueError(f"expected unix:/absolute/path, got {addr!r}")
        return socket.AF_UNIX, path
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (port 1-65535) or unix:/path, got {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.inet_pton(fam, host)
    except OSError:
        raise ValueError(f"expected an IP address before the port, got {host!r}") from None
    return fam, (host, int(port))


class _Collector:
    def __init__(self, snapshot, admin_socket: str):
        self.snapshot, self.admin_socket = snapshot, admin_socket

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        snap: Snapshot = self.snapshot()
        st = snap.status
        if st is None:
            return
        C, G = CounterMetricFamily, GaugeMetricFamily

        info = G("meshd_info", "meshd's version", labels=["version"])
        info.add_metric([st.version], 1)
        state = G("meshd_state", "1 for meshd's current state", labels=["state"])
        for s in STATES:
            state.add_metric([s], float(st.state == s))
        envoy = G("meshd_envoy_state", "1 for Envoy's current state", labels=["state"])
        for s in sorted(set(ENVOY_STATES) | {st.envoy.state}):
            envoy.add_metric([s], float(st.envoy.state == s))
        restarts = C("meshd_envoy_restarts", "Envoy restarts by meshd")
        restarts.add_metric([], st.envoy.restarts)
        listening = G("meshd_envoy_listener_up",
                      "1 while Envoy's listener is in the data path (else: fail open)",
                      labels=["listener"])
        for name, up in sorted(st.envoy.listeners.items()):
            listening.add_metric([name], float(up))
        reloads = C("meshd_config_reloads", "configuration reloads", labels=["result"])
        for result in ("ok", "rejected"):
            reloads.add_metric([result], snap.reloads.get(result, 0))
        errors = G("meshd_config_errors", "errors in the rejected configuration (0: in force)")
        errors.add_metric([], len(st.config_errors))
        configured = G("meshd_workloads", "configured workloads, by whether they are enrolled",
                       labels=["state"])
        n_enrolled = sum(1 for w in st.workloads if w.enrolled_since)
        configured.add_metric(["enrolled"], n_enrolled)
        configured.add_metric(["not_enrolled"], len(st.workloads) - n_enrolled)
        enrolled = G("meshd_workload_enrolled", "1 while the workload is enrolled",
                     labels=["workload"])
        entries = G("meshd_map_entries", "entries in a BPF map", labels=["map"])
        capacity = G("meshd_map_capacity", "a BPF map's max_entries", labels=["map"])
        for name, (n, cap) in sorted(snap.maps.items()):
            entries.add_metric([name], n)
            capacity.add_metric([name], cap)
        flows = C("meshd_flow_records", "connection/request records received from Envoy")
        flows.add_metric([], snap.flows.get("received", 0))
        logged = C("meshd_flow_log_entries", "flow log entries written (after sampling)")
        logged.add_metric([], snap.flows.get("logged", 0))
        lost = C("meshd_flow_log_failures", "flow log entries that could not be written")
        lost.add_metric([], snap.flows.get("log_failed", 0))

        wl_labels = ["workload", "direction", "protocol"]
        cx = C("meshd_workload_connections", "connections through Envoy", labels=wl_labels)
        rq = C("meshd_workload_requests", "HTTP requests, by response class",
               labels=wl_labels + ["response_class"])
        sent = C("meshd_workload_sent_bytes", "bytes the workload sent through Envoy",
                 labels=wl_labels)
        recv = C("meshd_workload_received_bytes", "bytes the workload received through Envoy",
                 labels=wl_labels)
        dp = {name: C(f"meshd_datapath_{name}", f"data path: {name} (BPF counter)",
                      labels=["workload"]) for name in maplayout.COUNTERS}
        stats = snap.envoy_stats
        for w in st.workloads:
            enrolled.add_metric([w.name], float(bool(w.enrolled_since)))
            for name, v in w.counters.items():
                if name in dp:
                    dp[name].add_metric([w.name], v)
            for d in DIRECTIONS:
                for kind in KINDS:
                    p = f"{kind}.{d}_{kind}_{w.id}."
                    labels = [w.name, d, kind]
                    cx.add_metric(labels, stats.get(p + "downstream_cx_total", 0))
                    rx = stats.get(p + "downstream_cx_rx_bytes_total", 0)
                    tx = stats.get(p + "downstream_cx_tx_bytes_total", 0)
                    sent.add_metric(labels, rx if d == "outbound" else tx)
                    recv.add_metric(labels, tx if d == "outbound" else rx)
                    if kind == "http":
                        for cls in ("1xx", "2xx", "3xx", "4xx", "5xx"):
                            rq.add_metric(labels + [cls], stats.get(p + f"downstream_rq_{cls}", 0))
        for name, v in st.counters.items():   # slot 0: not attributed to a workload
            if name in dp:
                dp[name].add_metric([""], v)
        yield from (info, state, envoy, restarts, listening, reloads, errors, configured,
                    enrolled, entries, capacity, flows, logged, lost, cx, rq, sent, recv)
        yield from dp.values()
        if st.envoy.state == "running":
            yield from self._envoy(st)

    def _envoy(self, st):
        """Envoy's statistics of meshd's chains, with the workload's name."""
        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families
        names = {w.id: w.name for w in st.workloads}
        try:
            # the status names the socket in use (an Envoy adopted from an older meshd
            # serves its admin API at the old place)
            code, body = envoy_admin.get(st.envoy.admin_socket or self.admin_socket,
                                         "/stats/prometheus?usedonly",
                                         timeout=2.0)
            if code != 200:
                raise envoy_admin.AdminError(f"HTTP {code}")
            families = list(text_string_to_metric_families(body.decode("utf-8", "replace")))
        except (OSError, ValueError) as e:
            log.debug("metrics: Envoy's stats: %s", e)
            return
        for fam in families:
            server = fam.name.startswith("envoy_server_")
            out = Metric(fam.name, fam.documentation, fam.type)
            for s in fam.samples:
                labels = relabel(s.labels, names) if not server else (
                    {} if not s.labels else None)
                if labels is not None:
                    out.add_sample(s.name, labels, s.value)
            if out.samples:
                yield out


def relabel(labels: dict, names: dict) -> Optional[dict]:
    """Envoy's labels for one of meshd's chains -> workload/direction/protocol
    (the rest kept); None for anything else (listeners, clusters: they carry
    addresses) or a workload that is gone."""
    for key in _ENVOY_PREFIX_LABELS:
        m = _MESHD_PREFIX.match(labels.get(key, ""))
        if m:
            break
    else:
        return None
    d, kind, wid = m.groups()
    name = ""
    if wid is not None:
        name = names.get(int(wid))
        if name is None:
            return None
    out = {k: v for k, v in labels.items() if k not in _ENVOY_PREFIX_LABELS}
    out.update(workload=name, direction=d, protocol=kind)
    return out


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)   # http.server wants an (address, port) pair


class MetricsServer:
    """The scrape endpoint in a daemon thread; close() stops it."""

    def __init__(self, address: str, snapshot, admin_socket: str):
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import MetricsHandler
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(snapshot, admin_socket))
        handler = MetricsHandler.factory(registry)
        fam, where = parse_address(address)
        self.path = ""
        if fam == socket.AF_UNIX:
            try:
                os.unlink(where)
            except FileNotFoundError:
                pass
            self.server = _UnixHTTPServer(where, handler)
            self.path = where
        else:
            cls = type("_Server", (ThreadingHTTPServer,), {"address_family": fam})
            self.server = cls(where, handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
