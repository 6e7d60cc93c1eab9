"""The BPF maps' layout as Python sees it, and the constants C and Python share.

This is the one place these are declared. The C side gets them from
c_prelude() (the shared constants and the counter enum, put before
bpf/meshd.h) and c_asserts() (after it: the compiler checks every struct here
against its C twin, field by field), both added by datapath.program_text().

Why generated text rather than `-D` cflags: the text is what the daemon
hashes to decide whether pinned programs can be adopted, so pins built with
other constants or another counter list are never adopted; and a layout
mismatch fails the compilation instead of corrupting a map. meshd.h refuses
to compile without the prelude, so no stale default can hide in it.
"""
from __future__ import annotations

import ctypes
import ipaddress
import socket
import sys
from dataclasses import dataclass

MAX_WORKLOADS = 256   # workload ids 1..255; 0 = "global" (applies to every workload)
# connect4 binds a steered socket to WORKLOAD_NET4.<workload id>: Envoy tells
# workloads apart by that source address.
WORKLOAD_NET4 = ipaddress.IPv4Network("127.77.0.0/24")
# In a Podman container's own network namespace, connect4 binds a steered
# socket to CONTAINER_NET4 | <the container's index> instead: one Envoy listener
# per container namespace, and 4-tuples that stay unique across namespaces.
CONTAINER_NET4 = ipaddress.IPv4Network("127.78.0.0/16")
# Envoy's connections to local applications come from here (Istio's choice);
# sk_lookup lets them through instead of steering them back into Envoy.
ENVOY_INBOUND_SOURCE4 = ipaddress.IPv4Address("127.0.0.6")
WL_EXPLICIT_PORTS = 1   # workload_flags: only meshd sets this workload's inbound ports
MESH_F_ACCEL = 1        # settings.flags: socket acceleration on (sockops.c, sk_msg.c)
# envoy_upstreams values: Envoy connected to a meshed port; its SYN reached an
# enrolled workload's listener on this host (the pair is local: accelerable)
ENVOY_UPSTREAM_SEEN, ENVOY_UPSTREAM_LOCAL = 1, 2

# Counter slots per workload id (index = id * NR_COUNTERS + slot). The C enum is
# generated from this list: C_<NAME> = slot.
COUNTERS = (
    "redirected",         # connect4/6 sent the connection to Envoy
    "excluded",           # bypassed: excluded port or CIDR
    "fail_open",          # bypassed: Envoy's listener is not up
    "answered",           # getsockopt answered SO_ORIGINAL_DST from the map
    "miss",               # getsockopt found no original destination
    "peername",           # getpeername showed the original destination
    "closed",             # entries deleted because the connection closed
    "inbound",            # sk_lookup steered an inbound connection to Envoy
    "inbound_excluded",   # inbound: excluded port
    "inbound_fail_open",  # inbound: Envoy's inbound listener is not up
    "table_full",         # a connection map was full: the connection went direct
)
NR_COUNTERS = len(COUNTERS)

# Acceleration's counters (accel_counters, one per-CPU slot each): C enum
# A_<NAME> = slot.
ACCEL_COUNTERS = (
    "sockets",               # sockets put into accel_socks
    "pairs",                 # ... whose peer was already there (a local pair joined)
    "closed",                # sockets of accel_socks closed
    "messages_redirected",   # sends handed straight to the peer socket
    "bytes_redirected",
    "fallbacks",             # sends of a socket in the map that took the TCP path
    "insert_failed",         # the kernel refused a socket (map full, ...)
)
ACCEL_MAX_SOCKETS = 65536   # accel_socks, accel_state (MESHD_MAX_ACCEL)
# accel_state values: a socket's latch (sk_msg.c)
ACCEL_STATES = ("UNDECIDED", "REDIRECT", "TCP")

# envoy_listeners slots: (C enum name, name in status), in slot order.
LISTENER_SLOTS = (("OUT_V4", "ipv4"), ("OUT_V6", "ipv6"),
                  ("IN_V4", "inbound_ipv4"), ("IN_V6", "inbound_ipv6"))


def workload_source4(workload: int) -> str:
    """The source address of a workload's steered IPv4 connections."""
    return str(WORKLOAD_NET4[workload])


# -- structs (mirrors of bpf/meshd.h; field names as in C) -----------------------
class Struct(ctypes.Structure):
    """A struct of meshd.h. Equal and hashed by its bytes, so map keys fit in
    sets and dicts."""
    C_NAME = ""

    def __eq__(self, other):
        return type(self) is type(other) and bytes(self) == bytes(other)

    def __hash__(self):
        return hash((type(self), bytes(self)))

    def __repr__(self):
        vals = ", ".join(f"{f[0]}={_plain(getattr(self, f[0]))}" for f in self._fields_)
        return f"{type(self).__name__}({vals})"


