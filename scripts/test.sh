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

# The PostgreSQL store's tests need a server. Use NEXUS_TEST_DATABASE_URL (a superuser URL) when it is
# given; otherwise start a throwaway cluster for this run (installing PostgreSQL if needed) and stop it
# afterwards. Without either, those tests fail: NEXUS_SKIP_POSTGRES=1 is the only way to skip them.
if [ -z "${NEXUS_TEST_DATABASE_URL:-}" ] && [ "${NEXUS_SKIP_POSTGRES:-}" != 1 ]; then
  if ! ./scripts/postgres.sh status >/dev/null 2>&1; then
    trap './scripts/postgres.sh stop' EXIT
  fi
  NEXUS_TEST_DATABASE_URL=$(./scripts/postgres.sh start)
  export NEXUS_TEST_DATABASE_URL
fi

cargo test --workspace --locked "$@"
