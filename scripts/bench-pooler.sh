#!/usr/bin/env bash
# Drain throughput through PgBouncer in transaction mode against a direct connection, in
# the same run, alternating.
#
#   scripts/bench-pooler.sh
#
# What it does: a scratch database on the DATABASE_URL server (or the private cluster of
# scripts/postgres.sh), migrated; a private pgbouncer (Debian's package; its own ini,
# pool_mode = transaction, BENCH_PGB_POOL server connections) in front of it; then
# BENCH_RUNS rounds, each of them once direct and once through pgbouncer (the order
# alternates per round): BENCH_EVENTS events over BENCH_USERS users enqueued by one
# INSERT ... SELECT, a release `notifyd worker` started on the given URL
# (NOTIFYD_DB_POOLER=transaction through pgbouncer), and the drain timed as in
# `notifyd-bench`: events over the span from the first to the last stored notification. It prints
# every run, the medians and the ratio. The scratch database is dropped at the end.
#
# Env: DATABASE_URL (else scripts/postgres.sh), BENCH_EVENTS (100000), BENCH_USERS
#      (10000), BENCH_RUNS (3), BENCH_PGB_POOL (20), BENCH_WORKER_POOL (10: the worker's
#      NOTIFYD_DB_POOL), BENCH_PGB_PORT (16433), NOTIFYD_PGBOUNCER (/usr/sbin/pgbouncer),
#      BENCH_NO_BUILD=1 (use the existing target/release/notifyd), BENCH_BIN (another
#      notifyd binary; implies BENCH_NO_BUILD).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NOTIFYD_REPO"

EVENTS="${BENCH_EVENTS:-100000}"
USERS="${BENCH_USERS:-10000}"
RUNS="${BENCH_RUNS:-3}"
PGB_POOL="${BENCH_PGB_POOL:-20}"
WORKER_POOL="${BENCH_WORKER_POOL:-10}"
PGB_PORT="${BENCH_PGB_PORT:-16433}"
((EVENTS / USERS <= 100)) || die "keep BENCH_EVENTS / BENCH_USERS at most 100 (the rate limit)"

WORK=$(mktemp -d)
chmod 755 "$WORK"
SCRATCH="notifyd_bench_pooler_$$"
PGB_PID=""
WORKER_PID=""
LOGS="$NOTIFYD_STATE/logs"
mkdir -p "$LOGS"

cleanup() {
    set +e
    for pid in "$WORKER_PID" "$PGB_PID"; do
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
        fi
    done
    if [[ -n "${PSQL:-}" && -n "${DATABASE_URL:-}" ]]; then
        "$PSQL" -X -q -d "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $SCRATCH WITH (FORCE)" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "Tools"
ensure_cargo
if [[ -z "${DATABASE_URL:-}" ]]; then
    # shellcheck source=scripts/postgres.sh
    source "$NOTIFYD_REPO/scripts/postgres.sh"
fi
PSQL=$(find_pg_tool psql) || die "psql not found (install postgresql-client)"
PGBOUNCER="${NOTIFYD_PGBOUNCER:-/usr/sbin/pgbouncer}"
[[ -x "$PGBOUNCER" ]] || apt_install pgbouncer || die "pgbouncer not found (apt-get install pgbouncer)"

if [[ "${BENCH_NO_BUILD:-}" != 1 && -z "${BENCH_BIN:-}" ]]; then
    step "Build (cargo build --release)"
    locked=()
    if [[ -f Cargo.lock ]]; then locked=(--locked); fi
    cargo build --release ${locked[@]+"${locked[@]}"}
fi
BIN="${BENCH_BIN:-$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/notifyd}"
[[ -x "$BIN" ]] || die "no $BIN (build it with cargo build --release)"

step "Scratch database $SCRATCH and a pgbouncer (transaction mode) on 127.0.0.1:$PGB_PORT"
"$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -c "CREATE DATABASE $SCRATCH" >/dev/null
DIRECT_URL=$(url_for_database "$DATABASE_URL" "$SCRATCH" disable)
DATABASE_URL="$DIRECT_URL" "$BIN" migrate 2>>"$LOGS/bench-pooler.log"
db_user=$(python3 -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).username or "postgres")' "$DIRECT_URL")
db_host=$(python3 -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).hostname or "127.0.0.1")' "$DIRECT_URL")
db_port=$(python3 -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).port or 5432)' "$DIRECT_URL")
printf '"%s" ""\n' "$db_user" >"$WORK/users.txt"
cat >"$WORK/pgbouncer.ini" <<INI
[databases]
* = host=$db_host port=$db_port
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/users.txt
pool_mode = transaction
default_pool_size = $PGB_POOL
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
INI
chmod 644 "$WORK/users.txt" "$WORK/pgbouncer.ini"
as_user=()
if [[ "$(id -u)" == 0 ]]; then as_user=(-u nobody); fi
"$PGBOUNCER" "${as_user[@]}" "$WORK/pgbouncer.ini" >"$LOGS/bench-pooler-pgbouncer.log" 2>&1 &
PGB_PID=$!
POOLED_URL="postgres://$db_user@127.0.0.1:$PGB_PORT/$SCRATCH"
for _ in $(seq 100); do
    "$PSQL" -X -q -At -d "$POOLED_URL" -c "SELECT 1" >/dev/null 2>&1 && break
    sleep 0.1