def _plain(v):
    return list(v) if isinstance(v, ctypes.Array) else v


_u8, _u16, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
_ADDR6 = _u32 * 4   # network order, as the kernel's address fields


class MeshSettings(Struct):
    """Live settings the daemon writes (settings[0]); ports in host order."""
    C_NAME = "mesh_settings"
    _fields_ = [("outbound_port", _u16), ("inbound_port", _u16), ("flags", _u32)]


class OrigDst(Struct):
    """An original destination: what the workload asked connect() for.
    port and addr in network order; IPv4 in addr[0]."""
    C_NAME = "orig_dst"
    _fields_ = [("family", _u8), ("pad", _u8), ("port", _u16), ("workload", _u32),
                ("addr", _ADDR6)]


class ConnTuple(Struct):
    """A connection from the workload's side; ports host order, addresses network order."""
    C_NAME = "conn_tuple"
    _fields_ = [("family", _u8), ("pad", _u8), ("sport", _u16), ("dport", _u16),
                ("pad2", _u16), ("saddr", _ADDR6), ("daddr", _ADDR6)]


class PortKey(Struct):
    """An excluded port (host order) of one workload (0 = every workload)."""
    C_NAME = "port_key"
    _fields_ = [("workload", _u32), ("port", _u16), ("pad", _u16)]


class Cidr4Key(Struct):
    """LPM key: the workload id (network order, so the trie matches it bit by
    bit) then the network; prefixlen counts both."""
    C_NAME = "cidr4_key"
    _fields_ = [("prefixlen", _u32), ("workload", _u32), ("addr", _u32)]


class Cidr6Key(Struct):
    C_NAME = "cidr6_key"
    _fields_ = [("prefixlen", _u32), ("workload", _u32), ("addr", _ADDR6)]


class Route4Key(Struct):
    """LPM key of route_src4: a destination network (network order)."""
    C_NAME = "route4_key"
    _fields_ = [("prefixlen", _u32), ("addr", _u32)]


class Route6Key(Struct):
    C_NAME = "route6_key"
    _fields_ = [("prefixlen", _u32), ("addr", _ADDR6)]


class Route6Src(Struct):
    """route_src6's value: the source address (network order)."""
    C_NAME = "route6_src"
    _fields_ = [("addr", _ADDR6)]


class AccelKey(Struct):
    """A socket of a local pair (accel_socks, accel_state): its network
    namespace's cookie and the tuple as that socket sees it."""
    C_NAME = "accel_key"
    _fields_ = [("netns", _u64), ("t", ConnTuple)]


class CtrNetns(Struct):
    """container_netns's value: a container namespace's index and IPv4 address."""
    C_NAME = "ctr_netns"
    _fields_ = [("index", _u32), ("addr4", _u32)]


class NetnsSlot(Struct):
    """netns_listeners's key: one of Envoy's listeners in one container namespace."""
    C_NAME = "netns_slot"
    _fields_ = [("netns", _u64), ("slot", _u32), ("pad", _u32)]


class CtrPort(Struct):
    """ctr_inbound_ports's key: a port (host order) of a container's address."""
    C_NAME = "ctr_port"
    _fields_ = [("addr4", _u32), ("port", _u16), ("pad", _u16)]


STRUCTS = (MeshSettings, OrigDst, ConnTuple, PortKey, Cidr4Key, Cidr6Key,
           Route4Key, Route6Key, Route6Src, AccelKey, CtrNetns, NetnsSlot,
           CtrPort)


def _with_addr(cls: type, addr, **fields):
    """A struct whose `addr` holds an IP address's bytes as they are (network
    order), whatever int type the C field has."""
    s = cls(**fields)
    ctypes.memmove(ctypes.addressof(s) + cls.addr.offset, addr.packed, cls.addr.size)
    return s


def cidr_key(workload: int, network) -> Cidr4Key | Cidr6Key:
    """The excluded_cidr4/6 key for one workload's (0 = everyone's) network."""
    net = ipaddress.ip_network(network, strict=False)
    return _with_addr(Cidr4Key if net.version == 4 else Cidr6Key, net.network_address,
                      prefixlen=32 + net.prefixlen, workload=socket.htonl(workload))


def route_key(network) -> Route4Key | Route6Key:
    """The route_src4/6 key for a destination network."""
    net = ipaddress.ip_network(network, strict=False)
    return _with_addr(Route4Key if net.version == 4 else Route6Key, net.network_address,
                      prefixlen=net.prefixlen)


