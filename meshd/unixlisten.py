"""A listening Unix stream socket on the daemon's GLib loop: replaces a previous
instance's socket file, accepts without ever blocking, and hands each connection
(non-blocking) to a callback. Used by meshd/flows.py and meshd/observe.py."""
from __future__ import annotations

import os
import socket
from typing import Callable


class UnixListener:
    def __init__(self, path: str, mode: int, on_conn: Callable[[socket.socket], None],
                 backlog: int = 16, gid: int = -1):
        from gi.repository import GLib
        self._glib, self.path, self.on_conn = GLib, path, on_conn
        try:
            os.unlink(path)   # a previous meshd's: clients reconnect to this one
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.sock.bind(path)
        if gid != -1:   # before the mode lets the group in
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        self.sock.listen(backlog)
        self._watch = GLib.io_add_watch(self.sock.fileno(), GLib.PRIORITY_DEFAULT,
                                        GLib.IO_IN, self._on_accept)

    def _on_accept(self, fd, cond) -> bool:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:   # EAGAIN: all taken; anything else: try on the next event
                return True
            conn.setblocking(False)
            self.on_conn(conn)

    def close(self) -> None:
        self._glib.source_remove(self._watch)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
