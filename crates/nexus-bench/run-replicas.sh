#!/usr/bin/env bash
# NEXUS on PostgreSQL + Redis, two replicas: ingest on both, cross-replica fan-out
# (publish on A, subscribe on B) and the same fan-out across a Redis restart.
#
# Starts its own throwaway PostgreSQL and Redis with scripts/postgres.sh and
# scripts/redis.sh (on their own ports/directories by default, so an instance
# somebody else is using is never touched or restarted), a fresh database, the
# schema (`nexus migrate`), two `nexus server` replicas as the unprivileged
# application role, runs the benchmarks and stops everything it started.
#
# Environment knobs (all optional):
#   NEXUS_BIN        nexus binary (default: <workspace>/target/release/nexus)
#   BENCH            nexus-bench binary (default: $CARGO_TARGET_DIR or <workspace>/target, release)
#   NEXUS_PG_PORT    PostgreSQL port (default 55433), NEXUS_PG_DIR (default /tmp/nexus-bench-pg)
#   NEXUS_REDIS_PORT Redis port (default 56380), NEXUS_REDIS_DIR (default /tmp/nexus-bench-redis)
#   PORT_A, PORT_B   replica ports (default 18181, 18182)
#   DURATION         seconds per run (default 10); RESTART_AFTER seconds into the
#                    publishing phase of the last fan-out run at which Redis is restarted (default 5)
#   SUBSCRIBERS      fan-out subscribers (default 1000); INGEST_CONNECTIONS per replica (default 32)
#   RESULTS          JSON-lines output (default docs/benchmarks/pg-redis-<timestamp>.jsonl)
#   KEEP=1           leave PostgreSQL / Redis running at the end
#   SERVER_ARGS      extra flags for both replicas (e.g. "--credential-cache-ttl 5s")
#   NEXUS_BENCH_EMAIL, NEXUS_BENCH_PASSWORD
#                    the web user the bench signs in as (defaults: the bench's defaults); the
#                    replicas get them as their bootstrap admin
#
# Authentication: both replicas use ONE signing-key directory (--jwt-keys-dir $WORK/keys, created
# by replica A on start, read by B), as replicas must in production. Each bench process signs in
# once on its --url; the access token is an Ed25519 JWT tied to a session stored in PostgreSQL, so
# the token obtained from A also works on B (fan-out: pairing/publishing on A, SSE subscriptions on
# B with the same token).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WS="$(cd "$HERE/../.." && pwd)"
export NEXUS_PG_PORT="${NEXUS_PG_PORT:-55433}"
export NEXUS_PG_DIR="${NEXUS_PG_DIR:-/tmp/nexus-bench-pg}"
export NEXUS_REDIS_PORT="${NEXUS_REDIS_PORT:-56380}"
export NEXUS_REDIS_DIR="${NEXUS_REDIS_DIR:-/tmp/nexus-bench-redis}"
NEXUS_BIN="${NEXUS_BIN:-$WS/target/release/nexus}"
BENCH="${BENCH:-${CARGO_TARGET_DIR:-$WS/target}/release/nexus-bench}"
PORT_A="${PORT_A:-18181}"
PORT_B="${PORT_B:-18182}"
DURATION="${DURATION:-10}"
RESTART_AFTER="${RESTART_AFTER:-5}"
SUBSCRIBERS="${SUBSCRIBERS:-1000}"
INGEST_CONNECTIONS="${INGEST_CONNECTIONS:-32}"
RESULTS="${RESULTS:-$WS/docs/benchmarks/pg-redis-$(date +%Y%m%dT%H%M%S).jsonl}"
WORK="$(mktemp -d /tmp/nexus-bench-replicas.XXXXXX)"
DB="nexus_bench_$(date +%s)"
A="http://127.0.0.1:$PORT_A"
export NEXUS_BENCH_EMAIL="${NEXUS_BENCH_EMAIL:-bench@nexus.bench}"
export NEXUS_BENCH_PASSWORD="${NEXUS_BENCH_PASSWORD:-Load-Test-Pass-2026!}"
B="http://127.0.0.1:$PORT_B"
mkdir -p "$(dirname "$RESULTS")"

