#!/usr/bin/env bash
# Make sure a usable PostgreSQL exists for notifyd, and export DATABASE_URL.
#
#   source scripts/postgres.sh    ensure, then export DATABASE_URL in this (bash) shell
#   scripts/postgres.sh           ensure, then print DATABASE_URL=...
#   scripts/postgres.sh stop      stop the private cluster
#   scripts/postgres.sh status    show the private cluster's state
#
# DATABASE_URL set: only check that it answers (psql 'select 1').
# DATABASE_URL unset: run a private cluster owned by this checkout, in .notifyd/pg
# (NOTIFYD_PG_DIR), on 127.0.0.1:54329 (NOTIFYD_PG_PORT), with trust auth for local
# connections only, and a database `notifyd`. Server binaries are installed with
# apt-get when missing. The system's own cluster, if any, is left alone.
#
# Env: DATABASE_URL, NOTIFYD_PG_DIR, NOTIFYD_PG_PORT (54329),
#      NOTIFYD_PG_WAIT (seconds to wait for the server: 60, or 20 for a DATABASE_URL).

# Sourced: do the work in a child bash, so that a failure cannot kill an interactive
# shell and errexit applies inside it, then export the result here.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    _notifyd_pg_out=$("${BASH:-bash}" "${BASH_SOURCE[0]}" ensure) || {
        unset _notifyd_pg_out
        echo "notifyd: error: no usable PostgreSQL (see the messages above)" >&2
        return 1
    }
    DATABASE_URL=$(printf '%s\n' "$_notifyd_pg_out" | sed -n 's/^DATABASE_URL=//p' | tail -n 1)
    unset _notifyd_pg_out
    if [[ -z "$DATABASE_URL" ]]; then
        echo "notifyd: error: scripts/postgres.sh printed no DATABASE_URL" >&2
        return 1
    fi
    export DATABASE_URL
    return 0
fi

set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec 3>&1 1>&2 # stdout carries only the DATABASE_URL line; everything else goes to stderr

PORT="${NOTIFYD_PG_PORT:-54329}"
DB=notifyd
RUN_AS=""  # system user that owns and runs the private cluster ("" = the current user)
PG_BIN=""  # server bin directory
PGD=""     # data directory

# ---------------------------------------------------------------- DATABASE_URL given

check_url() {
    local url="$DATABASE_URL" shown wait="${NOTIFYD_PG_WAIT:-20}" psql isready err="" rc
    shown=$(redact_url "$url")
    psql=$(find_pg_tool psql || true)
    isready=$(find_pg_tool pg_isready || true)
    if [[ -z "$psql" && -z "$isready" ]] && have apt-get; then
        apt_install postgresql-client || true
        psql=$(find_pg_tool psql || true)
        isready=$(find_pg_tool pg_isready || true)
    fi
    if [[ -z "$psql" && -z "$isready" ]]; then
        warn "neither psql nor pg_isready is installed: cannot check DATABASE_URL ($shown); using it as is"
        return 0
    fi
    log "checking DATABASE_URL ($shown)"
    local deadline=$((SECONDS + wait))
    while :; do
        if [[ -n "$psql" ]]; then
            if err=$(PGCONNECT_TIMEOUT=5 "$psql" -X -q -t -A -d "$url" -c 'select 1' 2>&1 >/dev/null); then
                break
            fi
        else
            rc=0
            PGCONNECT_TIMEOUT=5 "$isready" -q -d "$url" || rc=$?
            if [[ $rc -eq 0 ]]; then break; fi
            err="pg_isready exit code $rc"
        fi
        # The server answers but refuses us (no such database or role, bad password...):
        # waiting will not help.
        if [[ -n "$isready" && -n "$psql" ]] && PGCONNECT_TIMEOUT=5 "$isready" -q -d "$url"; then
            die "DATABASE_URL ($shown) reaches a server, but connecting fails: ${err}"
        fi
        if ((SECONDS >= deadline)); then
            die "DATABASE_URL ($shown) does not answer after ${wait}s: ${err}
       Fix DATABASE_URL, or unset it to use a private local cluster instead."
        fi
        sleep 1
    done
    if [[ -n "$psql" ]]; then
        if [[ "$("$psql" -X -q -t -A -d "$url" -c "SELECT count(*) FROM pg_available_extensions WHERE name = 'hstore'" 2>/dev/null)" != 1 ]]; then
            warn "the server behind DATABASE_URL ($shown) does not offer the hstore extension (install its contrib package)"
        fi
    fi
    log "DATABASE_URL answers ($shown)"
    DB_URL="$url"
}

