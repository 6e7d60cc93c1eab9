"""Policy routing that lets the application see the client's real address.

Envoy's inbound upstream connection carries the client's address as its
source (original_src) and SO_MARK = MARK. The application's replies to that
address must come back to Envoy, not leave the host, so in the instance's
network namespace:
  - tcp_fwmark_accept=1: an accepted socket inherits the mark of its SYN, so
    every reply of the app on that connection carries MARK;
  - `ip rule fwmark MARK lookup TABLE` + `local default dev lo` in TABLE:
    marked packets are delivered locally, to Envoy's transparent socket.
The same scheme as Istio's TPROXY inbound mode; only packets with MARK are
affected. Everything here is undone by `meshd cleanup`.
"""
from __future__ import annotations

import logging
import os
import socket

from . import fsutil, statefiles

log = logging.getLogger("meshd.routing")

MARK = 0x4D53      # "MS"
TABLE = 0x4D53
PRIORITY = 19795
FWMARK_ACCEPT = "/proc/sys/net/ipv4/tcp_fwmark_accept"


class RoutingError(Exception):
    pass


def _saved_path(state_dir: str) -> str:
    return statefiles.path(state_dir, statefiles.FWMARK_SAVED)


def install(state_dir: str) -> None:
    with open(FWMARK_ACCEPT) as f:
        old = f.read().strip()
    if old != "1" and not os.path.exists(_saved_path(state_dir)):
        # a torn write here would lose the value cleanup must restore
        fsutil.atomic_write(_saved_path(state_dir), old + "\n")
    install_rules()


def install_rules() -> None:
    """The sysctl, rule and route in the calling thread's namespace (a
    container's namespace goes with the container: nothing to restore)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with open(FWMARK_ACCEPT) as f:
        if f.read().strip() != "1":
            with open(FWMARK_ACCEPT, "w") as w:
                w.write("1\n")
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family, dst in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
            try:
                if not ipr.get_rules(family=family, fwmark=MARK, table=TABLE):
                    ipr.rule("add", family=family, fwmark=MARK, table=TABLE, priority=PRIORITY)
                # an IPv4 local route must have host scope (iproute2 sets it implicitly)
                scope = {"scope": 254} if family == socket.AF_INET else {}
                ipr.route("replace", family=family, dst=dst, type="local", oif=lo, table=TABLE,
                          **scope)
            except NetlinkError as e:
                if family == socket.AF_INET6 and not os.path.exists("/proc/net/if_inet6"):
                    continue   # no IPv6 on this host
                raise RoutingError(f"policy routing for the client's address (family {family}): "
                                   f"{e}") from None


def remove(state_dir: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for family, dst in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
            for _ in range(8):   # one rule per install; tolerate repeats
                try:
                    ipr.rule("del", family=family, fwmark=MARK, table=TABLE, priority=PRIORITY)
                except NetlinkError:
                    break
            scope = {"scope": 254} if family == socket.AF_INET else {}
            try:
                ipr.route("del", family=family, dst=dst, type="local", table=TABLE,
                          oif=ipr.link_lookup(ifname="lo")[0], **scope)
            except NetlinkError:
                pass
    try:
        with open(_saved_path(state_dir)) as f:
            old = f.read().strip()
        with open(FWMARK_ACCEPT, "w") as f:
            f.write(old + "\n")
        os.unlink(_saved_path(state_dir))
    except FileNotFoundError:
        pass
