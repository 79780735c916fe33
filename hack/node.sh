#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine, joined to a control plane started by
# hack/cluster.sh: containerd + runc + CNI bridge (Debian), kubelet, kube-proxy and kube-scheduler
# (built from the Go module proxy by hack/build-control-plane.sh), all inside a network namespace
# of their own so that the bridge, iptables rules and ip_forward never touch the host's stack.
#
#   hack/node.sh up [KUBECONFIG] [--watch-pid PID]
#                                  start the node (or reuse one joined to the same control plane);
#                                  KUBECONFIG defaults to .cluster/kubeconfig (`make cluster`);
#                                  with --watch-pid, the node is removed once PID has exited
#   hack/node.sh down              remove it and leave the host as it was found
#   hack/node.sh status            exit 0 iff a node is up and Ready; prints its control plane
#   hack/node.sh load TAR...       import image archives into the node's containerd
#   hack/node.sh host-ip           the address at which pods reach a process on the host
#   hack/node.sh check             exit 0 iff a node can run here; else print why (exit 3)
#   hack/node.sh ctr ARGS...       containerd's ctr, in the node's k8s.io namespace
#
# Network: the host end of a veth pair holds HOST_IP (10.213.0.1/30); the node's end 10.213.0.2;
# pods get 10.214.0.0/24 on the bridge capy0, masqueraded when they leave it. The host reaches
# Service IPs (10.0.0.0/24) and pod IPs through routes via the node's end, which go away with the
# veth. The API server stays on loopback: a relay (socat) on HOST_IP:6443 forwards to it, and the
# `kubernetes` Service's EndpointSlice names that relay, so pods reach the API server at
# KUBERNETES_SERVICE_HOST as in any cluster.
#
# One node per machine: kubelet and containerd keep some fixed paths (/var/lib/kubelet,
# /var/log/pods, /run/containerd, ...) and ports 10248-10259. Commands take a lock. State, configs
# and logs live in $CAPY_NODE_DIR (default /var/lib/capy-node); `down` restores every sysctl
# kubelet changed and removes every path, mount, cgroup, link and rule it made.
# Progress goes to stderr; stdout carries only results.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

node_dir="${CAPY_NODE_DIR:-/var/lib/capy-node}"
run_dir=/run/capy-node
netns=capy-node
node_name=capy-node
host_if=capy-h0
node_if=capy-n0
host_ip=10.213.0.1
node_ip=10.213.0.2
link_cidr=30
pod_cidr=10.214.0.0/24
service_cidr=10.0.0.0/24
relay_port=6443
pause_ref=capy.local/pause:3.10
sock="$run_dir/containerd.sock"
lock_file=/run/lock/capy-node.lock
# Paths kubelet or containerd use whatever they are told; removed by `down` unless they existed.
fixed_paths=(/var/lib/kubelet /var/log/pods /var/log/containers /run/containerd /var/lib/cni
  /run/netns /etc/cni /opt/cni /var/lib/containerd /usr/libexec/kubernetes)
# Kernel settings kubelet sets at start (pkg/kubelet/cm setupKernelTunables); `down` restores them.
kubelet_sysctls=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes)
start_timeout="${CAPY_NODE_TIMEOUT:-120}"

log() { echo "[node] $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# Why a node cannot run here, or nothing.
cannot_run() {
  [ "$(uname -s)" = Linux ] || { echo "not Linux ($(uname -s)): kubelet and containerd need Linux"; return; }
  [ "$(id -u)" = 0 ] || { echo "not root: a node needs root for namespaces, mounts and cgroups"; return; }
  [ -d /sys/fs/cgroup ] || { echo "no /sys/fs/cgroup"; return; }
  command -v ip >/dev/null || { echo "no 'ip' command (Debian: iproute2)"; return; }
  command -v nsenter >/dev/null || { echo "no 'nsenter' command (Debian: util-linux)"; return; }
}

in_ns() { nsenter --net="/run/netns/$netns" -- "$@"; }

with_lock() {
  mkdir -p "$(dirname "$lock_file")"
  exec 8>"$lock_file"
  flock -w 600 8 || die "another hack/node.sh holds $lock_file for 10 minutes"
}

install_packages() {
  local missing=() p
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v socat >/dev/null || missing+=(socat)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]}; install them with your package manager"
  log "installing ${missing[*]} (Debian)"
  apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
  for p in containerd runc; do command -v $p >/dev/null || die "$p still missing after install"; done
}

