#!/usr/bin/env bash
# Builds the operator's container image without a registry or a container engine:
#
#   hack/image.sh [operator|pause|all]     (default: all)
#
#   operator  target/image/capy-webhooks.tar   docker-archive, tagged $CAPY_IMAGE (capy-webhooks:dev)
#   pause     target/image/pause.tar           the pod sandbox image, tagged capy.local/pause:3.10
#
# The operator's image holds what the Dockerfile's final stage holds (distroless/cc: libc, CA
# certificates, a passwd entry for 65532): the release binary, the shared libraries `ldd` says it
# links, /etc/ssl/certs/ca-certificates.crt and /etc/passwd + /etc/group with `nonroot` (65532).
# USER, ENTRYPOINT, CMD and EXPOSE are read from the Dockerfile itself, so the two cannot drift;
# tests/image.rs checks the written image against the Dockerfile again.
#
# Tools (Debian): umoci writes the OCI image (one layer from a directory, then its config);
# skopeo turns it into a docker-archive tar, which `docker load`, `ctr images import` and
# `kind load image-archive` all read. Both are installed when missing. A tar whose inputs did not
# change is kept. Prints each tar's path on stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="${CAPY_IMAGE_DIR:-$root/target/image}"
image_ref="${CAPY_IMAGE:-capy-webhooks:dev}"
pause_ref="capy.local/pause:3.10"
what="${1:-all}"

log() { echo "[image] $*" >&2; }
die() { log "error: $*"; exit 1; }
case "$what" in operator|pause|all) ;; *) die "usage: hack/image.sh [operator|pause|all]" ;; esac
[ "$(uname -s)" = Linux ] || die "images are built on Linux only (the binary must be a Linux binary)"

