"""Identity without root: SPIFFE IDs, the CA commands, leaves and their SDS
files, the identity config keys, the catalog's parsing, and the Envoy parts
for mTLS, strict and allow_from (rendered, and checked by Envoy's validator)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from meshd import ca, catalog, certs, config, envoy_config, envoy_mtls, identity
from meshd.config import ConfigInvalid, parse_files

TD = "example.test"


# -- SPIFFE IDs -------------------------------------------------------------------
def test_spiffe_id_scheme():
    assert identity.spiffe_id(TD, "web") == "spiffe://example.test/workload/web"
    assert identity.parse_spiffe_id("spiffe://example.test/workload/web") == (TD, "/workload/web")
    for bad in ("http://x/y", "spiffe://Upper/x", "spiffe://td", "spiffe://td/"):
        with pytest.raises(ValueError):
            identity.parse_spiffe_id(bad)


# -- the CA and leaves ----------------------------------------------------------------
@pytest.fixture
def host_ca(tmp_path):
    root, host = str(tmp_path / "root"), str(tmp_path / "host")
    ca.init_root(root, TD)
    ca.issue_intermediate(root, host, "h1")
    return host


def test_ca_files_and_modes(tmp_path, host_ca):
    root = tmp_path / "root"
    assert stat.S_IMODE(os.stat(root / "root.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(host_ca, "intermediate.key")).st_mode) == 0o600
    with pytest.raises(ca.CAError, match="refusing to replace"):
        ca.init_root(str(root), TD)
    with pytest.raises(ca.CAError, match="exists"):
        ca.issue_intermediate(str(root), host_ca, "h1")
    loaded = ca.load_host_ca(host_ca, TD)
    assert identity.trust_domain_of(loaded.chain[0]) == TD
    with pytest.raises(ca.CAError, match="trust domain"):
        ca.load_host_ca(host_ca, "other.test")


def test_leaf_chain_verifies_with_openssl(tmp_path, host_ca):
    """The leaf chains to the root; its only SAN is the SPIFFE ID."""
    h = ca.load_host_ca(host_ca, TD)
    leaf = identity.issue_leaf(h.key, h.chain, identity.spiffe_id(TD, "web"), 20)
    (tmp_path / "leaf.pem").write_bytes(leaf.chain_pem)
    cert = identity.load_certs(leaf.chain_pem)[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.test/workload/web"]
    assert leaf.not_after - leaf.not_before == 20 + 5   # 20 s, from 5 s ago (skew, lifetime/4)
    assert leaf.not_before < leaf.renew_at() < leaf.not_after
    if shutil.which("openssl"):
        r = subprocess.run(["openssl", "verify", "-CAfile", os.path.join(host_ca, "bundle.crt"),
                            "-untrusted", os.path.join(host_ca, "intermediate.crt"),
                            str(tmp_path / "leaf.pem")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_certificates_sync_renews_at_half_life_and_keeps_keys_private(tmp_path, host_ca):
    state = str(tmp_path / "state")
    os.makedirs(state)
    c = certs.Certificates(state)
    c.set_ca(ca.load_host_ca(host_ca, TD))
    assert c.sync({"web": 1}, TD, 100) == ["web"]
    path = certs.sds_path(state, "web")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o750
    doc = json.load(open(path))
    assert doc["resources"][0]["name"] == certs.secret_name("web")
    first = c.leaves["web"]
    assert c.sync({"web": 1}, TD, 100, now=first.renew_at() - 1) == []      # not due
    assert c.sync({"web": 1}, TD, 100, now=first.renew_at()) == ["web"]     # half-life
    # a new meshd finds the leaf it wrote and keeps it until it is due
    again = certs.Certificates(state)
    again.set_ca(ca.load_host_ca(host_ca, TD))
    assert again.sync({"web": 1}, TD, 100) == []
    # a workload no longer enrolled: its key file goes
    assert again.sync({}, TD, 100) == [] and not os.path.exists(path)


# -- configuration ----------------------------------------------------------------------
def test_identity_keys_and_their_errors():
    cfg = parse_files({"a.toml": '[mesh]\ntrust_domain = "example.test"\ncert_lifetime = 20\n'
                                 'inbound_mode = "strict"\n[workload.web]\nunit = "web.service"\n'
                                 'allow_from = ["api", "spiffe://x.test/workload/y"]\n'
                                 'inbound_mode = "permissive"\n'
                                 '[catalog]\nendpoints = ["http://10.0.0.1:2379"]\n'})
    assert cfg.mesh.trust_domain == TD and cfg.mesh.cert_lifetime == 20
    assert cfg.workloads[0].allow_from == ("api", "spiffe://x.test/workload/y")
    assert cfg.catalog.endpoints == ("http://10.0.0.1:2379",) and cfg.catalog.lease_ttl == 10
    with pytest.raises(ConfigInvalid) as e:
        parse_files({"a.toml": '[mesh]\ninbound_mode = "strict"\n[catalog]\nendpoints = []\n'
                               '[workload.w]\nunit = "w.service"\nallow_from = ["bad name"]\n'})
    text = str(e.value)
    assert "a.toml:2: mesh.inbound_mode: mesh.inbound_mode needs mesh.trust_domain" in text
    assert "catalog.endpoints: must not be empty" in text
    assert "workload.w.allow_from: element 1" in text
    with pytest.raises(ConfigInvalid, match="cert_file and key_file go together"):
        parse_files({"a.toml": '[mesh]\ntrust_domain = "t.test"\n[catalog]\n'
                               'endpoints = ["https://e:2379"]\ncert_file = "/c.pem"\n'})
    with pytest.raises(ConfigInvalid, match="invalid trust domain"):
        parse_files({"a.toml": '[mesh]\ntrust_domain = "Not A Domain"\n'})


# -- the catalog ---------------------------------------------------------------------------
def test_catalog_keys_parse_and_remotes():
    p = "/meshd/v1/"
    a = catalog.Entry("a", ("10.0.0.1",), 15008, 15006, TD, (
        {"name": "client", "spiffe_id": identity.spiffe_id(TD, "client"),
         "addresses": ["10.0.0.1"], "ports": []},))
    b = catalog.Entry("b", ("10.0.0.2",), 15009, 15006, TD, (
        {"name": "server", "spiffe_id": identity.spiffe_id(TD, "server"),
         "addresses": ["10.0.0.2"], "ports": [8080, 9000]},))
    other = catalog.Entry("c", ("10.0.0.3",), 15008, 15006, "other.test", (
        {"name": "x", "spiffe_id": "spiffe://other.test/workload/x",
         "addresses": ["10.0.0.3"], "ports": [80]},))
    kvs = {**a.keys(p), **b.keys(p), **other.keys(p), p + "hosts/junk": "{not json",
           p + "workloads/orphan/zz": "{}"}
    assert sorted(b.keys(p)) == [p + "hosts/b", p + "workloads/server/b"]
    hosts = catalog.parse(p, kvs)
    assert sorted(hosts) == ["a", "b", "c"]
    assert hosts["b"]["workloads"]["server"]["ports"] == [8080, 9000]
    remotes = catalog.remotes(hosts, "a", TD)
    assert remotes == (
        envoy_mtls.Remote("10.0.0.2", 8080, 15009, identity.spiffe_id(TD, "server"), "b"),
        envoy_mtls.Remote("10.0.0.2", 9000, 15009, identity.spiffe_id(TD, "server"), "b"))
    assert catalog.remotes(hosts, "b", TD) == ()   # a's client serves no port


def test_catalog_saved_for_restarts(tmp_path):
    hosts = {"b": {"host": "b", "workloads": {}}}
    c = catalog.Catalog(config.CatalogConfig(("http://127.0.0.1:1",)), "a", str(tmp_path),
                        lambda st: None)
    c._set(connected=True, hosts=hosts, updated=123.0)
    assert catalog.load_saved(str(tmp_path)) == (hosts, 123.0)
    again = catalog.Catalog(config.CatalogConfig(("http://127.0.0.1:1",)), "a", str(tmp_path),
                            lambda st: None)
    assert again.state.hosts == hosts and again.state.from_file and not again.state.connected


# -- Envoy -----------------------------------------------------------------------------------
SERVER = "spiffe://example.test/workload/server"


def _mtls(state, allow=None, strict=False):
    return envoy_mtls.MtlsInput(
        TD, 15008, state, {1: "client", 2: "server"},
        {2: envoy_mtls.LocalPolicy(strict, allow)},
        (envoy_mtls.Remote("10.0.0.2", 8080, 15009, SERVER, "b"),))


def _render(state, mtls):
    return envoy_config.render(15001, 15006, state, True, 0x4D53, {2: [8080, 9000]},
                               {8080: "http"}, {}, False, mtls=mtls)


def test_without_trust_domain_nothing_changes():
    assert _render("/run/meshd", None) == envoy_config.render(
        15001, 15006, "/run/meshd", True, 0x4D53, {2: [8080, 9000]}, {8080: "http"}, {}, False)


def test_mtls_rendering():
    files = _render("/run/meshd", _mtls("/run/meshd", allow=("spiffe://example.test/workload/client",),
                                        strict=True))
    listeners = {r["name"]: r for r in files["lds.json"]["resources"]}
    clusters = {c["name"]: c for c in files["cds.json"]["resources"]}
    # outbound: workload 1 calling 10.0.0.2:8080 -> its mTLS cluster
    chain = next(c for c in listeners["meshd_outbound"]["filter_chains"]
                 if c["name"] == "outbound_wl1_mtls_10.0.0.2_8080")
    assert chain["filter_chain_match"]["prefix_ranges"] == [
        {"address_prefix": "10.0.0.2", "prefix_len": 32}]
    cl = clusters["meshd_mtls_1_10.0.0.2_8080"]
    tls = cl["transport_socket"]["typed_config"]
    assert tls["sni"] == "8080.mtls.meshd"
    ctx = tls["common_tls_context"]
    assert ctx["tls_certificate_sds_secret_configs"][0]["name"] == "meshd_wl_client"
    assert ctx["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"] == [{"san_type": "URI", "matcher": {"exact": SERVER}}]
    assert cl["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "10.0.0.2", "port_value": 15009}}
    # inbound mTLS listener: per port, SNI, HTTP gets xfcc + RBAC, TCP the SAN list
    m = listeners["meshd_mtls"]
    by_name = {c["name"]: c for c in m["filter_chains"]}
    http = by_name["mtls_wl2_port8080"]
    hcm = http["filters"][-1]["typed_config"]
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["http_filters"][0]["name"] == "envoy.filters.http.rbac"
    tcp = by_name["mtls_wl2_port9000"]
    assert tcp["filters"][0]["name"] == "envoy.filters.network.rbac"
    sans = tcp["transport_socket"]["typed_config"]["common_tls_context"][
        "combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "URI",
                     "matcher": {"exact": "spiffe://example.test/workload/client"}}]
    # strict: plaintext from elsewhere to the server's ports goes to the black hole
    refused = [c for c in listeners["meshd_inbound"]["filter_chains"]
               if c["name"].endswith("_refused")]
    assert [c["filter_chain_match"] for c in refused] == [
        {"destination_port": 8080, "source_type": "EXTERNAL"},
        {"destination_port": 9000, "source_type": "EXTERNAL"}]


def test_mtls_config_passes_envoys_validator(tmp_path, host_ca):
    """envoy --mode validate accepts the whole rendered config (SDS files present)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from helpers.envoy_validate import validate
    binary = shutil.which("envoy", path=os.path.dirname(sys.executable))
    if binary is None:
        pytest.fail("no envoy next to the test interpreter (scripts/setup.sh installs it)")
    state = str(tmp_path / "state")
    os.makedirs(state)
    c = certs.Certificates(state)
    c.set_ca(ca.load_host_ca(host_ca, TD))
    c.sync({"client": 1, "server": 2}, TD, 600)
    envoy_config.write_config(state, _render(state, _mtls(state, allow=())))
    ok, out = validate(binary, envoy_config.bootstrap_path(state))
    assert ok, out


