"""Workload certificates on this host: issue, renew at half-life, hand to Envoy.

Each enrolled workload gets a leaf (meshd/identity.py) signed by the host's
intermediate (meshd/ca.py). Envoy reads it through file-based SDS: one xDS
DiscoveryResponse per workload, <state_dir>/identity/<name>.json, holding the
chain and the key inline, replaced by a rename (Envoy reloads a watched
directory's file when one is moved in; never written in place), so a renewal
reaches new handshakes without restarting Envoy or touching open connections.
trust.json holds the trust bundle the same way.

The key exists only in memory and in that file: mode 0640, owner root, group
Envoy's group (meshd/envoy/identity.py, when that group exists; else root's), in a
0750 directory of that group: readable by meshd and Envoy only.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from . import identity, statefiles
from .ca import HostCA
from .envoy.identity import envoy_group, make_dir
from .fsutil import write_if_changed

log = logging.getLogger("meshd")

T_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TRUST_SECRET = "meshd_trust_bundle"
TRUST_FILE = "trust.json"


def identity_dir(state_dir: str) -> str:
    return statefiles.path(state_dir, statefiles.IDENTITY_DIR)


def secret_name(workload: str) -> str:
    return f"meshd_wl_{workload}"


def sds_path(state_dir: str, workload: str) -> str:
    return os.path.join(identity_dir(state_dir), f"wl_{workload}.json")


def trust_path(state_dir: str) -> str:
    return os.path.join(identity_dir(state_dir), TRUST_FILE)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _response(secret: dict) -> dict:
    body = json.dumps(secret, sort_keys=True).encode()
    return {"version_info": hashlib.sha256(body).hexdigest()[:16], "type_url": T_SECRET,
            "resources": [dict({"@type": T_SECRET}, **secret)]}


def leaf_secret(name: str, leaf: identity.Leaf) -> dict:
    return _response({"name": secret_name(name), "tls_certificate": {
        "certificate_chain": {"inline_bytes": _b64(leaf.chain_pem)},
        "private_key": {"inline_bytes": _b64(leaf.key_pem)}}})


def trust_secret(bundle_pem: bytes) -> dict:
    return _response({"name": TRUST_SECRET,
                      "validation_context": {"trusted_ca": {"inline_bytes": _b64(bundle_pem)}}})


@dataclass(frozen=True)
class CertInfo:
    spiffe_id: str
    not_before: float
    not_after: float


def read_leaf(path: str) -> tuple[identity.Leaf | None, str]:
    """A leaf meshd wrote before (so a restart keeps it), or None."""
    try:
        with open(path) as f:
            tls = json.load(f)["resources"][0]["tls_certificate"]
        chain = base64.b64decode(tls["certificate_chain"]["inline_bytes"])
        key = base64.b64decode(tls["private_key"]["inline_bytes"])
        nb, na = identity.leaf_times(chain)
        cert = identity.load_certs(chain)[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uri = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
        return identity.Leaf(uri, key, chain, nb, na), ""
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return None, str(e)


class Certificates:
    """The workloads' certificates; `sync` issues or renews what is due and
    says when it next needs to run."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.leaves: dict[str, identity.Leaf] = {}
        self.ca: HostCA | None = None
        self.error = ""

    def set_ca(self, ca: HostCA | None, error: str = "") -> None:
        if ca is not None and self.ca is not None and (
                ca.bundle_pem != self.ca.bundle_pem or
                _fingerprints(ca.chain) != _fingerprints(self.ca.chain)):
            self.leaves.clear()   # a new CA: reissue every leaf from it
        self.ca, self.error = ca, error

    def _ensure_dir(self) -> None:
        make_dir(identity_dir(self.state_dir), 0, envoy_group(), 0o750)

    def sync(self, workloads: dict[str, int], trust_domain: str, lifetime: int,
             now: float | None = None) -> list[str]:
        """workloads: enrolled name -> id. Issue/renew, write the SDS files,
        forget the others. Returns the names (re)issued."""
        if self.ca is None:
            return []
        now = time.time() if now is None else now
        self._ensure_dir()
        gid = envoy_group()
        self._write(trust_path(self.state_dir), trust_secret(self.ca.bundle_pem), gid)
        issued = []
        for name in sorted(workloads):
            want = identity.spiffe_id(trust_domain, name)
            leaf = self.leaves.get(name)
            if leaf is None:
                leaf, _ = read_leaf(sds_path(self.state_dir, name))
                if leaf is not None and not self._from_ca(leaf):
                    leaf = None
            if (leaf is None or leaf.spiffe_id != want or now >= leaf.renew_at()
                    or leaf.not_after - leaf.not_before > lifetime + identity.CLOCK_SKEW.seconds):
                leaf = identity.issue_leaf(self.ca.key, self.ca.chain, want, lifetime)
                issued.append(name)
                log.info("workload %s: certificate %s issued, valid until %s", name, want,
                         time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(leaf.not_after)),
                         extra={"WORKLOAD": name})
            self.leaves[name] = leaf
            self._write(sds_path(self.state_dir, name), leaf_secret(name, leaf), gid)
        for name in set(self.leaves) - set(workloads):
            del self.leaves[name]
            try:
                os.unlink(sds_path(self.state_dir, name))
            except FileNotFoundError:
                pass
        return issued

    def _from_ca(self, leaf: identity.Leaf) -> bool:
        """Was this leaf issued by the current intermediate?"""
        chain = identity.load_certs(leaf.chain_pem)
        return _fingerprints(chain[1:2]) == _fingerprints(self.ca.chain[:1])

    def _write(self, path: str, doc: dict, gid: int) -> None:
        # Written as 0600 root, then given Envoy's group before the rename makes
        # it visible: at no moment is the key readable by anyone else.
        write_if_changed(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(),
                         mode=0o640, gid=gid)

    def next_due(self) -> float | None:
        """When the next renewal is due (epoch seconds), None without leaves."""
        return min((leaf.renew_at() for leaf in self.leaves.values()), default=None)

    def info(self) -> dict[str, CertInfo]:
        return {n: CertInfo(leaf.spiffe_id, leaf.not_before, leaf.not_after)
                for n, leaf in self.leaves.items()}


def _fingerprints(certs) -> list[bytes]:
    return [c.fingerprint(hashes.SHA256()) for c in certs]