pid_alive() { # pid_alive NAME
  local pid
  pid="$(cat "$node_dir/$1.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

launch() { # launch NAME [--netns] CMD...
  local name="$1"; shift
  local wrap=()
  if [ "$1" = --netns ]; then wrap=(nsenter "--net=/run/netns/$netns" --); shift; fi
  # fd 8 is the lock: the node's processes must not hold it after this command ends.
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' launch "$node_dir/$name.pid" "${wrap[@]}" "$@" \
    </dev/null >"$node_dir/log/$name.log" 2>&1 8>&- &
  disown "$!" 2>/dev/null || true
  local i
  for ((i = 0; i < 50; i++)); do [ -s "$node_dir/$name.pid" ] && return 0; sleep 0.02; done
  die "$name did not start"
}

stop_proc() { # stop_proc NAME [GRACE]
  local name="$1" grace="${2:-10}" pid i
  pid="$(cat "$node_dir/$name.pid" 2>/dev/null)" || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$node_dir/$name.pid"
}

# The control plane's binaries (kubectl, kubelet, ...), found once per command in this shell:
# finding them runs the (cached) build script, and the wait loops call kubectl every 0.3 s from
# subshells, which cannot keep a value for the next call.
capy_bin=""
resolve_bin() { [ -n "$capy_bin" ] || capy_bin="$("$here/cluster.sh" bin-dir)"; }

kubectl_admin() { resolve_bin; "$capy_bin/kubectl" --kubeconfig "$(cat "$node_dir/joined")" --request-timeout=10s "$@"; }

# --- up ---------------------------------------------------------------------------------------

sign_cert() { # sign_cert PKI NAME SUBJECT EXT  (with the control plane's CA)
  local pki="$1" ca_dir="$2" name="$3" subj="$4" ext="$5"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/$name.key" 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
    -CAcreateserial -CAserial "$pki/ca.srl" -sha256 -days 30 -extfile "$pki/$name.ext" \
    -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
  chmod 600 "$pki/$name.key"
}

write_kubeconfig() { # write_kubeconfig FILE PKI NAME
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: capy-local
  cluster:
    server: https://$host_ip:$relay_port
    tls-server-name: kubernetes
    certificate-authority: $2/ca.crt
users:
- name: $3
  user:
    client-certificate: $2/$3.crt
    client-key: $2/$3.key
contexts:
- name: capy-local
  context: {cluster: capy-local, user: $3}
current-context: capy-local
EOF
  chmod 600 "$1"
}

record_host_state() {
  # What existed before the first node, so that `down` removes only what the node made.
  local p f="$node_dir/host-before"
  [ -f "$f" ] && return 0
  : >"$f.tmp"
  for p in "${fixed_paths[@]}"; do [ -e "$p" ] && echo "path $p" >>"$f.tmp"; done
  for p in "${kubelet_sysctls[@]}"; do echo "sysctl $p $(cat "/proc/sys/$p")" >>"$f.tmp"; done
  mv "$f.tmp" "$f"
}

setup_network() {
  if [ ! -e "/run/netns/$netns" ]; then
    log "network namespace $netns, veth $host_if ($host_ip) <-> $node_if ($node_ip)"
    ip netns add "$netns"
  fi
  if ! ip link show "$host_if" >/dev/null 2>&1; then
    ip link add "$host_if" type veth peer name "$node_if" netns "$netns"
    ip addr add "$host_ip/$link_cidr" dev "$host_if"
    ip link set "$host_if" up
    in_ns ip link set lo up
    in_ns ip addr add "$node_ip/$link_cidr" dev "$node_if"
    in_ns ip link set "$node_if" up
    in_ns ip route add default via "$host_ip"
    # Scoped to the namespace: the host's own ip_forward is untouched.
    in_ns sysctl -qw net.ipv4.ip_forward=1
    # Service and pod addresses from the host (tests' producers, curl), through the node.
    ip route add "$service_cidr" via "$node_ip" dev "$host_if"
    ip route add "$pod_cidr" via "$node_ip" dev "$host_if"
  fi
}

write_configs() { # write_configs CA_DIR
  local ca_dir="$1" pki="$node_dir/pki"
  mkdir -p "$pki" "$node_dir/cni" "$node_dir/log" "$run_dir"
  cp "$ca_dir/ca.crt" "$pki/ca.crt"
  local client="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  # Identities the API server's Node authorizer and bootstrap RBAC expect.
  sign_cert "$pki" "$ca_dir" kubelet "/O=system:nodes/CN=system:node:$node_name" "$client"
  sign_cert "$pki" "$ca_dir" kube-proxy "/CN=system:kube-proxy" "$client"
  sign_cert "$pki" "$ca_dir" kube-scheduler "/CN=system:kube-scheduler" "$client"
  local c
  for c in kubelet kube-proxy kube-scheduler; do write_kubeconfig "$node_dir/$c.kubeconfig" "$pki" "$c"; done

  cat >"$node_dir/containerd.toml" <<EOF
version = 2
root = "$node_dir/containerd"
state = "$run_dir/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_ref"
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails in runc
  # ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node_dir/cni"
EOF
  cat >"$node_dir/cni/10-capy.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "capy",
  "plugins": [
    {
      "type": "bridge", "bridge": "capy0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {"type": "host-local", "subnet": "$pod_cidr", "routes": [{"dst": "0.0.0.0/0"}],
               "dataDir": "$node_dir/ipam"}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$node_dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 on this kind of machine; kubelet 1.34 refuses it unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$sock
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: Webhook
tlsCertFile: ""
registerNode: true
volumePluginDir: $node_dir/volume-plugins
# No cluster DNS here: pods use the host's resolver; nothing in the tests needs DNS.
resolvConf: /etc/resolv.conf
imageGCHighThresholdPercent: 100
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
serializeImagePulls: false
EOF
  cat >"$node_dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $pod_cidr
hostnameOverride: $node_name
bindAddress: $node_ip
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
clientConnection:
  kubeconfig: $node_dir/kube-proxy.kubeconfig
# Zero: leave the host-wide conntrack table sizes and timeouts as they are.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
}

api_loopback_addr() { # host:port of the API server in KUBECONFIG
  local server
  resolve_bin
  server="$("$capy_bin/kubectl" --kubeconfig "$1" config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
  server="${server#https://}"
  echo "${server%%/*}"
}

# The `kubernetes` Service's endpoints: the relay. The control plane runs with
# --endpoint-reconciler-type=none, so nothing else writes them.
publish_api_endpoints() {
  kubectl_admin apply --server-side --field-manager=capy-node -f - >/dev/null <<EOF
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
    endpointslice.kubernetes.io/managed-by: capy-node
addressType: IPv4
endpoints:
  - addresses: ["$host_ip"]
    conditions: {ready: true}
ports:
  - name: https
    port: $relay_port
    protocol: TCP
EOF
}

wait_for() { # wait_for WHAT LOGNAME CMD...
  local what="$1" logname="$2" deadline=$(( $(date +%s) + start_timeout )); shift 2
  log "waiting for $what"
  until "$@" >/dev/null 2>&1; do
    local c
    for c in containerd kubelet kube-proxy kube-scheduler api-relay; do
      [ -f "$node_dir/$c.pid" ] || continue
      if ! pid_alive "$c"; then
        log "$c exited while waiting for $what; last lines of $node_dir/log/$c.log:"
        tail -n 30 "$node_dir/log/$c.log" >&2 || true
        return 1
      fi
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "timed out after ${start_timeout}s waiting for $what; last lines of $node_dir/log/$logname.log:"
      tail -n 30 "$node_dir/log/$logname.log" >&2 || true
      return 1
    fi
    sleep 0.3
  done
}

node_ready() {
  [ "$(kubectl_admin get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

ctr_k8s() { ctr --address "$sock" --namespace k8s.io "$@"; }

load_images() { # load_images TAR...
  local tar
  for tar in "$@"; do
    [ -f "$tar" ] || die "no image archive at $tar (make image builds it)"
    log "loading $(basename "$tar") into the node"
    ctr_k8s images import --no-unpack=false "$tar" >&2 || die "ctr images import $tar failed"
  done
}

# A detached watchdog that runs `down` once PID has exited (a test binary that crashed).
start_watchdog() { # start_watchdog PID
  local pid="$1" self="$here/node.sh"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || die "--watch-pid $pid: no such process"
  stop_proc watchdog 1
  setsid nohup bash -c '
    echo $$ >"$1/watchdog.pid"
    while kill -0 "$2" 2>/dev/null; do sleep 1; done
    [ -f "$1/watchdog.pid" ] && [ "$(cat "$1/watchdog.pid")" = $$ ] || exit 0
    rm -f "$1/watchdog.pid"
    echo "pid $2 exited; removing the node"
    exec "$3" down' watchdog "$node_dir" "$pid" "$self" </dev/null >"$node_dir/log/watchdog.log" 2>&1 8>&- &
  disown "$!" 2>/dev/null || true
}

cmd_up() {
  local kubeconfig="" watch_pid=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --watch-pid) [ $# -ge 2 ] || usage; watch_pid="$2"; shift 2 ;;
      -*) usage ;;
      *) [ -z "$kubeconfig" ] || usage; kubeconfig="$1"; shift ;;
    esac
  done
  kubeconfig="${kubeconfig:-$root/.cluster/kubeconfig}"
  local why; why="$(cannot_run)"; [ -z "$why" ] || { log "a node cannot run here: $why"; exit 3; }
  [ -f "$kubeconfig" ] || die "no control plane at $kubeconfig: start one with 'make cluster' (or pass a kubeconfig written by hack/cluster.sh up)"
  kubeconfig="$(cd "$(dirname "$kubeconfig")" && pwd)/$(basename "$kubeconfig")"
  local ca_dir; ca_dir="$(dirname "$kubeconfig")/pki"
  [ -f "$ca_dir/ca.key" ] || die "$kubeconfig was not written by hack/cluster.sh (no CA key in $ca_dir): a node joins only such a control plane"
  with_lock
  if [ -f "$node_dir/joined" ]; then
    if [ "$(cat "$node_dir/joined")" = "$kubeconfig" ] && pid_alive kubelet && node_ready; then
      log "node $node_name already up and joined to $kubeconfig"
      ensure_pause_image
      [ -z "$watch_pid" ] || start_watchdog "$watch_pid"
      return 0
    fi
    log "a node from an earlier run is still here (joined to $(cat "$node_dir/joined")); removing it first"
    do_down
  fi
  local t0; t0=$(date +%s)
  local total=7
  log "[1/$total] packages (containerd, runc, CNI plugins, iptables, conntrack, socat)"
  install_packages
  log "[2/$total] kubelet, kube-proxy, kube-scheduler (hack/build-control-plane.sh, cached)"
  resolve_bin
  local bin="$capy_bin"
  local c
  for c in kubelet kube-proxy kube-scheduler; do [ -x "$bin/$c" ] || die "$bin/$c missing after the build"; done
  mkdir -p "$node_dir/log" "$run_dir"
  record_host_state
  echo "$kubeconfig" >"$node_dir/joined"
  # Any failure from here on removes what was made.
  trap 'rc=$?; if [ $rc -ne 0 ]; then log "start-up failed; removing what was made (logs kept in /tmp/capy-node-logs)"; rm -rf /tmp/capy-node-logs; cp -r "$node_dir/log" /tmp/capy-node-logs 2>/dev/null || true; do_down || true; fi' EXIT

  log "[3/$total] network namespace and API relay"
  setup_network
  write_configs "$ca_dir"
  launch api-relay socat "TCP-LISTEN:$relay_port,bind=$host_ip,reuseaddr,fork" "TCP:$(api_loopback_addr "$kubeconfig")"
  publish_api_endpoints

  log "[4/$total] containerd"
  launch containerd --netns containerd --config "$node_dir/containerd.toml"
  wait_for "containerd" containerd ctr --address "$sock" version
  ensure_pause_image

  log "[5/$total] kubelet"
  launch kubelet --netns "$bin/kubelet" --config="$node_dir/kubelet.yaml" \
    --kubeconfig="$node_dir/kubelet.kubeconfig" --root-dir="$node_dir/kubelet" \
    --cert-dir="$node_dir/pki/kubelet-serving" --hostname-override="$node_name" --node-ip="$node_ip" \
    --v=1
  log "[6/$total] kube-proxy and kube-scheduler"
  launch kube-proxy --netns "$bin/kube-proxy" --config="$node_dir/kube-proxy.yaml" --v=1
  launch kube-scheduler --netns "$bin/kube-scheduler" --kubeconfig="$node_dir/kube-scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port=10259 --v=1

  log "[7/$total] waiting for the node to be Ready"
  wait_for "node $node_name Ready" kubelet node_ready
  # Pods mount kube-root-ca.crt; only a control plane with the workload controllers publishes it.
  local i
  for ((i = 0; i < 50; i++)); do
    kubectl_admin -n default get configmap kube-root-ca.crt >/dev/null 2>&1 && break
    sleep 0.2
  done
  [ $i -lt 50 ] || die "the control plane runs without the controllers pods need (Deployments, EndpointSlices, kube-root-ca.crt): restart it with CAPY_CLUSTER_WORKLOADS=true (make cluster-down && make node)"
  trap - EXIT
  [ -z "$watch_pid" ] || start_watchdog "$watch_pid"
  log "node $node_name Ready in $(( $(date +%s) - t0 ))s; pods reach the host at $host_ip"
}

ensure_pause_image() {
  ctr_k8s images ls -q 2>/dev/null | grep -qxF "$pause_ref" && return 0
  local tar; tar="$("$here/image.sh" pause | tail -n 1)"
  load_images "$tar"
}

# --- down -------------------------------------------------------------------------------------

umount_under() { # umount_under PREFIX: every mount at or below PREFIX, deepest first
  local m
  while read -r m; do
    [ -n "$m" ] || continue
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done < <(awk -v p="$1" '$5 == p || index($5, p "/") == 1 {print $5}' /proc/self/mountinfo | sort -r)
}

do_down() {
  [ -d "$node_dir" ] || [ -e "/run/netns/$netns" ] || ip link show "$host_if" >/dev/null 2>&1 || return 0
  # The Node object goes too when its control plane is still there (best effort).
  if [ -f "$node_dir/joined" ] && [ -f "$(cat "$node_dir/joined")" ]; then
    resolve_bin
    kubectl_admin delete node "$node_name" --wait=false >/dev/null 2>&1 || true
  fi
  # Not the watchdog itself: it runs this very function.
  [ "$(cat "$node_dir/watchdog.pid" 2>/dev/null)" = "$$" ] || stop_proc watchdog 1
  stop_proc kubelet 10
  # Every container and sandbox: kill their tasks so the shims exit and their mounts go.
  if [ -S "$sock" ]; then
    local id
    for id in $(ctr_k8s tasks ls -q 2>/dev/null); do ctr_k8s tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 0.5
    for id in $(ctr_k8s tasks ls -q 2>/dev/null); do ctr_k8s tasks delete -f "$id" >/dev/null 2>&1 || true; done
  fi
  stop_proc kube-scheduler 5
  stop_proc kube-proxy 5
  stop_proc containerd 10
  stop_proc api-relay 2
  # Shims left behind (containerd killed first, or a crash).
  pkill -KILL -f -- "-address $sock" 2>/dev/null || true
  local i
  for ((i = 0; i < 20; i++)); do pgrep -f -- "-address $sock" >/dev/null || break; sleep 0.1; done

  # Mounts: pod volumes, container roots, shm, sandbox network namespaces.
  umount_under "$node_dir"
  umount_under "$run_dir"
  umount_under /var/lib/kubelet
  umount_under /run/containerd
  local ns
  for ns in /run/netns/cni-*; do
    [ -e "$ns" ] || continue
    umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null || true
    rm -f "$ns"
  done
  if [ -e "/run/netns/$netns" ]; then ip netns del "$netns" 2>/dev/null || true; fi
  # The host's end of the veth (and the routes through it) go with the namespace; make sure.
  ip link del "$host_if" 2>/dev/null || true

  # cgroups kubelet and runc made, in every hierarchy, deepest first.
  local d
  while read -r d; do rmdir "$d" 2>/dev/null || true; done < <(
    find /sys/fs/cgroup -mindepth 2 -maxdepth 8 -type d -path '*/kubepods*' 2>/dev/null | awk '{print length, $0}' | sort -rn | cut -d' ' -f2-)

  # Kernel settings and paths as they were before the first node.
  local before="$node_dir/host-before"
  if [ -f "$before" ]; then
    local kind key val p
    while read -r kind key val; do
      [ "$kind" = sysctl ] || continue
      [ "$(cat "/proc/sys/$key")" = "$val" ] || echo "$val" >"/proc/sys/$key" 2>/dev/null || log "could not restore $key"
    done <"$before"
    for p in "${fixed_paths[@]}"; do
      grep -qxF "path $p" "$before" && continue
      [ -e "$p" ] || continue
      umount_under "$p"
      rm -rf "$p"
    done
  fi
  rm -rf "$run_dir" "$node_dir"
}

cmd_down() {
  [ -z "$(cannot_run)" ] || { log "nothing to remove: $(cannot_run)"; return 0; }
  with_lock
  do_down
  log "node removed; the host is as it was found"
}

cmd_status() {
  resolve_bin
  [ -f "$node_dir/joined" ] && pid_alive kubelet && node_ready || return 1
  echo "node $node_name Ready, joined to $(cat "$node_dir/joined")"
}

[ $# -ge 1 ] || usage
cmd="$1"; shift
case "$cmd" in
  up) cmd_up "$@" ;;
  down) [ $# -eq 0 ] || usage; cmd_down ;;
  status) [ $# -eq 0 ] || usage; cmd_status ;;
  load) [ $# -ge 1 ] || usage; pid_alive containerd || die "no node is up (hack/node.sh up)"; load_images "$@" ;;
  host-ip) echo "$host_ip" ;;
  check) why="$(cannot_run)"; [ -z "$why" ] || { echo "$why"; exit 3; } ;;
  ctr) ctr_k8s "$@" ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
