#!/usr/bin/env bash
# The whole test suite, from a fresh clone, in one command. It installs and starts what the tests
# need (a throwaway PostgreSQL and Redis on loopback, unless NEXUS_TEST_DATABASE_URL /
# NEXUS_TEST_REDIS_URL point at running ones), runs
#   1. every crate's tests: unit tests, the storage conformance suite on SQLite and PostgreSQL,
#      the integration tests on the embedded store, the multi-replica tests (PostgreSQL + Redis);
#   2. the integration tests again with every server on PostgreSQL + Redis;
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
  if [ -z "${NEXUS_TEST_REDIS_URL:-}" ]; then
    started+=(redis)
    NEXUS_TEST_REDIS_URL=$(./scripts/redis.sh start)
    export NEXUS_TEST_REDIS_URL
  fi
  # The replica tests start private redis-server processes.
  ./scripts/redis.sh install
fi

echo "== all crates (SQLite default; PostgreSQL conformance and replicas)"
cargo test --workspace --locked "$@"

if [ "${NEXUS_SKIP_POSTGRES:-}" != 1 ]; then
  echo "== integration tests with every server on PostgreSQL + Redis"
  NEXUS_TEST_BACKEND=postgres cargo test --locked -p nexus --test it
fi
