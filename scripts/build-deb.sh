#!/usr/bin/env bash
# Build the Debian package: dist/meshd_<version>_all.deb (or into OUTDIR).
#   scripts/build-deb.sh [OUTDIR]
# Installs the build dependencies if they are missing (needs root then), copies
# what the package ships into a temporary tree with packaging/debian as debian/,
# runs dpkg-buildpackage there (the checkout is never written to, except
# OUTDIR), and prints the .deb's path on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
log() { printf 'build-deb: %s\n' "$*" >&2; }

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

log "building meshd $version in $src"
if ! (cd "$src" && dpkg-buildpackage -us -uc -b >"$tmp/build.log" 2>&1); then
  tail -n 40 "$tmp/build.log" >&2
  log "dpkg-buildpackage failed"
  exit 1
fi
deb="$tmp/meshd_${version}_all.deb"
[ -f "$deb" ] || { log "no $deb after the build"; exit 1; }
mkdir -p "$outdir"
cp "$deb" "$outdir/"
echo "$(cd "$outdir" && pwd)/meshd_${version}_all.deb"
