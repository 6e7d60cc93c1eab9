"""meshd's command line: run, check, status, observe, cleanup."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

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
                              (readable by root and the meshd-envoy group only)
  <state_dir>/envoy-run/      what Envoy (user meshd-envoy) writes: its admin
                              socket and log
  <state_dir>/flows.sock      Envoy sends its flow records here (root and the
                              meshd-envoy group only)
  <state_dir>/observe.sock    recent and live flow records (`meshd observe`)
  <state_dir>/flows.log       the flow log without systemd (else the journal)
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

    observe = sub.add_parser(
        "observe", formatter_class=fmt, help="watch connections and requests as they happen",
        description=textwrap.dedent("""\
            Print one line per connection (ports not declared HTTP) or HTTP request
            that went through this instance's Envoy, from the records the daemon
            keeps (the last 4096) and, with --follow, as they happen:

              TIME DIR SOURCE -> DESTINATION PROTOCOL [METHOD PATH] STATUS sent= recv= DURATION

            Outbound lines start at the workload and end at the destination it
            connected to; inbound lines start at the client's address and end at
            the workload (and the address it was reached at). STATUS is the HTTP
            status code, "ok" for a TCP connection that went through, Envoy's
            response flags when it did not (UF: the destination refused or did not
            answer), or "miss" when the original destination was unknown. Bytes
            are from the workload's side; DURATION is the whole connection or
            request. The records are Envoy's access log, batched and sent to meshd
            beside the traffic: watching never slows traffic down.

            Filters combine (all must match). Without --follow, what the daemon has
            is printed and meshd observe exits."""),
        epilog=textwrap.dedent("""\
            examples:
              meshd observe --follow --workload web        # live, one workload
              meshd observe --since 5m --status error      # recent failures
              meshd observe --follow --json | jq .path     # for scripts: one JSON object a line

            JSON fields: time (unix seconds), workload, direction, source, destination,
            peer, protocol, method, path, status, flags, bytes_sent, bytes_received,
            duration_ms. The journal has the same records (docs/observability.md).

            exit status: 0, 1 on a bad option, 3 when the daemon is not running."""))
    _config_arg(observe)
    observe.add_argument("--workload", "-w", metavar="NAME", default="",
                         help="only this workload's connections and requests")
    observe.add_argument("--direction", "-d", choices=["in", "out", "inbound", "outbound"],
                         help="only inbound (to the workload) or outbound (from it)")
    observe.add_argument("--status", "-s", metavar="STATUS", default="",
                         help="only this status: a code (404), a class (5xx), ok, miss, "
                              "Envoy's flags (UF) or error (5xx, a failed connection, a miss)")
    observe.add_argument("--since", metavar="WHEN", default="",
                         help="only records that started since WHEN: a duration ago (30s, 5m, "
                              "2h) or a unix time (default: everything kept; with --follow: "
                              "from now on)")
    observe.add_argument("--follow", "-f", action="store_true",
                         help="keep printing new records as they happen (Ctrl-C ends)")
    observe.add_argument("--json", action="store_true", help="one JSON object per line")

    cleanup = sub.add_parser(
        "cleanup", formatter_class=fmt, help="remove everything this instance installed",
        description=textwrap.dedent("""\
            Stop this instance's daemon and Envoy, detach every eBPF link it
            attached, remove its pins, its Envoy cgroup and its state files.
            Programs attached by anything else are left alone."""))
    _config_arg(cleanup)

    hook = sub.add_parser(
        "oci-hook", formatter_class=fmt, help="the OCI createRuntime hook Podman runs",
        description=textwrap.dedent("""\
            Read a container's OCI state on stdin (Podman runs this from
            /usr/share/containers/oci/hooks.d/meshd.json for containers started with
            --annotation io.meshd.workload=NAME), record the container and ask the
            daemon to enroll it; return once its traffic goes through Envoy. With
            meshd stopped or slow, or run by a non-root user (rootless Podman), the
            container starts un-meshed with a log line (exit 0); input that is not
            an OCI state is refused (exit 1)."""))
    _config_arg(hook)
    hook.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                      help="give up waiting for meshd after this long (default: 5)")
    ca = sub.add_parser(
        "ca", formatter_class=fmt, help="a trust domain's root CA and per-host intermediates",
        description=textwrap.dedent("""\
            Certificates for workload identities (docs/identity.md).
              meshd ca init --trust-domain TD --dir ROOTDIR
                  a new root for trust domain TD (keep ROOTDIR offline)
              meshd ca issue-intermediate --dir ROOTDIR --host NAME --out DIR
                  a host's CA (DIR becomes that host's mesh.identity_dir:
                  intermediate.crt, intermediate.key, bundle.crt)"""))
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND", required=True)
    init = ca_sub.add_parser("init", help="create a trust domain's root")
    init.add_argument("--trust-domain", required=True)
    init.add_argument("--dir", required=True, help="where root.crt and root.key go")
    init.add_argument("--days", type=int, default=3650)
    inter = ca_sub.add_parser("issue-intermediate", help="issue a host's intermediate CA")
    inter.add_argument("--dir", required=True, help="the root's directory")
    inter.add_argument("--host", required=True, help="the host's name (in the subject)")
    inter.add_argument("--out", required=True, help="the host's identity directory")
    inter.add_argument("--days", type=int, default=365)
    return p


def cmd_ca(args) -> int:
    from . import ca
    try:
        if args.ca_command == "init":
            print(ca.init_root(args.dir, args.trust_domain, args.days))
        else:
            print(ca.issue_intermediate(args.dir, args.out, args.host, args.days))
    except (ca.CAError, ValueError, OSError) as e:
        print(f"meshd ca: {e}", file=sys.stderr)
        return 1
    return 0


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
    from .footprint import Footprint, FootprintError
    try:
        binary = Footprint(cfg.mesh).envoy_binary()
    except FootprintError as e:
        print(f"{args.config_dir}: mesh.envoy_binary: {e}", file=sys.stderr)
        return 1
    print(f"{args.config_dir}: ok ({len(cfg.files)} file(s), {len(cfg.workloads)} workload(s); "
          f"envoy: {binary})")
    return 0


def _mesh_despite_errors(config_dir: str):
    """Where the instance lives (state_dir, bpffs_dir, cgroup_root, netns), read
    leniently from whichever file sets it even if the config as a whole is
    invalid: a rejected change is exactly when `meshd status` (and possibly
    `meshd cleanup`) is needed."""
    import dataclasses
    from .config import MeshConfig, parse_toml, read_files
    found = {}
    for text in read_files(config_dir)[0].values():   # the same hostile-file rules as check
        try:
            mesh = parse_toml(text).get("mesh", {})
        except ValueError:
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
        from .footprint import alive
        running, source = st.state != "stopped" and alive(st.pid), f"status file {path}"
    print(st.to_json() if args.json else status.format_text(st, running, source))
    return 0 if running else 3


def _since(value: str, now: float) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1:] in units:
            return now - float(value[:-1]) * units[value[-1]]
        return float(value)
    except ValueError:
        raise SystemExit(f"meshd observe: --since: expected a duration (30s, 5m, 2h) or a "
                         f"unix time, got {value!r}") from None


def cmd_observe(args) -> int:
    import json
    import time
    from . import observe, statefiles
    state_dir = _mesh_or_lenient(args.config_dir).state_dir
    now = time.time()
    since = _since(args.since, now) if args.since else (now if args.follow else 0.0)
    path = statefiles.path(state_dir, statefiles.OBSERVE_SOCKET)
    direction = {"in": "inbound", "out": "outbound"}.get(args.direction, args.direction or "")
    try:
        for r in observe.stream(path, since, args.follow):
            if observe.matches(r, args.workload, direction, args.status):
                print(json.dumps(r, sort_keys=True) if args.json else observe.format_line(r),
                      flush=True)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"meshd is not running (nothing at {path})", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        sys.stderr.close()   # the reader went away (| head): not an error
    return 0


def _need_root(command: str) -> None:
    if os.geteuid() != 0:
        raise PermissionError("must run as root (it loads and removes eBPF "
                              "programs, cgroups and routing)")


def cmd_cleanup(args) -> int:
    from .footprint import Footprint, FootprintError
    _need_root("cleanup")
    if not os.path.isdir(args.config_dir):   # a typo must not clean up the default instance
        print(f"meshd cleanup: {args.config_dir}: no such config directory", file=sys.stderr)
        return 1
    try:
        Footprint(_mesh_or_lenient(args.config_dir)).cleanup()
    except FootprintError as e:
        print(f"meshd: {e}", file=sys.stderr)
        return 1
    return 0


def describe(e: BaseException) -> str:
    """One line for an expected error: an OSError names its file, not its errno."""
    if isinstance(e, OSError) and e.strerror and e.errno:
        where = f": {e.filename}" if e.filename else ""
        hint = " (meshd needs root)" if isinstance(e, PermissionError) and os.geteuid() else ""
        return f"{e.strerror}{where}{hint}"
    return str(e)


def expected_errors() -> tuple[type[BaseException], ...]:
    """What the environment (not a bug) can make a command fail with."""
    from .cgroups import CgroupError
    from .datapath import DatapathError
    from .envoy.systemd_manager import SystemdError
    from .footprint import FootprintError
    from .plan import PlanError
    from .routing import RoutingError
    return (OSError, CgroupError, DatapathError, SystemdError, FootprintError, PlanError,
            RoutingError, ConfigInvalid)


def _run(args) -> int:
    _need_root("run")
    _setup_logging(args.log_level)
    from .daemon import run
    return run(args.config_dir)


def _oci_hook(args) -> int:
    from .ocihook import main as hook_main
    return hook_main(args.config_dir, min(max(args.timeout, 0.1), 60.0))


COMMANDS = {"check": cmd_check, "status": cmd_status, "cleanup": cmd_cleanup, "run": _run,
            "oci-hook": _oci_hook, "observe": cmd_observe, "ca": cmd_ca}


def main(argv=None) -> int:
    """Every command: its exit status, or one line on stderr and 1 for an expected
    error (never a traceback); 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not isinstance(e, expected_errors()):
            raise
        print(f"meshd {args.command}: {describe(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
