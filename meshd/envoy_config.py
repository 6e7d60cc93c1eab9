"""Render Envoy's bootstrap and filesystem-xDS (LDS/CDS) files, and write them atomically.

Everything here is pure except :func:`write_config`.  The files are JSON (which Envoy reads
as YAML's subset); LDS and CDS are xDS ``DiscoveryResponse`` documents that Envoy reloads
when an entry is *moved into* the watched directory, so every write is a rename.
"""

from __future__ import annotations

import hashlib
import json
import os

from . import fsutil

# v3 type URLs ----------------------------------------------------------------------------
_T = "type.googleapis.com/"
T_LISTENER = _T + "envoy.config.listener.v3.Listener"
T_CLUSTER = _T + "envoy.config.cluster.v3.Cluster"
T_ORIGINAL_DST = _T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
T_HTTP_INSPECTOR = _T + "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
T_TCP_PROXY = _T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
T_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
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
# Envoy's connections to the local application come from here; sk_lookup lets
# them through instead of steering them back into Envoy (as Istio's 127.0.0.6;
# for IPv6 ::1, since ::6 is not a local address and replies to it get lost).
INBOUND_SOURCE_V4 = "127.0.0.6"
INBOUND_SOURCE_V6 = "::1"
T_ORIGINAL_SRC = _T + "envoy.extensions.filters.listener.original_src.v3.OriginalSrc"
T_FILE_ACCESS_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"

BOOTSTRAP = "bootstrap.json"
LDS = "lds.json"
CDS = "cds.json"
# Written in this order: clusters before the listeners that reference them.
_WRITE_ORDER = (CDS, LDS, BOOTSTRAP)

MAX_DOWNSTREAM_CONNECTIONS = 50000
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


def config_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "envoy")


def admin_socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, "envoy-admin.sock")


def access_log_path(state_dir: str) -> str:
    return os.path.join(state_dir, "access.log")


def bootstrap_path(state_dir: str) -> str:
    return os.path.join(config_dir(state_dir), BOOTSTRAP)


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
    sock = admin_socket_path(state_dir)
    if len(sock.encode()) > _SUN_PATH_MAX:
        raise ValueError(f"admin socket path too long for AF_UNIX ({len(sock)} bytes): {sock}")
    cdir = config_dir(state_dir)
    return {
        "node": {"id": "meshd", "cluster": "meshd"},
        "admin": {"address": {"pipe": {"path": sock, "mode": 0o600}}},
        "dynamic_resources": {
            "lds_config": _path_source(os.path.join(cdir, LDS), cdir),
            "cds_config": _path_source(os.path.join(cdir, CDS), cdir),
        },
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


def _access_log(path: str) -> list[dict]:
    """One JSON line per connection/request, with the client's real address."""
    fields = {"start": "%START_TIME%", "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
              "destination": "%DOWNSTREAM_LOCAL_ADDRESS%", "upstream": "%UPSTREAM_HOST%",
              "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%", "code": "%RESPONSE_CODE%",
              "bytes_received": "%BYTES_RECEIVED%", "bytes_sent": "%BYTES_SENT%",
              "duration_ms": "%DURATION%"}
    return [{"name": "envoy.access_loggers.file",
             "typed_config": {"@type": T_FILE_ACCESS_LOG, "path": path,
                              "log_format": {"json_format": fields}}}]


def _tcp_proxy(stat_prefix: str, cluster: str, access_log: str = "") -> dict:
    cfg = {"@type": T_TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster}
    if access_log:
        cfg["access_log"] = _access_log(access_log)
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": cfg}


def _http_connection_manager(stat_prefix: str = "outbound_http",
                             cluster: str = CLUSTER_ORIGINAL_DST, access_log: str = "") -> dict:
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": T_HCM,
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            # Inbound, the peer is the real client: append it to X-Forwarded-For so an
            # HTTP application can see who called even though Envoy connects to it.
            "use_remote_address": stat_prefix.startswith("inbound"),
            # Transparent: keep the upstream's Server header instead of writing "envoy".
            "server_header_transformation": "PASS_THROUGH",
            # Unconfigured upgrades are refused by Envoy; a transparent proxy must pass them.
            "upgrade_configs": [{"upgrade_type": "websocket"}],
            "route_config": {
                "name": f"meshd_{stat_prefix}",
                "virtual_hosts": [
                    {
                        "name": "original_dst",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                # 0s: no per-route timeout, so streaming responses work.
                                "route": {"cluster": cluster, "timeout": "0s"},
                            }
                        ],
                    }
                ],
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER}}
            ],
        },
    }
    if access_log:
        hcm["typed_config"]["access_log"] = _access_log(access_log)
    return hcm


