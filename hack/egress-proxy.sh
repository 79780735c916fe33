#!/usr/bin/env bash
# Installs tinyproxy (Debian's tinyproxy-bin, an HTTP proxy that tunnels with CONNECT) into the
# cache outside the repository, once, at the version pinned in hack/versions.env, and prints the
# path of its executable. No root install: the .deb is fetched with `apt-get download` and
# unpacked with `dpkg -x`; it needs only libc. The egress proxy tests (tests/egress.rs) deliver
# through it. `make test` runs this; the tests find it through CAPY_TINYPROXY (set by the
# Makefile) or run this script themselves.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${CAPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capy-webhooks}"
dir="$cache/tools/tinyproxy-$TINYPROXY_VERSION"
bin="$dir/usr/bin/tinyproxy"
if [[ ! -x "$bin" ]] || ! "$bin" -v >/dev/null 2>&1; then
  echo "[egress-proxy] installing tinyproxy $TINYPROXY_VERSION into $dir" >&2
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # apt-get download writes into the current directory; _apt needs to be able to write there.
  chmod 0777 "$work"
  if ! (cd "$work" && apt-get download -q "tinyproxy-bin=$TINYPROXY_VERSION" >&2); then
    # The package lists may be missing or stale on a fresh machine.
    apt-get update -q >&2
    (cd "$work" && apt-get download -q "tinyproxy-bin=$TINYPROXY_VERSION" >&2)
  fi
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  dpkg -x "$work"/tinyproxy-bin_*.deb "$dir.tmp"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
fi
"$bin" -v >/dev/null
echo "$bin"
