"""Envoy's admin API, spoken over its UNIX socket: GET a path, read the stats, ask
whether Envoy is ready.

The admin API never listens on a network port; Envoy's bootstrap puts it on
``{state_dir}/envoy-run/admin.sock`` (see :mod:`meshd.envoy_config`).
"""
from __future__ import annotations

import http.client
import json
import socket


class AdminError(OSError):
    """The admin API answered, but not with what was asked for (an HTTP error status, a
    malformed or truncated reply).  An OSError, so that callers treat it like the socket
    failures it sits between."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a UNIX socket.  http.client speaks HTTP/1.1, which Envoy's admin
    requires (Envoy 1.40 answers HTTP/1.0 with 426), and reads chunked bodies for us."""

    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def get(socket_path: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``path``; returns (HTTP status, body).

    Raises OSError when the socket is not there or does not answer within ``timeout``
    (each send or receive), AdminError on a malformed reply."""
    conn = _UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request("GET", path, headers={"Accept": "*/*", "Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except http.client.HTTPException as e:
        raise AdminError(f"admin {path}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()


def stats(socket_path: str, timeout: float = 2.0) -> dict[str, int]:
    """Counters and gauges from ``/stats?format=json``, name -> value (histograms skipped).

    Raises OSError (AdminError included) or ValueError (not JSON)."""
    status, body = get(socket_path, "/stats?format=json", timeout)
    if status != 200:
        raise AdminError(f"admin /stats: HTTP {status}: {body[:200]!r}")
    out: dict[str, int] = {}
    for entry in json.loads(body).get("stats", []):
        if "name" in entry and isinstance(entry.get("value"), int):
            out[entry["name"]] = entry["value"]
    return out


def total(stats: dict[str, int], name: str) -> int:
    """A counter summed over meshd's per-workload filter chains: for
    "http.outbound_http.downstream_rq_total" also every
    "http.outbound_http_<workload id>.downstream_rq_total"."""
    kind, prefix, rest = name.split(".", 2)
    head, tail = f"{kind}.{prefix}_", f".{rest}"
    return stats.get(name, 0) + sum(
        v for k, v in stats.items()
        if k.startswith(head) and k.endswith(tail) and k[len(head):-len(tail)].isdigit())


def is_ready(socket_path: str, timeout: float = 0.5) -> bool:
    """Does ``/ready`` answer 200 (Envoy's server state LIVE)?"""
    try:
        status, _ = get(socket_path, "/ready", timeout)
    except (OSError, ValueError):   # never raise into the GLib readiness poll
        return False
    return status == 200
