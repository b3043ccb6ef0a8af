#!/usr/bin/env bash
# The whole test suite, from a fresh clone, in one command. It installs and starts what the tests
# need (a throwaway PostgreSQL on loopback, unless NEXUS_TEST_DATABASE_URL points at a running one;
# redis-server, which the multi-replica tests start privately so they can restart it), runs
#   1. every crate's tests: unit tests, the storage conformance suite on SQLite and PostgreSQL,
#      the integration tests on the embedded store, the multi-replica tests (PostgreSQL + Redis);
#   2. the integration tests again with every server on PostgreSQL alone (no Redis: a single
#      replica needs none); set NEXUS_TEST_REDIS_URL to run this pass with Redis too;
# and stops what it started. Extra arguments go to the first `cargo test`.
# NEXUS_SKIP_POSTGRES=1 skips everything that needs PostgreSQL or Redis (nothing else does).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi

# Integration tests open many sockets (SSE subscribers); give them room.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

started=()
cleanup() {
  for service in "${started[@]}"; do "./scripts/$service.sh" stop || true; done
}
trap cleanup EXIT

# The audit tamper test edits the SQLite store directly, as an attacker with file access would.
if ! command -v sqlite3 >/dev/null 2>&1; then
  (apt-get update -qq || true) >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >&2
fi

if [ "${NEXUS_SKIP_POSTGRES:-}" != 1 ]; then
  if ! command -v psql >/dev/null 2>&1; then
    (apt-get update -qq || true) >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >&2
  fi
  if [ -z "${NEXUS_TEST_DATABASE_URL:-}" ]; then
    ./scripts/postgres.sh status >/dev/null 2>&1 || started+=(postgres)
    NEXUS_TEST_DATABASE_URL=$(./scripts/postgres.sh start)
    export NEXUS_TEST_DATABASE_URL
  fi
  # The replica tests start private redis-server processes.
  ./scripts/redis.sh install
fi

echo "== all crates (SQLite by default; PostgreSQL conformance; replicas on PostgreSQL + Redis)"
cargo test --workspace --locked "$@"

if [ "${NEXUS_SKIP_POSTGRES:-}" != 1 ]; then
  echo "== integration tests with every server on PostgreSQL"
  # `--workspace --test it` selects the same test as `-p nexus --test it`, but with the first
  # pass's feature set, so the dependencies are not compiled a second time.
  NEXUS_TEST_BACKEND=postgres cargo test --workspace --locked --test it
fi
