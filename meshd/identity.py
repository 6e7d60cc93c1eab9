"""Workload identity: SPIFFE IDs and the X.509 certificates that carry them.

Pure (no files): the CA commands (meshd/ca.py) and the daemon's certificate
renewal (meshd/certs.py) call these with keys and certificates in memory.

Scheme: a workload named NAME in trust domain TD is ``spiffe://TD/workload/NAME``
on every host (the same name on several hosts is one service). Chain: a root per
trust domain (``meshd ca init``) -> an intermediate per host (``meshd ca
issue-intermediate``, or the operator's own) -> a short-lived leaf per workload
that meshd issues on the host, whose only SAN is the SPIFFE ID (a URI SAN).
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE_PREFIX = "spiffe://"
WORKLOAD_PATH = "workload"
# A trust domain is a DNS-like name (SPIFFE: lower case letters, digits, '.', '-', '_').
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")
# Leaves are valid from a little before now: the peers' clocks may lag ours.
CLOCK_SKEW = datetime.timedelta(seconds=60)


class IdentityError(Exception):
    pass


def check_trust_domain(td: str) -> str:
    if not _TRUST_DOMAIN_RE.match(td) or td.strip(".") != td:
        raise ValueError(f"invalid trust domain {td!r}: use lower-case a-z 0-9 . - _ "
                         "(a DNS-like name, e.g. \"prod.example.org\")")
    return td


def spiffe_id(trust_domain: str, workload: str) -> str:
    """The SPIFFE ID of a workload (workload names are [A-Za-z0-9_.-], valid path
    segments as they are)."""
    return f"{SPIFFE_PREFIX}{trust_domain}/{WORKLOAD_PATH}/{workload}"


def parse_spiffe_id(uri: str) -> tuple[str, str]:
    """(trust domain, path) of a SPIFFE ID, or ValueError."""
    if not uri.startswith(SPIFFE_PREFIX):
        raise ValueError(f"not a SPIFFE ID (spiffe://<trust domain>/<path>): {uri!r}")
    td, sep, path = uri[len(SPIFFE_PREFIX):].partition("/")
    check_trust_domain(td)
    if not sep or not path:
        raise ValueError(f"a SPIFFE ID needs a path after the trust domain: {uri!r}")
    return td, "/" + path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key(pem: bytes):
    return serialization.load_pem_private_key(pem, password=None)


def load_certs(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM file (a chain or a bundle), in order."""
    out, marker = [], b"-----END CERTIFICATE-----"
    for block in pem.split(marker)[:-1]:
        out.append(x509.load_pem_x509_certificate(block.strip() + b"\n" + marker + b"\n"))
    if not out:
        raise ValueError("no PEM certificate found")
    return out


def _ca_cert(subject: x509.Name, issuer: x509.Name, public_key, signing_key, days: int,
             trust_domain: str, path_length: int | None) -> x509.Certificate:
    now = _now()
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"{SPIFFE_PREFIX}{trust_domain}")]),
                critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(signing_key, hashes.SHA256()))


def make_root(trust_domain: str, days: int = 3650):
    """A self-signed root for the trust domain: (key, certificate)."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"meshd root {trust_domain}")])
    return key, _ca_cert(name, name, key.public_key(), key, days, trust_domain, 1)


def make_intermediate(root_key, root_cert: x509.Certificate, trust_domain: str, host: str,
                      days: int = 365):
    """A host's intermediate CA, signed by the root: (key, certificate)."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"meshd host {host}")])
    return key, _ca_cert(name, root_cert.subject, key.public_key(), root_key, days,
                         trust_domain, 0)


def trust_domain_of(ca_cert: x509.Certificate) -> str:
    """The trust domain a meshd CA certificate names in its URI SAN ("" if none)."""
    try:
        san = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(SPIFFE_PREFIX):
            return uri[len(SPIFFE_PREFIX):].rstrip("/")
    return ""


@dataclass(frozen=True)
class Leaf:
    spiffe_id: str
    key_pem: bytes
    chain_pem: bytes          # the leaf, then the intermediate(s)
    not_before: float         # epoch seconds
    not_after: float

    def renew_at(self) -> float:
        """Renewed at half its life (as Consul and SPIRE do)."""
        return self.not_before + (self.not_after - self.not_before) / 2


def issue_leaf(ca_key, ca_chain: list[x509.Certificate], spiffe: str,
               lifetime_s: int) -> Leaf:
    """A workload's certificate: its SPIFFE ID as the only SAN, usable as TLS
    client and server, valid for lifetime_s seconds. The key is made here and
    is only ever written into meshd's own key files."""
    key = new_key()
    now = _now()
    not_before = now - datetime.timedelta(seconds=min(CLOCK_SKEW.seconds, lifetime_s // 4))
    not_after = now + datetime.timedelta(seconds=lifetime_s)
    issuer = ca_chain[0]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd")]))
            .issuer_name(issuer.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                           critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    chain = cert_pem(cert) + b"".join(cert_pem(c) for c in ca_chain)
    return Leaf(spiffe, key_pem(key), chain, not_before.timestamp(), not_after.timestamp())


def leaf_times(chain_pem: bytes) -> tuple[float, float]:
    """(not before, not after) of the first certificate of a chain."""
    c = load_certs(chain_pem)[0]
    return (c.not_valid_before.replace(tzinfo=datetime.timezone.utc).timestamp(),
            c.not_valid_after.replace(tzinfo=datetime.timezone.utc).timestamp())
