#!/usr/bin/env bash
# A throwaway local Kubernetes control plane (etcd + kube-apiserver + kube-controller-manager) on
# loopback: no root, no docker, no kubelet. Used by the integration tests (tests/support/mod.rs)
# and by hand.
#
#   hack/cluster.sh up DIR [--watch-pid PID]   start; last stdout line: export KUBECONFIG=DIR/kubeconfig
#   hack/cluster.sh down DIR                   stop everything started in DIR and remove DIR
#   hack/cluster.sh status DIR                 exit 0 iff the apiserver in DIR answers /readyz
#   hack/cluster.sh bin-dir                    print the dir holding kubectl, helm, ... (builds if needed)
#
# With --watch-pid, a detached watchdog runs `down DIR` once PID has exited, so a test binary that
# exits without running destructors leaves nothing behind.
# Environment: CAPY_CLUSTER_TIMEOUT (seconds to wait for readiness, default 60);
# CAPY_CLUSTER_PROFILING=true serves /debug/pprof on the apiserver and controller-manager (off by default);
# CAPY_CLUSTER_ETCD_QUOTA_BYTES sets etcd's --quota-backend-bytes (default: etcd's own, 2 GiB);
# CAPY_CLUSTER_WORKLOADS=true also runs the controllers that pods on a real node need (Deployments,
# ReplicaSets, EndpointSlices, PodDisruptionBudgets, kube-root-ca.crt, pod GC, node taints): see
# hack/node.sh.
# etcd's client URL (metrics, alarms) is written to DIR/etcd.url.
# Progress goes to stderr; stdout carries only the results named above.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
marker=".capy-cluster"
components=(kube-controller-manager kube-apiserver etcd)
start_timeout="${CAPY_CLUSTER_TIMEOUT:-60}"

