#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kubectl and helm from the Go module proxy
# at the versions pinned in hack/versions.env, once, into a cache outside the repository; and, for
# the real node (hack/node.sh), kubelet, kube-proxy and kube-scheduler from the same wrapper module,
# so they reuse the k8s.io packages compiled for the apiserver.
# Prints the directory holding the binaries on its last line of stdout.
#
# kube-apiserver cannot be `go install`ed: k8s.io/kubernetes' go.mod replaces its staging modules
# with local paths. A small wrapper module requires k8s.io/kubernetes and points each staging
# module at its published v0.x release instead.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${CAPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capy-webhooks}"
bin="$cache/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin"
mkdir -p "$bin"
export GOWORK=off CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
# Go's module and build caches for this build reach several GiB. They live under the work dir, so a
# failed build resumes from them, and are removed once every binary is built: what is kept is the
# binaries (~0.4 GiB), and a clean `make test` fits on a machine with little disk free.
go_tmp="$cache/work/go"
export GOCACHE="$go_tmp/build" GOMODCACHE="$go_tmp/mod" GOFLAGS="-buildvcs=false -modcacherw"

log() { echo "[control-plane] $*" >&2; }
retry_hint="make control-plane"
step() { # step N TOTAL NAME
  current_step="$3"
  log "[$1/$2] $3"
}
trap 'rc=$?; [ $rc -ne 0 ] && log "FAILED at step: ${current_step:-setup} (exit $rc). Retry with: $retry_hint  (work dir: $cache/work)"' EXIT

command -v go >/dev/null || { log "go is not on PATH; install Go 1.24+ first"; exit 1; }

total=5
start=$(date +%s)

# --- etcd -----------------------------------------------------------------------------------
step 1 $total "etcd v$ETCD_VERSION"
if [ ! -x "$bin/etcd" ]; then
  w="$cache/work/etcd-$ETCD_VERSION"; mkdir -p "$w"
  cat >"$w/go.mod" <<MOD
module capy.local/etcd-build

go 1.24
MOD
  cat >"$w/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$w" && go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2 && go mod tidy >&2 \
     && go build -trimpath -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3 >&2)
  mv "$bin/etcd.tmp" "$bin/etcd"
  log "      built in $(( $(date +%s) - start ))s"
else
  log "      cached"
fi

# --- Kubernetes components ------------------------------------------------------------------
k8s_mod="$cache/work/kubernetes-$K8S_VERSION"
prepare_k8s_module() {
  # The marker names the set of commands the module was tidied for: a cache prepared for fewer
  # commands (before the node's were added) lacks their dependencies and is tidied again.
  [ -f "$k8s_mod/.ready-node" ] && return 0
  mkdir -p "$k8s_mod"
  local upstream="$k8s_mod/upstream.mod"
  (cd "$k8s_mod" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" >/dev/null)
  cp "$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/v$K8S_VERSION.mod" "$upstream"
  local staging_ver="v0.${K8S_VERSION#1.}"
  {
    echo "module capy.local/kubernetes-build"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    echo
    echo "replace ("
    grep -E '^\s*k8s.io/[^ ]+ => \./staging/' "$upstream" | awk -v v="$staging_ver" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } >"$k8s_mod/go.mod"
  cat >"$k8s_mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
  (cd "$k8s_mod" && go mod tidy >&2)
  touch "$k8s_mod/.ready-node"
}
build_k8s() { # build_k8s NAME
  local major="${K8S_VERSION%%.*}" rest="${K8S_VERSION#*.}"; local minor="${rest%%.*}"
  local pkg="k8s.io/kubernetes/cmd/$1"
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/component-base/version.gitTreeState=clean \
    -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION \
    -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  (cd "$k8s_mod" && go build -trimpath -ldflags "$ldflags" -o "$bin/$1.tmp" "$pkg" >&2)
  mv "$bin/$1.tmp" "$bin/$1"
}

build_each() { # build_each NAME...: the Kubernetes commands not built yet
  local c t
  for c in "$@"; do
    if [ ! -x "$bin/$c" ]; then
      prepare_k8s_module
      t=$(date +%s); build_k8s "$c"; log "      $c built in $(( $(date +%s) - t ))s"
    else log "      $c cached"; fi
  done
}

step 2 $total "kube-apiserver v$K8S_VERSION (the longest step: several minutes on 2 cores)"
if [ ! -x "$bin/kube-apiserver" ]; then
  prepare_k8s_module
  t=$(date +%s); build_k8s kube-apiserver; log "      built in $(( $(date +%s) - t ))s"
else log "      cached"; fi

step 3 $total "kube-controller-manager and kubectl v$K8S_VERSION"
build_each kube-controller-manager kubectl

step 4 $total "kubelet, kube-proxy and kube-scheduler v$K8S_VERSION (for the real node)"
build_each kubelet kube-proxy kube-scheduler

step 5 $total "helm v$HELM_VERSION"
if [ ! -x "$bin/helm" ]; then
  t=$(date +%s)
  GOBIN="$bin" go install -trimpath "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" >&2
  log "      built in $(( $(date +%s) - t ))s"
else log "      cached"; fi

current_step=done
if [ -d "$go_tmp" ]; then
  log "      removing Go's caches for this build ($(du -sh "$go_tmp" | cut -f1))"
  rm -rf "$go_tmp"
fi
log "control plane ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
