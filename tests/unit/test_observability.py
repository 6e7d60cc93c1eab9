"""The pure parts of observability: Envoy's records -> flow records, the flow-log
file, observe's filters, the metrics collector and Envoy's relabelling."""
from __future__ import annotations

import json
import socket

import msgpack
import pytest

from meshd import flowlog, flows, metrics, observe
from meshd.status import EnvoyStatus, Status, WorkloadStatus

NAMES = {3: "web", 4: "api"}.get


def raw(**kw):
    r = {"t": "1700000000.250", "chain": "outbound_wl3_port80", "client": "127.77.0.3:40000",
         "local": "10.0.0.5:80", "upstream": "10.0.0.5:80", "proto": "HTTP/1.1",
         "method": "GET", "path": "/a", "code": 503, "flags": "-", "rx": 10, "tx": 200, "ms": 7}
    r.update(kw)
    return r


def test_outbound_http_record():
    r = flows.record(raw(), NAMES)
    assert r == {"time": 1700000000.25, "workload": "web", "direction": "outbound",
                 "source": "127.77.0.3:40000", "destination": "10.0.0.5:80",
                 "peer": "10.0.0.5:80", "protocol": "http", "method": "GET", "path": "/a",
                 "status": "503", "flags": "", "bytes_sent": 10, "bytes_received": 200,
                 "duration_ms": 7, "peer_id": "", "denied": "", "tls_failure": ""}
    assert flows.status_class(r["status"]) == "5xx"


def test_mtls_records_name_the_verified_caller():
    r = flows.record(raw(chain="mtls_wl4_port8080", peer_id="spiffe://td/workload/client"), NAMES)
    assert r["direction"] == "inbound" and r["peer_id"] == "spiffe://td/workload/client"
    r = flows.record(raw(chain="outbound_wl3_mtls_10.0.0.2_8080", peer_id="-"), NAMES)
    assert r["direction"] == "outbound" and r["workload"] == "web" and r["peer_id"] == ""
    # refusals say why: Envoy's RBAC (HTTP: response code details; TCP: the
    # connection's termination details), or the mTLS handshake
    r = flows.record(raw(chain="mtls_wl4_port8080", peer_id="spiffe://td/workload/x",
                         code=403, details="rbac_access_denied_matched_policy[none]"), NAMES)
    assert r["denied"] == "rbac_access_denied_matched_policy[none]" and r["tls_failure"] == ""
    r = flows.record(raw(chain="mtls_wl4_port9000", method="-", proto="-", code=0, details="via_upstream",
                         termination="rbac_access_denied_matched_policy[none]"), NAMES)
    assert r["denied"] == "rbac_access_denied_matched_policy[none]" and r["status"] == "denied"
    r = flows.record(raw(chain="mtls_wl4_port9000", method="-", proto="-", code=0, details="-",
                         tls_failure="TLS_error:|268435581:SSL routines:OPENSSL_internal:"
                                     "CERTIFICATE_VERIFY_FAILED"), NAMES)
    assert r["denied"] == "" and "CERTIFICATE_VERIFY_FAILED" in r["tls_failure"]
    assert r["status"] == "denied"


def test_inbound_tcp_record_peer_is_the_client_and_bytes_from_the_workload():
    r = flows.record(raw(chain="inbound_wl4_port9000", client="192.0.2.9:5555",
                         local="10.0.0.1:9000", proto=None, method=None, path=None,
                         code=0, rx=5, tx=900), NAMES)
    assert (r["workload"], r["direction"], r["protocol"], r["status"]) == (
        "api", "inbound", "tcp", "ok")
    assert r["peer"] == "192.0.2.9:5555" and r["destination"] == "10.0.0.1:9000"
    assert (r["bytes_sent"], r["bytes_received"]) == (900, 5)


@pytest.mark.parametrize("chain, workload, status", [
    ("outbound_tcp", "", "UF"), ("inbound_port8080", "", "UF"), ("outbound_miss", "", "miss")])
def test_unattributed_chains_and_failures(chain, workload, status):
    r = flows.record(raw(chain=chain, method="-", proto="-", code=0, flags="UF"), NAMES)
    assert (r["workload"], r["status"]) == (workload, status)


