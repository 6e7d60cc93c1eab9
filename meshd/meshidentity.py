"""The daemon's identity duties, in one place: the host CA, the workloads'
certificates (meshd/certs.py), this host's entry in the catalog and the other
hosts' (meshd/catalog.py). meshd/daemon.py calls it at start, around each
reconcile, on its status tick and on reload; it is absent when mesh.trust_domain
is unset.
"""
from __future__ import annotations

import logging
import os
import socket
import time

from . import ca, catalog, identity, sources
from .certs import Certificates
from .config import Config
from .envoy_mtls import Remote
from .status import IdentityStatus

log = logging.getLogger("meshd")


class IdentityService:
    def __init__(self, config: Config, on_catalog_change):
        """on_catalog_change(): called from the catalog's thread when the
        catalog changed (the daemon moves it onto its main loop)."""
        self.config = config
        mesh = config.mesh
        self.certs = Certificates(mesh.state_dir)
        self._ca_stamp = None
        self.error = ""
        self.host = (config.catalog.host_name if config.catalog and config.catalog.host_name
                     else socket.gethostname())
        self.catalog = (catalog.Catalog(config.catalog, self.host, mesh.state_dir,
                                        lambda _st: on_catalog_change())
                        if config.catalog else None)
        self._netlink = None

    def start(self) -> None:
        """Load the host CA (an error here stops meshd from starting: a trust
        domain without a CA would serve no identity at all)."""
        self.load_ca(strict=True)
        if self.catalog:
            self.catalog.start()

    def _stamp(self):
        d = self.config.mesh.identity_dir
        out = []
        for name in (ca.INTERMEDIATE_CRT, ca.INTERMEDIATE_KEY, ca.BUNDLE):
            try:
                st = os.stat(os.path.join(d, name))
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return out

    def load_ca(self, strict: bool = False) -> bool:
        """(Re)load the host CA when its files changed. Returns True if it did."""
        stamp = self._stamp()
        if stamp == self._ca_stamp:
            return False
        self._ca_stamp = stamp
        mesh = self.config.mesh
        try:
            host_ca = ca.load_host_ca(mesh.identity_dir, mesh.trust_domain)
        except ca.CAError as e:
            self.error = f"host CA: {e}"
            if strict:
                raise
            log.error("%s; keeping the CA loaded before", self.error)
            return False
        self.certs.set_ca(host_ca)
        self.error = ""
        log.info("host CA loaded from %s (trust domain %s)", mesh.identity_dir, mesh.trust_domain)
        return True

    def reload(self, config: Config) -> None:
        self.config = config
        self.load_ca()

    def stop(self) -> None:
        if self.catalog:
            self.catalog.stop()

    # -- around reconcile ------------------------------------------------------
    def remotes(self) -> tuple[Remote, ...]:
        if not self.catalog:
            return ()
        return catalog.remotes(self.catalog.state.hosts, self.host, self.config.mesh.trust_domain)

    def sync_certificates(self, enrolled: dict[str, int]) -> None:
        """Before Envoy's files name them: every enrolled workload has its SDS file."""
        self.certs.sync(enrolled, self.config.mesh.trust_domain, self.config.mesh.cert_lifetime)

    # -- on the status tick ----------------------------------------------------
    def tick(self, enrolled: dict[str, int], inbound_ports: dict[int, list[int]]) -> None:
        """Renew what is due (half-life), pick up a replaced host CA, publish this
        host's entry (its listening ports change as workloads listen)."""
        if self.load_ca() or (self.certs.next_due() or float("inf")) <= time.time():
            self.sync_certificates(enrolled)
        if self.catalog:
            self.catalog.publish(self.entry(enrolled, inbound_ports))

    def entry(self, enrolled: dict[str, int], inbound_ports: dict[int, list[int]]) -> catalog.Entry:
        mesh = self.config.mesh
        if self._netlink is None:
            self._netlink = sources.netlink()
        addresses = tuple(sources.host_addresses(self._netlink))
        return catalog.Entry(
            host=self.host, addresses=addresses, mtls_port=mesh.mtls_port,
            inbound_port=mesh.inbound_port, trust_domain=mesh.trust_domain,
            workloads=tuple({"name": name, "spiffe_id": identity.spiffe_id(mesh.trust_domain, name),
                             "addresses": list(addresses),
                             "ports": sorted(inbound_ports.get(wid, []))}
                            for name, wid in sorted(enrolled.items())))

    # -- status ----------------------------------------------------------------
    def status(self) -> IdentityStatus:
        mesh = self.config.mesh
        ca_after = 0.0
        if self.certs.ca is not None:
            ca_after = identity.leaf_times(identity.cert_pem(self.certs.ca.chain[0]))[1]
        out = dict(trust_domain=mesh.trust_domain, error=self.error or self.certs.error,
                   ca_not_after=ca_after)
        if self.catalog:
            st = self.catalog.state
            out.update(catalog="connected" if st.connected else "unreachable",
                       catalog_endpoint=st.endpoint, catalog_error=st.error,
                       catalog_updated=st.updated, catalog_hosts=tuple(sorted(st.hosts)),
                       remote_destinations=len(self.remotes()))
        return IdentityStatus(**out)

    def workload_fields(self, name: str) -> dict:
        """A workload's identity fields of the status model."""
        leaf = self.certs.leaves.get(name)
        return dict(spiffe_id=identity.spiffe_id(self.config.mesh.trust_domain, name),
                    cert_not_after=leaf.not_after if leaf else 0.0,
                    cert_renew_at=leaf.renew_at() if leaf else 0.0)
