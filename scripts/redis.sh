#!/usr/bin/env bash
# A throwaway Redis for tests: `scripts/redis.sh start|stop|restart|url`.
# Loopback only, no persistence (NEXUS never relies on Redis for data). Installs redis-server
# from Debian if it is missing.
set -euo pipefail
PORT="${NEXUS_REDIS_PORT:-56379}"
DIR="${NEXUS_REDIS_DIR:-/tmp/nexus-redis}"
URL="redis://127.0.0.1:${PORT}"

ensure_installed() {
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server" >&2
    (apt-get update -qq || true) >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2
  fi
}

running() { redis-cli -p "$PORT" ping >/dev/null 2>&1; }

start() {
  ensure_installed
  mkdir -p "$DIR"
  if ! running; then
    redis-server --port "$PORT" --bind 127.0.0.1 --daemonize yes --dir "$DIR" \
      --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" --save "" --appendonly no >&2
    for _ in $(seq 1 100); do running && break; sleep 0.1; done
    running || { echo "redis did not start; see $DIR/redis.log" >&2; exit 1; }
  fi
  echo "$URL"
}

stop() {
  if running; then redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; fi
  for _ in $(seq 1 50); do running || break; sleep 0.1; done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  url) echo "$URL" ;;
  install) ensure_installed ;;
  *) echo "usage: $0 start|stop|restart|url|install" >&2; exit 2 ;;
esac
