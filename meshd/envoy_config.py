"""Render Envoy's bootstrap and filesystem-xDS (LDS/CDS) files, and write them atomically.

Everything here is pure except :func:`write_config`.  The files are JSON (which Envoy reads
as YAML's subset); LDS and CDS are xDS ``DiscoveryResponse`` documents that Envoy reloads
when an entry is *moved into* the watched directory, so every write is a rename.
"""

from __future__ import annotations

import hashlib
import json
import os

from . import envoy_mtls, fsutil, maplayout, statefiles
from .envoy import identity

# v3 type URLs ----------------------------------------------------------------------------
_T = "type.googleapis.com/"
T_LISTENER = _T + "envoy.config.listener.v3.Listener"
T_CLUSTER = _T + "envoy.config.cluster.v3.Cluster"
T_ORIGINAL_DST = _T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
T_TCP_PROXY = _T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
T_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
T_PRESERVE_CASE = (
    _T + "envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig")
T_HTTP_PROTOCOL_OPTIONS = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
T_DOWNSTREAM_CONNECTIONS = (
    _T + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)

# names -------------------------------------------------------------------------------------
LISTENER_OUTBOUND = "meshd_outbound"
LISTENER_INBOUND = "meshd_inbound"
CLUSTER_ORIGINAL_DST = "meshd_original_dst"
CLUSTER_INBOUND = "meshd_inbound"
CLUSTER_BLACKHOLE = "meshd_blackhole"
CLUSTER_FLOWS = "meshd_flows"
# Envoy's connections to the local application come from here; sk_lookup lets
# them through instead of steering them back into Envoy (as Istio's 127.0.0.6;
# for IPv6 ::1, since ::6 is not a local address and replies to it get lost).
INBOUND_SOURCE_V4 = str(maplayout.ENVOY_INBOUND_SOURCE4)
INBOUND_SOURCE_V6 = "::1"
T_ORIGINAL_SRC = _T + "envoy.extensions.filters.listener.original_src.v3.OriginalSrc"
T_FLUENTD_ACCESS_LOG = _T + "envoy.extensions.access_loggers.fluentd.v3.FluentdAccessLogConfig"

BOOTSTRAP = "bootstrap.json"
LDS = "lds.json"
CDS = "cds.json"
# Written in this order: clusters before the listeners that reference them.
_WRITE_ORDER = (CDS, LDS, BOOTSTRAP)

MAX_DOWNSTREAM_CONNECTIONS = 50000
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


def config_dir(state_dir: str) -> str:
    return statefiles.path(state_dir, statefiles.ENVOY_CONFIG_DIR)


def admin_socket_path(state_dir: str) -> str:
    return statefiles.path(state_dir, statefiles.ENVOY_ADMIN)


def admin_socket_in_use(state_dir: str) -> str:
    """The running Envoy's admin socket: the legacy place for an Envoy started by a
    meshd from before <state_dir>/envoy-run (adopted across the upgrade)."""
    new, old = admin_socket_path(state_dir), statefiles.path(state_dir, statefiles.LEGACY_ENVOY_ADMIN)
    return old if not os.path.exists(new) and os.path.exists(old) else new


def flows_socket_path(state_dir: str) -> str:
    return statefiles.path(state_dir, statefiles.FLOWS_SOCKET)


def bootstrap_path(state_dir: str) -> str:
    return os.path.join(config_dir(state_dir), BOOTSTRAP)


def bootstrap_has_flows(state_dir: str) -> bool:
    """Does the bootstrap on disk (the one a running Envoy may have started from)
    define the flow-record cluster? True when there is none yet."""
    try:
        with open(bootstrap_path(state_dir)) as f:
            return CLUSTER_FLOWS in f.read()
    except FileNotFoundError:
        return True


