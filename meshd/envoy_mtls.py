"""Render the identity parts of Envoy's config: mTLS between hosts, strict
inbound, allow_from (RBAC). Pure; meshd/envoy_config.py adds them to the
listeners and clusters it renders when mesh.trust_domain is set.

Between two meshd hosts (docs/identity.md):
  A's outbound listener: a workload's connection to a destination that the
  catalog names as a meshed workload on another host matches a chain for
  (calling workload, destination ip, port) -> a cluster that connects to that
  host's mTLS port with the *calling* workload's certificate, SNI
  "<port>.mtls.meshd", and accepts only the destination's SPIFFE ID.
  B's mTLS listener (mesh.mtls_port): one chain per served port, chosen by SNI,
  presenting that workload's certificate, requiring a client certificate from the
  trust bundle with a SPIFFE ID of the trust domain; RBAC if allow_from is set;
  then on to <the address the client reached>:<port>, as the inbound listener does.
Plain connections (destinations outside the mesh) never meet any of this.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from . import certs

_T = "type.googleapis.com/"
T_UPSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
T_DOWNSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
T_TLS_INSPECTOR = _T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
T_SET_FILTER_STATE = _T + "envoy.extensions.filters.network.set_filter_state.v3.Config"
T_NETWORK_RBAC = _T + "envoy.extensions.filters.network.rbac.v3.RBAC"
T_HTTP_RBAC = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"

LISTENER_MTLS = "meshd_mtls"
SNI_SUFFIX = "mtls.meshd"
# Which address the inbound ORIGINAL_DST cluster connects to (the client reached
# <host address>:<mtls_port>; the workload listens on <host address>:<port>).
ORIGINAL_DST_KEY = "envoy.network.transport_socket.original_dst_address"


def sni(port: int) -> str:
    return f"{port}.{SNI_SUFFIX}"


@dataclass(frozen=True)
class Remote:
    """A meshed workload on another host, as the catalog has it."""
    ip: str               # the address callers use
    port: int             # the workload's port
    mtls_port: int        # its host's mTLS listener
    spiffe_id: str
    host: str = ""


@dataclass(frozen=True)
class LocalPolicy:
    """How one local workload accepts calls."""
    strict: bool = False
    allow_from: tuple[str, ...] | None = None   # SPIFFE IDs; None = anyone of the trust domain


@dataclass(frozen=True)
class MtlsInput:
    trust_domain: str
    mtls_port: int
    state_dir: str
    names: dict[int, str] = field(default_factory=dict)           # local workload id -> name
    policies: dict[int, LocalPolicy] = field(default_factory=dict)
    remotes: tuple[Remote, ...] = ()

    def strict_or_restricted(self, wid: int) -> bool:
        """Plaintext from other hosts refused: strict, or an allow_from list
        (a plaintext caller has no identity to be allowed by)."""
        p = self.policies.get(wid, LocalPolicy())
        return p.strict or p.allow_from is not None


def _sds(name: str, path: str) -> dict:
    import os
    return {"name": name, "sds_config": {
        "path_config_source": {"path": path, "watched_directory": {"path": os.path.dirname(path)}},
        "resource_api_version": "V3"}}


def _common_tls(m: MtlsInput, workload: str, san_matcher: dict) -> dict:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "tls_certificate_sds_secret_configs": [
            _sds(certs.secret_name(workload), certs.sds_path(m.state_dir, workload))],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": san_matcher}]},
            "validation_context_sds_secret_config": _sds(certs.TRUST_SECRET,
                                                         certs.trust_path(m.state_dir)),
        },
    }


def _host_prefix(ip: str) -> dict:
    addr = ipaddress.ip_address(ip)
    return {"address_prefix": str(addr), "prefix_len": addr.max_prefixlen}


def cluster_name(wid: int, r: Remote) -> str:
    return f"meshd_mtls_{wid}_{r.ip}_{r.port}"


def outbound_chains(m: MtlsInput, workload_source, chain) -> list[dict]:
    """Chains of the outbound listener for calls from local workloads to remote
    meshed workloads. chain(name, match, port, stat, cluster) renders one
    (envoy_config's, so protocols and stats are the plain chains')."""
    out = []
    for wid in sorted(m.names):
        src = {"address_prefix": workload_source(wid), "prefix_len": 32}
        for r in m.remotes:
            match = {"destination_port": r.port, "prefix_ranges": [_host_prefix(r.ip)],
                     "source_prefix_ranges": [src]}
            out.append(chain(f"outbound_wl{wid}_mtls_{r.ip}_{r.port}", match, r.port,
                             f"outbound_{wid}", cluster_name(wid, r)))
    return out


def clusters(m: MtlsInput, base_cluster) -> list[dict]:
    """One per (calling workload, remote destination): to the remote host's mTLS
    port, with the caller's certificate. base_cluster(name): envoy_config's
    cluster settings (timeouts, HTTP protocol options) to build on."""
    out = []
    for wid, name in sorted(m.names.items()):
        for r in m.remotes:
            c = base_cluster(cluster_name(wid, r))
            c.pop("original_dst_lb_config", None)
            c.update({
                "type": "STATIC", "lb_policy": "ROUND_ROBIN",
                "load_assignment": {"cluster_name": c["name"], "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": r.ip, "port_value": r.mtls_port}}}}]}]},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": T_UPSTREAM_TLS, "sni": sni(r.port),
                    "common_tls_context": _common_tls(m, name, {"exact": r.spiffe_id})}},
            })
            out.append(c)
    return out


def _principals(ids: tuple[str, ...]) -> list[dict]:
    return [{"authenticated": {"principal_name": {"exact": i}}} for i in ids] or [
        {"not_id": {"any": True}}]   # an empty allow_from: nobody


def _rules(ids: tuple[str, ...]) -> dict:
    return {"action": "ALLOW", "policies": {"allow_from": {
        "permissions": [{"any": True}], "principals": _principals(ids)}}}


def network_rbac(stat_prefix: str, ids: tuple[str, ...]) -> dict:
    return {"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": T_NETWORK_RBAC, "stat_prefix": stat_prefix, "rules": _rules(ids)}}


def http_rbac(ids: tuple[str, ...]) -> dict:
    return {"name": "envoy.filters.http.rbac",
            "typed_config": {"@type": T_HTTP_RBAC, "rules": _rules(ids)}}


def _set_original_dst(port: int, v6: bool) -> dict:
    host = "[%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%]" if v6 else "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%"
    return {"name": "envoy.filters.network.set_filter_state", "typed_config": {
        "@type": T_SET_FILTER_STATE, "on_new_connection": [{
            "object_key": ORIGINAL_DST_KEY,
            "format_string": {"text_format_source": {"inline_string": f"{host}:{port}"}}}]}}


def mtls_listener(m: MtlsInput, workload_ports: dict[int, list[int]], ipv6: bool,
                  listener_filters: list[dict], proxy_filter) -> dict:
    """The listener other hosts' Envoys call. proxy_filter(port, stat, rbac_ids)
    renders the last filter (tcp_proxy, or the HTTP connection manager with the
    caller's identity in x-forwarded-client-cert) to the inbound cluster."""
    chains, served = [], set()
    for wid, ports in sorted(workload_ports.items()):
        name = m.names.get(wid)
        if name is None:
            continue
        allow = m.policies.get(wid, LocalPolicy()).allow_from
        for port in sorted(set(ports) - served):
            served.add(port)
            for v6 in ((False, True) if ipv6 else (False,)):
                filters = [_set_original_dst(port, v6)]
                last = proxy_filter(port, f"inbound_{wid}", allow)
                tcp = last["name"].endswith("tcp_proxy")
                if allow is not None and tcp:
                    filters.insert(0, network_rbac(f"mtls_{wid}.", allow))
                tls = _downstream_tls(m, name, allow if tcp else None)
                chains.append({
                    "name": f"mtls_wl{wid}_port{port}{'_v6' if v6 else ''}",
                    "filter_chain_match": {
                        "server_names": [sni(port)],
                        "prefix_ranges": [{"address_prefix": "::" if v6 else "0.0.0.0",
                                           "prefix_len": 0}]},
                    "transport_socket": tls,
                    "filters": filters + [last]})
    listener = {
        "name": LISTENER_MTLS,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": m.mtls_port}},
        # tls_inspector reads the ClientHello's SNI: every client here speaks TLS first.
        "listener_filters": [{"name": "envoy.filters.listener.tls_inspector",
                              "typed_config": {"@type": T_TLS_INSPECTOR}}] + listener_filters,
        "filter_chains": chains or [{"name": "mtls_none", "filter_chain_match": {
            "server_names": ["none." + SNI_SUFFIX]}, "filters": []}],
    }
    if ipv6:
        listener["additional_addresses"] = [{"address": {"socket_address": {
            "address": "::", "port_value": m.mtls_port}}}]
    return listener


def _downstream_tls(m: MtlsInput, workload: str, allow: tuple[str, ...] | None) -> dict:
    """Any SPIFFE ID of the trust domain, from a certificate of the trust bundle.
    allow: only these IDs, checked in the handshake itself. For plain TCP that is
    where a caller must be stopped: Envoy connects upstream as soon as the TLS
    connection is accepted and RBAC only looks at the first byte the client
    sends, so a server that speaks first would have talked to a refused caller."""
    if allow is None:
        matchers = [{"prefix": f"spiffe://{m.trust_domain}/"}]
    else:
        matchers = [{"exact": i} for i in allow] or [{"exact": "spiffe://nobody.invalid/"}]
    ctx = _common_tls(m, workload, matchers[0])
    ctx["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"] = [{"san_type": "URI", "matcher": x} for x in matchers]
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": T_DOWNSTREAM_TLS, "require_client_certificate": True,
        "common_tls_context": ctx}}


def refused_chains(m: MtlsInput, workload_ports: dict[int, list[int]], tcp_proxy) -> list[dict]:
    """Inbound listener: for workloads that refuse plaintext from other hosts,
    a chain per port for connections from outside the host, to the black hole
    (closed at once). Same-host callers keep the workload's ordinary chain."""
    out, served = [], set()
    for wid, ports in sorted(workload_ports.items()):
        if wid not in m.names or not m.strict_or_restricted(wid):
            served |= set(ports)
            continue
        for port in sorted(set(ports) - served):
            served.add(port)
            out.append({"name": f"inbound_wl{wid}_port{port}_refused",
                        "filter_chain_match": {"destination_port": port,
                                               "source_type": "EXTERNAL"},
                        "filters": [tcp_proxy(f"inbound_refused_{wid}")]})
    return out