@pytest.mark.parametrize("chain", ["outbound_wl9", "meshd_something", "", None])
def test_records_of_gone_workloads_or_other_chains_are_dropped(chain):
    assert flows.record(raw(chain=chain), NAMES) is None


def test_forward_protocol_entries():
    batch = ["meshd", [[1, {"a": 1}], [2, {"b": 2}]]]
    assert [e[1] for e in flows._entries(msgpack.unpackb(msgpack.packb(batch)))] == [
        {"a": 1}, {"b": 2}]
    assert flows._entries(["meshd", 1, {"c": 3}]) == [(1, {"c": 3})]   # Message mode
    assert flows._entries("junk") == [] and flows._entries(["t"]) == []


def test_flow_log_file_sampling_and_rotation(tmp_path, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    log = flowlog.FlowLog("auto", 1.0, str(tmp_path))
    assert log.mode == "file"
    rec = flows.record(raw(), NAMES)
    log.write([rec, rec])
    lines = (tmp_path / "flows.log").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [rec, rec] and log.written == 2
    assert (tmp_path / "flows.log").stat().st_mode & 0o777 == 0o600   # who talked to whom: root's
    monkeypatch.setattr(flowlog, "FILE_MAX", 10)
    log.write([rec])
    assert (tmp_path / "flows.log.1").exists() and not (tmp_path / "flows.log").exists()
    log.close()
    off = flowlog.FlowLog("off", 1.0, str(tmp_path / "x"))
    off.write([rec])
    assert off.written == 0
    some = flowlog.FlowLog("file", 0.5, str(tmp_path))
    some.write([rec] * 400)
    assert 100 < some.written < 300   # sampled (a 1e-15 chance of failing by luck)
    some.close()
    assert "web -> 10.0.0.5:80 http GET /a 503" in flowlog.message(rec)


def test_journal_fields(monkeypatch):
    sent = []
    log = flowlog.FlowLog("file", 1.0, "/nonexistent", unit="meshd-envoy.service")
    log.mode, log._send = "journal", lambda msg, **f: sent.append((msg, f))
    log.write([flows.record(raw(), NAMES)])
    (msg, f), = sent
    assert f["WORKLOAD"] == "web" and f["DIRECTION"] == "outbound" and f["STATUS"] == "503"
    assert f["PEER"] == f["DESTINATION"] == "10.0.0.5:80" and f["PROTOCOL"] == "http"
    assert (f["BYTES_SENT"], f["BYTES_RECEIVED"], f["DURATION_MS"]) == ("10", "200", "7")
    assert f["OBJECT_SYSTEMD_UNIT"] == "meshd-envoy.service"
    assert f["SYSLOG_IDENTIFIER"] == "meshd-flow" and "ENVOY_FLAGS" not in f


@pytest.mark.parametrize("status, hit", [
    ("503", True), ("5xx", True), ("error", True), ("2xx", False), ("ok", False), ("", True)])
def test_observe_status_filter(status, hit):
    assert observe.matches(flows.record(raw(), NAMES), status=status) is hit


def test_observe_filters_and_line():
    r = flows.record(raw(), NAMES)
    assert observe.matches(r, workload="web", direction="out")
    assert not observe.matches(r, workload="api") and not observe.matches(r, direction="in")
    tcp_fail = flows.record(raw(method="-", proto="-", flags="UF", code=0), NAMES)
    assert observe.matches(tcp_fail, status="error") and observe.matches(tcp_fail, status="UF")
    line = observe.format_line(r)
    assert "out web -> 10.0.0.5:80 http GET /a 503 sent=10B recv=200B 7ms" in line


@pytest.mark.parametrize("addr, fam", [("127.0.0.1:9464", socket.AF_INET),
                                       ("[::1]:9464", socket.AF_INET6),
                                       ("unix:/run/meshd/metrics.sock", socket.AF_UNIX)])
def test_metrics_address(addr, fam):
    assert metrics.parse_address(addr)[0] == fam


@pytest.mark.parametrize("addr", ["localhost:9464", "127.0.0.1", "127.0.0.1:0", "unix:rel",
                                  "1.2.3.4:99999"])
def test_bad_metrics_address(addr):
    with pytest.raises(ValueError):
        metrics.parse_address(addr)


def test_relabel_names_workloads_and_drops_addresses():
    names = {3: "web"}
    assert metrics.relabel({"envoy_http_conn_manager_prefix": "outbound_http_3",
                            "envoy_response_code_class": "2"}, names) == {
        "envoy_response_code_class": "2", "workload": "web", "direction": "outbound",
        "protocol": "http"}
    assert metrics.relabel({"envoy_tcp_prefix": "inbound_tcp"}, names) == {
        "workload": "", "direction": "inbound", "protocol": "tcp"}
    assert metrics.relabel({"envoy_tcp_prefix": "inbound_tcp_9"}, names) is None   # gone
    assert metrics.relabel({"envoy_listener_address": "127.0.0.1_15001"}, names) is None
    assert metrics.relabel({"envoy_tcp_prefix": "outbound_miss"}, names) is None


def _scrape(snapshot) -> str:
    from prometheus_client import CollectorRegistry, generate_latest
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics._Collector(lambda: snapshot, "/nonexistent"))
    return generate_latest(reg).decode()