log() { printf '\n=== %s\n' "$*" >&2; }
[[ -x "$NEXUS_BIN" ]] || { echo "no nexus binary at $NEXUS_BIN (set NEXUS_BIN)" >&2; exit 1; }
[[ -x "$BENCH" ]] || { echo "no nexus-bench binary at $BENCH (set BENCH)" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

PIDS=()
STARTED_INFRA=0
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    if [[ "$STARTED_INFRA" == 1 && "${KEEP:-0}" != 1 ]]; then
        "$WS/scripts/redis.sh" stop || true
        "$WS/scripts/postgres.sh" stop || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

log "PostgreSQL (127.0.0.1:$NEXUS_PG_PORT, $NEXUS_PG_DIR) and Redis (127.0.0.1:$NEXUS_REDIS_PORT)"
STARTED_INFRA=1
SUPER="$("$WS/scripts/postgres.sh" start)"
REDIS="$("$WS/scripts/redis.sh" start)"
PSQL=(psql -v ON_ERROR_STOP=1 -q -h 127.0.0.1 -p "$NEXUS_PG_PORT" -U postgres)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"
"${PSQL[@]}" -d postgres -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nexus_app') THEN CREATE ROLE nexus_app LOGIN NOSUPERUSER NOBYPASSRLS; END IF; END \$\$"
"$NEXUS_BIN" migrate --database-url "${SUPER%/*}/$DB"
APP_URL="postgres://nexus_app@127.0.0.1:$NEXUS_PG_PORT/$DB"

start_replica() { # name port
    mkdir -p "$WORK/$1" # $WORK/keys: created by the first replica (mode 0700)
    NEXUS_BOOTSTRAP_ADMIN_EMAIL="$NEXUS_BENCH_EMAIL" NEXUS_BOOTSTRAP_ADMIN_PASSWORD="$NEXUS_BENCH_PASSWORD" \
    "$NEXUS_BIN" server --listen "127.0.0.1:$2" --data-dir "$WORK/$1" --dev \
        --database-url "$APP_URL" --redis-url "$REDIS" --jwt-keys-dir "$WORK/keys" \
        --log warn ${SERVER_ARGS:-} >"$WORK/$1.log" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 1 100); do
        curl -sf -o /dev/null "http://127.0.0.1:$2/health/ready" && return 0
        sleep 0.1
    done
    echo "replica $1 not ready:" >&2; tail -20 "$WORK/$1.log" >&2; return 1
}
log "replicas A=$A B=$B ($APP_URL, $REDIS)"
start_replica a "$PORT_A"
PID_A="${PIDS[0]}"
start_replica b "$PORT_B"
PID_B="${PIDS[1]}"

log "ingest: two processes, $INGEST_CONNECTIONS connections each, one per replica, ${DURATION}s"
timeout 300 "$BENCH" ingest --url "$A" --server-pid "$PID_A" --connections "$INGEST_CONNECTIONS" \
    --duration "$DURATION" --json-out "$RESULTS" >"$WORK/ingest-a.out" &
IA=$!
timeout 300 "$BENCH" ingest --url "$B" --server-pid "$PID_B" --connections "$INGEST_CONNECTIONS" \
    --duration "$DURATION" --json-out "$RESULTS" >"$WORK/ingest-b.out" &
IB=$!
wait "$IA"; wait "$IB"
cat "$WORK/ingest-a.out" "$WORK/ingest-b.out"
sleep 2

FAN=(fanout --url "$A" --server-pid "$PID_A" --subscribe-url "$B" --subscribers "$SUBSCRIBERS"
    --sessions 100 --rate 200 --duration "$DURATION" --json-out "$RESULTS")
log "fan-out: $SUBSCRIBERS subscribers on B, publishing on A"
timeout 300 "$BENCH" "${FAN[@]}"
sleep 2

log "fan-out across a Redis restart ${RESTART_AFTER}s into publishing"
timeout 300 "$BENCH" "${FAN[@]}" >"$WORK/fan-restart.out" 2>"$WORK/fan-restart.err" &
FP=$!
# Publishing starts when every subscriber is established; wait for that line.
for _ in $(seq 1 600); do
    grep -q 'subscribers established' "$WORK/fan-restart.err" 2>/dev/null && break
    kill -0 "$FP" 2>/dev/null || break
    sleep 0.1
done
sleep "$RESTART_AFTER"
log "restarting Redis ($(date +%T.%N | cut -c1-12))"
"$WS/scripts/redis.sh" restart
wait "$FP" || true
cat "$WORK/fan-restart.err" >&2
cat "$WORK/fan-restart.out"

log "replica logs (warnings and errors)"
tail -n 15 "$WORK/a.log" "$WORK/b.log" >&2 || true
log "results: $RESULTS"
