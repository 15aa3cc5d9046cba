#!/usr/bin/env bash
# Make a real PostgreSQL server available for the nbserver storage tests.
#
# Usage: scripts/postgres.sh [DATA_DIR]
#
#   DATA_DIR  where the cluster lives (default /tmp/nbagent-pg)
#   PGPORT    TCP port on 127.0.0.1 (default 55432)
#
# Idempotent: installs the `postgresql` package with apt-get only when no server
# binaries are found, creates the cluster only when DATA_DIR has none, starts the
# server only when it is not running, and creates the database only when missing.
# Runs as root (the server itself runs as the `postgres` user, which it insists on).
# The last line on stdout is the URL to put in NBSERVER_TEST_POSTGRES_URL:
#
#   export NBSERVER_TEST_POSTGRES_URL="$(scripts/postgres.sh | tail -n 1)"
set -euo pipefail

DATA_DIR="${1:-/tmp/nbagent-pg}"
PORT="${PGPORT:-55432}"
DB=nbserver_test
URL="postgres://postgres@127.0.0.1:${PORT}/${DB}"

log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    local dir
    # Highest version first.
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r); do
        if [[ -x "$dir/postgres" && -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

as_postgres() {
    if command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- "$@"
    else
        # shellcheck disable=SC2145
        su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
}

BINDIR="$(find_bindir || true)"
if [[ -z "$BINDIR" ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        log "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin and not root: install the postgresql package"
        exit 1
    fi
    log "installing postgresql with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BINDIR="$(find_bindir)" || {
        log "postgresql installed but no server binaries found"
        exit 1
    }
fi
log "using server binaries in $BINDIR"

if ! id postgres >/dev/null 2>&1; then
    log "the postgres user does not exist (the postgresql package creates it)"
    exit 1
fi

ready() {
    "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" -d postgres -U postgres
}

ensure_db() {
    local exists
    exists="$("$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '${DB}'")"
    if [[ "$exists" != "1" ]]; then
        log "creating database $DB"
        "$BINDIR/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
    fi
}

if ready; then
    log "already running on 127.0.0.1:$PORT"
    ensure_db
    echo "$URL"
    exit 0
fi

mkdir -p "$DATA_DIR"
chown postgres: "$DATA_DIR"
chmod 700 "$DATA_DIR"

if [[ ! -f "$DATA_DIR/PG_VERSION" ]]; then
    log "creating cluster in $DATA_DIR"
    as_postgres "$BINDIR/initdb" -D "$DATA_DIR" -U postgres \
        --auth-local=trust --auth-host=trust -E UTF8 --locale=C.UTF-8 >&2
fi

# A stale pid file from a killed server would stop pg_ctl; it checks the pid itself.
log "starting server on 127.0.0.1:$PORT"
as_postgres "$BINDIR/pg_ctl" -D "$DATA_DIR" -l "$DATA_DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA_DIR -c max_connections=200" \
    start >&2 || {
    log "server did not start; its log follows"
    tail -n 50 "$DATA_DIR/server.log" >&2 || true
    exit 1
}

for _ in $(seq 1 60); do
    if ready; then
        break
    fi
    sleep 0.5
done
if ! ready; then
    log "server is not accepting connections on 127.0.0.1:$PORT"
    exit 1
fi

ensure_db
echo "$URL"
