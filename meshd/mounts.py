"""What is mounted where, read from /proc/self/mountinfo.

Mount points differ between hosts (cgroup2 at /sys/fs/cgroup or
/sys/fs/cgroup/unified, bpffs wherever the admin put it), so they are always
read, never assumed.
"""
from __future__ import annotations

import re
from typing import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"


class Mount(NamedTuple):
    point: str
    fstype: str


def _unescape(field: str) -> str:
    # the kernel writes space, tab, newline and backslash as \ooo octal
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Mount]:
    """mountinfo lines: ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        out.append(Mount(_unescape(left.split(" ")[4]), right.split(" ", 1)[0]))
    return out


def read(mountinfo: str = MOUNTINFO) -> list[Mount]:
    with open(mountinfo) as f:
        return parse(f.read())


def first_of_type(fstype: str, mountinfo: str = MOUNTINFO) -> str | None:
    """The mount point of the first filesystem of this type, or None."""
    return next((m.point for m in read(mountinfo) if m.fstype == fstype), None)


def fstype_at(path: str, mountinfo: str = MOUNTINFO) -> str:
    """The type of the filesystem holding path (the deepest mount above it;
    the last one wins when several are stacked on one point)."""
    best = Mount("", "")
    for m in read(mountinfo):
        inside = path == m.point or path.startswith(m.point.rstrip("/") + "/")
        if inside and len(m.point) >= len(best.point):
            best = m
    return best.fstype
