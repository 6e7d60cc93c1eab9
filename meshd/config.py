"""meshd configuration: *.toml files in, a validated immutable Config (or every error) out.

Pure: the only system access is listing and reading the config directory in
load_config(); parse_files() is the side-effect-free core, fed path -> text.
"""
from __future__ import annotations

import difflib
import errno
import functools
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_CONFIG_DIR = "/etc/meshd"
MAX_WORKLOAD_COUNT = 255   # workload ids 1..255 (maplayout.MAX_WORKLOADS - 1)


@dataclass(frozen=True)
class ConfigError:
    file: str
    line: int  # 1-based; 0 when no line applies
    key: str  # dotted key, e.g. "mesh.outbound_port"; "" for errors about the whole file
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigInvalid(Exception):
    def __init__(self, errors: list[ConfigError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


@dataclass(frozen=True)
class MeshConfig:
    outbound_port: int = 15001  # Envoy outbound listener port
    inbound_port: int = 15006  # Envoy inbound listener port
    envoy_binary: str = ""  # "" = find on PATH / next to the python interpreter
    envoy_log_level: str = "warning"
    exclude_outbound_ports: tuple[int, ...] = (22,)  # SSH, so a mistake can't lock the operator out
    exclude_outbound_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = (22,)
    bpffs_dir: str = "/sys/fs/bpf/meshd"  # absolute
    state_dir: str = "/run/meshd"  # absolute
    cgroup_root: str = "/meshd.slice"  # relative to the cgroup2 mount; Envoy runs below it (a systemd slice under systemd)
    netns: str = ""  # "" = meshd's own network namespace, else an absolute path
    # inbound: the application sees the client's address (original_src + policy
    # routing) instead of Envoy's 127.0.0.6
    preserve_client_address: bool = True
    # destination port -> application protocol, for every connection on this host;
    # a port not listed is "tcp": its bytes pass untouched (see PROTOCOLS)
    protocols: tuple[tuple[int, str], ...] = ()
    # inbound HTTP: append the client's address to X-Forwarded-For
    http_forwarded_for: bool = False
    # identity (docs/identity.md): "" = no identities, no mTLS (plain as before)
    trust_domain: str = ""
    identity_dir: str = "/etc/meshd/identity"   # intermediate.crt/.key, bundle.crt
    cert_lifetime: int = 86400                   # workload certificates, seconds
    mtls_port: int = 15008                       # Envoy's mTLS listener (other hosts call it)
    inbound_mode: str = "permissive"             # or "strict": no plaintext from other hosts
    # map sizes (maplayout.MapSizes; take effect at restart, the maps keep their contents)
    max_connections: int = 65536   # steered connections open at once; beyond: direct, counted
    max_exclusions: int = 16384    # entries of each exclusion map (ports, IPv4 CIDRs, ...)
    max_inbound_ports: int = 16384  # meshed inbound ports
    # socket acceleration of local pairs (sockops + sk_msg): "on" (true), "off"
    # (false) or "force" (also on a kernel not on meshd/acceleration.py's allowlist)
    acceleration: str = "off"
    # observability (docs/observability.md): Prometheus endpoint ("" = off),
    # flow log destination and the share of records it keeps
    metrics_address: str = "127.0.0.1:9464"
    flow_logs: str = "auto"
    flow_log_sample: float = 1.0


@dataclass(frozen=True)
class Workload:
    name: str
    cgroup: str | None  # relative to the cgroup2 mount, normalized "/a/b"
    unit: str | None  # systemd unit name
    exclude_outbound_ports: tuple[int, ...]  # per-workload only; the datapath adds the global ones
    exclude_outbound_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    exclude_inbound_ports: tuple[int, ...]
    source: str  # "file:line" where the table was declared
    # inbound ports steered through Envoy: None = every TCP port it listens on
    inbound_ports: tuple[int, ...] | None = None
    # protocols of the ports this workload serves, over [mesh] protocols
    protocols: tuple[tuple[int, str], ...] = ()
    # identity: "" = [mesh] inbound_mode; allow_from: SPIFFE IDs (names resolved), None = all
    inbound_mode: str = ""
    allow_from: tuple[str, ...] | None = None
    # Podman containers selected by name (shell patterns) or by labels (all must
    # match), enrolled when discovery sees them (meshd/podmanselect.py)
    container_names: tuple[str, ...] = ()
    container_labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CatalogConfig:
    """[catalog]: the etcd cluster where hosts find each other (docs/identity.md)."""
    endpoints: tuple[str, ...]
    prefix: str = "/meshd/v1/"
    lease_ttl: int = 10            # seconds: a vanished host leaves the catalog this late
    ca_file: str = ""              # TLS to etcd: CA bundle, client certificate and key
    cert_file: str = ""
    key_file: str = ""
    host_name: str = ""            # "" = the machine's host name


@dataclass(frozen=True)
class Config:
    mesh: MeshConfig
    workloads: tuple[Workload, ...]  # sorted by name
    files: tuple[str, ...]  # the *.toml files read, sorted
    catalog: CatalogConfig | None = None   # None: single host, no etcd


# ---------------------------------------------------------------- converters
# Each takes a raw TOML value and returns the typed value or raises ValueError(message).

_TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
_LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]+)?\.(service|scope|slice|socket)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _describe(value: Any) -> str:
    kind = _TOML_TYPES.get(type(value), type(value).__name__)  # datetimes keep their Python name
    if isinstance(value, (list, dict)):
        return kind
    return f"{kind} {str(value).lower() if isinstance(value, bool) else repr(value)}"


