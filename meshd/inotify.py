"""A minimal inotify(7) binding (the standard library has none).

Kept rather than Gio.File.monitor_directory: the daemon watches a set of
directories that changes with the config, on one fd read in batches it
debounces itself; GFileMonitor is one object per directory with its own
event rate limiting on top, which would only delay reconcile.
"""
from __future__ import annotations

import ctypes
import os
import struct

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

DIR_CHANGES = (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
               | IN_DELETE_SELF | IN_MOVE_SELF)

_libc = ctypes.CDLL(None, use_errno=True)
_HDR = struct.Struct("iIII")  # wd, mask, cookie, len


class Inotify:
    def __init__(self):
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self.paths: dict[int, str] = {}  # wd -> path

    def watch(self, path: str, mask: int = DIR_CHANGES) -> int:
        wd = _libc.inotify_add_watch(self.fd, path.encode(), mask | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify watch {path}: {os.strerror(err)}")
        self.paths[wd] = path
        return wd

    def unwatch(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)  # fails harmlessly if already gone
        self.paths.pop(wd, None)

    def read(self) -> list[tuple[str, int, str]]:
        """Pending events as (watched dir, mask, name)."""
        try:
            buf = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, off = [], 0
        while off < len(buf):
            wd, mask, _, n = _HDR.unpack_from(buf, off)
            name = buf[off + _HDR.size: off + _HDR.size + n].split(b"\0", 1)[0].decode()
            off += _HDR.size + n
            path = self.paths.get(wd, "")
            if mask & IN_IGNORED:
                self.paths.pop(wd, None)
            out.append((path, mask, name))
        return out

    def close(self) -> None:
        os.close(self.fd)
