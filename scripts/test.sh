#!/usr/bin/env bash
# The whole test suite, from a fresh clone: unit tests, the storage conformance suite and the
# integration tests that start the real `nexus` binary. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi

# Integration tests open many sockets (SSE subscribers); give them room.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --workspace --locked "$@"