def _listener_filters() -> dict:
    return {
        "listener_filters": [
            {"name": "envoy.filters.listener.original_dst",
             "typed_config": {"@type": T_ORIGINAL_DST}},
            {"name": "envoy.filters.listener.http_inspector",
             "typed_config": {"@type": T_HTTP_INSPECTOR}},
        ],
        # Server-first protocols (SMTP, MySQL, ...) send nothing: don't stall them long.
        "listener_filters_timeout": "1s",
        "continue_on_listener_filters_timeout": True,
    }


HTTP_PROTOCOLS = ["http/1.1", "h2c"]


WORKLOAD_NET4 = "127.77.0."  # + workload id: the source bpf/connect.c binds (meshd.h)


def workload_source(wid: int) -> str:
    return f"{WORKLOAD_NET4}{wid}"


def _workload_chains(direction: str, wid: int, match: dict, cluster: str,
                     access_log: str = "", tag: str = "") -> list[dict]:
    """HTTP and TCP chains for one workload, with stat prefixes
    <direction>_http_<id> / <direction>_tcp_<id>: Envoy's per-workload numbers."""
    return [
        {"name": f"{direction}_http_{wid}{tag}",
         "filter_chain_match": dict(match, application_protocols=HTTP_PROTOCOLS),
         "filters": [_http_connection_manager(f"{direction}_http_{wid}", cluster, access_log)]},
        {"name": f"{direction}_tcp_{wid}{tag}",
         "filter_chain_match": dict(match),
         "filters": [_tcp_proxy(f"{direction}_tcp_{wid}", cluster, access_log)]},
    ]


def render_inbound_listener(inbound_port: int, ipv6: bool, access_log: str,
                            client_mark: int = 0,
                            workload_ports: dict[int, list[int]] | None = None) -> dict:
    """sk_lookup hands connections for workload ports to this listener's socket;
    they keep their real addresses, so the local address is the destination.

    client_mark != 0: connect to the application from the client's own address
    (original_src), with that SO_MARK so policy routing brings replies back.
    workload_ports: workload id -> its meshed ports, for per-workload chains."""
    listener = {
        "name": LISTENER_INBOUND,
        "address": _addr("127.0.0.1", inbound_port),
        # Measured: without it the ORIGINAL_DST cluster answers 503 for sk_lookup'ed
        # connections (their local address is not the listener's).
        "transparent": True,
        **_listener_filters(),
        "filter_chains": [
            {
                # Somebody connected to the inbound port itself: nothing to forward to.
                "name": "inbound_miss",
                "filter_chain_match": {"destination_port": inbound_port},
                "filters": [_tcp_proxy("inbound_miss", CLUSTER_BLACKHOLE)],
            },
            {
                "name": "inbound_http",
                "filter_chain_match": {"application_protocols": HTTP_PROTOCOLS},
                "filters": [_http_connection_manager("inbound_http", CLUSTER_INBOUND, access_log)],
            },
        ],
        "default_filter_chain": {
            "name": "inbound_tcp",
            "filters": [_tcp_proxy("inbound_tcp", CLUSTER_INBOUND, access_log)],
        },
    }
    for wid, ports in sorted((workload_ports or {}).items()):
        for port in sorted(set(ports) - {inbound_port}):
            listener["filter_chains"] += _workload_chains(
                "inbound", wid, {"destination_port": port}, CLUSTER_INBOUND, access_log,
                tag=f"_{port}")
    if client_mark:  # before http_inspector: a filter timeout skips the filters after it
        listener["listener_filters"].insert(1,
            {"name": "envoy.filters.listener.original_src",
             "typed_config": {"@type": T_ORIGINAL_SRC, "mark": client_mark}})
    if ipv6:
        listener["additional_addresses"] = [{"address": _addr("::1", inbound_port)}]
    return listener