def _addr(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": port}}


def _path_source(path: str, watched_dir: str) -> dict:
    return {
        "path_config_source": {"path": path, "watched_directory": {"path": watched_dir}},
        "resource_api_version": "V3",
    }


def _discovery_response(type_url: str, resources: list[dict]) -> dict:
    body = json.dumps(resources, sort_keys=True, separators=(",", ":")).encode()
    return {
        "version_info": hashlib.sha256(body).hexdigest()[:16],
        "type_url": type_url,
        "resources": [dict({"@type": type_url}, **r) for r in resources],
    }


def render_bootstrap(state_dir: str) -> dict:
    sock, flows = admin_socket_path(state_dir), flows_socket_path(state_dir)
    for path in (sock, flows):
        if len(path.encode()) > _SUN_PATH_MAX:
            raise ValueError(f"socket path too long for AF_UNIX ({len(path)} bytes): {path}")
    cdir = config_dir(state_dir)
    return {
        "node": {"id": "meshd", "cluster": "meshd"},
        # 0666 in a directory only Envoy's user and root's group may enter (0750):
        # meshd connects as root without CAP_DAC_OVERRIDE (meshd/envoy/identity.py)
        "admin": {"address": {"pipe": {"path": sock, "mode": 0o666}}},
        "dynamic_resources": {
            "lds_config": _path_source(os.path.join(cdir, LDS), cdir),
            "cds_config": _path_source(os.path.join(cdir, CDS), cdir),
        },
        "static_resources": {"clusters": [_flows_cluster(flows)]},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": T_DOWNSTREAM_CONNECTIONS,
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
    }


# One record per connection (tcp_proxy) or request (HTTP), streamed to meshd
# (meshd/flows.py) with the Fluentd forward protocol over a Unix socket: each
# worker batches records in memory and sends them every FLOW_FLUSH, with no
# file or disk write in Envoy; while meshd is not reading, a worker keeps at
# most FLOW_BUFFER bytes and then drops records (counted by Envoy as
# access_logs.meshd_flows.entries_lost), so traffic never waits for meshd.
# Every chain has the same logger config, so a worker shares one connection;
# meshd tells the chains apart by %FILTER_CHAIN_NAME% (named below).
FLOW_FLUSH = "0.2s"
FLOW_BUFFER = 256 * 1024
FLOW_RECORD = {"t": "%START_TIME(%s.%3f)%", "chain": "%FILTER_CHAIN_NAME%",
               "client": "%DOWNSTREAM_REMOTE_ADDRESS%", "local": "%DOWNSTREAM_LOCAL_ADDRESS%",
               "upstream": "%UPSTREAM_HOST%", "proto": "%PROTOCOL%",
               "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH):256%",
               "code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%",
               "rx": "%BYTES_RECEIVED%", "tx": "%BYTES_SENT%", "ms": "%DURATION%",
               # identity (docs/identity.md): the caller's verified SPIFFE ID ("-" for
               # plaintext), and why Envoy refused a request/connection (RBAC)
               "peer_id": "%DOWNSTREAM_PEER_URI_SAN%", "details": "%RESPONSE_CODE_DETAILS%",
               "termination": "%CONNECTION_TERMINATION_DETAILS%",
               "tls_failure": "%DOWNSTREAM_TRANSPORT_FAILURE_REASON%"}


def _access_log() -> list[dict]:
    return [{"name": "envoy.access_loggers.fluentd",
             "typed_config": {"@type": T_FLUENTD_ACCESS_LOG, "cluster": CLUSTER_FLOWS,
                              "tag": "meshd", "stat_prefix": "meshd_flows",
                              "buffer_flush_interval": FLOW_FLUSH,
                              "buffer_size_bytes": FLOW_BUFFER, "record": FLOW_RECORD,
                              # Reconnect soon after meshd restarts, forever.
                              "retry_options": {"backoff_options": {
                                  "base_interval": "0.2s", "max_interval": "2s"}}}}]


def _flows_cluster(socket_path: str) -> dict:
    """Where the records go: meshd's socket. Static (the Fluentd logger wants
    a bootstrap cluster), so it is in place before any listener."""
    return {"name": CLUSTER_FLOWS, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": CLUSTER_FLOWS, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": socket_path}}}}]}]}}


def _tcp_proxy(stat_prefix: str, cluster: str, access_log: bool = True) -> dict:
    cfg = {"@type": T_TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster,
           # No idle timeout of our own (Envoy's default is 1 h): a quiet
           # connection lives as long as the kernel and the peers let it.
           "idle_timeout": "0s"}
    if access_log:
        cfg["access_log"] = _access_log()
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": cfg}


