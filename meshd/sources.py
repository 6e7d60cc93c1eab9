"""Which local address the kernel would choose as the source towards a destination.

A steered socket is really connected to Envoy over loopback, so without help its
getsockname() would show 127.77.0.<id> (or ::1). bpf/getsockname.c answers with the
address the application would have had without the mesh; this module computes the
table it reads: destination network -> source address, from the routing table of the
network namespace meshd serves (the main table, as the kernel's source selection for
unbound sockets does; policy rules are not consulted).
"""
from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute

MAIN_TABLE, LOCAL_TABLE = 254, 255
RTN_UNICAST, RTN_LOCAL = 1, 2
SCOPE_HOST = 254


def _interface_addresses(ipr: IPRoute) -> dict[tuple[int, int], list]:
    """(family, ifindex) -> usable interface addresses (ip_interface), primary first."""
    out: dict[tuple[int, int], list] = {}
    for a in ipr.get_addr():
        if a["scope"] >= SCOPE_HOST or a["flags"] & 0x40:  # IFA_F_TENTATIVE (DAD not done)
            continue
        addr = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
        if addr:
            out.setdefault((a["family"], a["index"]), []).append(
                ipaddress.ip_interface(f"{addr}/{a['prefixlen']}"))
    return out


def _pick(candidates: list, gateway, link_local: bool) -> object | None:
    """The address on the outgoing device: one whose subnet holds the gateway, else
    the first (primary) one of the right scope (IPv6 link-local for link-local
    destinations, a wider one for the rest)."""
    if gateway is not None:
        for c in candidates:
            if gateway in c.network:
                return c.ip
    scoped = [c for c in candidates if c.ip.is_link_local == link_local] or candidates
    return scoped[0].ip if scoped else None


def netlink() -> IPRoute:
    """A route netlink socket in the current network namespace, for route_sources."""
    return IPRoute()


def route_sources(ipr: IPRoute | None = None) -> dict:
    """{ip_network: ip_address} for every main-table route and every local address."""
    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        addrs = _interface_addresses(ipr)
        table = {}
        for family, bits in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
            for r in ipr.get_routes(family=family, table=MAIN_TABLE):
                if r["type"] != RTN_UNICAST:
                    continue
                dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                net = ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)
                src = r.get_attr("RTA_PREFSRC")
                gw = r.get_attr("RTA_GATEWAY")
                if src:
                    src = ipaddress.ip_address(src)
                else:
                    src = _pick(addrs.get((family, r.get_attr("RTA_OIF")), []),
                                ipaddress.ip_address(gw) if gw else None, net.is_link_local)
                if src is not None:
                    table.setdefault(net, src)
            # A connection to one of our own addresses comes from that address.
            for cands in (v for (f, _), v in addrs.items() if f == family):
                for c in cands:
                    table[ipaddress.ip_network(f"{c.ip}/{bits}")] = c.ip
        return table
    finally:
        if own:
            ipr.close()


def host_addresses(ipr: IPRoute) -> list[str]:
    """This namespace's addresses other hosts can reach (no loopback, no link-local):
    what the catalog publishes for this host and its workloads."""
    out = []
    for cands in _interface_addresses(ipr).values():
        for c in cands:
            if not (c.ip.is_loopback or c.ip.is_link_local):
                out.append(str(c.ip))
    return sorted(set(out), key=lambda a: (ipaddress.ip_address(a).version, a))
