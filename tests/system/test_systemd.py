"""meshd under a real systemd, installed from its .deb: what `systemctl` and
`busctl` users see. The tests run in order on one booted guest (install ->
start -> use -> restart -> reload -> stop -> purge), as an operator would."""
from __future__ import annotations

import json
import threading
import time

import pytest

from helpers.common import wait_for
from meshd.envoy import total

SERVER = "10.240.1.2"
MANAGER = "io.meshd.Mesh1 /io/meshd/Mesh1 io.meshd.Mesh1.Manager"
ENVOY_UNIT = "meshd-envoy.service"

# New connections, plus one kept-alive connection used throughout: neither a
# request nor that connection may be lost while meshd restarts.
LOAD = r"""
import http.client, json, sys, time
ok = bad = 0
kept = http.client.HTTPConnection("%s", 8080, timeout=5)
kept_ok = 0
end = time.time() + float(sys.argv[1])
def get(c):
    c.request("GET", "/echo")
    r = c.getresponse()
    return r.status == 200 and "x-request-id" in json.loads(r.read())["headers"]
while time.time() < end:
    try:
        c = http.client.HTTPConnection("%s", 8080, timeout=5)
        ok, bad = (ok + 1, bad) if get(c) else (ok, bad + 1)
        c.close()
        kept_ok += get(kept)
    except Exception as e:
        bad += 1
        print("error:", e, file=sys.stderr)
print(json.dumps({"ok": ok, "bad": bad, "kept_ok": kept_ok}))
""" % (SERVER, SERVER)


@pytest.fixture(scope="module")
def installed(guest):
    g = guest
    r = g.sh("dpkg -i /mnt/meshd/meshd.deb 2>&1")
    # Envoy is not installed yet: the package says why it does not start meshd
    assert "not starting meshd.service yet" in r.stdout, r.stdout
    assert g.sh("systemctl is-enabled meshd").stdout.strip() == "enabled"
    assert g.sh("systemctl is-active meshd", check=False).stdout.strip() == "inactive"
    g.sh("install -m 0755 /mnt/meshd/envoy /usr/local/bin/envoy")
    # a server host behind a veth, inside the guest
    g.sh("ip netns add srv && ip link add mv0 type veth peer name mv1 && "
         "ip link set mv1 netns srv && ip addr add 10.240.1.1/24 dev mv0 && ip link set mv0 up && "
         f"ip -n srv addr add {SERVER}/24 dev mv1 && ip -n srv link set mv1 up && "
         "ip -n srv link set lo up")
    g.sh("systemd-run --unit=mtsrv.service ip netns exec srv "
         "python3 /mnt/meshd/echo_server.py --http 8080 --http 2222")
    # the workload: a long-running unit, enrolled by its unit name
    g.sh("systemd-run --unit=webclient.service sleep infinity")
    g.sh("printf '[workload.client]\\nunit = \"webclient.service\"\\n' > /etc/meshd/10-test.toml")
    assert g.sh("meshd check").returncode == 0
    wait_for(lambda: g.sh(f"curl -s -m 2 http://{SERVER}:8080/echo", check=False).returncode == 0,
             what="test server")
    return g


