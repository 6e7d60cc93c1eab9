"""The names of the files meshd and Envoy keep in mesh.state_dir, declared once.

Every module that writes one takes its name from here, and `meshd cleanup`
(meshd/footprint.py) removes exactly these.
"""
from __future__ import annotations

import os

STATUS = "status.json"               # the status model, for `meshd status` without D-Bus
MESHD_PID = "meshd.pid"              # the instance lock (flock) and the daemon's PID
ENVOY_PID = "envoy.pid"              # Envoy as meshd's child: adopted by the next meshd
WORKLOAD_IDS = "workload-ids.json"   # ids index the BPF counters: kept across restarts
ENVOY_LOG = "envoy.log"              # Envoy as meshd's child (under systemd: the journal)
FLOWS_SOCKET = "flows.sock"          # Envoy streams its connection/request records here
FLOWS_LOG = "flows.log"              # the flow log without a journal (rotated to flows.log.1)
FLOWS_LOG_OLD = "flows.log.1"
OBSERVE_SOCKET = "observe.sock"      # `meshd observe` reads recent and live records here
ENVOY_ADMIN = "envoy-admin.sock"     # Envoy's admin API (AF_UNIX)
FWMARK_SAVED = "tcp_fwmark_accept.orig"   # the sysctl's value before meshd set it
ENVOY_CONFIG_DIR = "envoy"           # bootstrap and filesystem-xDS files (a directory)
CONTAINERS_DIR = "containers"        # one record per Podman container (written by the OCI hook)
HOOK_SOCKET = "hook.sock"            # the OCI hook asks the daemon to enroll a container
IDENTITY_DIR = "identity"            # workload certificates and keys as SDS files (0750)
CATALOG = "catalog.json"             # the last catalog seen in etcd (served while it is down)

# What cleanup removes. FWMARK_SAVED is not here: routing.remove deletes it once it
# has restored the value (and keeps it while another meshd serves the namespace).
FILES = (STATUS, MESHD_PID, ENVOY_PID, WORKLOAD_IDS, ENVOY_LOG, ENVOY_ADMIN, FLOWS_SOCKET,
         FLOWS_LOG, FLOWS_LOG_OLD, OBSERVE_SOCKET, HOOK_SOCKET, CATALOG)
DIRS = (ENVOY_CONFIG_DIR, CONTAINERS_DIR, IDENTITY_DIR)


def path(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, name)
