#!/usr/bin/env bash
# Installs PyNaCl (PyPI; libsodium's ed25519) into a virtualenv in the cache outside the
# repository, once, at the version pinned in hack/versions.env, and prints the path of its Python.
# The tests verify `v1a` (ed25519) signatures with it: an implementation this project did not
# write. `make test` runs it; the tests find it through CAPY_VERIFIER_PYTHON (set by the Makefile)
# or run this script themselves.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${CAPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capy-webhooks}"
venv="$cache/tools/pynacl-$PYNACL_VERSION"
python="$venv/bin/python3"
if [[ ! -x "$python" ]] || ! "$python" -c 'import nacl.signing' 2>/dev/null; then
  echo "[verifier-tools] installing PyNaCl $PYNACL_VERSION into $venv" >&2
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check "pynacl==$PYNACL_VERSION" >&2
  rm -rf "$venv"
  # Moved whole: the interpreter finds its packages from pyvenv.cfg beside bin/ (only pip's own
  # scripts name the old path, and nothing here runs them).
  mv "$venv.tmp" "$venv"
fi
"$python" -c 'import nacl.signing' >/dev/null
echo "$python"
