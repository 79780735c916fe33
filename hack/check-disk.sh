#!/usr/bin/env bash
# Warns, before a build starts, when the disk looks too full for it, so that a run that later dies
# with "No space left on device" has said why up front. Never fails: the figures are estimates.
#
# Figures (README, "Disk"): a clean `make test` build is about 2.9 GiB in target/; the first
# control-plane build peaks at about 5.1 GiB of Go caches (removed when it ends) and keeps 0.4 GiB.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

target="${CARGO_TARGET_DIR:-$here/../target}"
cache="${CAPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capy-webhooks}"
bin="$cache/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin"

# Free MiB on the filesystem holding $1 (or its nearest existing parent).
free_mib() {
  local dir="$1"
  while [ ! -e "$dir" ]; do dir="$(dirname "$dir")"; done
  df -Pm "$dir" | awk 'NR == 2 { print $4 }'
}

warn() { echo "[disk] warning: $*" >&2; }

if [ ! -x "$bin/helm" ]; then
  need=5632 free=$(free_mib "$cache")
  [ "$free" -ge "$need" ] || warn "$free MiB free under $cache; the first control-plane build needs about $need MiB for a while"
fi
if [ ! -d "$target/debug/deps" ]; then
  # The debug build (2.0 GiB) and the release build of the image's binary (0.8 GiB).
  need=3072 free=$(free_mib "$target")
  [ "$free" -ge "$need" ] || warn "$free MiB free under $target; a clean test build and the image need about $need MiB"
fi
exit 0