def test_collector_per_workload_and_health():
    st = Status(version="1", state="running", envoy=EnvoyStatus(state="running", restarts=2),
                counters={"redirected": 1},
                workloads=(WorkloadStatus(name="web", id=3, enrolled_since=1.0,
                                          counters={"redirected": 5, "fail_open": 1}),
                           WorkloadStatus(name="api", id=4)))
    stats = {"http.outbound_http_3.downstream_rq_2xx": 7, "http.outbound_http_3.downstream_rq_5xx": 2,
             "http.outbound_http_3.downstream_cx_total": 4,
             "http.outbound_http_3.downstream_cx_rx_bytes_total": 100,
             "http.outbound_http_3.downstream_cx_tx_bytes_total": 900,
             "tcp.inbound_tcp_4.downstream_cx_total": 3}
    text = _scrape(metrics.Snapshot(status=st, envoy_stats=stats, reloads={"ok": 2, "rejected": 1},
                                    maps={"cookie_dst": (5, 65536)}))
    lines = set(text.splitlines())
    for want in (
            'meshd_workload_requests_total{direction="outbound",protocol="http",'
            'response_class="2xx",workload="web"} 7.0',
            'meshd_workload_requests_total{direction="outbound",protocol="http",'
            'response_class="5xx",workload="web"} 2.0',
            'meshd_workload_sent_bytes_total{direction="outbound",protocol="http",workload="web"} 100.0',
            'meshd_workload_received_bytes_total{direction="outbound",protocol="http",workload="web"} 900.0',
            'meshd_workload_connections_total{direction="inbound",protocol="tcp",workload="api"} 3.0',
            'meshd_datapath_redirected_total{workload="web"} 5.0',
            'meshd_datapath_redirected_total{workload=""} 1.0',
            'meshd_datapath_fail_open_total{workload="web"} 1.0',
            'meshd_workload_enrolled{workload="web"} 1.0', 'meshd_workload_enrolled{workload="api"} 0.0',
            'meshd_envoy_state{state="running"} 1.0', 'meshd_envoy_restarts_total 2.0',
            'meshd_config_reloads_total{result="rejected"} 1.0', 'meshd_config_errors 0.0',
            'meshd_map_entries{map="cookie_dst"} 5.0', 'meshd_map_capacity{map="cookie_dst"} 65536.0',
            'meshd_state{state="running"} 1.0', 'meshd_workloads{state="enrolled"} 1.0'):
        assert want in lines, want
    assert _scrape(metrics.Snapshot()) == ""   # before the first tick: nothing


def test_bootstrap_has_flows(tmp_path):
    from meshd import envoy_config as ec
    state = str(tmp_path)
    assert ec.bootstrap_has_flows(state)                     # nothing yet: a fresh Envoy
    old = ec.render_bootstrap(state)
    del old["static_resources"]                               # an older meshd's bootstrap
    ec.write_config(state, {ec.BOOTSTRAP: old})
    assert not ec.bootstrap_has_flows(state)
    ec.write_config(state, {ec.BOOTSTRAP: ec.render_bootstrap(state)})
    assert ec.bootstrap_has_flows(state)
