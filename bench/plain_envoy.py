"""The iptables anchor's proxy: a plain Envoy config, as an Istio/Consul sidecar without
policy would run it, and the process that serves it.

The config is the minimum that proxies what iptables REDIRECT hands it: listeners on
0.0.0.0 (REDIRECT rewrites to 127.0.0.1 in OUTPUT and to the incoming interface's address
in PREROUTING), the original_dst listener filter (conntrack answers SO_ORIGINAL_DST), an
HTTP connection manager with only the router on the HTTP ports, tcp_proxy on every other
port, and an ORIGINAL_DST cluster with Envoy's defaults. `render` is pure (unit-tested
and validated by `envoy --mode validate`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meshd.envoy.admin import stats as envoy_stats  # noqa: E402

_T = "type.googleapis.com/envoy."
T_ORIGINAL_DST = _T + "extensions.filters.listener.original_dst.v3.OriginalDst"
T_TCP_PROXY = _T + "extensions.filters.network.tcp_proxy.v3.TcpProxy"
T_HCM = _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_ROUTER = _T + "extensions.filters.http.router.v3.Router"
CLUSTER = "original_dst"


def _http(stat: str) -> dict:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": T_HCM, "stat_prefix": stat, "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster": CLUSTER, "timeout": "0s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": T_ROUTER}}]}}


def _tcp(stat: str) -> dict:
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": T_TCP_PROXY, "stat_prefix": stat, "cluster": CLUSTER}}


def _listener(name: str, port: int, http_ports) -> dict:
    chains = [{"filter_chain_match": {"destination_port": p}, "filters": [_http(f"{name}_http")]}
              for p in sorted(http_ports)]
    return {"name": name,
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "listener_filters": [{"name": "envoy.filters.listener.original_dst",
                                  "typed_config": {"@type": T_ORIGINAL_DST}}],
            "filter_chains": chains,
            "default_filter_chain": {"filters": [_tcp(f"{name}_tcp")]}}


def render(admin_socket: str, outbound_port: int, inbound_port: int, http_ports) -> dict:
    """Bootstrap with two static listeners, "anchor_out" (Istio's 15001) and
    "anchor_in" (15006); their stats are http.anchor_{out,in}_http.* and
    tcp.anchor_{out,in}_tcp.*."""
    return {
        "admin": {"address": {"pipe": {"path": admin_socket}}},
        "static_resources": {
            "listeners": [_listener("anchor_out", outbound_port, http_ports),
                          _listener("anchor_in", inbound_port, http_ports)],
            "clusters": [{"name": CLUSTER, "type": "ORIGINAL_DST",
                          "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "5s"}],
        },
    }


class PlainEnvoy:
    """One plain Envoy in its own cgroup and network namespace."""

    def __init__(self, base, name: str, netns: str, http_ports, free_port):
        self.base, self.name, self.netns = base, name, netns
        self.outbound_port, self.inbound_port = free_port(), free_port()
        self.admin = os.path.join(base.tmp, f"{name}-admin.sock")
        self.cgroup = base.cg_make(f"{name}envoy")
        self.bootstrap = os.path.join(base.tmp, f"{name}-envoy.json")
        Path(self.bootstrap).write_text(json.dumps(
            render(self.admin, self.outbound_port, self.inbound_port, http_ports), indent=1))
        self.proc: subprocess.Popen | None = None

    def start(self, binary: str, extra_args=()) -> None:
        log = open(os.path.join(self.base.tmp, f"{self.name}-envoy.log"), "a")
        self.proc = subprocess.Popen(
            [binary, "-c", self.bootstrap, "-l", "warning", "--disable-hot-restart",
             *extra_args], stdout=log, stderr=log,
            preexec_fn=self.base.preexec(self.cgroup, netns=self.netns))
        self.base.servers.append(self.proc)   # killed with the servers at cleanup

    def stats(self) -> dict[str, int]:
        return envoy_stats(self.admin)

    @property
    def pid(self) -> int:
        return self.proc.pid
