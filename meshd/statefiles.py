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
FWMARK_SAVED = "tcp_fwmark_accept.orig"   # the sysctl's value before meshd set it
ENVOY_CONFIG_DIR = "envoy"           # bootstrap and filesystem-xDS files (a directory)
# What Envoy writes, in the one directory its user may write to (meshd/envoy/identity.py)
ENVOY_RUN_DIR = "envoy-run"
ENVOY_LOG = "envoy-run/envoy.log"    # Envoy as meshd's child (under systemd: the journal)
ENVOY_ADMIN = "envoy-run/admin.sock"  # Envoy's admin API (AF_UNIX)
FLOWS_SOCKET = "flows.sock"          # Envoy streams its connection/request records here
FLOWS_LOG = "flows.log"              # the flow log without a journal (rotated to flows.log.1)
FLOWS_LOG_OLD = "flows.log.1"
OBSERVE_SOCKET = "observe.sock"      # `meshd observe` reads recent and live records here
CONTAINERS_DIR = "containers"        # one record per Podman container (written by the OCI hook)
HOOK_SOCKET = "hook.sock"            # the OCI hook asks the daemon to enroll a container
IDENTITY_DIR = "identity"            # workload certificates and keys as SDS files (0750)
CATALOG = "catalog.json"             # the last catalog seen in etcd (served while it is down)
# Where Envoy's files were before it had a user of its own: removed by cleanup too, and
# an Envoy adopted across that upgrade still serves its admin API at the old place.
LEGACY_ENVOY_ADMIN = "envoy-admin.sock"
LEGACY = ("envoy.log", "access.log", LEGACY_ENVOY_ADMIN)

# What cleanup removes. FWMARK_SAVED is not here: routing.remove deletes it once it
# has restored the value (and keeps it while another meshd serves the namespace).
FILES = (STATUS, MESHD_PID, ENVOY_PID, WORKLOAD_IDS, ENVOY_LOG, ENVOY_ADMIN, FLOWS_SOCKET,
         FLOWS_LOG, FLOWS_LOG_OLD, OBSERVE_SOCKET, HOOK_SOCKET, CATALOG) + LEGACY
DIRS = (ENVOY_CONFIG_DIR, CONTAINERS_DIR, IDENTITY_DIR, ENVOY_RUN_DIR)


def path(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, name)