# HTTP/1 as the peers wrote it: header names keep their case, and the upstream's
# reason phrase ("200 Fine Thanks") reaches the client.
_PRESERVE_CASE = {
    "header_key_format": {"stateful_formatter": {
        "name": "preserve_case",
        "typed_config": {"@type": T_PRESERVE_CASE, "forward_reason_phrase": True}}},
}
# No idle timeouts shorter than the kernel's; headers as large and many as a
# server may accept (Envoy's maximum).
_HTTP_COMMON = {"idle_timeout": "0s", "max_headers_count": 10000}


def _http_connection_manager(stat_prefix: str, cluster: str, access_log: bool = True,
                             forwarded_for: bool = False) -> dict:
    """Envoy's HTTP handling, set to change as little as Envoy allows (README
    "Transparency" lists what it still changes)."""
    hcm = {
        "@type": T_HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",   # HTTP/1.x, and h2c with prior knowledge
        "generate_request_id": False,
        # X-Forwarded-For only when the operator asks for it (inbound): Envoy
        # appends the peer only when it treats it as the remote address.
        "use_remote_address": forwarded_for,
        "skip_xff_append": not forwarded_for,
        "server_header_transformation": "PASS_THROUGH",
        "proxy_100_continue": True,   # the server answers Expect: 100-continue
        "stream_idle_timeout": "0s",  # long polls and quiet streams (default 5 min)
        "max_request_headers_kb": 8192,
        "common_http_protocol_options": _HTTP_COMMON,
        "http_protocol_options": dict(_PRESERVE_CASE, accept_http_10=True,
                                      allow_chunked_length=True),
        # Upgrades and CONNECT pass to the server, which answers them.
        "upgrade_configs": [{"upgrade_type": "websocket"}, {"upgrade_type": "CONNECT"}],
        "route_config": {
            "name": f"meshd_{stat_prefix}",
            # An inline route config names its clusters, and Envoy checks them
            # when the listener arrives: a chain to a cluster added in the same
            # update (an mTLS cluster still waiting for its SDS certificate, or
            # simply read after lds.json) made Envoy reject the whole listener,
            # and file-based LDS is not read again until lds.json changes. The
            # chains then kept sending plaintext to a host that refuses it.
            # Unchecked, a request meets the cluster as soon as it is warm.
            "validate_clusters": False,
            # What use_remote_address adds besides X-Forwarded-For.
            "request_headers_to_remove": (["x-envoy-external-address", "x-envoy-internal"]
                                          if forwarded_for else []),
            "virtual_hosts": [{
                "name": "original_dst",
                "domains": ["*"],
                "routes": [
                    {"match": {"connect_matcher": {}},
                     "route": {"cluster": cluster, "timeout": "0s",
                               "upgrade_configs": [{"upgrade_type": "CONNECT"}]}},
                    # 0s: no per-route timeout, so streaming responses work.
                    {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}},
                ],
            }],
        },
        # dynamic_stats off: the router's per-cluster stats by response code and its
        # upstream_rq_time histogram are looked up and charged on every request, and nothing
        # reads them (meshd exports only the http.*/tcp.* stats of its chains); Envoy's
        # cluster counters (upstream_rq_total, upstream_cx_*) stay. Measured with
        # bench/envoy_cost.py (variant meshd+dynstats).
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": T_ROUTER, "suppress_envoy_headers": True,
                                           "dynamic_stats": False}}],
    }
    if access_log:
        hcm["access_log"] = _access_log()
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


def _original_dst_filter() -> dict:
    # The only listener filter that always runs: it reads no bytes, so nothing
    # waits for the client to speak (no protocol sniffing: ports are declared).
    return {"name": "envoy.filters.listener.original_dst",
            "typed_config": {"@type": T_ORIGINAL_DST}}


def is_http(protocol: str) -> bool:
    return protocol != "tcp"


def _chain(name: str, match: dict, protocol: str, stat: str, cluster: str,
           access_log: bool = True, forwarded_for: bool = False) -> dict:
    """One filter chain; its stat prefix is <stat's direction>_<http|tcp><stat's suffix>,
    e.g. outbound_http_3: the numbers status reads per workload."""
    direction, _, suffix = stat.partition("_")
    kind = "http" if is_http(protocol) else "tcp"
    prefix = f"{direction}_{kind}{'_' + suffix if suffix else ''}"
    filt = (_http_connection_manager(prefix, cluster, access_log, forwarded_for)
            if kind == "http" else _tcp_proxy(prefix, cluster, access_log))
    chain = {"name": name, "filters": [filt]}
    if match:
        chain["filter_chain_match"] = match
    return chain