done
"$PSQL" -X -q -At -d "$POOLED_URL" -c "SELECT 1" >/dev/null || die "pgbouncer does not answer (see $LOGS/bench-pooler-pgbouncer.log)"

# One drain: enqueue, start a worker on $2 (pooler mode $3), wait for the queue to empty,
# stop the worker; prints events/s over the stored notifications' span.
drain() {
    local label=$1 url=$2 pooler=$3 round=$4
    "$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DIRECT_URL" -o /dev/null <<SQL
TRUNCATE notify.notifications, notify.events, notify.rate_windows, notify.notification_horizons;
DELETE FROM apalis.jobs;
INSERT INTO notify.events (user_id, event_type, body)
SELECT 'u' || (g % $USERS), 'new_message', 'bench $label $round ' || g
FROM generate_series(1, $EVENTS) AS g;
VACUUM ANALYZE notify.events, apalis.jobs;
SQL
    DATABASE_URL="$url" NOTIFYD_DB_POOLER="$pooler" NOTIFYD_DB_POOL="$WORKER_POOL" \
        NOTIFYD_CLEANUP_INTERVAL_SECS=0 RUST_LOG=warn \
        "$BIN" worker >>"$LOGS/bench-pooler-worker.log" 2>&1 &
    WORKER_PID=$!
    local deadline=$((SECONDS + 600))
    while "$PSQL" -X -q -At -d "$DIRECT_URL" \
        -c "SELECT EXISTS (SELECT 1 FROM apalis.jobs WHERE job_type = 'notifyd.events')" | grep -q t; do
        kill -0 "$WORKER_PID" 2>/dev/null || die "the worker exited (see $LOGS/bench-pooler-worker.log)"
        ((SECONDS < deadline)) || die "no drain within 600 s"
        sleep 0.2
    done
    kill -TERM "$WORKER_PID"
    wait "$WORKER_PID" || true
    WORKER_PID=""
    "$PSQL" -X -q -At -d "$DIRECT_URL" -c \
        "SELECT round(count(*) / greatest(extract(epoch FROM max(created_at) - min(created_at)), 0.001))
         FROM notify.notifications"
}

step "Drain $EVENTS events over $USERS users, $RUNS rounds, alternating direct / pgbouncer"
direct=()
pooled=()
for round in $(seq "$RUNS"); do
    if ((round % 2 == 1)); then order=(direct pooled); else order=(pooled direct); fi
    for which in "${order[@]}"; do
        if [[ "$which" == direct ]]; then
            r=$(drain direct "$DIRECT_URL" none "$round")
            direct+=("$r")
        else
            r=$(drain pgbouncer "$POOLED_URL" transaction "$round")
            pooled+=("$r")
        fi
        printf 'round %s  %-9s %8s events/s\n' "$round" "$which" "$r"
    done
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
md=$(median "${direct[@]}")
mp=$(median "${pooled[@]}")
pgv=$("$PSQL" -X -q -At -d "$DIRECT_URL" -c "SHOW server_version" | cut -d' ' -f1)
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || true)
echo
echo "machine: $(nproc) cores${cpu:+ ($cpu)}, PostgreSQL $pgv, $("$PGBOUNCER" --version | head -n 1), worker and pgbouncer on the same host"
echo "events $EVENTS over $USERS users; worker NOTIFYD_DB_POOL=$WORKER_POOL; pgbouncer pool_mode=transaction default_pool_size=$PGB_POOL"
echo "direct:    ${direct[*]}  median $md events/s"
echo "pgbouncer: ${pooled[*]}  median $mp events/s"
awk -v p="$mp" -v d="$md" 'BEGIN { printf "ratio pgbouncer/direct: %.2f\n", p / d }'