def route_source(address) -> int | Route6Src:
    """The route_src4/6 value for a source address: IPv4 is a bare __u32 in
    network order, IPv6 a struct route6_src."""
    addr = ipaddress.ip_address(address)
    if addr.version == 4:
        return int.from_bytes(addr.packed, sys.byteorder)
    return _with_addr(Route6Src, addr)


# -- maps ------------------------------------------------------------------------
@dataclass(frozen=True)
class MapSizes:
    """The configurable map sizes ([mesh] max_connections, max_exclusions,
    max_inbound_ports). Each is the max_entries of the maps named beside it."""
    connections: int = 65536   # cookie_dst, tuple_dst, envoy_upstreams
    exclusions: int = 16384    # each of excluded_ports, excluded_cidr4/6, excluded_in_ports
    inbound_ports: int = 16384  # inbound_ports


# the C macro of each size (generated into the prelude) -> its MapSizes field
SIZE_MACROS = {"MESHD_MAX_CONNS": "connections", "MESHD_MAX_EXCLUSIONS": "exclusions",
               "MESHD_MAX_INBOUND_PORTS": "inbound_ports"}
# BCC's table type names -> enum bpf_map_type
MAP_TYPES = {"hash": 1, "array": 2, "percpu_array": 6, "lru_hash": 9, "lpm_trie": 11,
             "sockmap": 15, "sockhash": 18}
BPF_F_NO_PREALLOC = 1


@dataclass(frozen=True)
class MapSpec:
    key: type
    value: type
    kind: str = "hash"   # BCC's table type ("hash", "lru_hash", "array", ...)
    size: int | str = 0  # max_entries: a number, or a SIZE_MACROS name
    flags: int = 0

    @property
    def array(self) -> bool:
        """Every slot exists; "deleting" one zeroes it."""
        return self.kind in ("array", "percpu_array")

    @property
    def percpu(self) -> bool:
        """A lookup returns one value per possible CPU."""
        return self.kind.startswith("percpu_")

    def max_entries(self, sizes: MapSizes) -> int:
        return self.size if isinstance(self.size, int) else getattr(sizes, SIZE_MACROS[self.size])


_CONNS, _EXCL = "MESHD_MAX_CONNS", "MESHD_MAX_EXCLUSIONS"
_MAX_COUNTERS = MAX_WORKLOADS * NR_COUNTERS

# Every map meshd pins, by its name in meshd.h (declared there with the same
# type, size and flags: datapath checks the kernel's maps against these).
MAPS = {
    "settings": MapSpec(_u32, MeshSettings, "array", 1),
    "meta": MapSpec(_u32, _u64, "array", 1),   # [0] = hash of the program text
    "workload_ids": MapSpec(_u64, _u32, "hash", 1024),   # cgroup id -> workload id
    "excluded_ports": MapSpec(PortKey, _u8, "hash", _EXCL),
    "excluded_cidr4": MapSpec(Cidr4Key, _u8, "lpm_trie", _EXCL, BPF_F_NO_PREALLOC),
    "excluded_cidr6": MapSpec(Cidr6Key, _u8, "lpm_trie", _EXCL, BPF_F_NO_PREALLOC),
    # socket cookie -> original destination; not LRU: a full map makes connect4
    # leave the connection direct (counted), it never evicts a live entry
    "cookie_dst": MapSpec(_u64, OrigDst, "hash", _CONNS),
    "tuple_dst": MapSpec(ConnTuple, OrigDst, "hash", _CONNS),
    "envoy_listeners": MapSpec(_u32, _u64, "sockmap", 4),   # a lookup returns the cookie
    "counters": MapSpec(_u32, _u64, "percpu_array", _MAX_COUNTERS),
    "inbound_ports": MapSpec(_u16, _u32, "hash", "MESHD_MAX_INBOUND_PORTS"),  # port -> workload id
    "workload_flags": MapSpec(_u32, _u32, "array", MAX_WORKLOADS),
    "excluded_in_ports": MapSpec(PortKey, _u8, "hash", _EXCL),
    # needed only while Envoy's SYN to a local app is looked up: LRU is safe
    "envoy_upstreams": MapSpec(ConnTuple, _u8, "lru_hash", _CONNS),
    "route_src4": MapSpec(Route4Key, _u32, "lpm_trie", 4096, BPF_F_NO_PREALLOC),
    "route_src6": MapSpec(Route6Key, Route6Src, "lpm_trie", 4096, BPF_F_NO_PREALLOC),
    # acceleration: fixed size (see meshd.h: this layout must not change with
    # the config); a socket that does not fit uses TCP (insert_failed)
    "accel_socks": MapSpec(AccelKey, _u32, "sockhash", ACCEL_MAX_SOCKETS),  # BCC's 4-byte value
    "accel_state": MapSpec(AccelKey, _u8, "lru_hash", ACCEL_MAX_SOCKETS),
    "accel_counters": MapSpec(_u32, _u64, "percpu_array", len(ACCEL_COUNTERS)),
    "container_netns": MapSpec(_u64, CtrNetns, "hash", 4096),   # netns cookie -> container
    # Envoy's listeners in container namespaces; a lookup returns the cookie
    "netns_listeners": MapSpec(NetnsSlot, _u64, "sockhash", 8192),
    "container_addr4": MapSpec(_u32, _u64, "hash", 4096),   # container IPv4 -> netns cookie
    # a container's listening port -> workload id
    "ctr_inbound_ports": MapSpec(CtrPort, _u32, "hash", "MESHD_MAX_INBOUND_PORTS"),
}


