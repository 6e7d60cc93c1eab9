"""The daemon's end of `meshd oci-hook`: a stream socket at <state_dir>/hook.sock,
served on the main loop, that enrolls a recorded container and answers once
its traffic goes through Envoy (or why not).

Why a socket of its own rather than a D-Bus method: the hook must work where
there is no system bus (tests, minimal hosts) and must not wait on a bus
daemon during container start. The socket is mode 0600 in the state
directory, and every peer's SO_PEERCRED uid must be 0.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct

from . import containers

log = logging.getLogger("meshd")
MAX_REQUEST = 4096


class HookServer:
    def __init__(self, path: str, on_enroll):
        """on_enroll(container id, reply) is called on the main loop; reply(meshed,
        message) answers the hook (once)."""
        self.path = path
        self.on_enroll = on_enroll
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(128)
        self.sock.setblocking(False)
        from gi.repository import GLib
        self._watch = GLib.io_add_watch(self.sock.fileno(), GLib.PRIORITY_DEFAULT, GLib.IO_IN,
                                        self._accept)

    def close(self) -> None:
        from gi.repository import GLib
        GLib.source_remove(self._watch)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self, fd, cond) -> bool:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return True
        try:
            self._serve(conn)
        except Exception:
            log.exception("hook request failed")
            conn.close()
        return True

    def _serve(self, conn: socket.socket) -> None:
        def reply(meshed: bool, message: str = "") -> None:
            try:
                conn.setblocking(True)
                conn.settimeout(1)
                conn.sendall(json.dumps({"meshed": meshed, "message": message}).encode() + b"\n")
            except OSError:
                pass
            finally:
                conn.close()

        pid, uid, _ = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != 0:
            log.warning("hook socket: refused a request from uid %d (pid %d): root only", uid, pid)
            return reply(False, "refused: only root may enroll containers")
        conn.settimeout(1)   # the hook writes its one line at once
        buf = b""
        try:
            while not buf.endswith(b"\n") and len(buf) <= MAX_REQUEST:
                chunk = conn.recv(MAX_REQUEST + 1)
                if not chunk:
                    break
                buf += chunk
            req = json.loads(buf.decode())
        except (OSError, ValueError) as e:
            return reply(False, f"bad request: {e}")
        cid = req.get("enroll") if isinstance(req, dict) else None
        if not isinstance(cid, str) or not containers.ID_RE.fullmatch(cid):
            return reply(False, "bad request: expected {\"enroll\": <container id>}")
        self.on_enroll(cid, reply)