log() { echo "[cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,17p' "$self" | sed 's/^# \{0,1\}//' >&2; exit 2; }

bin_dir() {
  local out lock="${CAPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capy-webhooks}/.build.lock"
  mkdir -p "$(dirname "$lock")"
  # Serialise concurrent first builds (e.g. two test binaries); the lock fd stays in the subshell.
  out="$(
    if command -v flock >/dev/null; then exec 9>"$lock"; flock 9; fi
    # A no-op run (all cached) prints nothing; a real build shows its progress.
    "$here/build-control-plane.sh" 2> >(awk '
      /^\[control-plane\] \[[0-9]+\/[0-9]+\]/ { held = $0; next }
      / cached$/ { held = ""; next }
      /control plane ready in/ && !built { next }
      held != "" { print held; held = "" }
      { built = 1; print; fflush() }' >&2)
  )" || die "building the control plane failed (see above)"
  out="$(printf '%s\n' "$out" | tail -n 1)"
  [ -x "$out/kube-apiserver" ] || die "build-control-plane.sh printed '$out', which holds no kube-apiserver"
  printf '%s\n' "$out"
}

abs_dir() { # abs_dir DIR -> absolute path (DIR need not exist)
  local d="$1"
  case "$d" in /*) ;; *) d="$PWD/$d" ;; esac
  printf '%s\n' "${d%/}"
}

# Is PID alive and is it one of ours (its command line mentions DIR)? Guards against pid reuse.
ours() { # ours PID DIR
  local pid="$1" dir="$2"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  [ -r "/proc/$pid/cmdline" ] || return 0 # no /proc: trust the pid file
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir"
}

# Stop the process whose pid is in DIR/NAME.pid: SIGTERM, wait up to $3 s, then SIGKILL.
stop() { # stop DIR NAME [GRACE]
  local dir="$1" name="$2" grace="${3:-10}" pid i
  [ -f "$dir/$name.pid" ] || return 0
  pid="$(cat "$dir/$name.pid" 2>/dev/null || true)"
  if ours "$pid" "$dir"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do ours "$pid" "$dir" || break; sleep 0.1; done
    if ours "$pid" "$dir"; then
      log "$name (pid $pid) ignored SIGTERM for ${grace}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$dir/$name.pid"
}

cmd_down() { # down DIR
  local dir; dir="$(abs_dir "$1")"
  [ -d "$dir" ] || return 0
  if [ ! -e "$dir/$marker" ]; then
    [ -z "$(ls -A "$dir")" ] && { rmdir "$dir" 2>/dev/null || true; return 0; }
    die "$dir was not created by hack/cluster.sh (no $marker); refusing to remove it"
  fi
  # The watchdog first (unless we are the watchdog), so it does not race us.
  if [ "${CAPY_CLUSTER_WATCHDOG:-}" != "$dir" ]; then stop "$dir" watchdog 2; fi
  # The controller manager and the apiserver together, then etcd under them.
  # (Wait on these two only: after a failed `up`, etcd is a child of this same shell.)
  local a b
  stop "$dir" kube-controller-manager & a=$!
  stop "$dir" kube-apiserver & b=$!
  wait "$a" "$b" || true
  stop "$dir" etcd
  rm -rf "$dir"
}

cmd_status() { # status DIR
  local dir bin; dir="$(abs_dir "$1")"
  [ -f "$dir/kubeconfig" ] || return 1
  bin="$(bin_dir)"
  [ "$("$bin/kubectl" --kubeconfig "$dir/kubeconfig" --request-timeout=3s get --raw /readyz 2>/dev/null)" = ok ]
}

free_ports() { # free_ports N -> N distinct free loopback TCP ports, space separated
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

make_certs() { # make_certs PKI_DIR
  local pki="$1"
  mkdir -p "$pki"; chmod 700 "$pki"
  (
    cd "$pki"
    ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    ec ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 30 -subj "/CN=capy-local-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out ca.crt 2>/dev/null
    sign() { # sign NAME SUBJ EXTENSIONS
      ec "$1.key"
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
      printf '%s\n' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 30 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    sign apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:::1,IP:10.0.0.1"
    client_ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
    sign admin "/O=system:masters/CN=capy-admin" "$client_ext"
    # The controller manager runs every controller under its own identity: give it system:masters.
    sign kcm "/O=system:masters/CN=system:kube-controller-manager" "$client_ext"
    # The API server's identity towards kubelets (logs, exec, port-forward on a real node).
    sign kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client_ext"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
  ) || die "certificate generation with openssl failed"
}

write_kubeconfig() { # write_kubeconfig FILE SERVER PKI_DIR CLIENT_NAME
  local b64="base64 -w0"
  base64 -w0 </dev/null >/dev/null 2>&1 || b64="base64"
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: capy-local
  cluster:
    server: $2
    certificate-authority-data: $($b64 <"$3/ca.crt" | tr -d '\n')
users:
- name: $4
  user:
    client-certificate-data: $($b64 <"$3/$4.crt" | tr -d '\n')
    client-key-data: $($b64 <"$3/$4.key" | tr -d '\n')
contexts:
- name: capy-local
  context:
    cluster: capy-local
    user: $4
current-context: capy-local
EOF
  chmod 600 "$1"
}

# Start a detached process (own session, stdio to DIR/NAME.log) and record its pid in DIR/NAME.pid.
launch() { # launch DIR NAME CMD...
  local dir="$1" name="$2"; shift 2
  # `exec` keeps the recorded pid valid whether or not setsid had to fork.
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' launch "$dir/$name.pid" "$@" \
    </dev/null >"$dir/$name.log" 2>&1 &
  disown "$!" 2>/dev/null || true # no "Killed" job notices from `down` after a failed start
  local i
  for ((i = 0; i < 50; i++)); do [ -s "$dir/$name.pid" ] && return 0; sleep 0.02; done
  die "$name did not start"
}

cmd_up() { # up DIR [--watch-pid PID]
  local dir="" watch_pid=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --watch-pid) [ $# -ge 2 ] || usage; watch_pid="$2"; shift 2 ;;
      --watch-pid=*) watch_pid="${1#*=}"; shift ;;
      -*) usage ;;
      *) [ -z "$dir" ] || usage; dir="$1"; shift ;;
    esac
  done
  [ -n "$dir" ] || usage
  if [ -n "$watch_pid" ]; then
    [[ "$watch_pid" =~ ^[0-9]+$ ]] || die "--watch-pid wants a pid, got '$watch_pid'"
    kill -0 "$watch_pid" 2>/dev/null || die "--watch-pid $watch_pid: no such process"
  fi
  dir="$(abs_dir "$dir")"
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
    die "$dir exists and is not empty (a cluster may already run there: hack/cluster.sh down $dir)"
  fi
  mkdir -p "$dir"
  touch "$dir/$marker"
  # From here on, any failure tears down what was started.
  trap 'rc=$?; if [ $rc -ne 0 ]; then log "start-up failed; stopping what was started"; cmd_down "'"$dir"'" || true; fi' EXIT
  trap 'exit 130' INT TERM

  local bin t0; t0=$(date +%s)
  bin="$(bin_dir)"
  local etcd_port peer_port api_port kcm_port
  read -r etcd_port peer_port api_port kcm_port <<<"$(free_ports 4)"
  make_certs "$dir/pki"
  local pki="$dir/pki" server="https://127.0.0.1:$api_port"
  write_kubeconfig "$dir/kubeconfig" "$server" "$pki" admin
  write_kubeconfig "$dir/kcm.kubeconfig" "$server" "$pki" kcm

  if [ -n "$watch_pid" ]; then
    CAPY_CLUSTER_WATCHDOG="$dir" setsid nohup bash -c '
      echo $$ >"$1/watchdog.pid"
      while kill -0 "$2" 2>/dev/null; do sleep 1; done
      echo "pid $2 exited; tearing down $1"
      exec "$3" down "$1"' watchdog "$dir" "$watch_pid" "$self" \
      </dev/null >"$dir/watchdog.log" 2>&1 &
  fi

  log "starting etcd on 127.0.0.1:$etcd_port"
  launch "$dir" etcd "$bin/etcd" \
    --name=capy --data-dir="$dir/etcd-data" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-cluster="capy=http://127.0.0.1:$peer_port" --initial-cluster-state=new \
    --unsafe-no-fsync --log-level=warn \
    ${CAPY_CLUSTER_ETCD_QUOTA_BYTES:+--quota-backend-bytes="$CAPY_CLUSTER_ETCD_QUOTA_BYTES"}
  echo "http://127.0.0.1:$etcd_port" >"$dir/etcd.url"

  log "starting kube-apiserver on $server"
  launch "$dir" kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
    --cert-dir="$pki" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --kubelet-client-certificate="$pki/kubelet-client.crt" --kubelet-client-key="$pki/kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --endpoint-reconciler-type=none \
    --profiling="${CAPY_CLUSTER_PROFILING:-false}"

  local controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller
  if [ "${CAPY_CLUSTER_WORKLOADS:-false}" = true ]; then
    controllers+=,deployment-controller,replicaset-controller,endpointslice-controller,disruption-controller
    controllers+=,root-ca-certificate-publisher-controller,pod-garbage-collector-controller,node-lifecycle-controller
  fi
  log "starting kube-controller-manager (secure port 127.0.0.1:$kcm_port)"
  launch "$dir" kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$dir/kcm.kubeconfig" \
    --authentication-kubeconfig="$dir/kcm.kubeconfig" --authorization-kubeconfig="$dir/kcm.kubeconfig" \
    --controllers="$controllers" \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port="$kcm_port" \
    --kube-api-qps=100 --kube-api-burst=200 \
    --concurrent-gc-syncs=20 --concurrent-namespace-syncs=10 \
    --profiling="${CAPY_CLUSTER_PROFILING:-false}"

  local kubectl=("$bin/kubectl" --kubeconfig "$dir/kubeconfig" --request-timeout=5s)
  local deadline=$(( $(date +%s) + start_timeout ))
  await() { # await WHAT LOG CMD...
    local what="$1" logname="$2" c; shift 2
    log "waiting for $what"
    until "$@" >/dev/null 2>&1; do
      for c in "${components[@]}"; do
        if ! ours "$(cat "$dir/$c.pid" 2>/dev/null)" "$dir"; then
          log "$c exited while waiting for $what; last lines of $dir/$c.log:"
          tail -n 30 "$dir/$c.log" >&2 || true
          exit 1
        fi
      done
      if [ "$(date +%s)" -ge "$deadline" ]; then
        log "timed out after ${start_timeout}s waiting for $what; last lines of $dir/$logname.log:"
        tail -n 30 "$dir/$logname.log" >&2 || true
        exit 1
      fi
      sleep 0.2
    done
  }
  readyz() { [ "$("${kubectl[@]}" get --raw /readyz 2>/dev/null)" = ok ]; }
  await "kube-apiserver /readyz" kube-apiserver readyz
  await "namespace default" kube-apiserver "${kubectl[@]}" get namespace default
  # The controller manager is up once its service-account controller has made this one.
  await "service account default/default (kube-controller-manager)" kube-controller-manager \
    "${kubectl[@]}" get serviceaccount default --namespace default

  trap - EXIT INT TERM
  log "ready in $(( $(date +%s) - t0 ))s: $server (logs and pids in $dir)"
  echo "export KUBECONFIG=$dir/kubeconfig"
}

[ $# -ge 1 ] || usage
cmd="$1"; shift
case "$cmd" in
  up) cmd_up "$@" ;;
  down) [ $# -eq 1 ] || usage; cmd_down "$1" ;;
  status) [ $# -eq 1 ] || usage; cmd_status "$1" ;;
  bin-dir) [ $# -eq 0 ] || usage; bin_dir ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
