"""A private system-type dbus-daemon for tests, enforcing meshd's shipped policy.

    with PrivateBus(tmp_path) as bus:
        bus.address          # unix:path=<tmp>/bus,guid=...
        bus.busctl("tree")   # busctl --address=... tree

The config is `<type>system</type>` with EXTERNAL auth (the uid comes from the
socket's credentials, as on the real system bus) and `<include>`s
etc/dbus-1/io.meshd.Mesh1.conf, so the real policy file is what is tested.

default_policy:
  "permissive"  the default context allows everything; whatever is denied is
                denied by the shipped file alone.
  "system"      the default context of Debian's /usr/share/dbus-1/system.conf
                (no one owns names, no method calls): the shipped file must
                punch every hole that the read-only API needs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED_POLICY = REPO / "etc" / "dbus-1" / "io.meshd.Mesh1.conf"

_DEFAULTS = {
    "permissive": """
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"/>""",
    "system": """
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>""",
}


class PrivateBus:
    def __init__(self, tmpdir=None, policy: Path = SHIPPED_POLICY,
                 default_policy: str = "permissive"):
        """tmpdir: where the socket and config go; by default a new directory in
        /tmp (removed by stop()), reachable by the unprivileged test user, which
        pytest's 0700 tmp_path is not."""
        self._own_dir = tmpdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="meshd-bus-") if tmpdir is None else tmpdir)
        self.socket = self.dir / "bus"
        self.config = self.dir / "bus.conf"
        self.policy = Path(policy)
        self.default_policy = _DEFAULTS[default_policy]
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> "PrivateBus":
        self.dir.mkdir(parents=True, exist_ok=True)
        # The socket must be reachable by the unprivileged test user too.
        os.chmod(self.dir, 0o755)
        self.config.write_text(f"""<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={self.socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">{self.default_policy}
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{self.policy}</include>
</busconfig>
""")
        self.proc = subprocess.Popen(
            ["dbus-daemon", "--nofork", "--nopidfile", "--print-address",
             f"--config-file={self.config}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()
        if not line:
            self.proc.wait(5)
            raise RuntimeError(f"dbus-daemon exited {self.proc.returncode} with {self.config}")
        self.address = line
        os.chmod(self.socket, 0o666)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def busctl(self, *args, user: int | None = None, timeout: float = 10,
               check: bool = False) -> subprocess.CompletedProcess:
        """busctl --address=<this bus> ARGS, as root or (user=uid) an unprivileged user."""
        cmd = ["busctl", f"--address={self.address}", *map(str, args)]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)

    def __enter__(self) -> "PrivateBus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
