"""The catalog: which meshd hosts and workloads exist, kept in etcd.

Client: Debian's python3-etcd3gw, which speaks etcd's gRPC gateway (JSON over
HTTP/1.1, /v3/ on etcd 3.4) with requests: pure Python, TLS and client
certificates through requests, no grpcio/protobuf version constraints (the
`etcd3` package breaks with protobuf >= 4, `aetcd` needs a newer grpcio than
Debian's). It talks to one endpoint at a time; this module moves to the next
endpoint when one fails.

Key layout (below [catalog] prefix, default /meshd/v1/), every key under this
host's lease (lease_ttl seconds, kept alive every lease_ttl/3):
  hosts/<host>                JSON {"host", "addresses", "mtls_port", "inbound_port",
                              "trust_domain", "workloads": [names]}
  workloads/<name>/<host>     JSON {"name", "host", "spiffe_id", "addresses", "ports"}
A host that vanishes stops renewing its lease: etcd deletes its keys when the
lease expires, and the other hosts' watches see it go.

One thread does everything that can block (lease, puts, reads, watch); the main
loop gets each new catalog through a callback (GLib.idle_add in the daemon).
The last catalog seen is saved to <state_dir>/catalog.json and served while
etcd is unreachable, also across a meshd restart.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import statefiles
from .config import CatalogConfig
from .envoy_mtls import Remote
from .fsutil import atomic_write

log = logging.getLogger("meshd")

API_PATH = "/v3/"        # etcd >= 3.4's gateway (3.3 had /v3beta/)
REQUEST_TIMEOUT = 2.0    # seconds per request: a dead member costs at most this


@dataclass(frozen=True)
class Entry:
    """What one host publishes."""
    host: str
    addresses: tuple[str, ...] = ()
    mtls_port: int = 0
    inbound_port: int = 0
    trust_domain: str = ""
    workloads: tuple[dict, ...] = ()   # {"name", "spiffe_id", "addresses", "ports"}

    def host_value(self) -> dict:
        return {"host": self.host, "addresses": list(self.addresses), "mtls_port": self.mtls_port,
                "inbound_port": self.inbound_port, "trust_domain": self.trust_domain,
                "workloads": sorted(w["name"] for w in self.workloads)}

    def keys(self, prefix: str) -> dict[str, str]:
        out = {f"{prefix}hosts/{self.host}": json.dumps(self.host_value(), sort_keys=True)}
        for w in self.workloads:
            out[f"{prefix}workloads/{w['name']}/{self.host}"] = json.dumps(
                dict(w, host=self.host), sort_keys=True)
        return out


def parse(prefix: str, kvs: dict[str, str]) -> dict[str, dict]:
    """{host: {"host", "addresses", ..., "workloads": {name: {...}}}} from the
    keys below prefix. Unreadable values are skipped (another version, a typo)."""
    hosts: dict[str, dict] = {}
    for key, value in kvs.items():
        rest = key[len(prefix):].split("/")
        try:
            doc = json.loads(value)
        except ValueError:
            continue
        if rest[0] == "hosts" and len(rest) == 2 and isinstance(doc, dict):
            hosts.setdefault(rest[1], {"workloads": {}}).update(
                {k: v for k, v in doc.items() if k != "workloads"})
    for key, value in kvs.items():
        rest = key[len(prefix):].split("/")
        if rest[0] == "workloads" and len(rest) == 3 and rest[2] in hosts:
            try:
                hosts[rest[2]]["workloads"][rest[1]] = json.loads(value)
            except ValueError:
                continue
    return hosts


def remotes(hosts: dict[str, dict], me: str, trust_domain: str) -> tuple[Remote, ...]:
    """The meshed destinations on other hosts of this trust domain."""
    out = set()
    for name, h in hosts.items():
        if name == me or h.get("trust_domain") != trust_domain or not h.get("mtls_port"):
            continue
        for w in h.get("workloads", {}).values():
            for ip in w.get("addresses", ()):
                for port in w.get("ports", ()):
                    if isinstance(port, int) and w.get("spiffe_id"):
                        out.add(Remote(ip, port, h["mtls_port"], w["spiffe_id"], name))
    return tuple(sorted(out, key=lambda r: (r.host, r.ip, r.port)))


@dataclass
class CatalogState:
    """What status shows about the catalog."""
    connected: bool = False
    endpoint: str = ""
    error: str = ""
    hosts: dict = field(default_factory=dict)
    updated: float = 0.0        # when this catalog was last read from etcd
    from_file: bool = False     # served from catalog.json (etcd not reached yet)


def catalog_path(state_dir: str) -> str:
    return statefiles.path(state_dir, statefiles.CATALOG)


def load_saved(state_dir: str) -> tuple[dict, float]:
    try:
        with open(catalog_path(state_dir)) as f:
            doc = json.load(f)
        return dict(doc["hosts"]), float(doc["updated"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}, 0.0


class Catalog:
    """Registers this host, watches the others, keeps serving the last catalog."""

    def __init__(self, cfg: CatalogConfig, host: str, state_dir: str, on_change):
        self.cfg, self.host, self.state_dir = cfg, host, state_dir
        self.on_change = on_change         # called (from the thread) with a CatalogState
        hosts, updated = load_saved(state_dir)
        self.state = CatalogState(hosts=hosts, updated=updated, from_file=bool(hosts),
                                  error="etcd not reached yet")
        self._entry: Entry | None = None
        self._published: dict[str, str] = {}
        self._lease = None
        self._endpoint = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._warned = False

    # -- called from the main loop --
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meshd-catalog", daemon=True)
        self._thread.start()

    def publish(self, entry: Entry) -> None:
        """What this host registers (written by the thread, soon)."""
        with self._lock:
            changed = entry != self._entry
            self._entry = entry
        if changed:
            self._wake.set()

    def stop(self) -> None:
        """Stop the thread. The lease is left to expire only if meshd does not
        come back: a restarted meshd within lease_ttl finds its keys still there."""
        self._stop.set()
        self._wake.set()

    # -- the thread --
    def _client(self):
        from etcd3gw.client import Etcd3Client
        url = urlsplit(self.cfg.endpoints[self._endpoint % len(self.cfg.endpoints)])
        client = Etcd3Client(
            host=url.hostname, port=url.port or 2379, protocol=url.scheme,
            ca_cert=self.cfg.ca_file or None, cert_cert=self.cfg.cert_file or None,
            cert_key=self.cfg.key_file or None, api_path=API_PATH)
        # etcd is reached directly, with [catalog]'s CA: requests would otherwise
        # take proxies from the environment, and REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE
        # there win over the session's verify (ca_file ignored: "unable to get
        # local issuer certificate" on hosts that set them).
        client.session.trust_env = False
        # etcd3gw's timeout sets an attribute requests ignores: give every request
        # (the watch stream's too) a real one, so a silent member cannot hang us.
        client.session.request = functools.partial(client.session.request,
                                                   timeout=REQUEST_TIMEOUT)
        return client

    def _run(self) -> None:
        interval = max(self.cfg.lease_ttl / 3, 0.5)
        client = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = self._client()
                self._keepalive(client)
                self._register(client)
                rev = self._read(client)
                self._watch(client, rev, interval)
            except Exception as e:   # any failure: next endpoint, serve the last catalog
                endpoint = self.cfg.endpoints[self._endpoint % len(self.cfg.endpoints)]
                # once per outage, and once per endpoint that fails while others work
                (log.warning if self.state.connected or not self._warned else log.debug)(
                    "catalog: etcd %s: %s; serving the last catalog", endpoint, _short(e))
                self._warned = True
                self._endpoint += 1
                client = None
                self._set(connected=False, error=f"{endpoint}: {_short(e)}")
                self._wake.wait(min(interval, 1.0))
                self._wake.clear()

    def _keepalive(self, client) -> None:
        if self._lease is not None:
            from etcd3gw.lease import Lease
            if Lease(self._lease, client).refresh() > 0:
                return
            log.warning("catalog: lease %x expired; registering again", self._lease)
        self._lease = client.lease(self.cfg.lease_ttl).id
        self._published = {}

    def _register(self, client) -> None:
        with self._lock:
            entry = self._entry
        if entry is None:
            return
        want = entry.keys(self.cfg.prefix)
        from etcd3gw.lease import Lease
        lease = Lease(self._lease, client)
        for key, value in want.items():
            if self._published.get(key) != value:
                client.put(key, value, lease=lease)
        for key in set(self._published) - set(want):
            client.delete(key)
        self._published = want

    def _read(self, client) -> int:
        """The whole catalog; returns the revision it was read at."""
        from etcd3gw.utils import _decode, _encode, _increment_last_byte
        prefix = self.cfg.prefix
        resp = client.post(client.get_url("/kv/range"), json={
            "key": _encode(prefix), "range_end": _encode(_increment_last_byte(prefix))})
        kvs = {_decode(kv["key"]).decode(errors="replace"):
               _decode(kv.get("value", "")).decode(errors="replace") for kv in resp.get("kvs", [])}
        hosts = parse(prefix, kvs)
        if not self.state.connected:
            self._warned = False
            log.info("catalog: connected to etcd %s (%d host(s))",
                     self.cfg.endpoints[self._endpoint % len(self.cfg.endpoints)], len(hosts))
        self._set(connected=True, error="", hosts=hosts, updated=time.time(), from_file=False)
        return int(resp["header"]["revision"])

    def _watch(self, client, rev: int, interval: float) -> None:
        """Wait for a change after rev (etcd's watch, through the gateway's
        streaming endpoint) or for the next keepalive, whichever is first."""
        from etcd3gw.exceptions import WatchTimedOut
        if self._wake.is_set():
            self._wake.clear()
            return
        try:
            client.watch_prefix_once(self.cfg.prefix, timeout=interval, start_revision=rev + 1)
        except WatchTimedOut:
            pass

    def _set(self, **changes) -> None:
        old = (self.state.connected, self.state.hosts)
        for k, v in changes.items():
            setattr(self.state, k, v)
        self.state.endpoint = self.cfg.endpoints[self._endpoint % len(self.cfg.endpoints)]
        if changes.get("hosts") is not None and changes["hosts"] != old[1]:
            try:
                atomic_write(catalog_path(self.state_dir), json.dumps(
                    {"hosts": self.state.hosts, "updated": self.state.updated},
                    indent=1, sort_keys=True))
            except OSError as e:
                log.warning("catalog: cannot save %s: %s", catalog_path(self.state_dir), e)
        if (self.state.connected, self.state.hosts) != old:   # not each retry's error
            self.on_change(self.snapshot())

    def snapshot(self) -> CatalogState:
        s = self.state
        return CatalogState(s.connected, s.endpoint, s.error, dict(s.hosts), s.updated,
                            s.from_file)


def _short(e: Exception) -> str:
    # etcd3gw's exceptions keep requests' message in detail_text, not in args
    text = str(e) or str(getattr(e, "detail_text", "") or "") or type(e).__name__
    return text if len(text) < 160 else text[:157] + "..."
