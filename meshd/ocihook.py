"""`meshd oci-hook`: the OCI createRuntime hook Podman runs before a container's
first instruction (etc/containers/oci/hooks.d/meshd.json selects containers
annotated io.meshd.workload=NAME).

It validates the OCI state on stdin, records the container in
<state_dir>/containers/<id>.json (so a meshd that is stopped now enrolls it
when it comes back), and asks the running daemon over <state_dir>/hook.sock
to enroll it, waiting until the container's traffic goes through Envoy. It
never breaks a container: meshd stopped, slow or broken, or a rootless
Podman, means a log line and an un-meshed container. Only input that is not an
OCI state is refused (exit 1), since that is not Podman talking.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

from . import containers, statefiles

DEFAULT_TIMEOUT = 5.0


def socket_path(state_dir: str) -> str:
    return statefiles.path(state_dir, statefiles.HOOK_SOCKET)


def _log(msg: str, warning: bool = True, **fields) -> None:
    """One line on stderr (Podman shows it with --log-level) and in the journal."""
    print(f"meshd oci-hook: {msg}", file=sys.stderr)
    try:
        from systemd import journal
        journal.send(msg, SYSLOG_IDENTIFIER="meshd-oci-hook",
                     PRIORITY=4 if warning else 6, **fields)
    except Exception:   # no journal here: stderr is the log
        pass


def ask_daemon(state_dir: str, cid: str, timeout: float) -> dict:
    """The daemon's answer to "enroll this container": {"meshed": bool, "message": str}."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path(state_dir))
        s.sendall(json.dumps({"enroll": cid}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 65536:
                raise OSError("answer too long")
    reply = json.loads(buf.decode() or "null")
    if not isinstance(reply, dict):
        raise OSError(f"unexpected answer {buf[:80]!r}")
    return reply


def run(state_dir: str, stdin, timeout: float = DEFAULT_TIMEOUT) -> int:
    if os.geteuid() != 0:
        # Rootless Podman runs hooks as the user: meshd (root) does not mesh
        # those containers, and must not break them either.
        _log(f"refused: run by uid {os.geteuid()}, not root; rootless containers are "
             "not meshed (the container starts un-meshed)")
        return 0
    try:
        state = containers.parse_oci_state(stdin.read(containers.MAX_STATE_BYTES + 1))
    except containers.OciStateError as e:
        _log(f"refused: stdin is not an OCI state: {e}")
        return 1
    if state.workload is None:
        return 0   # not annotated: nothing to do
    name = containers.conmon_name(state.id, os.getppid())
    fields = {"CONTAINER_ID": state.id, "CONTAINER_NAME": name, "WORKLOAD": state.workload}
    try:
        rec = containers.Record(
            state.id, state.workload, containers.cgroup_of(state.pid),
            containers.netns_of_bundle(state.bundle, state.pid) or "", state.pid,
            name=name, created=time.time())
        containers.save(state_dir, rec)
    except (OSError, ValueError) as e:
        _log(f"container {state.id[:12]} not meshed: cannot record it in {state_dir}: {e}",
             **fields)
        return 0
    try:
        reply = ask_daemon(state_dir, state.id, timeout)
    except (OSError, ValueError) as e:
        _log(f"container {state.id[:12]} starts un-meshed (meshd will enroll it when it "
             f"runs): no answer from meshd at {socket_path(state_dir)}: "
             f"{getattr(e, 'strerror', None) or e}", **fields)
        return 0
    if reply.get("meshed") is True:
        return 0
    _log(f"container {state.id[:12]} starts un-meshed: {reply.get('message', 'no reason given')}",
         **fields)
    return 0


def main(config_dir: str, timeout: float) -> int:
    from .cli import _mesh_or_lenient
    try:
        state_dir = _mesh_or_lenient(config_dir).state_dir
    except Exception as e:   # an unreadable config must not stop a container
        _log(f"container starts un-meshed: cannot read the configuration in {config_dir}: {e}")
        return 0
    return run(state_dir, sys.stdin.buffer, timeout)
