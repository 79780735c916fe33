#!/usr/bin/env bash
# Installs schemathesis (PyPI) into a virtualenv in the cache outside the repository, once, at the
# version pinned below, and prints the path of its executable. `make test` runs it; tests/fuzz.rs
# finds it through CAPY_SCHEMATHESIS (set by the Makefile) or at the same cache path.
set -euo pipefail
SCHEMATHESIS_VERSION=4.32.5
cache="${CAPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capy-webhooks}"
venv="$cache/tools/schemathesis-$SCHEMATHESIS_VERSION"
exe="$venv/bin/schemathesis"
if [[ ! -x "$exe" ]]; then
  echo "[fuzz-tools] installing schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" >&2
  rm -rf "$venv"
  mv "$venv.tmp" "$venv"
  # The venv's scripts name their interpreter by absolute path: fix them after the move.
  sed -i "1s|^#!.*python.*$|#!$venv/bin/python3|" "$venv"/bin/schemathesis "$venv"/bin/st 2>/dev/null || true
fi
"$exe" --version >/dev/null
echo "$exe"
