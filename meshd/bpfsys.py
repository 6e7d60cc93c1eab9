"""The bpf(2) operations meshd needs, through libbpf's low-level API (ctypes).

BCC compiles and loads the programs, in a short-lived child (meshd.compile);
everything else (pinning, links and their updates, map reads and writes on
pinned maps) goes through libbpf, so the daemon works on the pins without
ever loading BCC.
libbpf >= 1.0 returns -errno; every failure here raises OSError with the errno.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# enum bpf_attach_type (uapi/linux/bpf.h)
CGROUP_SOCK_OPS = 3
SK_MSG_VERDICT = 7
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_GETSOCKOPT = 21
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30
CGROUP_INET4_GETSOCKNAME = 31
CGROUP_INET6_GETSOCKNAME = 32
SK_LOOKUP = 36

# enum bpf_prog_type
PROG_SOCK_OPS = 13
PROG_SK_MSG = 16
PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25
PROG_SK_LOOKUP = 30

BPF_ANY = 0
BPF_NOEXIST = 1

_lib = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            _lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise OSError(f"libbpf is missing ({name}): install the libbpf1 package") from e
        for fn in ("bpf_obj_pin", "bpf_obj_get", "bpf_link_create", "bpf_link_detach",
                   "bpf_link_update",
                   "bpf_map_update_elem", "bpf_map_lookup_elem", "bpf_map_delete_elem",
                   "bpf_map_get_next_key", "bpf_obj_get_info_by_fd", "bpf_prog_query",
                   "bpf_prog_attach"):
            getattr(_lib, fn).restype = ctypes.c_int
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = -rc if rc != -1 else ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    return _check(lib().bpf_obj_get(path.encode()), f"open pinned {path}")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A bpf_link: attached like BPF_F_ALLOW_MULTI, detached only through it."""
    return _check(lib().bpf_link_create(prog_fd, target_fd, attach_type, None),
                  f"link program to fd {target_fd} (attach type {attach_type})")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """The old-style attachment, for what has no link here: an sk_msg program
    on a SOCKHASH (the map holds it; attaching again replaces it)."""
    _check(lib().bpf_prog_attach(prog_fd, target_fd, attach_type, 0),
           f"attach program to fd {target_fd} (attach type {attach_type})")


def link_detach(link_fd: int) -> None:
    _check(lib().bpf_link_detach(link_fd), "detach link")


def link_update(link_fd: int, prog_fd: int) -> None:
    """BPF_LINK_UPDATE: the link runs prog_fd from now on, with no moment
    without a program (the old one is released)."""
    _check(lib().bpf_link_update(link_fd, prog_fd, None), "update link")


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(lib().bpf_map_update_elem(fd, key, value, ctypes.c_ulonglong(flags)), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    rc = lib().bpf_map_delete_elem(fd, key)
    if rc < 0 and -rc == 2:  # ENOENT
        return False
    _check(rc, "map delete")
    return True


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    buf = ctypes.create_string_buffer(value_size)
    rc = lib().bpf_map_lookup_elem(fd, key, buf)
    if rc < 0 and -rc == 2:
        return None
    _check(rc, "map lookup")
    return buf.raw


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys, prev = [], None
    nxt = ctypes.create_string_buffer(key_size)
    while lib().bpf_map_get_next_key(fd, prev, nxt) == 0:
        keys.append(nxt.raw)
        prev = ctypes.create_string_buffer(nxt.raw, key_size)
    return keys


class _LinkInfo(ctypes.Structure):
    # struct bpf_link_info: type, id, prog_id, then a union; for cgroup links
    # the union starts with cgroup_id (u64) and attach_type (u32).
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("cgroup_id", ctypes.c_uint64), ("attach_type", ctypes.c_uint32),
                ("_rest", ctypes.c_uint8 * 100)]


class MapInfo(ctypes.Structure):
    # the head of struct bpf_map_info; the kernel fills as much as we offer
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


def _obj_info(fd: int, info, what: str):
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), what)
    return info


def link_info(link_fd: int) -> _LinkInfo:
    return _obj_info(link_fd, _LinkInfo(), "link info")


def map_info(map_fd: int) -> MapInfo:
    """A map's type and key/value sizes, as the kernel has them."""
    return _obj_info(map_fd, MapInfo(), "map info")


def _prog_info(prog_fd: int):
    return _obj_info(prog_fd, (ctypes.c_uint32 * 64)(), "program info")


def prog_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (struct bpf_prog_info: type, then id)."""
    return _prog_info(prog_fd)[1]


def prog_name(prog_id_: int) -> str:
    """A loaded program's name (bpf_prog_info.name, at byte 64, 16 bytes)."""
    lib().bpf_prog_get_fd_by_id.restype = ctypes.c_int
    fd = _check(lib().bpf_prog_get_fd_by_id(prog_id_), f"open program {prog_id_}")
    try:
        raw = bytes(_prog_info(fd))[64:80]
    finally:
        os.close(fd)
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of every program attached to a cgroup for one hook (ours and others')."""
    ids = (ctypes.c_uint32 * 64)()
    cnt = ctypes.c_uint32(64)
    flags = ctypes.c_uint32(0)
    _check(lib().bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids,
                                ctypes.byref(cnt)), "query attached programs")
    return list(ids[: cnt.value])


def possible_cpus() -> int:
    """Per-CPU map values hold one slot per *possible* CPU."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n
