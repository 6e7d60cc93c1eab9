import dataclasses
import ipaddress
import re
from pathlib import Path

import pytest

from meshd.config import (
    DEFAULT_CONFIG_DIR,
    Config,
    ConfigError,
    ConfigInvalid,
    MeshConfig,
    Workload,
    load_config,
    parse_files,
)

SHIPPED_DIR = Path(__file__).parents[2] / "etc/meshd"


def errors_of(files: dict) -> list[str]:
    with pytest.raises(ConfigInvalid) as exc:
        parse_files(files)
    assert str(exc.value) == "\n".join(str(e) for e in exc.value.errors)
    return [str(e) for e in exc.value.errors]


def only_error(text: str) -> str:
    errors = errors_of({"a.toml": text})
    assert len(errors) == 1, errors
    return errors[0]


# ---------------------------------------------------------------- valid configs

def test_empty_directory_gives_defaults(tmp_path):
    config = load_config(str(tmp_path))
    assert config == Config(mesh=MeshConfig(), workloads=(), files=())
    assert config.mesh.exclude_outbound_ports == (22,) and config.mesh.exclude_inbound_ports == (22,)
    assert DEFAULT_CONFIG_DIR == "/etc/meshd"


def test_shipped_config_loads_to_defaults():
    config = load_config(str(SHIPPED_DIR))
    assert config.mesh == MeshConfig()
    assert config.workloads == ()
    assert config.files == (str(SHIPPED_DIR / "meshd.toml"),)


def test_shipped_config_documents_every_mesh_key_with_its_default():
    text = (SHIPPED_DIR / "meshd.toml").read_text()
    lines = [line[2:] for line in text.splitlines() if line.startswith("# ") and " = " in line]
    for field in dataclasses.fields(MeshConfig):
        line = next((l for l in lines if l.startswith(field.name + " ")), None)
        assert line is not None, f"{field.name} not documented"
        # Uncommenting the line must give exactly the default.
        one = parse_files({"x.toml": "[mesh]\n" + line})
        assert getattr(one.mesh, field.name) == field.default


def test_shipped_config_examples_are_valid_when_uncommented():
    text = (SHIPPED_DIR / "meshd.toml").read_text()
    body = text.split("\n[mesh]\n", 1)[1]
    # Uncomment only what looks like TOML (headers and `key =` lines), not the prose.
    toml_line = re.compile(r"^# (\[|[a-z_]+ = )")
    uncommented = "\n".join(l[2:] for l in body.splitlines() if toml_line.match(l))
    config = parse_files({"x.toml": "[mesh]\n" + uncommented})
    assert config.mesh == MeshConfig()
    assert [w.name for w in config.workloads] == ["api", "db-client", "front", "shop", "web",
                                                  "web2"]
    assert config.workloads[5].inbound_ports == (8080, 8443)
    assert (config.workloads[3].cgroup, config.workloads[3].unit) == (None, None)   # bare
    assert config.workloads[2].container_labels == (("app", "shop"), ("tier", "front"))