def render_inbound_listener(inbound_port: int, ipv6: bool, access_log: bool = True,
                            client_mark: int = 0,
                            workload_ports: dict[int, list[int]] | None = None,
                            protocols: dict[int, str] | None = None,
                            workload_protocols: dict[int, dict[int, str]] | None = None,
                            forwarded_for: bool = False,
                            mtls: envoy_mtls.MtlsInput | None = None) -> dict:
    """sk_lookup hands connections for workload ports to this listener's socket;
    they keep their real addresses, so the local address is the destination.

    client_mark != 0: connect to the application from the client's own address
    (original_src), with that SO_MARK so policy routing brings replies back.
    workload_ports: workload id -> its meshed ports, for per-workload chains.
    protocols: port -> protocol for every port; workload_protocols: a workload's
    own declarations for the ports it serves, over those."""
    protocols, workload_protocols = protocols or {}, workload_protocols or {}
    log = dict(access_log=access_log, forwarded_for=forwarded_for)
    chains = [{
        # Somebody connected to the inbound port itself: nothing to forward to.
        "name": "inbound_miss",
        "filter_chain_match": {"destination_port": inbound_port},
        "filters": [_tcp_proxy("inbound_miss", CLUSTER_BLACKHOLE, access_log)],
    }]
    if mtls:   # plaintext from other hosts refused (strict, allow_from)
        chains += envoy_mtls.refused_chains(
            mtls, workload_ports or {}, lambda stat: _tcp_proxy(stat, CLUSTER_BLACKHOLE, access_log))
    served = set()
    for wid, ports in sorted((workload_ports or {}).items()):
        for port in sorted(set(ports) - {inbound_port} - served):
            served.add(port)  # one chain per port: Envoy refuses duplicate matches
            proto = workload_protocols.get(wid, {}).get(port, protocols.get(port, "tcp"))
            chains.append(_chain(f"inbound_wl{wid}_port{port}", {"destination_port": port}, proto,
                                 f"inbound_{wid}", CLUSTER_INBOUND, **log))
    for port, proto in sorted(protocols.items()):
        if is_http(proto) and port not in served and port != inbound_port:
            chains.append(_chain(f"inbound_port{port}", {"destination_port": port}, proto,
                                 "inbound", CLUSTER_INBOUND, **log))
    listener = {
        "name": LISTENER_INBOUND,
        "address": _addr("127.0.0.1", inbound_port),
        # Measured: without it the ORIGINAL_DST cluster answers 503 for sk_lookup'ed
        # connections (their local address is not the listener's).
        "transparent": True,
        "listener_filters": [_original_dst_filter()],
        "filter_chains": chains,
        "default_filter_chain": _chain("inbound_tcp", {}, "tcp", "inbound", CLUSTER_INBOUND,
                                       access_log),
    }
    listener["listener_filters"] += _original_src(client_mark)
    if ipv6:
        listener["additional_addresses"] = [{"address": _addr("::1", inbound_port)}]
    return listener


def _original_src(client_mark: int) -> list[dict]:
    if not client_mark:
        return []
    return [{"name": "envoy.filters.listener.original_src",
             "typed_config": {"@type": T_ORIGINAL_SRC, "mark": client_mark}}]


def render_mtls_listener(mtls: envoy_mtls.MtlsInput, ipv6: bool, access_log: bool,
                         client_mark: int, workload_ports: dict[int, list[int]],
                         protocols: dict[int, str], workload_protocols: dict[int, dict[int, str]],
                         forwarded_for: bool = False) -> dict:
    """The listener other meshd hosts call with mTLS (meshd/envoy_mtls.py); it
    forwards to the workload as the inbound listener does."""
    def proxy(port: int, stat: str, allow) -> dict:
        wid = int(stat.rpartition("_")[2])
        proto = workload_protocols.get(wid, {}).get(port, protocols.get(port, "tcp"))
        if not is_http(proto):
            return _tcp_proxy(f"inbound_tcp_{wid}", CLUSTER_INBOUND, access_log)
        hcm = _http_connection_manager(f"inbound_http_{wid}", CLUSTER_INBOUND, access_log,
                                       forwarded_for)
        tc = hcm["typed_config"]
        # The caller's verified identity for the application: x-forwarded-client-cert
        # "By=<this workload's ID>;Hash=<cert sha256>;URI=<the caller's SPIFFE ID>"
        # (a client's own header is replaced, never trusted).
        tc["forward_client_cert_details"] = "SANITIZE_SET"
        tc["set_current_client_cert_details"] = {"uri": True}
        if allow is not None:
            tc["http_filters"].insert(0, envoy_mtls.http_rbac(allow))
        return hcm
    return envoy_mtls.mtls_listener(mtls, workload_ports, ipv6, _original_src(client_mark),
                                    proxy)


