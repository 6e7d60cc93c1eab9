"""Pure checks of the rendered Envoy configuration (no Envoy needed)."""

import json
import os
import stat

import pytest

from meshd import envoy_config as ec
from meshd.envoy import identity
from helpers.envoy_validate import static_equivalent

STATE = "/run/meshd"


@pytest.fixture
def files():
    return ec.render(15001, 15006, STATE, ipv6=True)


def _listener(files, name="meshd_outbound"):
    (listener,) = [r for r in files["lds.json"]["resources"] if r["name"] == name]
    return listener


def _clusters(files):
    return {c["name"]: c for c in files["cds.json"]["resources"]}


def _types(obj):
    """Every @type URL anywhere in obj."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "@type":
                yield v
            else:
                yield from _types(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _types(v)


def test_file_set(files):
    assert set(files) == {"bootstrap.json", "lds.json", "cds.json"}
    for doc in files.values():
        json.dumps(doc)  # serialisable


def test_bootstrap(files):
    b = files["bootstrap.json"]
    assert b["node"] == {"id": "meshd", "cluster": "meshd"}
    assert b["admin"]["address"] == {"pipe": {"path": "/run/meshd/envoy-run/admin.sock", "mode": 0o666}}
    assert "socket_address" not in json.dumps(b["admin"])
    for key, name in (("lds_config", "lds.json"), ("cds_config", "cds.json")):
        src = b["dynamic_resources"][key]
        assert src["resource_api_version"] == "V3"
        assert src["path_config_source"] == {
            "path": f"/run/meshd/envoy/{name}",
            "watched_directory": {"path": "/run/meshd/envoy"},
        }
    (mon,) = b["overload_manager"]["resource_monitors"]
    assert mon["name"] == "envoy.resource_monitors.global_downstream_max_connections"
    assert mon["typed_config"]["max_active_downstream_connections"] == 50000


def test_admin_socket_path_too_long():
    with pytest.raises(ValueError):
        ec.render(15001, 15006, "/tmp/" + "x" * 120, ipv6=False)


@pytest.mark.parametrize("port", [0, 65536, -1, "15001"])
def test_bad_port(port):
    with pytest.raises(ValueError):
        ec.render(port, 15006, STATE, ipv6=False)


def test_discovery_documents(files):
    lds, cds = files["lds.json"], files["cds.json"]
    assert lds["type_url"] == "type.googleapis.com/envoy.config.listener.v3.Listener"
    assert cds["type_url"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    assert all(r["@type"] == lds["type_url"] for r in lds["resources"])
    assert all(r["@type"] == cds["type_url"] for r in cds["resources"])
    assert lds["version_info"] and cds["version_info"]
    # deterministic; version follows content
    again = ec.render(15001, 15006, STATE, ipv6=True)
    assert again == files
    other = ec.render(15002, 15006, STATE, ipv6=True)
    assert other["lds.json"]["version_info"] != lds["version_info"]


def test_listener_addresses(files):
    listener = _listener(files)
    assert listener["name"] == "meshd_outbound"
    assert listener["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 15001}}
    assert listener["additional_addresses"] == [
        {"address": {"socket_address": {"address": "::1", "port_value": 15001}}}
    ]
    v4only = _listener(ec.render(15001, 15006, STATE, ipv6=False))
    assert "additional_addresses" not in v4only


def test_listener_filters_read_no_bytes(files):
    """Only original_dst: nothing sniffs the protocol, so no connection waits
    for its client to speak (server-first protocols, a write without newline)."""
    for name in ("meshd_outbound", "meshd_inbound"):
        listener = _listener(files, name)
        assert [f["name"] for f in listener["listener_filters"]][0] == \
            "envoy.filters.listener.original_dst"
        assert "envoy.filters.listener.http_inspector" not in json.dumps(listener)
        assert "listener_filters_timeout" not in listener


def test_filter_chains(files):
    listener = _listener(files)
    (miss,) = listener["filter_chains"]   # no ports declared: everything is TCP
    # (a) original dst not restored -> blackhole, counted as outbound_miss
    assert miss["filter_chain_match"] == {"destination_port": 15001}
    (f,) = miss["filters"]
    assert f["name"] == "envoy.filters.network.tcp_proxy"
    assert f["typed_config"]["cluster"] == "meshd_blackhole"
    assert f["typed_config"]["stat_prefix"] == "outbound_miss"
    # (b) everything else -> plain TCP to the original destination, no idle timeout
    dflt = listener["default_filter_chain"]
    assert "filter_chain_match" not in dflt
    (f,) = dflt["filters"]
    assert f["typed_config"]["cluster"] == "meshd_original_dst"
    assert f["typed_config"]["stat_prefix"] == "outbound_tcp"
    assert f["typed_config"]["idle_timeout"] == "0s"


def test_declared_http_port_gets_a_transparent_connection_manager():
    files = ec.render(15001, 15006, STATE, ipv6=False, protocols={8080: "http", 50051: "grpc"})
    chains = {c["name"]: c for c in _listener(files)["filter_chains"]}
    http = chains["outbound_port8080"]
    assert http["filter_chain_match"] == {"destination_port": 8080}
    tc = http["filters"][0]["typed_config"]
    assert tc["@type"].endswith("http_connection_manager.v3.HttpConnectionManager")
    assert tc["stat_prefix"] == "outbound_http"
    assert tc["codec_type"] == "AUTO"
    # nothing added that the operator did not ask for; no timeouts of Envoy's own
    assert tc["generate_request_id"] is False and tc["skip_xff_append"] is True
    assert tc["use_remote_address"] is False
    assert tc["stream_idle_timeout"] == "0s"
    assert tc["common_http_protocol_options"]["idle_timeout"] == "0s"
    assert tc["proxy_100_continue"] is True
    opts = tc["http_protocol_options"]
    assert opts["accept_http_10"] is True
    fmt = opts["header_key_format"]["stateful_formatter"]["typed_config"]
    assert fmt["forward_reason_phrase"] is True
    router = tc["http_filters"][0]["typed_config"]
    assert router["suppress_envoy_headers"] is True
    (vh,) = tc["route_config"]["virtual_hosts"]
    # Envoy would reject the whole listener while a cluster named here is
    # still warming (a new mTLS cluster), and not read lds.json again
    assert tc["route_config"]["validate_clusters"] is False
    connect, rest = vh["routes"]
    assert connect["match"] == {"connect_matcher": {}}
    assert rest["route"] == {"cluster": "meshd_original_dst", "timeout": "0s"}
    assert chains["outbound_port50051"]["filters"][0]["typed_config"]["stat_prefix"] == \
        "outbound_http"


def test_miss_chain_follows_port(files):
    listener = _listener(ec.render(20123, 15006, STATE, ipv6=False))
    assert listener["filter_chains"][0]["filter_chain_match"] == {"destination_port": 20123}


def test_clusters(files):
    cl = _clusters(files)
    assert set(cl) == {"meshd_original_dst", "meshd_inbound", "meshd_blackhole"}
    od = cl["meshd_original_dst"]
    assert od["type"] == "ORIGINAL_DST"
    assert od["lb_policy"] == "CLUSTER_PROVIDED"
    assert od["connect_timeout"] == "130s"   # never sooner than the kernel's own SYN timeout
    assert od["connection_pool_per_downstream_connection"] is True
    assert od["original_dst_lb_config"] == {"use_http_header": False}
    assert "load_assignment" not in od
    for c in (od, cl["meshd_inbound"]):
        # a server connection whose client has gone is closed, not kept for good
        opts = c["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert opts["common_http_protocol_options"]["idle_timeout"] == ec.UPSTREAM_IDLE_TIMEOUT
        assert ec.UPSTREAM_IDLE_TIMEOUT != "0s"
        # no limit of Envoy's own below the overload manager's
        (th,) = c["circuit_breakers"]["thresholds"]
        assert th["max_connections"] == th["max_requests"] == th["max_pending_requests"] \
            == ec.MAX_DOWNSTREAM_CONNECTIONS
    bh = cl["meshd_blackhole"]
    assert bh["type"] == "STATIC"
    assert bh["connect_timeout"] == "1s"
    assert bh["load_assignment"]["endpoints"] == []


def test_type_urls_are_v3(files):
    urls = set(_types(files))
    assert urls
    for url in urls:
        assert url.startswith("type.googleapis.com/envoy.")
        assert ".v3." in url, url


def test_write_config(tmp_path):
    state = str(tmp_path)
    files = ec.render(15001, 15006, state, ipv6=False)
    changed = ec.write_config(state, files)
    assert sorted(changed) == ["bootstrap.json", "cds.json", "lds.json"]
    d = tmp_path / "envoy"
    # readable by Envoy's group only (meshd/envoy/identity.py)
    gid = identity.envoy_group()
    assert (stat.S_IMODE(d.stat().st_mode), d.stat().st_gid) == (0o750, gid)
    for name, doc in files.items():
        assert json.loads((d / name).read_text()) == doc
        assert (stat.S_IMODE((d / name).stat().st_mode), (d / name).stat().st_gid) == (0o640, gid)
    assert sorted(os.listdir(d)) == ["bootstrap.json", "cds.json", "lds.json"]  # no temp left

    inode = (d / "lds.json").stat().st_ino
    assert ec.write_config(state, files) == []  # unchanged: nothing rewritten
    assert (d / "lds.json").stat().st_ino == inode

    files2 = ec.render(15009, 15006, state, ipv6=False)
    assert ec.write_config(state, files2) == ["lds.json"]
    assert (d / "lds.json").stat().st_ino != inode  # replaced by rename, not edited in place
    assert json.loads((d / "lds.json").read_text()) == files2["lds.json"]


def test_static_equivalent_inlines_dynamic_files(tmp_path):
    state = str(tmp_path)
    files = ec.render(15001, 15006, state, ipv6=True)
    ec.write_config(state, files)
    combined = static_equivalent(files["bootstrap.json"])
    assert "dynamic_resources" not in combined
    assert [r["name"] for r in combined["static_resources"]["listeners"]] == [
        "meshd_outbound", "meshd_inbound"]
    assert "@type" not in combined["static_resources"]["listeners"][0]
    assert len(combined["static_resources"]["clusters"]) == 4   # meshd_flows + CDS


def test_inbound_listener(files):
    li = _listener(files, "meshd_inbound")
    assert li["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15006}
    assert li["additional_addresses"][0]["address"]["socket_address"]["address"] == "::1"
    assert li["transparent"] is True   # sk_lookup'ed connections keep their own local address
    names = [f["name"] for f in li["listener_filters"]]
    assert names == ["envoy.filters.listener.original_dst"]
    (miss,) = li["filter_chains"]
    assert miss["filter_chain_match"] == {"destination_port": 15006}
    assert miss["filters"][0]["typed_config"]["cluster"] == "meshd_blackhole"
    tcp = li["default_filter_chain"]["filters"][0]["typed_config"]
    assert tcp["stat_prefix"] == "inbound_tcp" and tcp["cluster"] == "meshd_inbound"
    flows = tcp["access_log"][0]["typed_config"]
    assert flows["cluster"] == "meshd_flows" and flows["record"]["chain"] == "%FILTER_CHAIN_NAME%"


def test_inbound_protocols_per_workload_over_global():
    files = ec.render(15001, 15006, STATE, ipv6=False, client_mark=0x4d53,
                      workload_ports={3: [8080, 9000], 4: [80]},
                      protocols={8080: "http", 80: "http", 443: "http2"},
                      workload_protocols={3: {9000: "grpc"}, 4: {80: "tcp"}},
                      forwarded_for=True)
    li = _listener(files, "meshd_inbound")
    assert [f["name"] for f in li["listener_filters"]] == [
        "envoy.filters.listener.original_dst", "envoy.filters.listener.original_src"]
    chains = {c["name"]: c["filters"][0]["typed_config"] for c in li["filter_chains"]}
    assert chains["inbound_wl3_port8080"]["stat_prefix"] == "inbound_http_3"   # global
    assert chains["inbound_wl3_port9000"]["stat_prefix"] == "inbound_http_3"   # its own
    assert chains["inbound_wl4_port80"]["stat_prefix"] == "inbound_tcp_4"      # overrides
    assert chains["inbound_port443"]["stat_prefix"] == "inbound_http"          # nobody's
    asked = chains["inbound_wl3_port8080"]                                      # asked for
    assert asked["skip_xff_append"] is False and asked["use_remote_address"] is True
    assert asked["route_config"]["request_headers_to_remove"] == [
        "x-envoy-external-address", "x-envoy-internal"]


def test_inbound_cluster_binds_the_bypass_source(files):
    bind = _clusters(files)["meshd_inbound"]["upstream_bind_config"]
    assert bind["source_address"]["address"] == "127.0.0.6"   # sk_lookup lets this through
    assert bind["extra_source_addresses"][0]["address"]["address"] == "::1"


def test_per_workload_chains():
    files = ec.render(15001, 15006, STATE, ipv6=True, workload_ports={3: [8080], 7: []},
                      protocols={8080: "http"})
    out = _listener(files)
    chains = {c["name"]: c for c in out["filter_chains"]}
    src3 = [{"address_prefix": "127.77.0.3", "prefix_len": 32}]
    # Envoy matches the destination port before the source: every workload gets
    # its own chain for each declared port, and a catch-all TCP chain.
    http3 = chains["outbound_wl3_port8080"]
    assert http3["filter_chain_match"] == {"source_prefix_ranges": src3, "destination_port": 8080}
    assert http3["filters"][0]["typed_config"]["stat_prefix"] == "outbound_http_3"
    assert chains["outbound_wl3"]["filter_chain_match"] == {"source_prefix_ranges": src3}
    assert chains["outbound_wl7"]["filters"][0]["typed_config"]["stat_prefix"] == "outbound_tcp_7"
    inbound = {c["name"]: c for c in _listener(files, "meshd_inbound")["filter_chains"]}
    assert inbound["inbound_wl3_port8080"]["filter_chain_match"] == {"destination_port": 8080}
    assert not any(n.startswith("inbound_wl7") for n in inbound)   # no ports, no chains



def test_container_listener_and_cluster_live_in_its_namespace():
    files = ec.render(15001, 15006, STATE, ipv6=True, protocols={8080: "http"},
                      workload_protocols={3: {9090: "http"}},
                      containers=(("abcdef012345", "/run/netns/netns-1", 3),))
    listener = _listener(files, "meshd_ctr_abcdef012345")
    addr = listener["address"]["socket_address"]
    assert addr == {"address": "127.0.0.1", "port_value": 15001,
                    "network_namespace_filepath": "/run/netns/netns-1"}
    chains = {c["name"]: c for c in listener["filter_chains"]}
    assert set(chains) == {"outbound_miss", "outbound_port8080", "outbound_port9090"}
    stat = chains["outbound_port8080"]["filters"][0]["typed_config"]["stat_prefix"]
    assert stat == "outbound_http_3"          # counted as the workload's
    assert listener["default_filter_chain"]["filters"][0]["typed_config"][
        "stat_prefix"] == "outbound_tcp_3"
    cluster = _clusters(files)["meshd_ctr_abcdef012345"]
    assert cluster["type"] == "ORIGINAL_DST"
    assert cluster["upstream_bind_config"]["source_address"] == {
        "address": "0.0.0.0", "port_value": 0, "network_namespace_filepath": "/run/netns/netns-1"}
    # the host's listeners are unchanged by a container
    assert _listener(files)["address"] == ec.render(15001, 15006, STATE, True)["lds.json"][
        "resources"][0]["address"]


def test_flow_records_off_leaves_no_access_logger():
    on = ec.render(15001, 15006, STATE, ipv6=True, workload_ports={3: [8080]},
                   protocols={8080: "http"})
    off = ec.render(15001, 15006, STATE, ipv6=True, workload_ports={3: [8080]},
                    protocols={8080: "http"}, access_log=False)
    assert json.dumps(on[ec.LDS]).count("envoy.access_loggers.fluentd") >= 6
    assert "access_log" not in json.dumps(off[ec.LDS])
    flows = on[ec.BOOTSTRAP]["static_resources"]["clusters"][0]
    assert flows["name"] == "meshd_flows" and flows["load_assignment"]["endpoints"][0][
        "lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"] == STATE + "/flows.sock"
