"""meshd's command line: run, check, status, cleanup."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import textwrap
import time

from . import __version__
from .config import DEFAULT_CONFIG_DIR, ConfigInvalid, load_config

DESCRIPTION = """\
meshd steers the TCP connections of enrolled workloads (cgroups: systemd units,
Podman containers, any process tree) through a local Envoy, transparently: the
applications keep connecting to their real destinations and never see the proxy.
eBPF programs (cgroup/connect4/6, sockops, cgroup/getsockopt, getpeername) do the
steering; they are pinned under mesh.bpffs_dir, so traffic keeps flowing while
meshd restarts. When Envoy is down, workloads connect directly (fail open)."""

EPILOG = """\
configuration:
  Every *.toml file in the config directory is read and merged; see the
  commented defaults in /etc/meshd/meshd.toml. The directory is watched: a
  change applies within a second without restarting Envoy, and a bad change is
  rejected (see `meshd status`) while the last good config stays in force.

exit status:
  0 success, 1 failure (invalid config, missing kernel feature, ...),
  2 usage error, 3 `meshd status`: the daemon is not running.

files:
  /etc/meshd/*.toml           configuration
  <state_dir>/status.json     the status (`meshd status` reads it when meshd is not
                              on D-Bus; state_dir: /run/meshd)
  <state_dir>/envoy/          generated Envoy bootstrap, listeners and clusters
  <bpffs_dir>/v1/             pinned maps, programs and links (/sys/fs/bpf/meshd)
"""


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", "-c", metavar="DIR", default=DEFAULT_CONFIG_DIR,
                   help=f"directory of *.toml files (default: {DEFAULT_CONFIG_DIR})")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="meshd", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"meshd {__version__}")
    p.add_argument("--log-level", default=os.environ.get("MESHD_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"],
                   help="daemon log verbosity (default: info, or $MESHD_LOG_LEVEL)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run", formatter_class=fmt, help="run the daemon in the foreground",
        description=textwrap.dedent("""\
            Run the meshd daemon in the foreground (systemd runs it this way).

            It loads or adopts the pinned eBPF programs, starts or adopts Envoy in
            its own cgroup, enrolls the configured workloads and then follows
            changes to the config directory and to the cgroups. SIGHUP reloads the
            config. SIGTERM/SIGINT stop meshd but leave the data path and Envoy
            serving, so a restart is hitless; `meshd cleanup` removes them.
            With systemd, READY=1 is sent once Envoy's listener is serving."""))
    _config_arg(run)

    check = sub.add_parser(
        "check", formatter_class=fmt, help="validate the configuration and exit",
        description=textwrap.dedent("""\
            Validate the configuration without touching the system. Prints every
            error as `file:line: key: message` and exits 1, or exits 0. Also
            reports whether the Envoy binary can be found."""))
    _config_arg(check)

    status = sub.add_parser(
        "status", formatter_class=fmt, help="show what the running daemon is doing",
        description=textwrap.dedent("""\
            Show the running daemon's state: config errors, Envoy, the pinned data
            path, each workload with its counters. Exits 3 when meshd is not
            running."""))
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")

    cleanup = sub.add_parser(
        "cleanup", formatter_class=fmt, help="remove everything this instance installed",
        description=textwrap.dedent("""\
            Stop this instance's daemon and Envoy, detach every eBPF link it
            attached, remove its pins, its Envoy cgroup and its state files.
            Programs attached by anything else are left alone."""))
    _config_arg(cleanup)
    return p


def _setup_logging(level: str) -> None:
    handler = None
    if os.environ.get("JOURNAL_STREAM"):  # under systemd: structured fields to the journal
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="meshd")
            # the journal has its own priority and identifier fields: the message alone
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            pass
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s meshd[%(process)d] %(levelname)s "
                                               "%(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def cmd_check(args) -> int:
    try:
        cfg = load_config(args.config_dir)
    except ConfigInvalid as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        return 1
    from .envoy.process import EnvoyNotFound, find_envoy
    try:
        binary = find_envoy(cfg.mesh.envoy_binary)
    except EnvoyNotFound as e:
        print(f"{args.config_dir}: mesh.envoy_binary: {e}", file=sys.stderr)
        return 1
    print(f"{args.config_dir}: ok ({len(cfg.files)} file(s), {len(cfg.workloads)} workload(s); "
          f"envoy: {binary})")
    return 0


def _alive(pid) -> bool:
    """A running process (a zombie waiting for its parent to reap it is not)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError, TypeError, IndexError):
        return False


def _mesh_despite_errors(config_dir: str):
    """Where the instance lives (state_dir, bpffs_dir, cgroup_root, netns), read
    leniently from whichever file sets it even if the config as a whole is
    invalid: a rejected change is exactly when `meshd status` (and possibly
    `meshd cleanup`) is needed."""
    import dataclasses
    from .config import MeshConfig, tomllib
    found = {}
    try:
        names = sorted(n for n in os.listdir(config_dir)
                       if n.endswith(".toml") and not n.startswith("."))
    except OSError:
        names = []
    for name in names:
        try:
            with open(os.path.join(config_dir, name), "rb") as f:
                mesh = tomllib.load(f).get("mesh", {})
        except (OSError, ValueError, AttributeError):
            continue
        for key in ("state_dir", "bpffs_dir", "cgroup_root", "netns"):
            value = mesh.get(key) if isinstance(mesh, dict) else None
            if isinstance(value, str) and value.startswith("/"):
                found[key] = value
    return dataclasses.replace(MeshConfig(), **found)


def _mesh_or_lenient(config_dir: str):
    """The validated [mesh], or (printing the errors) the lenient reading."""
    try:
        return load_config(config_dir).mesh
    except ConfigInvalid as e:
        print(f"meshd: the configuration in {config_dir} is invalid (the daemon keeps its "
              "last good config):", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return _mesh_despite_errors(config_dir)


def cmd_status(args) -> int:
    from . import status
    from .bus import BUS_NAME, read_status
    state_dir = _mesh_or_lenient(args.config_dir).state_dir
    # The D-Bus API first; only one meshd can own the name, so check it is this
    # instance, else (another instance, no system bus) read its status file.
    st = read_status()
    if st is not None and st.config_dir == os.path.abspath(args.config_dir):
        running, source = True, f"D-Bus ({BUS_NAME})"
    else:
        path = status.status_path(state_dir)
        st = status.read_file(state_dir)
        if st is None:
            print(f"meshd is not running (no status in {state_dir})")
            return 3
        running, source = st.state != "stopped" and _alive(st.pid), f"status file {path}"
    print(st.to_json() if args.json else status.format_text(st, running, source))
    return 0 if running else 3


def cmd_cleanup(args) -> int:
    mesh = _mesh_or_lenient(args.config_dir)
    from . import cgroups, envoy_config, routing
    from .envoy import process as envoy_process, systemd_unit
    from .daemon import enter_netns, pid_path
    from .datapath import Datapath
    try:
        with open(pid_path(mesh.state_dir)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and _alive(pid) and pid != os.getpid():
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        print(f"stopped meshd (pid {pid})")
    unit = systemd_unit.unit_name_for(mesh.state_dir)
    if systemd_unit.stop_unit(unit):   # False at once without systemd
        print(f"stopped Envoy ({unit})")
    if envoy_process.stop_from_pidfile(mesh.state_dir):
        print("stopped Envoy")
    if mesh.netns:
        enter_netns(mesh.netns)   # the routing below lives in the instance's namespace
    dp = Datapath(mesh.bpffs_dir)
    links = dp.pinned_links()
    dp.cleanup()
    print(f"detached {len(links)} link(s), removed pins under {mesh.bpffs_dir}")
    # The policy routing belongs to the namespace: leave it to the instance that
    # (still) serves it, if any.
    from . import bpfsys
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        serving = [i for i in bpfsys.prog_query(fd, bpfsys.SK_LOOKUP)
                   if bpfsys.prog_name(i) == "meshd_sk_lookup"]
    finally:
        os.close(fd)
    if serving:
        print("left the policy routing in place: another meshd serves this network namespace")
    else:
        routing.remove(mesh.state_dir)
    root = cgroups.cgroup2_mount()
    own = cgroups.path_of(root, mesh.cgroup_root)
    left = [p for d, _, _ in os.walk(own) for p in cgroups.procs(d)]
    if left:   # only Envoy ever runs there: anything left is ours
        print(f"killing processes left in {own}: {left}", file=sys.stderr)
    try:
        cgroups.kill_tree(own)
    except cgroups.CgroupError as e:
        print(f"warning: {e}", file=sys.stderr)
    for name in ("status.json", "meshd.pid", "envoy.pid", "workload-ids.json", "envoy.log",
                 "access.log", "envoy-admin.sock"):
        try:
            os.unlink(os.path.join(mesh.state_dir, name))
        except FileNotFoundError:
            pass
    shutil.rmtree(envoy_config.config_dir(mesh.state_dir), ignore_errors=True)
    try:
        os.rmdir(mesh.state_dir)
    except OSError:
        pass
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command == "cleanup":
        return cmd_cleanup(args)
    _setup_logging(args.log_level)
    from .daemon import run
    return run(args.config_dir)


if __name__ == "__main__":
    sys.exit(main())