def echo(g, port=8080):
    r = g.in_unit("webclient.service", f"curl -sS -m 10 http://{SERVER}:{port}/echo", check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def envoy_requests(g) -> int:
    out = g.sh("curl -s --unix-socket /run/meshd/envoy-admin.sock http://admin/stats").stdout
    stats = {k: int(v) for k, _, v in (l.partition(": ") for l in out.splitlines())
             if v.strip().isdigit()}
    return total(stats, "http.outbound_http.downstream_rq_total")


def prop(g, name, user=None):
    r = g.sh(f"busctl --system get-property --json=short {MANAGER} {name}", user=user)
    return json.loads(r.stdout)["data"]


def envoy_pid(g) -> int:
    return int(g.sh(f"systemctl show -p MainPID --value {ENVOY_UNIT}").stdout)


def test_start_returns_when_serving(installed):
    g = installed
    g.sh("systemctl start meshd", timeout=180)   # Type=notify: returns after READY=1
    # READY means serving: right now, the workload's traffic goes through Envoy
    before = envoy_requests(g)
    assert "x-request-id" in echo(g)["headers"]
    assert envoy_requests(g) == before + 1
    assert g.sh("systemctl is-active meshd").stdout.strip() == "active"
    assert g.sh(f"systemctl is-active {ENVOY_UNIT}").stdout.strip() == "active"
    # Envoy is its own unit, in meshd.slice
    assert g.sh(f"systemctl show -p Slice --value {ENVOY_UNIT}").stdout.strip() == "meshd.slice"
    status = g.sh("systemctl status meshd --no-pager", check=False).stdout
    assert "workloads enrolled" in status    # STATUS= line
    # structured journal fields: which workload, which cgroup
    entries = [json.loads(l) for l in g.sh(
        "journalctl -u meshd -o json --no-pager WORKLOAD=client").stdout.splitlines()]
    assert entries and entries[-1]["CGROUP"] == "/system.slice/webclient.service"


def test_watchdog_is_fed_from_the_main_loop(installed):
    g = installed
    g.sh("mkdir -p /run/systemd/system/meshd.service.d && printf '[Service]\nWatchdogSec=2s\n' "
         "> /run/systemd/system/meshd.service.d/wd.conf && systemctl daemon-reload")
    try:
        g.sh("systemctl restart meshd", timeout=180)
        pid = g.sh("systemctl show -p MainPID --value meshd").stdout.strip()
        first = g.sh("systemctl show -p WatchdogTimestampMonotonic --value meshd").stdout.strip()
        time.sleep(5)   # 2.5 watchdog periods: a starved loop would be killed by now
        assert g.sh("systemctl show -p MainPID --value meshd").stdout.strip() == pid
        assert g.sh("systemctl show -p WatchdogTimestampMonotonic --value meshd"
                    ).stdout.strip() != first
    finally:
        g.sh("rm -r /run/systemd/system/meshd.service.d && systemctl daemon-reload")
        g.sh("systemctl restart meshd", timeout=180)


def test_busctl_reads_and_only_root_reloads(installed):
    g = installed
    intro = g.sh("busctl --system introspect io.meshd.Mesh1 /io/meshd/Mesh1").stdout
    assert "io.meshd.Mesh1.Manager" in intro and ".Reload" in intro
    assert prop(g, "State") == "running"
    assert prop(g, "EnvoyPID") == envoy_pid(g)
    assert prop(g, "State", user=65534) == "running"            # anyone may read
    denied = g.sh(f"busctl --system call {MANAGER} Reload", user=65534, check=False)
    assert denied.returncode != 0 and "Access denied" in denied.stderr
    ok = g.sh(f"busctl --system call --json=short {MANAGER} Reload")
    assert json.loads(ok.stdout)["data"] == [True]
    tree = g.sh("busctl --system tree io.meshd.Mesh1").stdout
    assert "/io/meshd/Mesh1/workload/client" in tree
    out = g.sh("meshd status").stdout
    assert "client" in out and "enrolled" in out


def test_restart_under_load_loses_nothing(installed):
    g = installed
    pid = envoy_pid(g)
    g.sh(f"cat > /run/load.py <<'EOF'\n{LOAD}\nEOF")
    out = {}
    load = threading.Thread(target=lambda: out.update(
        r=g.in_unit("webclient.service", "python3 /run/load.py 6", check=False, timeout=60)))
    load.start()
    time.sleep(2)
    g.sh("systemctl restart meshd", timeout=180)
    load.join(60)
    r = out["r"]
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["bad"] == 0 and result["ok"] > 20, (result, r.stderr)
    assert result["kept_ok"] == result["ok"]     # the kept-alive connection survived
    assert envoy_pid(g) == pid          # Envoy untouched by meshd's restart
    assert prop(g, "DataPathAdopted") is True


def test_killed_envoy_unit_comes_back(installed):
    g = installed
    old = envoy_pid(g)
    g.sh(f"systemctl kill -s KILL {ENVOY_UNIT}")
    start = time.monotonic()
    wait_for(lambda: envoy_pid(g) not in (0, old) and prop(g, "EnvoyState") == "running", 20,
             what="Envoy restarted by meshd")
    assert time.monotonic() - start < 3   # re-wired within a second or so (0.2 s backoff)
    assert "x-request-id" in echo(g)["headers"]


def test_systemctl_reload_applies_config(installed):
    g = installed
    assert "x-request-id" in echo(g, 2222)["headers"]
    g.sh("printf '[mesh]\\nexclude_outbound_ports = [22, 2222]\\n' > /etc/meshd/20-test.toml")
    g.sh("systemctl reload meshd")
    wait_for(lambda: "x-request-id" not in echo(g, 2222)["headers"], 5, what="exclusion applied")
    assert "x-request-id" in echo(g)["headers"]


def test_stop_leaves_a_working_mesh(installed):
    g = installed
    g.sh("systemctl stop meshd")
    assert g.sh(f"systemctl is-active {ENVOY_UNIT}").stdout.strip() == "active"
    before = envoy_requests(g)
    assert "x-request-id" in echo(g)["headers"]     # still steered, still through Envoy
    assert envoy_requests(g) == before + 1


def test_purge_removes_every_pin(installed):
    g = installed
    g.sh("systemctl start meshd", timeout=180)
    assert g.sh("ls /sys/fs/bpf/meshd").stdout.strip()
    g.sh("dpkg --purge meshd", timeout=120)
    assert g.sh("ls -A /sys/fs/bpf").stdout.strip() == ""
    assert g.sh(f"systemctl is-active {ENVOY_UNIT}", check=False).stdout.strip() != "active"
    assert "19795" not in g.sh("ip rule").stdout
    assert "x-request-id" not in echo(g)["headers"]   # direct again
    assert g.sh("test -d /sys/fs/cgroup/meshd.slice", check=False).returncode != 0