def render_listeners(outbound_port: int, ipv6: bool, workload_ids=(),
                     protocols: dict[int, str] | None = None,
                     access_log: bool = True,
                     mtls: envoy_mtls.MtlsInput | None = None) -> list[dict]:
    """The outbound listener. A connection's chain is chosen by its original
    destination port (protocols) and its workload (source 127.77.0.<id>).
    Envoy matches the destination port before the source, so each workload
    gets a chain for every declared port, next to its catch-all TCP chain."""
    declared = sorted((protocols or {}).items())
    chains = [{
        # Original destination not restored: the connection would loop back to us.
        # Fail it loudly and count it (tcp.outbound_miss.*).
        "name": "outbound_miss",
        "filter_chain_match": {"destination_port": outbound_port},
        "filters": [_tcp_proxy("outbound_miss", CLUSTER_BLACKHOLE, access_log)],
    }]
    for wid in sorted(workload_ids):
        src = {"source_prefix_ranges": [{"address_prefix": maplayout.workload_source4(wid), "prefix_len": 32}]}
        for port, proto in declared:
            chains.append(_chain(f"outbound_wl{wid}_port{port}", dict(src, destination_port=port),
                                 proto, f"outbound_{wid}", CLUSTER_ORIGINAL_DST, access_log))
        chains.append(_chain(f"outbound_wl{wid}", src, "tcp", f"outbound_{wid}",
                             CLUSTER_ORIGINAL_DST, access_log))
    if mtls:   # to meshed workloads on other hosts: mTLS with the caller's identity
        chains += envoy_mtls.outbound_chains(
            mtls, maplayout.workload_source4,
            lambda name, match, port, stat, cluster: _chain(
                name, match, (protocols or {}).get(port, "tcp"), stat, cluster, access_log))
    for port, proto in declared:   # connections no workload address tells apart (IPv6)
        chains.append(_chain(f"outbound_port{port}", {"destination_port": port}, proto,
                             "outbound", CLUSTER_ORIGINAL_DST, access_log))
    default = _chain("outbound_tcp", {}, "tcp", "outbound", CLUSTER_ORIGINAL_DST, access_log)
    listener: dict = {
        "name": LISTENER_OUTBOUND,
        "address": _addr("127.0.0.1", outbound_port),
        "listener_filters": [_original_dst_filter()],
        "filter_chains": chains,
        "default_filter_chain": default,
    }
    if ipv6:
        listener["additional_addresses"] = [{"address": _addr("::1", outbound_port)}]
    return [listener]


# A destination that never answers: the kernel gives up on a SYN after about
# 127 s (tcp_syn_retries = 6); Envoy must not give up sooner than the
# application's own connect() would have.
CONNECT_TIMEOUT = "130s"


# An HTTP server connection with no request in flight is closed after this long.
# Envoy keeps a per-client-connection pool's server connection open after the client
# has gone (it does not couple the two); with no idle timeout every closed client
# connection on an HTTP port left one server connection behind for good, and after
# 1,024 of them (the default circuit breaker) new ones failed. Measured with
# bench/run.py (one request per connection).
UPSTREAM_IDLE_TIMEOUT = "1s"
# Envoy's default circuit breakers (1,024 connections, pending and active requests
# per cluster) are a limit the host did not have without the mesh.
_NO_CIRCUIT_BREAKER = {"thresholds": [{
    "max_connections": MAX_DOWNSTREAM_CONNECTIONS, "max_pending_requests": MAX_DOWNSTREAM_CONNECTIONS,
    "max_requests": MAX_DOWNSTREAM_CONNECTIONS}]}