def _expect(value: Any, typ: type, what: str) -> Any:
    # bool is an int subclass in Python, but `port = true` is a mistake, not port 1.
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise ValueError(f"expected {what}, got {_describe(value)}")
    return value


def _string(v: Any) -> str:
    return _expect(v, str, "string")


def _bool(v: Any) -> bool:
    return _expect(v, bool, "boolean")


def _abs_path(v: Any, allow_empty: bool = False) -> str:
    if not _string(v).startswith("/") and not (allow_empty and v == ""):
        raise ValueError(f"must be an absolute path{' or empty' if allow_empty else ''}, got {v!r}")
    return v


def _log_level(v: Any) -> str:
    if _string(v) not in _LOG_LEVELS:
        raise ValueError(f"must be one of {' '.join(_LOG_LEVELS)}, got {v!r}")
    return v


def _port(v: Any) -> int:
    if not 1 <= _expect(v, int, "integer") <= 65535:
        raise ValueError(f"port {v} out of range 1..65535")
    return v


def _cidr(v: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    _string(v)
    try:
        return ipaddress.ip_network(v, strict=False)  # strict=False: 10.1.2.3/8 means 10.0.0.0/8
    except ValueError:
        raise ValueError(f"invalid CIDR {v!r}") from None


def _cgroup(v: Any) -> str:
    if not _string(v).startswith("/"):
        raise ValueError(f"must start with '/' (relative to the cgroup2 mount), got {v!r}")
    if v == "/sys/fs/cgroup" or v.startswith("/sys/fs/cgroup/"):
        raise ValueError(f"is relative to the cgroup2 mount: drop the /sys/fs/cgroup prefix from {v!r}")
    parts = [p for p in v.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"must not contain '..', got {v!r}")
    if not parts:
        raise ValueError("must not be the root cgroup '/'")
    return "/" + "/".join(parts)


def _unit(v: Any) -> str:
    if len(_string(v)) > 255 or not _UNIT_RE.match(v):
        raise ValueError(f"expected a systemd unit name ending in .service, .scope, .slice or .socket, got {v!r}")
    return v


def _list_of(convert: Callable[[Any], Any], what: str, sort_key: Callable | None = None):
    """Array converter: converts every element, reports all bad ones, dedupes and sorts."""
    def conv(v: Any) -> tuple:
        good, bad = set(), []
        for i, item in enumerate(_expect(v, list, f"array of {what}"), 1):
            try:
                good.add(convert(item))
            except ValueError as e:
                bad.append(f"element {i}: {e}")
        if bad:
            raise ValueError("; ".join(bad))
        return tuple(sorted(good, key=sort_key))
    return conv


_ports = _list_of(_port, "integers")

_CONTAINER_NAME = re.compile(r"[A-Za-z0-9*?\[][A-Za-z0-9_.*?\[\]!-]{0,252}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,252}")


def _container_name(v: Any) -> str:
    """A Podman container name, or a shell-style pattern of names (web-*)."""
    _expect(v, str, "a string")
    if not _CONTAINER_NAME.fullmatch(v):
        raise ValueError(f"expected a container name or pattern ([a-zA-Z0-9][a-zA-Z0-9_.-]*, "
                         f"with * ? [] wildcards), got {v!r}")
    return v


_container_names = _list_of(_container_name, "container names")


def _container_labels(v: Any) -> tuple[tuple[str, str], ...]:
    """A table of label = "value"; a container must carry all of them."""
    bad, good = [], {}
    for key, value in _expect(v, dict, 'table of label = "value"').items():
        if not _LABEL.fullmatch(key):
            bad.append(f"label {key!r}: expected [A-Za-z0-9][A-Za-z0-9_./-]*")
        elif not isinstance(value, str) or "\0" in value or len(value) > 4096:
            bad.append(f"label {key}: expected a string value, got {_describe(value)}")
        else:
            good[key] = value
    if bad:
        raise ValueError("; ".join(bad))
    if not good:
        raise ValueError("expected at least one label = \"value\"")
    return tuple(sorted(good.items()))

# What Envoy does with a port's connections. "tcp" forwards bytes untouched, with
# TCP's own semantics (half-close, resets, no timeouts); the HTTP family runs
# Envoy's HTTP connection manager (per-request numbers; Envoy's HTTP handling
# shows, see README "Transparency"). The names are the ones Istio and Consul use.
PROTOCOLS = ("tcp", "http", "http2", "grpc")


def _protocols(v: Any) -> tuple[tuple[int, str], ...]:
    """A table of port = "protocol", e.g. { 8080 = "http", 50051 = "grpc" }."""
    bad, good = [], {}
    for key, proto in _expect(v, dict, 'table of port = "protocol"').items():
        try:
            port = int(key) if key.isdigit() else None
            if port is None or not 1 <= port <= 65535:
                raise ValueError(f"key {key!r} is not a port number 1..65535")
            if not isinstance(proto, str) or proto not in PROTOCOLS:
                raise ValueError(f"port {key}: expected one of {', '.join(PROTOCOLS)}, "
                                 f"got {_describe(proto)}")
            good[port] = proto
        except ValueError as e:
            bad.append(str(e))
    if bad:
        raise ValueError("; ".join(bad))
    return tuple(sorted(good.items()))


def _acceleration(v: Any) -> str:
    """true | false | "force" -> "on" | "off" | "force"."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if v == "force":
        return v
    raise ValueError(f'expected true, false or "force", got {_describe(v)}')


_cidrs = _list_of(_cidr, "CIDR strings", sort_key=lambda n: (n.version, n.network_address, n.prefixlen))

# ---------------------------------------------------------------- identity and catalog keys
INBOUND_MODES = ("permissive", "strict")


def _trust_domain(v: Any) -> str:
    from .identity import check_trust_domain
    return check_trust_domain(_string(v)) if v != "" else ""


def _inbound_mode(v: Any) -> str:
    if _string(v) not in INBOUND_MODES:
        raise ValueError(f"expected one of {', '.join(INBOUND_MODES)}, got {v!r}")
    return v


def _seconds(v: Any) -> int:
    if _expect(v, int, "integer (seconds)") < 1:
        raise ValueError(f"must be at least 1 second, got {v}")
    return v


def _caller(v: Any) -> str:
    """allow_from entry: a workload name or a SPIFFE ID."""
    if _string(v).startswith("spiffe://"):
        from .identity import parse_spiffe_id
        parse_spiffe_id(v)
        return v
    if not _NAME_RE.match(v):
        raise ValueError(f"expected a workload name or a spiffe:// ID, got {v!r}")
    return v


def _endpoint(v: Any) -> str:
    if not re.match(r"^https?://[^/\s]+$", _string(v)):
        raise ValueError(f"expected http://HOST:PORT or https://HOST:PORT, got {v!r}")
    return v


def _host_name(v: Any) -> str:
    if _string(v) and not _NAME_RE.match(v):
        raise ValueError(f"invalid host name {v!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return v


def _nonempty(conv):
    def c(v: Any):
        out = conv(v)
        if not out:
            raise ValueError("must not be empty")
        return out
    return c


_CATALOG_SCHEMA: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "endpoints": (_nonempty(_list_of(_endpoint, "endpoint URLs")), None),
    "prefix": (_abs_path, "/meshd/v1/"),
    "lease_ttl": (_seconds, 10),
    "ca_file": (lambda v: _abs_path(v, allow_empty=True), ""),
    "cert_file": (lambda v: _abs_path(v, allow_empty=True), ""),
    "key_file": (lambda v: _abs_path(v, allow_empty=True), ""),
    "host_name": (_host_name, ""),
}

def _metrics_address(v: Any) -> str:
    if _string(v):
        from .metrics import parse_address
        parse_address(v)
    return v


def _flow_logs(v: Any) -> str:
    from .flowlog import MODES
    if _string(v) not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}, got {v!r}")
    return v


def _fraction(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"expected a number above 0 and at most 1, got {_describe(v)}")
    return float(v)


def _map_size(low: int, high: int):
    """A map size: an integer within what the kernel and meshd's memory allow."""
    def conv(v: Any) -> int:
        if not low <= _expect(v, int, "integer") <= high:
            raise ValueError(f"{v} out of range {low}..{high}")
        return v
    return conv

# key -> (converter, default)
_MESH_SCHEMA: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "outbound_port": (_port, 15001),
    "inbound_port": (_port, 15006),
    "envoy_binary": (_string, ""),
    "envoy_log_level": (_log_level, "warning"),
    "exclude_outbound_ports": (_ports, (22,)),
    "exclude_outbound_cidrs": (_cidrs, ()),
    "exclude_inbound_ports": (_ports, (22,)),
    "bpffs_dir": (_abs_path, "/sys/fs/bpf/meshd"),
    "state_dir": (_abs_path, "/run/meshd"),
    "cgroup_root": (_cgroup, "/meshd.slice"),
    "netns": (lambda v: _abs_path(v, allow_empty=True), ""),
    "preserve_client_address": (_bool, True),
    "protocols": (_protocols, ()),
    "http_forwarded_for": (_bool, False),
    "trust_domain": (_trust_domain, ""),
    "identity_dir": (_abs_path, "/etc/meshd/identity"),
    "cert_lifetime": (_seconds, 86400),
    "mtls_port": (_port, 15008),
    "inbound_mode": (_inbound_mode, "permissive"),
    "max_connections": (_map_size(64, 16_777_216), 65536),
    "max_exclusions": (_map_size(16, 1_048_576), 16384),
    "max_inbound_ports": (_map_size(16, 65_535), 16384),
    "acceleration": (_acceleration, "off"),
    "metrics_address": (_metrics_address, "127.0.0.1:9464"),
    "flow_logs": (_flow_logs, "auto"),
    "flow_log_sample": (_fraction, 1.0),
}
_WORKLOAD_SCHEMA: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "cgroup": (_cgroup, None),
    "unit": (_unit, None),
    "exclude_outbound_ports": (_ports, ()),
    "exclude_outbound_cidrs": (_cidrs, ()),
    "exclude_inbound_ports": (_ports, ()),
    "inbound_ports": (_ports, None),
    "protocols": (_protocols, ()),
    "inbound_mode": (_inbound_mode, ""),
    "allow_from": (_list_of(_caller, "workload names or SPIFFE IDs"), None),
    "container_names": (_container_names, ()),
    "container_labels": (_container_labels, ()),
}
# The dataclass defaults document the API; the schema must agree with them.
assert {k: d for k, (_, d) in _MESH_SCHEMA.items()} == vars(MeshConfig())


