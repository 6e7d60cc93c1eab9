"""A BPF map read and written as typed values, and making a map equal a wanted content.

Keys and values are what maplayout.MAPS declares: ints for scalar types,
maplayout structs otherwise; a per-CPU value is a list with one item per
possible CPU. The bytes go through bpfsys (or any object with its four map
calls, which the unit tests use).
"""
from __future__ import annotations

import ctypes

from . import bpfsys
from .maplayout import MapSpec


def _pack(ctype: type, value) -> bytes:
    if isinstance(value, (ctypes._SimpleCData, ctypes.Structure, ctypes.Array)):
        if ctypes.sizeof(value) != ctypes.sizeof(ctype) or (
                isinstance(value, ctypes.Structure) and not isinstance(value, ctype)):
            raise TypeError(f"{type(value).__name__} given where the map holds {ctype.__name__}")
        return bytes(value)
    return bytes(ctype(*value) if isinstance(value, (list, tuple)) else ctype(value))


def _unpack(ctype: type, raw: bytes):
    v = ctype.from_buffer_copy(raw)
    if isinstance(v, ctypes._SimpleCData):
        return v.value
    if isinstance(v, ctypes.Array):
        return [_plain(x) for x in v]
    return v


def _plain(x):
    return x.value if isinstance(x, ctypes._SimpleCData) else x


class Map:
    """One map (by fd) with its declared layout."""

    def __init__(self, fd: int, spec: MapSpec, ops=bpfsys):
        self.fd, self.spec, self.ops = fd, spec, ops
        self.key_size = ctypes.sizeof(spec.key)
        self.value_type = spec.value * ops.possible_cpus() if spec.percpu else spec.value
        self.value_size = ctypes.sizeof(self.value_type)

    def keys(self) -> list:
        return [_unpack(self.spec.key, k) for k in self.ops.map_keys(self.fd, self.key_size)]

    def get(self, key):
        raw = self.ops.map_lookup(self.fd, _pack(self.spec.key, key), self.value_size)
        return None if raw is None else _unpack(self.value_type, raw)

    def set(self, key, value) -> None:
        self.ops.map_update(self.fd, _pack(self.spec.key, key), _pack(self.value_type, value))

    def delete(self, key) -> None:
        """Remove an entry; an array's slot cannot be removed, so it is zeroed."""
        if self.spec.array:
            self.set(key, self.value_type())
        else:
            self.ops.map_delete(self.fd, _pack(self.spec.key, key))

    def items(self) -> list[tuple]:
        """Every (key, value); for an array, only the non-zero slots (a zero
        slot is empty)."""
        out = []
        zero = bytes(self.value_size)
        for k in self.ops.map_keys(self.fd, self.key_size):
            raw = self.ops.map_lookup(self.fd, k, self.value_size)
            if raw is not None and not (self.spec.array and raw == zero):
                out.append((_unpack(self.spec.key, k), _unpack(self.value_type, raw)))
        return out


def sync(m, want: dict, keep=None) -> None:
    """Make map m hold exactly `want`, changing only what differs.

    Entries not wanted are deleted, unless keep(key, value) says they belong to
    someone else (ports sockops added, say). Never flush-and-refill: a wanted
    entry that is already there is never missing, not even for a moment.
    m: a Map, or anything with items(), set() and delete()."""
    have = dict(m.items())
    for k, v in have.items():
        if k not in want and not (keep and keep(k, v)):
            m.delete(k)
    for k, v in want.items():
        if k not in have or have[k] != v:
            m.set(k, v)