need_tools() {
  local missing=()
  command -v umoci >/dev/null || missing+=(umoci)
  command -v skopeo >/dev/null || missing+=(skopeo)
  command -v cc >/dev/null || missing+=(gcc libc6-dev)
  [ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    || die "missing: ${missing[*]}; install them (Debian: apt-get install ${missing[*]})"
  log "installing ${missing[*]} (Debian)"
  apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
}

# One layer from DIR, the given config, then a docker-archive at TAR tagged REF.
write_image() { # write_image DIR TAR REF CONFIG_ARGS...
  local rootfs="$1" tar="$2" ref="$3"; shift 3
  local layout="$out/.oci-$(basename "$tar" .tar)"
  rm -rf "$layout" "$tar.tmp"
  umoci init --layout "$layout"
  umoci new --image "$layout:build"
  umoci insert --image "$layout:build" "$rootfs" /
  umoci config --image "$layout:build" --os linux --architecture amd64 "$@"
  skopeo --insecure-policy copy --quiet "oci:$layout:build" "docker-archive:$tar.tmp:$ref" >&2
  mv "$tar.tmp" "$tar"
  rm -rf "$layout"
}

# Fingerprint of everything that goes into an image; the tar is rebuilt only when it changes.
unchanged() { # unchanged TAR FINGERPRINT
  [ -f "$1" ] && [ -f "$1.inputs" ] && [ "$(cat "$1.inputs")" = "$2" ]
}

# USER, ENTRYPOINT, CMD, EXPOSE and the binary's path of the Dockerfile's final stage, as
# shell-quoted assignments.
dockerfile_config() {
  python3 - "$root/Dockerfile" <<'PY'
import json, shlex, sys
stages, cur = [], None
for raw in open(sys.argv[1]):
    line = raw.strip()
    if not line or line.startswith("#"):
        continue
    word, _, rest = line.partition(" ")
    word = word.upper()
    if word == "FROM":
        cur = {"copy": [], "expose": []}
        stages.append(cur)
    elif word == "USER":
        cur["user"] = rest.strip()
    elif word in ("ENTRYPOINT", "CMD"):
        cur[word.lower()] = json.loads(rest)  # exec form only: the shell form needs a shell
    elif word == "EXPOSE":
        cur["expose"] += rest.split()
    elif word == "COPY":
        cur["copy"].append(rest.split()[-1])
final = stages[-1]
binary = final["entrypoint"][0]
if binary not in final["copy"]:
    sys.exit(f"the Dockerfile's ENTRYPOINT {binary} is not a path its final stage copies")
print("df_user=" + shlex.quote(final["user"]))
print("df_binary=" + shlex.quote(binary))
print("df_entrypoint=(" + " ".join(shlex.quote(a) for a in final["entrypoint"]) + ")")
print("df_cmd=(" + " ".join(shlex.quote(a) for a in final.get("cmd", [])) + ")")
print("df_expose=(" + " ".join(shlex.quote(p if "/" in p else p + "/tcp") for p in final["expose"]) + ")")
PY
}

build_operator() {
  local cfg; cfg="$(dockerfile_config)" || die "cannot read the image's config from the Dockerfile"
  eval "$cfg"
  log "release build of the operator (cargo build --release --locked)"
  (cd "$root" && cargo build --release --locked --bin capy-webhooks >&2)
  local bin="${CARGO_TARGET_DIR:-$root/target}/release/capy-webhooks"
  local tar="$out/capy-webhooks.tar"
  local fp
  fp="$( { sha256sum "$bin" "$here/image.sh" /etc/ssl/certs/ca-certificates.crt | cut -d' ' -f1
           echo "$image_ref $cfg"; } | sha256sum | cut -d' ' -f1)"
  if unchanged "$tar" "$fp"; then log "$tar is up to date ($image_ref)"; echo "$tar"; return; fi

  local rootfs="$out/.rootfs-operator"
  rm -rf "$rootfs"; mkdir -p "$rootfs"
  install -D -m 0755 "$bin" "$rootfs$df_binary"
  # The dynamic loader and every library the binary links, at the paths the loader looks them up.
  local lib
  while read -r lib; do
    [ -n "$lib" ] || continue
    install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
  done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
  local interp
  interp="$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
  [ -z "$interp" ] || [ -e "$rootfs$interp" ] || die "the binary's loader $interp is not in the image"
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  local uid="${df_user%%:*}" gid="${df_user##*:}"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' \
    "$uid" "$gid" >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:%s:\n' "$gid" >"$rootfs/etc/group"
  chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
  install -d -m 0755 -o "$uid" -g "$gid" "$rootfs/home/nonroot"
  install -d -m 1777 "$rootfs/tmp"
  # The image must run on its own: the binary, started inside its root, with nothing of the host.
  if [ "$(id -u)" = 0 ]; then
    chroot "$rootfs" "${df_entrypoint[@]}" --version >/dev/null \
      || die "the image's entrypoint does not run inside its own root filesystem"
  fi

  local args=(--config.user "$df_user" --clear=config.entrypoint --clear=config.cmd)
  local a p
  for a in "${df_entrypoint[@]}"; do args+=(--config.entrypoint "$a"); done
  for a in "${df_cmd[@]}"; do args+=(--config.cmd "$a"); done
  for p in "${df_expose[@]}"; do args+=(--config.exposedports "$p"); done
  args+=(--config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
         --config.env "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
  log "writing $tar ($image_ref)"
  write_image "$rootfs" "$tar" "$image_ref" "${args[@]}"
  rm -rf "$rootfs"
  echo "$fp" >"$tar.inputs"
  log "$image_ref: $(du -h "$tar" | cut -f1)"
  echo "$tar"
}

build_pause() {
  local tar="$out/pause.tar" src="$here/pause/pause.c" fp
  fp="$(cat "$src" "$here/image.sh" | sha256sum | cut -d' ' -f1)"
  if unchanged "$tar" "$fp"; then log "$tar is up to date ($pause_ref)"; echo "$tar"; return; fi
  local rootfs="$out/.rootfs-pause"
  rm -rf "$rootfs"; mkdir -p "$rootfs"
  cc -Os -s -static -o "$rootfs/pause" "$src" || die "compiling $src failed (needs gcc and libc6-dev)"
  log "writing $tar ($pause_ref)"
  # 65535 as in Kubernetes' own pause image: the sandbox needs no privilege.
  write_image "$rootfs" "$tar" "$pause_ref" --config.user 65535:65535 \
    --clear=config.entrypoint --config.entrypoint /pause
  rm -rf "$rootfs"
  echo "$fp" >"$tar.inputs"
  echo "$tar"
}

need_tools
mkdir -p "$out"
case "$what" in
  operator) build_operator ;;
  pause) build_pause ;;
  all) build_pause; build_operator ;;
esac