def test_inbound_mode_per_workload_over_the_mesh():
    """The mesh's mode is every workload's default; a workload's own mode wins.
    allow_from names become SPIFFE IDs of the trust domain; IDs stay as given."""
    from types import SimpleNamespace as W
    from meshd.plan import _mtls
    cfg = parse_files({"a.toml": '[mesh]\ntrust_domain = "example.test"\ninbound_mode = "strict"\n'
                                 '[workload.web]\nunit = "web.service"\ninbound_mode = "permissive"\n'
                                 '[workload.db]\nunit = "db.service"\n'
                                 'allow_from = ["web", "spiffe://x.test/workload/y"]\n'})
    m = _mtls(cfg, [W(name="web", id=1, enrolled=True), W(name="db", id=2, enrolled=True)], ())
    assert m.policies[1] == envoy_mtls.LocalPolicy(strict=False, allow_from=None)
    assert m.policies[2] == envoy_mtls.LocalPolicy(
        strict=True, allow_from=("spiffe://example.test/workload/web", "spiffe://x.test/workload/y"))
    assert not m.strict_or_restricted(1) and m.strict_or_restricted(2)
    cfg = parse_files({"a.toml": '[mesh]\ntrust_domain = "example.test"\n'
                                 '[workload.web]\nunit = "web.service"\ninbound_mode = "strict"\n'})
    assert _mtls(cfg, [W(name="web", id=1, enrolled=True)], ()).policies[1].strict