# ---------------------------------------------------------------- private cluster

# Run a PostgreSQL server tool. initdb and pg_ctl refuse to run as root, so as root
# they run as $RUN_AS, from / (root's cwd may not be readable by that user).
run_pg() {
    if [[ -z "$RUN_AS" ]]; then
        "$@"
    elif have runuser; then
        (cd / && runuser -u "$RUN_AS" -- "$@")
    else
        (cd / && su -s /bin/bash "$RUN_AS" -c "$(printf '%q ' "$@")")
    fi
}

# Highest-version server bin directory, or the one of major version $1.
pick_server_bindir() {
    local want="${1:-}" d v best="" bestv=-1
    while IFS= read -r d; do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] || continue
        v=$(pg_major "$d/postgres") || continue
        if [[ -n "$want" ]]; then
            if [[ "$v" == "$want" ]]; then
                printf '%s\n' "$d"
                return 0
            fi
        elif ((v > bestv)); then
            best="$d" bestv="$v"
        fi
    done < <(pg_bindirs)
    [[ -n "$best" ]] && printf '%s\n' "$best"
}

find_server() {
    PG_BIN=$(pick_server_bindir || true)
    [[ -n "$PG_BIN" ]] && return 0
    if ! have apt-get; then
        die "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found, and apt-get is not available.
       Install a PostgreSQL server (13 or newer; e.g. 'brew install postgresql@16'),
       or set DATABASE_URL to an existing server."
    fi
    log "PostgreSQL server binaries not found: installing them (a default system cluster may"
    log "also be created and started by the package; it is not used)"
    apt_install postgresql postgresql-contrib ||
        die "could not install PostgreSQL with apt-get (set DATABASE_URL to use an existing server)"
    PG_BIN=$(pick_server_bindir || true)
    [[ -n "$PG_BIN" ]] || die "PostgreSQL was installed, but no initdb/pg_ctl/postgres was found in /usr/lib/postgresql/*/bin"
}

ensure_run_user() {
    [[ "${EUID:-$(id -u)}" -eq 0 ]] || return 0
    RUN_AS=postgres
    id -u "$RUN_AS" >/dev/null 2>&1 && return 0
    log "creating the system user '$RUN_AS' (PostgreSQL refuses to run as root)"
    local group=(--user-group)
    if getent group "$RUN_AS" >/dev/null 2>&1; then group=(--gid "$RUN_AS"); fi
    useradd --system "${group[@]}" --home-dir /var/lib/postgresql --no-create-home \
        --shell /bin/bash "$RUN_AS" || die "could not create the '$RUN_AS' user"
}

path_hash() { printf '%s' "$1" | cksum | cut -d' ' -f1; }

# Can $RUN_AS reach directory $1 (execute permission on every ancestor)?
# shellcheck disable=SC2016 # $1 expands in the inner shell
can_reach() { run_pg sh -c 'cd "$1"' sh "$1" >/dev/null 2>&1; }