def _unknown(what: str, key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown {what} {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


# ---------------------------------------------------------------- line locator
# tomllib reports no positions for keys, so scan the text for table headers and
# `key =` lines, tracking the current table. Covers [a.b], [a."b"], [[a]], dotted
# keys, one level of inline tables, and skips multi-line arrays and strings.
# Anything not found falls back to its nearest enclosing table found, then line 1.

_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER_RE = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_KEYVAL_RE = re.compile(rf"^\s*({_DOTTED})\s*=")
_INLINE_KEY_RE = re.compile(rf"[{{,]\s*({_DOTTED})\s*=")
_PART_RE = re.compile(_PART)
# tomllib recurses once per nesting level: a file nested deeper than Python's stack
# allows would end in RecursionError. No meshd key nests more than 2 levels.
MAX_NESTING = 64
_STRING_RE = re.compile(r"""\"\"\"|'''|"(?:[^"\\]|\\.)*"|'[^']*'""")


def _split_key(dotted: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _PART_RE.findall(dotted))


def _nesting(code: str) -> tuple[int, int]:
    """Net count of [ and { a line opens, and the deepest it gets on the way,
    ignoring strings and comments."""
    code = _STRING_RE.sub("", code).split("#", 1)[0]
    depth = peak = 0
    for c in code:
        if c in "[{":
            depth += 1
            peak = max(peak, depth)
        elif c in "]}":
            depth -= 1
    return depth, peak


class _Locator:
    def __init__(self, text: str):
        self.lines: dict[tuple[str, ...], int] = {}
        self.keys: list[tuple[str, ...]] = []  # line n-1 -> the key (or table) it belongs to
        self.too_deep = 0  # the first line nested deeper than MAX_NESTING (0: none)
        table: tuple[str, ...] = ()
        path: tuple[str, ...] = ()  # the key whose value is being read
        depth, in_string = 0, None  # inside a multi-line array / string value
        for n, line in enumerate(text.split("\n"), 1):
            deepest = 0
            if in_string:
                in_string = None if line.count(in_string) % 2 else in_string
            elif depth > 0:
                net, peak = _nesting(line)
                depth, deepest = depth + net, depth + peak
            elif m := _HEADER_RE.match(line):
                table = path = _split_key(m.group(1))
                self._add(table, n)
            elif m := _KEYVAL_RE.match(line):
                path, rest = table + _split_key(m.group(1)), line[m.end():]
                self._add(path, n)
                if rest.lstrip().startswith("{"):
                    for im in _INLINE_KEY_RE.finditer(rest):
                        self._add(path + _split_key(im.group(1)), n)
                in_string = next((q for q in ('"""', "'''") if rest.count(q) % 2), None)
                net, deepest = _nesting(rest)
                depth = 0 if in_string else max(net, 0)
            else:
                path = table
            if deepest > MAX_NESTING and not self.too_deep:
                self.too_deep = n
            self.keys.append(path)

    def _add(self, path: tuple[str, ...], line: int) -> None:
        for i in range(1, len(path) + 1):  # prefixes too: `web.cgroup = ...` declares `web`
            self.lines.setdefault(path[:i], line)

    def line(self, *path: str) -> int:
        found = (self.lines[path[:i]] for i in range(len(path), 0, -1) if path[:i] in self.lines)
        return next(found, 1)

    def key_at(self, line: int) -> str:
        """The dotted key (or table) a line belongs to; "" before the first."""
        return ".".join(self.keys[line - 1]) if 0 < line <= len(self.keys) else ""


# ---------------------------------------------------------------- parsing

class _At(NamedTuple):
    """Where a key is: the position part of a ConfigError."""
    file: str
    line: int
    key: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class _Parser:
    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.mesh: dict[str, Any] = {}
        self.mesh_at: dict[str, _At] = {}  # every mesh key set, valid or not
        self.workloads: dict[str, Workload] = {}
        self.workload_at: dict[str, _At] = {}  # every workload declared, valid or not
        self.locators: dict[str, _Locator] = {}
        self.file = ""  # the file being added
        self.catalog: CatalogConfig | None = None
        self.catalog_at: _At | None = None

    def at(self, *path: str, file: str = "") -> _At:
        file = file or self.file
        return _At(file, self.locators[file].line(*path), ".".join(path))

    def err(self, at: _At, message: str) -> None:
        self.errors.append(ConfigError(*at, message))

    def table(self, at: _At, value: Any) -> bool:
        if not isinstance(value, dict):
            self.err(at, f"expected table, got {_describe(value)}")
        return isinstance(value, dict)

    def add_file(self, path: str, text: str) -> None:
        locator = _Locator(text)
        try:
            doc = parse_toml(text, locator)
        except ValueError as e:
            line = _decode_error_line(e, text) if not locator.too_deep else locator.too_deep
            self.errors.append(ConfigError(path, line, locator.key_at(line), str(e)))
            return
        self.file, self.locators[path] = path, locator
        for key, value in doc.items():
            if key not in ("mesh", "workload", "catalog"):
                hint = _unknown("table/key", key, ("mesh", "workload", "catalog"))
                self.err(self.at(key), f"{hint}; allowed are [mesh], [catalog] and [workload.NAME]")
            elif key == "catalog":
                if self.table(self.at(key), value):
                    self.add_catalog(value)
            elif self.table(self.at(key), value):
                for name, item in value.items():
                    (self.add_mesh_key if key == "mesh" else self.add_workload)(name, item)

    def add_mesh_key(self, key: str, raw: Any) -> None:
        at = self.at("mesh", key)
        if key not in _MESH_SCHEMA:
            return self.err(at, _unknown("key", key, _MESH_SCHEMA))
        if key in self.mesh_at:
            return self.err(at, f"already set at {self.mesh_at[key]}; each [mesh] key may be set in one file only")
        self.mesh_at[key] = at
        try:
            self.mesh[key] = _MESH_SCHEMA[key][0](raw)
        except ValueError as e:
            self.err(at, str(e))

    def add_catalog(self, table: dict) -> None:
        at = self.at("catalog")
        if self.catalog_at:
            return self.err(at, f"[catalog] already set at {self.catalog_at}; set it in one file")
        self.catalog_at = at
        values = {}
        for key, raw in table.items():
            if key not in _CATALOG_SCHEMA:
                self.err(self.at("catalog", key), _unknown("key", key, _CATALOG_SCHEMA))
                continue
            try:
                values[key] = _CATALOG_SCHEMA[key][0](raw)
            except ValueError as e:
                self.err(self.at("catalog", key), str(e))
        if "endpoints" not in table:
            self.err(at, "needs 'endpoints' (etcd client URLs, e.g. [\"http://10.0.0.1:2379\"])")
        elif bool(values.get("cert_file")) != bool(values.get("key_file")):
            self.err(at, "cert_file and key_file go together (an etcd client certificate and its key)")
        elif "endpoints" in values:
            self.catalog = CatalogConfig(**values)

    def add_workload(self, name: str, table: Any) -> None:
        at, errors_before = self.at("workload", name), len(self.errors)
        if not _NAME_RE.match(name):
            self.err(at, f"invalid workload name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        if name in self.workload_at:
            self.err(at, f"duplicate workload, first defined at {self.workload_at[name]}")
        self.workload_at.setdefault(name, at)
        if not self.table(at, table):
            return
        values = {}
        for key, raw in table.items():
            if key not in _WORKLOAD_SCHEMA:
                self.err(self.at("workload", name, key), _unknown("key", key, _WORKLOAD_SCHEMA))
                continue
            try:
                values[key] = _WORKLOAD_SCHEMA[key][0](raw)
            except ValueError as e:
                self.err(self.at("workload", name, key), str(e))
        selectors = [k for k in ("cgroup", "unit") if k in table]
        if len(selectors) > 1:
            # neither is fine: a bare [workload.NAME] selects Podman containers only
            # (podman run --annotation io.meshd.workload=NAME)
            self.err(at, "needs at most one of 'cgroup' or 'unit' (both are set)")
        if len(self.errors) == errors_before:
            fields = {k: values.get(k, default) for k, (_, default) in _WORKLOAD_SCHEMA.items()}
            self.workloads[name] = Workload(name=name, source=str(at), **fields)

    def mesh_key_at(self, *keys: str) -> _At:
        """Where the first of these keys was set; a default has no place of its own."""
        return next((self.mesh_at[k] for k in keys if k in self.mesh_at), _At("<defaults>", 0, f"mesh.{keys[0]}"))

    def check(self, mesh: MeshConfig) -> None:
        """Rules across keys and files, once everything is merged."""
        envoy = {mesh.outbound_port, mesh.inbound_port}
        if mesh.outbound_port == mesh.inbound_port:
            self.err(self.mesh_key_at("inbound_port", "outbound_port"),
                     f"outbound_port and inbound_port are both {mesh.inbound_port}")
        self.check_identity(mesh, envoy)
        for key in ("exclude_outbound_ports", "exclude_inbound_ports"):
            if envoy & set(getattr(mesh, key)):
                self.err(self.mesh_key_at(key, "outbound_port", "inbound_port"),
                         _envoy_clash(envoy, getattr(mesh, key), f"mesh.{key}"))
        self.check_limits(mesh)
        selected: dict[tuple[str, str], Workload] = {}  # (selector, value) -> first workload to use it
        for w in sorted(self.workloads.values(), key=lambda w: self.workload_at[w.name]):
            at = functools.partial(self.at, "workload", w.name, file=self.workload_at[w.name].file)
            for key in ("exclude_outbound_ports", "exclude_inbound_ports"):
                if envoy & set(getattr(w, key)):
                    self.err(at(key), _envoy_clash(envoy, getattr(w, key), key))
            # cgroup BPF programs apply to descendants too, so Envoy must not be in or below a workload.
            if w.cgroup and (_within(w.cgroup, mesh.cgroup_root) or _within(mesh.cgroup_root, w.cgroup)):
                self.err(at("cgroup"), f"overlaps mesh.cgroup_root {mesh.cgroup_root} where Envoy runs; "
                                       "enrolling Envoy would loop its traffic")
            for selector in ("cgroup", "unit"):
                value = getattr(w, selector)
                first = selected.setdefault((selector, value), w) if value else w
                if first is not w:
                    self.err(at(selector), f"{selector} {value} is already selected by workload "
                                           f"{first.name!r} at {first.source}")
            for pattern in w.container_names:
                first = selected.setdefault(("container_names", pattern), w)
                if first is not w:
                    self.err(at("container_names"), f"container name {pattern!r} is already "
                                                    f"selected by workload {first.name!r} at "
                                                    f"{first.source}")


    def check_identity(self, mesh: MeshConfig, envoy: set[int]) -> None:
        """mTLS needs a trust domain; its port is Envoy's too."""
        if mesh.trust_domain and mesh.mtls_port in envoy:
            self.err(self.mesh_key_at("mtls_port"),
                     f"mtls_port {mesh.mtls_port} is already outbound_port or inbound_port")
        if mesh.trust_domain:
            envoy.add(mesh.mtls_port)
        needs = [(self.mesh_at.get("inbound_mode"), "mesh.inbound_mode")] if mesh.inbound_mode != "permissive" else []
        if self.catalog_at:
            needs.append((self.catalog_at, "[catalog]"))
        for w in self.workloads.values():
            if w.inbound_mode or w.allow_from is not None:
                needs.append((self.at("workload", w.name, file=self.workload_at[w.name].file),
                              f"workload.{w.name}: inbound_mode/allow_from"))
        if not mesh.trust_domain:
            for at, what in needs:
                self.err(at or self.mesh_key_at("trust_domain"),
                         f"{what} needs mesh.trust_domain (workload identities)")

    def check_limits(self, mesh: MeshConfig) -> None:
        """What the data path's maps can hold: workload ids, exclusions, inbound ports."""
        ordered = sorted(self.workloads.values(), key=lambda w: self.workload_at[w.name])
        if len(ordered) > MAX_WORKLOAD_COUNT:
            w = ordered[MAX_WORKLOAD_COUNT]
            self.err(self.workload_at[w.name],
                     f"workload {len(ordered)}: at most {MAX_WORKLOAD_COUNT} workloads (each gets "
                     f"an id 1..{MAX_WORKLOAD_COUNT} and the source address 127.77.0.<id>)")
        ws = self.workloads.values()
        v4 = lambda nets: [n for n in nets if n.version == 4]   # noqa: E731
        v6 = lambda nets: [n for n in nets if n.version == 6]   # noqa: E731
        for key, what, count in (
                ("exclude_outbound_ports", "excluded outbound ports",
                 len(mesh.exclude_outbound_ports) + sum(len(w.exclude_outbound_ports) for w in ws)),
                ("exclude_outbound_cidrs", "excluded IPv4 networks",
                 len(v4(mesh.exclude_outbound_cidrs)) + sum(len(v4(w.exclude_outbound_cidrs)) for w in ws)),
                ("exclude_outbound_cidrs", "excluded IPv6 networks",
                 len(v6(mesh.exclude_outbound_cidrs)) + sum(len(v6(w.exclude_outbound_cidrs)) for w in ws)),
                ("exclude_inbound_ports", "excluded inbound ports",
                 len(mesh.exclude_inbound_ports) + sum(len(w.exclude_inbound_ports) for w in ws))):
            if count > mesh.max_exclusions:
                self.err(self.mesh_key_at("max_exclusions", key),
                         f"{count} {what} ([mesh] and every workload's {key} together) exceed "
                         f"mesh.max_exclusions = {mesh.max_exclusions}")
        inbound = sum(len(w.inbound_ports or ()) for w in ws)
        if inbound > mesh.max_inbound_ports:
            self.err(self.mesh_key_at("max_inbound_ports"),
                     f"{inbound} inbound ports listed by workloads (inbound_ports) exceed "
                     f"mesh.max_inbound_ports = {mesh.max_inbound_ports}")


def _envoy_clash(envoy: set[int], ports: tuple[int, ...], key: str) -> str:
    return f"Envoy's listener port(s) {', '.join(map(str, sorted(envoy & set(ports))))} must not be in {key}"


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + "/")


def parse_toml(text: str, locator: _Locator | None = None) -> dict:
    """tomllib.loads, with every failure a ValueError: nesting deeper than
    MAX_NESTING is refused before tomllib could exhaust the stack."""
    if (locator or _Locator(text)).too_deep:
        raise ValueError(f"nested more than {MAX_NESTING} arrays/inline tables deep")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"invalid TOML: {e}") from None
    except RecursionError:  # nesting the locator did not count (inside a multi-line string?)
        raise ValueError("invalid TOML: nested too deeply") from None


def _decode_error_line(exc: Exception, text: str) -> int:
    lineno = getattr(exc, "lineno", None)  # only Python >= 3.14 has it
    if isinstance(lineno, int):
        return lineno
    m = re.search(r"\(at line (\d+)", str(exc))
    return int(m.group(1)) if m else max(1, len(text.rstrip().split("\n")))  # "(at end of document)"


def _parse(files: dict[str, str]) -> tuple[Config | None, list[ConfigError]]:
    p = _Parser()
    for path in sorted(files):
        p.add_file(path, files[path])
    mesh = MeshConfig(**p.mesh)
    p.check(mesh)
    workloads = tuple(p.workloads[n] for n in sorted(p.workloads))
    return (None if p.errors else Config(mesh, workloads, tuple(sorted(files)), p.catalog)), p.errors


def _raise(errors: list[ConfigError]) -> None:
    if errors:
        raise ConfigInvalid(sorted(errors, key=lambda e: (e.file, e.line)))


def parse_files(files: dict[str, str]) -> Config:
    """Validate the given config texts (path -> text) as one merged config."""
    config, errors = _parse(files)
    _raise(errors)
    return config


# ---------------------------------------------------------------- reading files
# A config directory is anyone's to fill: every odd file ends in a ConfigError,
# never a traceback or a hang.

MAX_FILE_BYTES = 8 << 20   # 10,000 workloads take < 1 MiB; more is a mistake, not a config


def read_file(path: str) -> str:
    """One config file's text, or ValueError(message). O_NONBLOCK: a FIFO named
    *.toml must not block meshd; only regular files (symlinks to them too) are read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError("cannot read: symbolic link loop") from None
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise ValueError(f"cannot read: symbolic link to {os.readlink(path)!r}, which "
                             "does not exist") from None
        raise ValueError(f"cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ValueError(f"{kind}: *.toml in a config directory must be regular files")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)   # the size may change between fstat and read
    except OSError as e:
        raise ValueError(f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    return decode(data)


def decode(data: bytes) -> str:
    """UTF-8 text (as TOML requires), or ValueError naming where the first bad byte is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise _BadByte(line, column, data[e.start], e.start,
                       data.decode("utf-8", errors="replace")) from None


class _BadByte(ValueError):
    def __init__(self, line: int, column: int, byte: int, offset: int, lossy: str):
        self.line, self.key = line, _Locator(lossy).key_at(line)  # the key on that line
        super().__init__(f"not UTF-8: byte 0x{byte:02x} at line {line}, column {column} "
                         f"(offset {offset}); TOML files must be UTF-8")


def config_names(config_dir: str) -> list[str]:
    """The *.toml files of config_dir (not recursive), sorted. Dotfiles are editor
    locks/temporaries (emacs' .#meshd.toml): skipped."""
    return [os.path.join(config_dir, n) for n in sorted(os.listdir(config_dir))
            if n.endswith(".toml") and not n.startswith(".")]


def read_files(config_dir: str) -> tuple[dict[str, str], list[ConfigError]]:
    """The texts of config_dir's files (path -> text) and the errors of those that
    cannot be read (a dangling symlink, a FIFO, bad UTF-8, ...). A file removed between listing and reading (an editor's rename)
    is gone, not an error: the change that removed it triggers a new reload."""
    try:
        paths = config_names(config_dir)
    except OSError as e:
        return {}, [ConfigError(config_dir, 0, "", f"cannot read config directory: {e.strerror}")]
    texts, errors = {}, []
    for path in paths:
        if os.path.isdir(path):   # subdirectories are not read, whatever their name
            continue
        try:
            texts[path] = read_file(path)
        except _BadByte as e:
            errors.append(ConfigError(path, e.line, e.key, str(e)))
        except ValueError as e:
            if os.path.lexists(path):
                errors.append(ConfigError(path, 0, "", str(e)))
    return texts, errors


def load_config(config_dir: str) -> Config:
    """Read every *.toml in config_dir (not recursive) and validate them together."""
    texts, errors = read_files(config_dir)
    config, parse_errors = _parse(texts)
    _raise(errors + parse_errors)
    return config
