"""Flow records: receive Envoy's connection/request records and turn each into
the one record the journal, the flow-log file, `meshd observe` and the tests share.

Envoy streams them (meshd/envoy_config.py, FLOW_RECORD) with the Fluentd
forward protocol, i.e. MessagePack ``[tag, [[time, record], ...]]`` batches,
over ``<state_dir>/flows.sock``; this module owns that socket. Everything runs
on the daemon's GLib loop and never blocks it: sockets are non-blocking and a
receive only handles what arrived.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Optional

from .envoy.identity import envoy_group
from .unixlisten import UnixListener

log = logging.getLogger("meshd")

# envoy_config names the chains: <direction>_wl<id>[_port<p>], <direction>_port<p>,
# <direction>_tcp (the default chains), <direction>_miss.
# mtls_*: the listener other meshd hosts call with mTLS (inbound); outbound_wl<id>_mtls_*:
# a workload's calls to a meshed workload on another host (meshd/envoy_mtls.py).
_CHAIN = re.compile(r"^(outbound|inbound|mtls)_(?:wl(\d+)(?:_port\d+(?:_v6)?|_mtls_[0-9a-fA-F.:]+_\d+)?"
                    r"|port\d+|tcp|(miss))$")
_MAX_BUFFER = 8 << 20   # one batch is far smaller (Envoy flushes at 256 KiB)


def _int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _str(v) -> str:
    return "" if v is None or v == "-" else str(v)


def record(raw: dict, workload_name: Callable[[int], Optional[str]]) -> Optional[dict]:
    """Envoy's record -> the flow record, or None when it is not one of meshd's
    chains (or names a workload that is gone).

    Bytes are from the workload's side, as in `meshd status`: bytes_sent is what
    the workload wrote (outbound: what Envoy received from it; inbound: the
    response Envoy sent to the client). peer is the other party: the destination
    of an outbound connection, the client of an inbound one."""
    m = _CHAIN.match(_str(raw.get("chain")))
    if not m:
        return None
    direction, wid, miss = m.group(1), m.group(2), m.group(3)
    direction = "inbound" if direction == "mtls" else direction
    name = ""
    if wid is not None:
        name = workload_name(int(wid))
        if name is None:
            return None
    method = _str(raw.get("method"))
    http = bool(method) or _str(raw.get("proto")).upper().startswith("HTTP")
    flags = _str(raw.get("flags"))
    code = _int(raw.get("code"))
    if miss:
        status = "miss"
    elif http:
        status = str(code) if code else (flags or "0")
    elif _denied(raw) or _unset(raw.get("tls_failure")):
        status = flags or "denied"   # refused by RBAC or in the mTLS handshake
    else:
        status = flags or "ok"
    client, local = _str(raw.get("client")), _str(raw.get("local"))
    rx, tx = _int(raw.get("rx")), _int(raw.get("tx"))
    outbound = direction == "outbound"
    try:
        t = float(raw.get("t"))
    except (TypeError, ValueError):
        t = 0.0
    return {
        "time": t, "workload": name, "direction": direction,
        "source": client, "destination": local, "peer": local if outbound else client,
        "protocol": "http" if http else "tcp", "method": method, "path": _str(raw.get("path")),
        "status": status, "flags": flags,
        "bytes_sent": rx if outbound else tx, "bytes_received": tx if outbound else rx,
        "duration_ms": _int(raw.get("ms")),
        # the caller's verified SPIFFE ID on an mTLS connection (docs/identity.md)
        "peer_id": _unset(raw.get("peer_id")),
        # why Envoy refused: its RBAC ("rbac_access_denied_matched_policy[none]"),
        # or the mTLS handshake (a certificate not allowed, from another CA)
        "denied": _denied(raw),
        "tls_failure": _unset(raw.get("tls_failure")),
    }


def _unset(v) -> str:
    """Envoy writes "-" for a value it does not have."""
    v = _str(v)
    return "" if v == "-" else v


def _denied(raw: dict) -> str:
    for key in ("termination", "details"):
        v = _unset(raw.get(key))
        if v.startswith("rbac_"):
            return v
    return ""


def status_class(status: str) -> str:
    """"2xx" for "204"; TCP's "ok", Envoy's flags and "miss" stay as they are."""
    return status[0] + "xx" if len(status) == 3 and status.isdigit() else status


def _entries(msg) -> list:
    """The (time, record) pairs of one forward-protocol message (Forward mode is
    what Envoy sends; Message mode is accepted too)."""
    if not isinstance(msg, (list, tuple)) or len(msg) < 2:
        return []
    if isinstance(msg[1], (list, tuple)):
        return [e for e in msg[1] if isinstance(e, (list, tuple)) and len(e) >= 2]
    if len(msg) >= 3:
        return [(msg[1], msg[2])]
    return []


class FlowReceiver:
    """The listening socket Envoy's workers connect to (one connection each),
    on the default GLib main context. on_records gets the record dicts of
    each receive (a batch: the flow log writes them at once)."""

    def __init__(self, path: str, on_records: Callable[[list], None]):
        import msgpack
        from gi.repository import GLib
        self._msgpack, self._glib = msgpack, GLib
        self.path, self.on_records = path, on_records
        self.received = 0
        self.errors = 0
        self._conns: dict[int, tuple] = {}   # fd -> (socket, unpacker, watch id)
        # Envoy runs as its own user (meshd/envoy/identity.py): its group may send
        # records, no one else (a forged record would be logged as a real flow).
        self.listener = UnixListener(path, 0o660, self._on_conn, backlog=64,
                                     gid=envoy_group())

    def _on_conn(self, conn) -> None:
        GLib = self._glib
        unpacker = self._msgpack.Unpacker(raw=False, max_buffer_size=_MAX_BUFFER)
        wid = GLib.io_add_watch(conn.fileno(), GLib.PRIORITY_DEFAULT,
                                GLib.IO_IN | GLib.IO_HUP | GLib.IO_ERR, self._on_data)
        self._conns[conn.fileno()] = (conn, unpacker, wid)

    def _drop(self, fd: int) -> None:
        conn, _, wid = self._conns.pop(fd)
        self._glib.source_remove(wid)
        conn.close()

    def _on_data(self, fd, cond) -> bool:
        conn, unpacker, _ = self._conns[fd]
        try:
            data = conn.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            self._conns.pop(fd)
            conn.close()
            return False   # removes this watch
        batch, ok = [], True
        try:
            unpacker.feed(data)
            for msg in unpacker:
                batch += [raw for _, raw in _entries(msg) if isinstance(raw, dict)]
        except (ValueError, self._msgpack.exceptions.BufferFull) as e:
            self.errors += 1
            log.warning("flow records: dropping a malformed stream from Envoy: %s", e)
            self._conns.pop(fd)
            conn.close()
            ok = False
        self.received += len(batch)
        if batch:
            self.on_records(batch)
        return ok

    def close(self) -> None:
        for fd in list(self._conns):
            self._drop(fd)
        self.listener.close()