def _original_dst_cluster(name: str) -> dict:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": CONNECT_TIMEOUT,
        "original_dst_lb_config": {"use_http_header": False},
        # A server connection serves one client connection, as without the mesh.
        "connection_pool_per_downstream_connection": True,
        "circuit_breakers": _NO_CIRCUIT_BREAKER,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T_HTTP_PROTOCOL_OPTIONS,
                "common_http_protocol_options": dict(_HTTP_COMMON,
                                                     idle_timeout=UPSTREAM_IDLE_TIMEOUT),
                "use_downstream_protocol_config": {
                    "http_protocol_options": _PRESERVE_CASE,
                    "http2_protocol_options": {},
                },
            }
        },
    }


def render_clusters(ipv6: bool = True, client_mark: int = 0,
                    mtls: envoy_mtls.MtlsInput | None = None) -> list[dict]:
    inbound = _original_dst_cluster(CLUSTER_INBOUND)
    if not client_mark:   # else original_src binds the client's address
        bind = {"source_address": {"address": INBOUND_SOURCE_V4, "port_value": 0}}
        if ipv6:  # ::6 would need an address on lo: ::1 is the IPv6 twin (sk_lookup skips it)
            bind["extra_source_addresses"] = [
                {"address": {"address": INBOUND_SOURCE_V6, "port_value": 0}}]
        inbound["upstream_bind_config"] = bind
    return [
        inbound,
        _original_dst_cluster(CLUSTER_ORIGINAL_DST),
        {
            "name": CLUSTER_BLACKHOLE,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": CLUSTER_BLACKHOLE, "endpoints": []},
        },
    ] + (envoy_mtls.clusters(mtls, _original_dst_cluster) if mtls else [])


CONTAINER_PREFIX = "meshd_ctr_"


def _in_netns(addr: dict, netns: str) -> dict:
    return {"socket_address": dict(addr["socket_address"], network_namespace_filepath=netns)}


def render_container(key: str, netns: str, workload_id: int, outbound_port: int,
                     protocols: dict[int, str] | None = None,
                     access_log: bool = True) -> tuple[dict, dict]:
    """A container network namespace (one a Podman pod, whose containers share
    it; `key` names it: "ns<cookie>"): Envoy's outbound listener inside it
    (connect4 there sends to 127.0.0.1:<outbound_port>),
    and an ORIGINAL_DST cluster whose connections are made from inside it too,
    so the server sees the container's own address, as without meshd. Its
    chains count into the workload's numbers (same stat prefixes)."""
    name = CONTAINER_PREFIX + key
    chains = [{"name": "outbound_miss", "filter_chain_match": {"destination_port": outbound_port},
               "filters": [_tcp_proxy("outbound_miss", CLUSTER_BLACKHOLE, access_log)]}]
    for port, proto in sorted((protocols or {}).items()):
        chains.append(_chain(f"outbound_port{port}", {"destination_port": port}, proto,
                             f"outbound_{workload_id}", name, access_log))
    listener = {
        "name": name,
        "address": _in_netns(_addr("127.0.0.1", outbound_port), netns),
        "listener_filters": [_original_dst_filter()],
        "filter_chains": chains,
        "default_filter_chain": _chain("outbound_tcp", {}, "tcp", f"outbound_{workload_id}",
                                       name, access_log),
    }
    cluster = _original_dst_cluster(name)
    cluster["upstream_bind_config"] = {"source_address": _in_netns(_addr("0.0.0.0", 0), netns)[
        "socket_address"]}
    return listener, cluster


def render_container_inbound(key: str, netns: str, workload_id: int, inbound_port: int,
                             client_mark: int = 0, protocols: dict[int, str] | None = None,
                             access_log: bool = True, forwarded_for: bool = False
                             ) -> tuple[dict, dict]:
    """A container namespace's inbound listener (sk_lookup linked
    there hands it connections for the ports the container listens on), and
    the cluster that connects to the application from inside the namespace:
    from the client's own address (original_src, with the mark the policy
    routing in that namespace follows), or from 127.0.0.6."""
    name = f"{CONTAINER_PREFIX}{key}_in"
    log = dict(access_log=access_log, forwarded_for=forwarded_for)
    chains = [{"name": "inbound_miss", "filter_chain_match": {"destination_port": inbound_port},
               "filters": [_tcp_proxy("inbound_miss", CLUSTER_BLACKHOLE, access_log)]}]
    for port, proto in sorted((protocols or {}).items()):
        if port != inbound_port:
            chains.append(_chain(f"inbound_port{port}", {"destination_port": port}, proto,
                                 f"inbound_{workload_id}", name, **log))
    listener = {
        "name": name,
        "address": _in_netns(_addr("127.0.0.1", inbound_port), netns),
        "transparent": True,
        "listener_filters": [_original_dst_filter()],
        "filter_chains": chains,
        "default_filter_chain": _chain("inbound_tcp", {}, "tcp", f"inbound_{workload_id}",
                                       name, access_log),
    }
    if client_mark:
        listener["listener_filters"].append(
            {"name": "envoy.filters.listener.original_src",
             "typed_config": {"@type": T_ORIGINAL_SRC, "mark": client_mark}})
    cluster = _original_dst_cluster(name)
    source = "0.0.0.0" if client_mark else INBOUND_SOURCE_V4
    cluster["upstream_bind_config"] = {"source_address": _in_netns(_addr(source, 0), netns)[
        "socket_address"]}
    return listener, cluster


