"""Writing a file atomically: readers see the old content or the new, never a part."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, data: bytes | str, mode: int = 0o644, gid: int | None = None) -> None:
    """Replace path with data: a temp file in the same directory (rename is only
    atomic within one filesystem), fsync'ed, renamed over path, then the
    directory fsync'ed so the rename itself survives a crash. gid: the file's
    group, set (with mode) before the rename makes it visible."""
    if isinstance(data, str):
        data = data.encode()
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if gid is not None:
                os.fchown(f.fileno(), -1, gid)
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_if_changed(path: str, data: bytes, mode: int = 0o644, gid: int | None = None) -> bool:
    """atomic_write, unless path already holds exactly data (a rename is an event
    for whoever watches the directory: Envoy reloads). Returns True if written."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except FileNotFoundError:
        pass
    atomic_write(path, data, mode, gid)
    return True
