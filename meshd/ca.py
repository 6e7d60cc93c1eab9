"""`meshd ca`: a trust domain's root and the per-host intermediates, as files.

Root directory (keep it offline): root.crt, root.key (0600).
A host's identity directory (mesh.identity_dir, /etc/meshd/identity), made by
`meshd ca issue-intermediate` or by the operator with their own CA:
  intermediate.crt   the host's CA certificate (followed by any further
                     intermediates up to, not including, the root)
  intermediate.key   its private key (0600)
  bundle.crt         the trust bundle: the root(s) whose leaves this host accepts
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import identity

ROOT_CRT, ROOT_KEY = "root.crt", "root.key"
INTERMEDIATE_CRT, INTERMEDIATE_KEY, BUNDLE = "intermediate.crt", "intermediate.key", "bundle.crt"


class CAError(Exception):
    pass


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create path (never overwrite: a CA key replaced by mistake is a new trust domain)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_root(ca_dir: str, trust_domain: str, days: int = 3650) -> str:
    identity.check_trust_domain(trust_domain)
    os.makedirs(ca_dir, mode=0o700, exist_ok=True)
    for name in (ROOT_CRT, ROOT_KEY):
        if os.path.exists(os.path.join(ca_dir, name)):
            raise CAError(f"{os.path.join(ca_dir, name)} exists; refusing to replace a root")
    key, cert = identity.make_root(trust_domain, days)
    _write_new(os.path.join(ca_dir, ROOT_KEY), identity.key_pem(key), 0o600)
    _write_new(os.path.join(ca_dir, ROOT_CRT), identity.cert_pem(cert), 0o644)
    return os.path.join(ca_dir, ROOT_CRT)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CAError(f"cannot read {path}: {e.strerror}") from None


def issue_intermediate(ca_dir: str, out_dir: str, host: str, days: int = 365) -> str:
    """A host's identity directory, from the root in ca_dir."""
    try:
        root_key = identity.load_key(_read(os.path.join(ca_dir, ROOT_KEY)))
        root_cert = identity.load_certs(_read(os.path.join(ca_dir, ROOT_CRT)))[0]
    except ValueError as e:
        raise CAError(f"{ca_dir}: not a meshd root: {e}") from None
    td = identity.trust_domain_of(root_cert)
    if not td:
        raise CAError(f"{ca_dir}/{ROOT_CRT} names no trust domain (spiffe:// URI SAN)")
    os.makedirs(out_dir, mode=0o755, exist_ok=True)
    for name in (INTERMEDIATE_CRT, INTERMEDIATE_KEY):
        if os.path.exists(os.path.join(out_dir, name)):
            raise CAError(f"{os.path.join(out_dir, name)} exists; remove it first to re-issue")
    key, cert = identity.make_intermediate(root_key, root_cert, td, host, days)
    _write_new(os.path.join(out_dir, INTERMEDIATE_KEY), identity.key_pem(key), 0o600)
    _write_new(os.path.join(out_dir, INTERMEDIATE_CRT), identity.cert_pem(cert), 0o644)
    bundle = os.path.join(out_dir, BUNDLE)
    if not os.path.exists(bundle):
        _write_new(bundle, identity.cert_pem(root_cert), 0o644)
    return out_dir


@dataclass(frozen=True)
class HostCA:
    """What the daemon signs with and trusts."""
    key: object
    chain: list          # the intermediate first, then any further ones
    bundle_pem: bytes    # trusted roots
    trust_domain: str


def load_host_ca(identity_dir: str, trust_domain: str) -> HostCA:
    """The host's CA from mesh.identity_dir; CAError says precisely what is wrong."""
    paths = {n: os.path.join(identity_dir, n) for n in (INTERMEDIATE_CRT, INTERMEDIATE_KEY, BUNDLE)}
    try:
        key = identity.load_key(_read(paths[INTERMEDIATE_KEY]))
    except ValueError as e:
        raise CAError(f"{paths[INTERMEDIATE_KEY]}: {e}") from None
    try:
        chain = identity.load_certs(_read(paths[INTERMEDIATE_CRT]))
        bundle = _read(paths[BUNDLE])
        identity.load_certs(bundle)
    except ValueError as e:
        raise CAError(f"{identity_dir}: {e}") from None
    td = identity.trust_domain_of(chain[0])
    if td and td != trust_domain:
        raise CAError(f"{paths[INTERMEDIATE_CRT]} is for trust domain {td!r}, "
                      f"mesh.trust_domain is {trust_domain!r}")
    return HostCA(key, chain, bundle, trust_domain)