def render_listeners(outbound_port: int, ipv6: bool, workload_ids=()) -> list[dict]:
    listener: dict = {
        "name": LISTENER_OUTBOUND,
        "address": _addr("127.0.0.1", outbound_port),
        **_listener_filters(),
        "filter_chains": [
            {
                # Original destination not restored: the connection would loop back to us.
                # Fail it loudly and count it (tcp.outbound_miss.*).
                "name": "outbound_miss",
                "filter_chain_match": {"destination_port": outbound_port},
                "filters": [_tcp_proxy("outbound_miss", CLUSTER_BLACKHOLE)],
            },
            {
                "name": "outbound_http",
                "filter_chain_match": {"application_protocols": HTTP_PROTOCOLS},
                "filters": [_http_connection_manager()],
            },
        ],
        "default_filter_chain": {
            "name": "outbound_tcp",
            "filters": [_tcp_proxy("outbound_tcp", CLUSTER_ORIGINAL_DST)],
        },
    }
    for wid in sorted(workload_ids):
        src = {"source_prefix_ranges": [{"address_prefix": workload_source(wid), "prefix_len": 32}]}
        listener["filter_chains"] += _workload_chains("outbound", wid, src, CLUSTER_ORIGINAL_DST)
    if ipv6:
        listener["additional_addresses"] = [{"address": _addr("::1", outbound_port)}]
    return [listener]


def _original_dst_cluster(name: str) -> dict:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "original_dst_lb_config": {"use_http_header": False},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T_HTTP_PROTOCOL_OPTIONS,
                "use_downstream_protocol_config": {
                    "http_protocol_options": {},
                    "http2_protocol_options": {},
                },
            }
        },
    }


def render_clusters(ipv6: bool = True, client_mark: int = 0) -> list[dict]:
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
    ]


def render(outbound_port: int, inbound_port: int, state_dir: str, ipv6: bool,
           client_mark: int = 0,
           workload_ports: dict[int, list[int]] | None = None) -> dict[str, dict]:
    """Return {"bootstrap.json": ..., "lds.json": ..., "cds.json": ...}.

    workload_ports: enrolled workload id -> its meshed inbound ports; each
    workload gets its own filter chains, so Envoy counts it separately."""
    for name, port in (("outbound_port", outbound_port), ("inbound_port", inbound_port)):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"{name}: invalid port {port!r}")
    return {
        BOOTSTRAP: render_bootstrap(state_dir),
        LDS: _discovery_response(T_LISTENER, render_listeners(
            outbound_port, ipv6, (workload_ports or {}).keys()) + [render_inbound_listener(
                inbound_port, ipv6, access_log_path(state_dir), client_mark, workload_ports)]),
        CDS: _discovery_response(T_CLUSTER, render_clusters(ipv6, client_mark)),
    }


def dumps(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    fsutil.atomic_write(path, data, mode)


def write_config(state_dir: str, files: dict[str, dict]) -> list[str]:
    """Write ``files`` under ``{state_dir}/envoy/`` atomically (temp file, fsync, rename).

    A file whose content is unchanged is not touched (each rename makes Envoy reload).
    Returns the names of the files that were (re)written.
    """
    cdir = config_dir(state_dir)
    os.makedirs(cdir, mode=0o755, exist_ok=True)
    os.chmod(cdir, 0o755)
    order = [n for n in _WRITE_ORDER if n in files] + sorted(set(files) - set(_WRITE_ORDER))
    changed = []
    for name in order:
        if os.sep in name or name.startswith("."):
            raise ValueError(f"bad config file name: {name!r}")
        path = os.path.join(cdir, name)
        data = dumps(files[name])
        try:
            with open(path, "rb") as f:
                if f.read() == data:
                    continue
        except FileNotFoundError:
            pass
        _atomic_write(path, data)
        changed.append(name)
    return changed