def render(outbound_port: int, inbound_port: int, state_dir: str, ipv6: bool,
           client_mark: int = 0,
           workload_ports: dict[int, list[int]] | None = None,
           protocols: dict[int, str] | None = None,
           workload_protocols: dict[int, dict[int, str]] | None = None,
           forwarded_for: bool = False, access_log: bool = True,
           containers: tuple[tuple[str, str, int], ...] = (),
           mtls: envoy_mtls.MtlsInput | None = None) -> dict[str, dict]:
    """Return {"bootstrap.json": ..., "lds.json": ..., "cds.json": ...}.

    workload_ports: enrolled workload id -> its meshed inbound ports; each
    workload gets its own filter chains, so Envoy counts it separately.
    protocols / workload_protocols: see render_inbound_listener.
    containers: (key, namespace path, workload id) per container network
    namespace (render_container).
    mtls: identities are on (mesh.trust_domain): see meshd/envoy_mtls.py."""
    for name, port in (("outbound_port", outbound_port), ("inbound_port", inbound_port)):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"{name}: invalid port {port!r}")
    ctr = []
    for key, netns, wid in sorted(containers):
        protos = {**(protocols or {}), **(workload_protocols or {}).get(wid, {})}
        ctr.append(render_container(key, netns, wid, outbound_port, protos, access_log))
        ctr.append(render_container_inbound(key, netns, wid, inbound_port, client_mark, protos,
                                            access_log, forwarded_for))
    listeners = render_listeners(outbound_port, ipv6, (workload_ports or {}).keys(), protocols,
                                 access_log, mtls) + [
        render_inbound_listener(inbound_port, ipv6, access_log, client_mark, workload_ports,
                                protocols, workload_protocols, forwarded_for, mtls)]
    if mtls:
        listeners.append(render_mtls_listener(mtls, ipv6, access_log, client_mark,
                                              workload_ports or {}, protocols or {},
                                              workload_protocols or {}, forwarded_for))
    return {
        BOOTSTRAP: render_bootstrap(state_dir),
        LDS: _discovery_response(T_LISTENER, listeners + [listener for listener, _ in ctr]),
        CDS: _discovery_response(T_CLUSTER, render_clusters(ipv6, client_mark, mtls)
                                 + [cluster for _, cluster in ctr]),
    }


def dumps(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def write_config(state_dir: str, files: dict[str, dict]) -> list[str]:
    """Write ``files`` under ``{state_dir}/envoy/`` atomically (temp file, fsync, rename).

    A file whose content is unchanged is not touched (each rename makes Envoy reload).
    Returns the names of the files that were (re)written.
    """
    cdir = config_dir(state_dir)
    gid = identity.envoy_group()   # Envoy reads them; no one else may
    identity.make_dir(cdir, 0, gid, 0o750)
    run = statefiles.path(state_dir, statefiles.ENVOY_RUN_DIR)
    if not os.path.isdir(run):   # the daemon prepares it first (identity.prepare_run_dir)
        identity.make_dir(run, 0, gid, 0o770)
    order = [n for n in _WRITE_ORDER if n in files] + sorted(set(files) - set(_WRITE_ORDER))
    changed = []
    for name in order:
        if os.sep in name or name.startswith("."):
            raise ValueError(f"bad config file name: {name!r}")
        path = os.path.join(cdir, name)
        if fsutil.write_if_changed(path, dumps(files[name]), mode=0o640, gid=gid):
            changed.append(name)
    return changed
