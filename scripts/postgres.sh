#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the PostgreSQL store's tests and for local development.
#
#   scripts/postgres.sh start   # initialise if needed, start, wait until ready, print the superuser URL
#   scripts/postgres.sh stop    # stop it (data is kept until you delete the directory)
#   scripts/postgres.sh url     # print the superuser URL
#   scripts/postgres.sh status  # exit 0 if it is running
#
# It never touches the distribution's own cluster: the data lives under ${NEXUS_PG_DIR:-/tmp/nexus-pg},
# the server listens only on 127.0.0.1:${NEXUS_PG_PORT:-55432} (plus a Unix socket in that directory),
# and loopback connections are trusted, so it is for tests on one machine, never for real data.
# On Debian/Ubuntu it installs postgresql-${NEXUS_PG_VERSION:-15} with apt-get when the binaries are missing.
# Run as root (the server is then run as the `postgres` user) or as an ordinary user (who then owns it).
set -euo pipefail

PG_VERSION=${NEXUS_PG_VERSION:-15}
PG_DIR=${NEXUS_PG_DIR:-/tmp/nexus-pg}
PG_PORT=${NEXUS_PG_PORT:-55432}
PG_BIN=${NEXUS_PG_BIN:-/usr/lib/postgresql/$PG_VERSION/bin}
DATA=$PG_DIR/data
LOG=$PG_DIR/postgres.log
URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# Runs a PostgreSQL tool as the cluster's owner (the server refuses to run as root).
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

ensure_installed() {
  [ -x "$PG_BIN/initdb" ] && return 0
  [ "$(id -u)" = 0 ] || die "$PG_BIN/initdb is missing; install postgresql-$PG_VERSION (as root: apt-get install postgresql-$PG_VERSION)"
  command -v apt-get >/dev/null 2>&1 || die "$PG_BIN/initdb is missing and apt-get is not available; install PostgreSQL $PG_VERSION"
  log "installing postgresql-$PG_VERSION with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "postgresql-$PG_VERSION" >&2
  [ -x "$PG_BIN/initdb" ] || die "postgresql-$PG_VERSION is installed but $PG_BIN/initdb is still missing"
}

is_running() {
  [ -f "$DATA/PG_VERSION" ] && as_owner "$PG_BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

init_cluster() {
  mkdir -p "$PG_DIR"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "the 'postgres' user does not exist (it comes with the postgresql-common package)"
    chown postgres: "$PG_DIR"
    chmod 0700 "$PG_DIR"
    runuser -u postgres -- test -w "$PG_DIR" || die "$PG_DIR is not writable by the postgres user (is a parent directory private?)"
  fi
  if [ ! -f "$DATA/PG_VERSION" ]; then
    log "initialising a cluster in $DATA"
    as_owner "$PG_BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C >"$PG_DIR/initdb.log" 2>&1 ||
      { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
    echo "include_if_exists = 'nexus.conf'" | as_owner tee -a "$DATA/postgresql.conf" >/dev/null
  fi
  # Rewritten on every start, so a different NEXUS_PG_PORT or directory takes effect.
  as_owner tee "$DATA/nexus.conf" >/dev/null <<EOF
# Written by scripts/postgres.sh on every start.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
fsync = on
synchronous_commit = on
max_connections = 300
EOF
  as_owner tee "$DATA/pg_hba.conf" >/dev/null <<'EOF'
# Written by scripts/postgres.sh: a throwaway test cluster, trusted on loopback only.
local all all                trust
host  all all 127.0.0.1/32   trust
EOF
}

start() {
  ensure_installed
  init_cluster
  if is_running; then
    log "already running ($DATA)"
  else
    as_owner "$PG_BIN/pg_ctl" start -D "$DATA" -l "$LOG" -w -t 60 >/dev/null ||
      { tail -n 20 "$LOG" >&2 || true; die "the server did not start (log: $LOG)"; }
  fi
  for _ in $(seq 1 60); do
    if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -d postgres -U postgres; then
      echo "$URL"
      return 0
    fi
    sleep 0.5
  done
  die "the server is not accepting connections on 127.0.0.1:$PG_PORT (log: $LOG)"
}

stop() {
  if [ ! -x "$PG_BIN/pg_ctl" ] || ! is_running; then
    log "not running"
    return 0
  fi
  as_owner "$PG_BIN/pg_ctl" stop -D "$DATA" -m fast -w -t 60 >/dev/null
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) echo "$URL" ;;
  status)
    if [ -x "$PG_BIN/pg_ctl" ] && is_running; then
      echo "running ($DATA, $URL)"
    else
      echo "not running"
      exit 1
    fi
    ;;
  *)
    echo "usage: $0 start|stop|url|status" >&2
    exit 2
    ;;
esac