def test_full_config_across_two_files(tmp_path):
    (tmp_path / "10-mesh.toml").write_text(
        "[mesh]\n"
        "outbound_port = 16001\n"
        "envoy_log_level = 'debug'\n"
        "exclude_outbound_ports = [443, 22, 22, 80]\n"
        'exclude_outbound_cidrs = ["fd00::1/8", "10.1.2.3/8", "10.0.0.0/8", "192.168.0.0/16"]\n'
        "[workload.web]\n"
        'cgroup = "/system.slice//web.service/"\n'
        "exclude_inbound_ports = [9100]\n"
    )
    (tmp_path / "20-more.toml").write_text(
        "[mesh]\n"
        "inbound_port = 16006\n"
        'state_dir = "/tmp/meshd"\n'
        'netns = "/var/run/netns/blue"\n'
        'envoy_binary = "/opt/envoy/bin/envoy"\n'
        "\n"
        '[workload."api.v2"]\n'
        'unit = "api@2.service"\n'
        'exclude_outbound_cidrs = ["169.254.169.254/32"]\n'
    )
    config = load_config(str(tmp_path))
    assert config.files == (str(tmp_path / "10-mesh.toml"), str(tmp_path / "20-more.toml"))
    m = config.mesh
    assert (m.outbound_port, m.inbound_port, m.envoy_log_level) == (16001, 16006, "debug")
    assert m.exclude_outbound_ports == (22, 80, 443)
    assert m.exclude_outbound_cidrs == tuple(
        ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.168.0.0/16", "fd00::/8"))
    assert m.exclude_inbound_ports == (22,)  # untouched default
    assert (m.state_dir, m.netns, m.envoy_binary) == ("/tmp/meshd", "/var/run/netns/blue", "/opt/envoy/bin/envoy")
    assert m.bpffs_dir == "/sys/fs/bpf/meshd" and m.cgroup_root == "/meshd.slice"
    assert config.workloads == (
        Workload(name="api.v2", cgroup=None, unit="api@2.service", exclude_outbound_ports=(),
                 exclude_outbound_cidrs=(ipaddress.ip_network("169.254.169.254/32"),),
                 exclude_inbound_ports=(), source=f"{tmp_path / '20-more.toml'}:7"),
        Workload(name="web", cgroup="/system.slice/web.service", unit=None, exclude_outbound_ports=(),
                 exclude_outbound_cidrs=(), exclude_inbound_ports=(9100,),
                 source=f"{tmp_path / '10-mesh.toml'}:6"),
    )


def test_workload_forms_dotted_and_inline():
    config = parse_files({"a.toml": (
        "[workload]\n"
        'web.cgroup = "/web"\n'
        'db = { unit = "db.service", exclude_inbound_ports = [5432] }\n'
    ), "b.toml": 'workload.x.unit = "x.scope"\n'})
    assert [(w.name, w.cgroup, w.unit, w.source) for w in config.workloads] == [
        ("db", None, "db.service", "a.toml:3"), ("web", "/web", None, "a.toml:2"), ("x", None, "x.scope", "b.toml:1")]


def test_config_is_immutable():
    config = parse_files({"a.toml": "[workload.w]\nunit = 'w.service'\n"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mesh.outbound_port = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workloads[0].unit = "x.service"


def test_ignores_non_toml_files(tmp_path):
    (tmp_path / "meshd.toml").write_text("[mesh]\noutbound_port = 15002\n")
    for name in ("meshd.toml.example", "meshd.toml.dpkg-old", ".meshd.toml.swp", "meshd.toml~", ".#meshd.toml"):
        (tmp_path / name).write_text("this is [not valid toml\n")
    (tmp_path / "sub.toml").mkdir()  # not a file; and subdirectories are not read
    (tmp_path / "sub.toml" / "x.toml").write_text("broken = \n")
    config = load_config(str(tmp_path))
    assert config.files == (str(tmp_path / "meshd.toml"),)
    assert config.mesh.outbound_port == 15002


# ---------------------------------------------------------------- errors

def test_error_str_format():
    assert str(ConfigError("/etc/meshd/a.toml", 3, "mesh.x", "bad")) == "/etc/meshd/a.toml:3: mesh.x: bad"


def test_missing_directory(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigInvalid) as exc:
        load_config(missing)
    assert [(e.file, e.line, e.key) for e in exc.value.errors] == [(missing, 0, "")]


def test_parse_error_reports_its_line(tmp_path):
    (tmp_path / "a.toml").write_text("[mesh]\noutbound_port = 15001\ninbound_port = \n")
    with pytest.raises(ConfigInvalid) as exc:
        load_config(str(tmp_path))
    assert str(exc.value).startswith(f"{tmp_path / 'a.toml'}:3: mesh.inbound_port: invalid TOML")


def test_parse_error_at_end_of_document():
    assert only_error("[mesh]\nexclude_inbound_ports = [1,\n").startswith("a.toml:2: mesh.exclude_inbound_ports: invalid TOML")


@pytest.mark.parametrize("text, prefix, message", [
    ("[workload]\n\n[foo]\nx = 1\n", "a.toml:3: foo:", "unknown table/key 'foo'"),
    ("\nfoo = 1\n[mesh]\n", "a.toml:2: foo:", "unknown table/key 'foo'"),
    ("[workloads.web]\nunit = 'w.service'\n", "a.toml:1: workloads:", "did you mean 'workload'?"),
    ("mesh = 1\n", "a.toml:1: mesh:", "expected table, got integer"),
    ("[mesh]\noutbond_port = 1\n", "a.toml:2: mesh.outbond_port:", "did you mean 'outbound_port'?"),
    ("[mesh]\nzzz = 1\n", "a.toml:2: mesh.zzz:", "unknown key 'zzz'"),
    ("[mesh]\n# c\noutbound_port = '15001'\n", "a.toml:3: mesh.outbound_port:", "expected integer, got string"),
    ("[mesh]\ninbound_port = true\n", "a.toml:2: mesh.inbound_port:", "expected integer, got boolean"),
    ("[mesh]\ninbound_port = 65536\n", "a.toml:2: mesh.inbound_port:", "out of range"),
    ("[mesh]\ninbound_port = 0\n", "a.toml:2: mesh.inbound_port:", "out of range"),
    ("[mesh]\nexclude_inbound_ports = 22\n", "a.toml:2: mesh.exclude_inbound_ports:", "expected array of integers"),
    ("[mesh]\nexclude_outbound_ports = [\n  1,\n  2.5,\n]\nstate_dir = '/x'\n",
     "a.toml:2: mesh.exclude_outbound_ports:", "element 2: expected integer, got float"),
    ("[mesh]\nexclude_outbound_cidrs = ['10.0.0.0/8', '10.0.0.0/33']\n",
     "a.toml:2: mesh.exclude_outbound_cidrs:", "element 2: invalid CIDR"),
    ("[mesh]\nexclude_outbound_cidrs = [10]\n", "a.toml:2: mesh.exclude_outbound_cidrs:", "expected string"),
    ("[mesh]\nenvoy_log_level = 'verbose'\n", "a.toml:2: mesh.envoy_log_level:", "must be one of"),
    ("[mesh]\nenvoy_binary = 1\n", "a.toml:2: mesh.envoy_binary:", "expected string, got integer"),
    ("[mesh]\nstate_dir = 'run/meshd'\n", "a.toml:2: mesh.state_dir:", "absolute"),
    ("[mesh]\nbpffs_dir = ''\n", "a.toml:2: mesh.bpffs_dir:", "absolute"),
    ("[mesh]\nnetns = 'blue'\n", "a.toml:2: mesh.netns:", "absolute"),
    ("[mesh]\ncgroup_root = '/'\n", "a.toml:2: mesh.cgroup_root:", "root cgroup"),
    ("[mesh]\ncgroup_root = 'meshd'\n", "a.toml:2: mesh.cgroup_root:", "must start with '/'"),
    ('[workload."bad name"]\nunit = "x.service"\n', "a.toml:1: workload.bad name:", "invalid workload name"),
    ("\n[workload.web]\nunit = 'w.service'\ncgroup = '/w'\n", "a.toml:2: workload.web:", "both are set"),
    ("[workload.web]\nunit = 'w.service'\n[workload.db]\ncgroup = '/a/../b'\n",
     "a.toml:4: workload.db.cgroup:", "'..'"),
    ("[workload.web]\ncgroup = '/sys/fs/cgroup/system.slice/web.service'\n",
     "a.toml:2: workload.web.cgroup:", "drop the /sys/fs/cgroup prefix"),
    ("[workload.web]\nunit = 'web'\n", "a.toml:2: workload.web.unit:", "systemd unit name"),
    ("[workload.web]\nunit = 'w.service'\nexclude_outbund_ports = []\n",
     "a.toml:3: workload.web.exclude_outbund_ports:", "did you mean 'exclude_outbound_ports'?"),
    ("[workload.web]\nunit = 'w.service'\n[workload.db]\ncgroup = 3\n", "a.toml:4: workload.db.cgroup:", "expected string"),
    ("[workload]\nweb.unit = 'w.service'\nx = 1\n", "a.toml:3: workload.x:", "expected table"),
    ("[workload]\nweb.exclude_inbound_ports = []\nweb.cgroup = 5\n", "a.toml:3: workload.web.cgroup:", "expected string"),
    ("[workload]\nweb = { exclude_inbound_ports = [], cgroup = 5 }\n", "a.toml:2: workload.web.cgroup:", "expected string"),
    ("[workload.'q']\nunit = 'q.service'\nexclude_inbound_ports = [70000]\n",
     "a.toml:3: workload.q.exclude_inbound_ports:", "out of range"),
    # cross-key rules
    ("[mesh]\noutbound_port = 15006\n", "a.toml:2: mesh.outbound_port:", "both 15006"),
    ("[mesh]\nexclude_outbound_ports = [22, 15001]\n", "a.toml:2: mesh.exclude_outbound_ports:", "15001"),
    ("[workload.web]\nunit = 'w.service'\nexclude_inbound_ports = [15006]\n",
     "a.toml:3: workload.web.exclude_inbound_ports:", "15006"),
    ("[workload.web]\ncgroup = '/meshd.slice/envoy'\n", "a.toml:2: workload.web.cgroup:", "overlaps mesh.cgroup_root"),
    ("[mesh]\ncgroup_root = '/system.slice/meshd'\n[workload.web]\ncgroup = '/system.slice'\n",
     "a.toml:4: workload.web.cgroup:", "overlaps mesh.cgroup_root"),
    ("[workload.a]\ncgroup = '/x/y'\n[workload.b]\ncgroup = '/x//y/'\n",
     "a.toml:4: workload.b.cgroup:", "already selected by workload 'a' at a.toml:1"),
    ("[workload.a]\nunit = 'a.service'\n[workload.b]\nunit = 'a.service'\n",
     "a.toml:4: workload.b.unit:", "already selected by workload 'a'"),
])
def test_error_kinds(text, prefix, message):
    error = only_error(text)
    assert error.startswith(prefix + " "), error
    assert message in error[len(prefix):], error


def test_envoy_port_in_default_exclusions_is_located_at_the_port():
    assert errors_of({"a.toml": "[mesh]\n\ninbound_port = 22\n"}) == [
        "a.toml:3: mesh.inbound_port: Envoy's listener port(s) 22 must not be in mesh.exclude_outbound_ports",
        "a.toml:3: mesh.inbound_port: Envoy's listener port(s) 22 must not be in mesh.exclude_inbound_ports",
    ]


def test_mesh_key_set_in_two_files_names_both():
    errors = errors_of({"/c/a.toml": "[mesh]\n\ninbound_port = 1000\n",
                        "/c/b.toml": "[mesh]\nstate_dir = '/s'\ninbound_port = 1000\n"})
    assert errors == ["/c/b.toml:3: mesh.inbound_port: already set at /c/a.toml:3; "
                      "each [mesh] key may be set in one file only"]


def test_duplicate_workload_across_files():
    errors = errors_of({"/c/a.toml": "\n[workload.web]\nunit = 'a.service'\n",
                        "/c/b.toml": "[workload]\nweb = { unit = 'b.service' }\n"})
    assert errors == ["/c/b.toml:2: workload.web: duplicate workload, first defined at /c/a.toml:2"]


def test_every_error_is_reported_at_once(tmp_path):
    (tmp_path / "a.toml").write_text("[mesh]\noutbound_port = 'x'\nbogus = 1\n[workload.w]\n")
    (tmp_path / "b.toml").write_text("[mesh\n")
    (tmp_path / "c.toml").write_text("[workload.v]\nunit = 'v'\n")
    with pytest.raises(ConfigInvalid) as exc:
        load_config(str(tmp_path))
    got = [(Path(e.file).name, e.line, e.key) for e in exc.value.errors]
    assert got == [
        ("a.toml", 2, "mesh.outbound_port"),
        ("a.toml", 3, "mesh.bogus"),
        ("b.toml", 1, ""),
        ("c.toml", 2, "workload.v.unit"),
    ]   # a.toml's bare [workload.w] is valid: a workload of Podman containers only
    assert len(str(exc.value).splitlines()) == 4


def test_locator_is_not_fooled_by_multiline_values():
    text = (
        "[mesh]\n"
        "exclude_outbound_cidrs = [\n"
        '  "10.0.0.0/8",\n'
        "  [1]\n"  # looks like a table header, but is inside the array
        "]\n"
        "envoy_binary = '''\n"
        "state_dir = 'fake'\n"
        "'''\n"
        "state_dir = 'relative'\n"
    )
    errors = errors_of({"a.toml": text})
    assert errors[0].startswith("a.toml:2: mesh.exclude_outbound_cidrs: element 2")
    assert errors[1].startswith("a.toml:9: mesh.state_dir: must be an absolute path")


# ---------------------------------------------------------------- protocols

def test_protocols_global_and_per_workload():
    c = parse_files({"a.toml": '[mesh]\nprotocols = { 8080 = "http", 50051 = "grpc" }\n'
                                '[workload.w]\ncgroup = "/w"\n'
                                '[workload.w.protocols]\n9000 = "http2"\n80 = "tcp"\n'})
    assert c.mesh.protocols == ((8080, "http"), (50051, "grpc"))
    assert c.workloads[0].protocols == ((80, "tcp"), (9000, "http2"))
    assert MeshConfig().protocols == () and MeshConfig().http_forwarded_for is False


def test_protocols_errors_name_every_bad_entry():
    with pytest.raises(ConfigInvalid) as e:
        parse_files({"a.toml": '[mesh]\nprotocols = { 8080 = "htp", x = "tcp", 70000 = "http" }\n'})
    (err,) = e.value.errors
    assert (err.line, err.key) == (2, "mesh.protocols")
    assert "port 8080: expected one of tcp, http, http2, grpc, got string 'htp'" in err.message
    assert "key 'x' is not a port number" in err.message and "'70000'" in err.message
    with pytest.raises(ConfigInvalid) as e:
        parse_files({"a.toml": '[mesh]\nprotocols = ["http"]\n'})
    assert e.value.errors[0].message == 'expected table of port = "protocol", got array'