resolve_data_dir() {
    PGD="${NOTIFYD_PG_DIR:-$NOTIFYD_STATE/pg}"
    [[ "$PGD" == /* ]] || PGD="$PWD/$PGD"
    PGD="${PGD%/}"
    if [[ -z "${NOTIFYD_PG_DIR:-}" && ! -d "$NOTIFYD_STATE" ]]; then
        mkdir -p "$NOTIFYD_STATE"
        chmod 755 "$NOTIFYD_STATE"
    fi
    [[ -n "$RUN_AS" ]] || return 0
    local parent
    parent=$(dirname "$PGD")
    mkdir -p "$parent"
    can_reach "$parent" && return 0
    if [[ -n "${NOTIFYD_PG_DIR:-}" ]]; then
        die "NOTIFYD_PG_DIR=$PGD: the '$RUN_AS' user, which runs the cluster, cannot reach $parent"
    fi
    local fallback
    fallback="/var/tmp/notifyd-pg-$(path_hash "$NOTIFYD_REPO")"
    log "the '$RUN_AS' user (PostgreSQL will not run as root) cannot reach $NOTIFYD_REPO,"
    log "so the private cluster lives in $fallback instead of $PGD"
    PGD="$fallback"
}

# Serialise concurrent runs (e.g. run.sh and test.sh started together).
take_lock() {
    have flock || return 0
    exec 8>"$PGD.lock"
    flock -w 300 8 || die "timed out waiting for another scripts/postgres.sh (lock $PGD.lock)"
}

init_cluster() {
    if [[ -e "$PGD" && -n "$(ls -A "$PGD" 2>/dev/null)" ]]; then
        die "$PGD exists but is not a PostgreSQL data directory (no PG_VERSION). Remove it and retry."
    fi
    mkdir -p "$PGD"
    chmod 700 "$PGD"
    if [[ -n "$RUN_AS" ]]; then chown "$RUN_AS:" "$PGD"; fi
    log "creating a private PostgreSQL $(pg_major "$PG_BIN/postgres") cluster in $PGD"
    local out
    if ! out=$(run_pg "$PG_BIN/initdb" -D "$PGD" -U postgres --auth=trust \
        --encoding=UTF8 --no-locale 2>&1); then
        printf '%s\n' "$out" >&2
        rm -rf "$PGD"
        die "initdb failed (output above)"
    fi
    # initdb --auth=trust: pg_hba.conf trusts local sockets and 127.0.0.1/::1 only.
    printf "\n# Settings for the notifyd dev/test cluster (written by scripts/postgres.sh)\ninclude_if_exists = 'notifyd.conf'\n" \
        >>"$PGD/postgresql.conf"
}

# Write notifyd.conf; set CONF_CHANGED=1 if it differs from the previous one.
write_conf() {
    local sock="$PGD"
    # A Unix socket path is limited to ~107 bytes.
    if ((${#sock} > 85)); then
        sock="/tmp/notifyd-pg-$(path_hash "$PGD")"
        mkdir -p "$sock"
        chmod 700 "$sock"
        if [[ -n "$RUN_AS" ]]; then chown "$RUN_AS:" "$sock"; fi
    fi
    local new old=""
    new="# Written by scripts/postgres.sh on every run: set NOTIFYD_PG_* instead of editing.
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '${sock//\'/\'\'}'
max_connections = 300
shared_buffers = 256MB
# Durability stays at the defaults (fsync on, synchronous_commit on): benchmarks
# against this cluster measure honest commits.
fsync = on
"
    if [[ -f "$PGD/notifyd.conf" ]]; then old=$(<"$PGD/notifyd.conf"); fi
    CONF_CHANGED=0
    if [[ "$old" != "${new%$'\n'}" ]]; then
        CONF_CHANGED=1
        printf '%s' "$new" >"$PGD/notifyd.conf"
        chmod 644 "$PGD/notifyd.conf"
    fi
}

port_in_use() { (exec 7<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

start_failed() {
    if [[ -f "$PGLOG" ]]; then
        log "last lines of $PGLOG:"
        tail -n 30 "$PGLOG" >&2 || true
    fi
    die "$1"
}

# Start (or reuse, or restart after a settings change) the private cluster.
# pg_ctl gets fds 3 and 8 closed: the postmaster must not inherit the pipe that
# carries our stdout, nor the lock.
start_cluster() {
    local wait="${NOTIFYD_PG_WAIT:-60}" st=0
    run_pg "$PG_BIN/pg_ctl" -D "$PGD" status >/dev/null 2>&1 || st=$?
    if [[ $st -eq 0 && "$CONF_CHANGED" == 1 ]]; then
        log "settings changed (port $PORT): restarting the private cluster in $PGD"
        run_pg "$PG_BIN/pg_ctl" -D "$PGD" -l "$PGLOG" -w -t "$wait" -m fast restart \
            >/dev/null 3>&- 8>&- || start_failed "the private PostgreSQL cluster did not restart"
    elif [[ $st -eq 0 ]]; then
        log "reusing the running private cluster in $PGD (port $PORT)"
    else
        if port_in_use; then
            die "127.0.0.1:$PORT is already in use by another process (not the cluster in $PGD).
       Set NOTIFYD_PG_PORT to a free port, or DATABASE_URL to use that server."
        fi
        log "starting the private cluster in $PGD on 127.0.0.1:$PORT (log: $PGLOG)"
        run_pg "$PG_BIN/pg_ctl" -D "$PGD" -l "$PGLOG" -w -t "$wait" start \
            >/dev/null 3>&- 8>&- || start_failed "the private PostgreSQL cluster did not start"
    fi
    local deadline=$((SECONDS + wait))
    until "$ISREADY" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres; do
        ((SECONDS < deadline)) || start_failed "PostgreSQL on 127.0.0.1:$PORT is not ready after ${wait}s"
        sleep 0.5
    done
}

psql_local() { "$PSQL" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }

ensure_database() {
    if [[ "$(psql_local -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]]; then
        log "creating database $DB"
        psql_local -d postgres -c "CREATE DATABASE $DB" || die "could not create database $DB"
    fi
}

ensure_hstore() {
    local q="SELECT count(*) FROM pg_available_extensions WHERE name = 'hstore'"
    if [[ "$(psql_local -d "$DB" -tAc "$q")" != 1 ]]; then
        if [[ "$PG_BIN" == /usr/lib/postgresql/* ]] && have apt-get; then
            apt_install postgresql-contrib || true
        fi
        [[ "$(psql_local -d "$DB" -tAc "$q")" == 1 ]] ||
            die "the hstore extension is not available: install PostgreSQL's contrib package for $PG_BIN"
    fi
    psql_local -d "$DB" -c 'SET client_min_messages = warning' -c 'BEGIN' \
        -c 'CREATE EXTENSION IF NOT EXISTS hstore' -c 'ROLLBACK' >/dev/null ||
        die "CREATE EXTENSION hstore fails on the private cluster"
}

# Locate (install if needed) the server and the data directory. Sets PG_BIN, RUN_AS, PGD.
setup_private() {
    # Our own connections must not be redirected by the caller's libpq settings.
    unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE PGSSLMODE \
        PGOPTIONS PGDATA PGPASSWORD PGTARGETSESSIONATTRS PGREQUIRESSL PGGSSENCMODE
    if ! [[ "$PORT" =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
        die "NOTIFYD_PG_PORT must be a TCP port number (got '$PORT')"
    fi
    find_server
    ensure_run_user
    resolve_data_dir
    PGLOG="$PGD/server.log"
    take_lock
    if [[ -f "$PGD/PG_VERSION" ]]; then
        local made_by
        made_by=$(<"$PGD/PG_VERSION")
        if [[ "$(pg_major "$PG_BIN/postgres")" != "$made_by" ]]; then
            PG_BIN=$(pick_server_bindir "$made_by" || true)
            [[ -n "$PG_BIN" ]] || die "the private cluster in $PGD was made by PostgreSQL $made_by, which is not installed.
       Install PostgreSQL $made_by, or delete the cluster (rm -rf '$PGD') to start afresh."
        fi
        if [[ -n "$RUN_AS" ]] && ! run_pg test -O "$PGD/PG_VERSION"; then
            die "$PGD is not owned by '$RUN_AS'; fix its owner (chown -R $RUN_AS: '$PGD') or delete it"
        fi
        if [[ -z "$RUN_AS" && ! -O "$PGD/PG_VERSION" ]]; then
            die "$PGD belongs to another user; delete it (or set NOTIFYD_PG_DIR) to start afresh"
        fi
    fi
    PSQL="$PG_BIN/psql"
    [[ -x "$PSQL" ]] || PSQL=$(find_pg_tool psql) || die "psql not found"
    ISREADY="$PG_BIN/pg_isready"
    [[ -x "$ISREADY" ]] || ISREADY=$(find_pg_tool pg_isready) || die "pg_isready not found"
}

private_cluster() {
    setup_private
    [[ -f "$PGD/PG_VERSION" ]] || init_cluster
    write_conf
    start_cluster
    ensure_database
    ensure_hstore
    DB_URL="postgres://postgres@127.0.0.1:$PORT/$DB"
    log "PostgreSQL $(pg_major "$PG_BIN/postgres") ready: $DB_URL (private cluster in $PGD; stop it with scripts/postgres.sh stop)"
}

# ---------------------------------------------------------------- commands

case "${1:-ensure}" in
ensure)
    DB_URL=""
    if [[ -n "${DATABASE_URL:-}" ]]; then check_url; else private_cluster; fi
    printf 'DATABASE_URL=%s\n' "$DB_URL" >&3
    ;;
stop | status)
    # The data directory is found exactly as for "ensure", without creating anything.
    find_server() { PG_BIN=$(pick_server_bindir || true); [[ -n "$PG_BIN" ]] || die "no PostgreSQL server binaries found"; }
    init_cluster() { :; }
    setup_private
    if [[ ! -f "$PGD/PG_VERSION" ]]; then
        log "no private cluster in $PGD"
        exit 0
    fi
    if [[ "$1" == stop ]]; then
        if run_pg "$PG_BIN/pg_ctl" -D "$PGD" status >/dev/null 2>&1; then
            run_pg "$PG_BIN/pg_ctl" -D "$PGD" -w -m fast stop >/dev/null 3>&- 8>&-
            log "stopped the private cluster in $PGD"
        else
            log "the private cluster in $PGD is not running"
        fi
    else
        run_pg "$PG_BIN/pg_ctl" -D "$PGD" status || true
    fi
    ;;
-h | --help | help)
    sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    ;;
*)
    die "usage: scripts/postgres.sh [ensure|stop|status]  (or: source scripts/postgres.sh)"
    ;;
esac