# -- the C side -------------------------------------------------------------------
def c_prelude(sizes: MapSizes = MapSizes()) -> str:
    """#defines and enums for meshd.h, from the declarations above."""
    counters = "".join(f"\tC_{name.upper()} = {i},\n" for i, name in enumerate(COUNTERS))
    slots = ", ".join(f"{c} = {i}" for i, (c, _) in enumerate(LISTENER_SLOTS))
    accel = "".join(f"\tA_{name.upper()} = {i},\n" for i, name in enumerate(ACCEL_COUNTERS))
    states = ", ".join(f"ACCEL_{name} = {i}" for i, name in enumerate(ACCEL_STATES, 1))
    return (
        "/* ---- generated by meshd/maplayout.py ---- */\n"
        "#define MESHD_LAYOUT_PRELUDE 1\n"
        f"#define MESHD_MAX_WORKLOADS {MAX_WORKLOADS}\n"
        f"#define WORKLOAD_NET4 {int(WORKLOAD_NET4.network_address):#010x}\n"
        f"#define CONTAINER_NET4 {int(CONTAINER_NET4.network_address):#010x}\n"
        f"#define MESHD_ENVOY_INBOUND_SOURCE4 {int(ENVOY_INBOUND_SOURCE4):#010x}\n"
        f"#define WL_EXPLICIT_PORTS {WL_EXPLICIT_PORTS}\n"
        f"#define MESH_F_ACCEL {MESH_F_ACCEL}\n"
        f"#define ENVOY_UPSTREAM_SEEN {ENVOY_UPSTREAM_SEEN}\n"
        f"#define ENVOY_UPSTREAM_LOCAL {ENVOY_UPSTREAM_LOCAL}\n"
        f"#define MESHD_MAX_ACCEL {ACCEL_MAX_SOCKETS}\n"
        + "".join(f"#define {macro} {getattr(sizes, field)}\n"
                  for macro, field in SIZE_MACROS.items()) +
        f"enum meshd_counter {{\n{counters}\tMESHD_NR_COUNTERS = {NR_COUNTERS},\n}};\n"
        f"enum accel_counter {{\n{accel}\tMESHD_NR_ACCEL_COUNTERS = {len(ACCEL_COUNTERS)},\n}};\n"
        f"enum accel_state {{ {states} }};\n"
        f"enum listener_slot {{ {slots} }};\n"
    )


def c_pins(paths: dict[str, str]) -> str:
    """Where each map is pinned (MESHD_PIN_<name>, used by meshd.h's MESHD_MAP):
    BCC reuses a map already pinned there and pins a new one it creates. Not
    part of the hashed program text: the same build may live under any bpffs_dir."""
    return "".join(f'#define MESHD_PIN_{name} "{path}"\n' for name, path in paths.items())


def c_asserts() -> str:
    """Compile-time checks that each C struct has exactly the Python layout."""
    out = ["/* ---- generated by meshd/maplayout.py: the layout checks ---- */"]
    for cls in STRUCTS:
        s = f"struct {cls.C_NAME}"
        out.append(f'_Static_assert(sizeof({s}) == {ctypes.sizeof(cls)}, '
                   f'"{s}: size differs from meshd/maplayout.py");')
        out.append(f'_Static_assert(_Alignof({s}) == {ctypes.alignment(cls)}, '
                   f'"{s}: alignment differs from meshd/maplayout.py");')
        for name, _ in cls._fields_:
            f = getattr(cls, name)
            out.append(f'_Static_assert(__builtin_offsetof({s}, {name}) == {f.offset} && '
                       f'sizeof((({s} *)0)->{name}) == {f.size}, '
                       f'"{s}.{name}: differs from meshd/maplayout.py");')
    return "\n".join(out) + "\n"
