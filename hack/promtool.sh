#!/usr/bin/env bash
# Builds promtool (Prometheus' rule checker and rule unit-test runner) from the Go module proxy at
# the version pinned in hack/versions.env, once, into the cache outside the repository, and prints
# the path of the executable on its last line of stdout. `make test` runs it; tests/alerts.rs finds
# promtool through CAPY_PROMTOOL (set by the Makefile) or at the same cache path.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${CAPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capy-webhooks}"
bin="$cache/tools/promtool-$PROMETHEUS_MODULE_VERSION"
exe="$bin/promtool"
log() { echo "[promtool] $*" >&2; }
if [[ ! -x "$exe" ]]; then
  command -v go >/dev/null || { log "go is not on PATH; install Go 1.24+ first"; exit 1; }
  mkdir -p "$bin"
  # Go's module and build caches for this build live in a work dir (a failed build resumes from
  # them) and are removed once promtool is built: only the binary (~150 MiB) is kept.
  go_tmp="$cache/work/promtool-go"
  export GOWORK=off CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
  export GOCACHE="$go_tmp/build" GOMODCACHE="$go_tmp/mod" GOFLAGS="-buildvcs=false -modcacherw"
  log "building promtool from github.com/prometheus/prometheus@v$PROMETHEUS_MODULE_VERSION (a few minutes on 2 cores)"
  start=$(date +%s)
  GOBIN="$bin" go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@v$PROMETHEUS_MODULE_VERSION" >&2
  log "built in $(( $(date +%s) - start ))s"
  rm -rf "$go_tmp"
fi
"$exe" --version >/dev/null
echo "$exe"
