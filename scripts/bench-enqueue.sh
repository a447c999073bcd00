#!/usr/bin/env bash
# Enqueue cost: a single-row INSERT into notify.events (the plain-SQL path), into the ORM
# view notify.new_events, and into a plain table with the same columns (no constraint,
# trigger or index but its primary key), measured with pgbench in the same run,
# alternating, BENCH_RUNS rounds. Each round runs two kinds of row: without an
# idempotency key, and with a fresh one (`'bench:' || random(1, 10^12)`).
#
#   scripts/bench-enqueue.sh
#
# A scratch database on the DATABASE_URL server (or the private cluster of
# scripts/postgres.sh), migrated by `notifyd migrate` (NOTIFYD_BIN, else the debug binary,
# built if missing); the tables are emptied (TRUNCATE, queue included) before every
# measurement, so each starts from the same state. Prints each measurement, the medians
# and the ratios to the plain table. The scratch database is dropped at the end.
#
# The sessions run with synchronous_commit off (BENCH_SYNCHRONOUS_COMMIT): with it on, every
# one-row transaction waits for its WAL flush, and the disk, not the INSERT, sets the rate.
#
# Env: DATABASE_URL, BENCH_SECONDS (10), BENCH_RUNS (3), BENCH_CLIENTS (4: pgbench clients
#      and threads), BENCH_SYNCHRONOUS_COMMIT (off), NOTIFYD_BIN.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NOTIFYD_REPO"

SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
RUNS="${BENCH_RUNS:-3}"
CLIENTS="${BENCH_CLIENTS:-4}"
SCRATCH="notifyd_bench_enqueue_$$"
WORK=$(mktemp -d)

if [[ -z "${DATABASE_URL:-}" ]]; then
    # shellcheck source=scripts/postgres.sh
    source "$NOTIFYD_REPO/scripts/postgres.sh"
fi
PSQL=$(find_pg_tool psql) || die "psql not found (install postgresql-client)"
PGBENCH=$(find_pg_tool pgbench || true)
if [[ -z "$PGBENCH" ]]; then
    apt_install postgresql-contrib || apt_install postgresql-client || true
    PGBENCH=$(find_pg_tool pgbench) || die "pgbench not found (install postgresql-contrib)"
fi
BIN="${NOTIFYD_BIN:-$NOTIFYD_REPO/target/debug/notifyd}"
if [[ ! -x "$BIN" ]]; then
    ensure_cargo
    cargo build --locked --bin notifyd
fi

cleanup() {
    set +e
    "$PSQL" -X -q -d "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $SCRATCH WITH (FORCE)" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT

"$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -c "CREATE DATABASE $SCRATCH"
SCRATCH_URL=$(url_for_database "$DATABASE_URL" "$SCRATCH" "${BENCH_SSLMODE:-disable}")
DATABASE_URL="$SCRATCH_URL" RUST_LOG=warn "$BIN" migrate
"$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$SCRATCH_URL" <<'SQL'
CREATE TABLE public.bench_plain_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         text NOT NULL,
    event_type      text NOT NULL,
    body            text NOT NULL,
    link            text,
    idempotency_key text,
    run_at          timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    outcome         text,
    outcome_reason  text,
    processed_at    timestamptz
);
SQL

targets=(events view plain)
declare -A TABLE=([events]=notify.events [view]=notify.new_events [plain]=public.bench_plain_events)
for t in "${targets[@]}"; do
    cat > "$WORK/$t-nokey.sql" <<SQL
\\set u random(1, 1000)
INSERT INTO ${TABLE[$t]} (user_id, event_type, body, link)
VALUES (:u::text, 'new_message', 'You have a new message from Alice', '/messages/1');
SQL
    cat > "$WORK/$t-key.sql" <<SQL
\\set u random(1, 1000)
\\set k random(1, 1000000000000)
INSERT INTO ${TABLE[$t]} (user_id, event_type, body, link, idempotency_key)
VALUES (:u::text, 'new_message', 'You have a new message from Alice', '/messages/1', 'bench:' || :k);
SQL
done

measure() {  # target kind -> tps
    "$PSQL" -X -q -d "$SCRATCH_URL" \
        -c "TRUNCATE notify.events, apalis.jobs, public.bench_plain_events" >/dev/null
    PGOPTIONS="-c synchronous_commit=${BENCH_SYNCHRONOUS_COMMIT:-off}" \
        "$PGBENCH" -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_PER_RUN" \
        -f "$WORK/$1-$2.sql" "$SCRATCH_URL" 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p'
}

median() { LC_ALL=C sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

log "pgbench: $CLIENTS clients, ${SECONDS_PER_RUN} s per measurement, $RUNS rounds, alternating, synchronous_commit ${BENCH_SYNCHRONOUS_COMMIT:-off}"
declare -A results
for round in $(seq 1 "$RUNS"); do
    # Rotate the order each round so that no target always runs first.
    order=("${targets[@]:$(((round - 1) % 3))}" "${targets[@]:0:$(((round - 1) % 3))}")
    for kind in nokey key; do
        for t in "${order[@]}"; do
            tps=$(measure "$t" "$kind")
            [[ -n "$tps" ]] || die "pgbench gave no result for $t ($kind)"
            results[$t-$kind]+="$tps "
            printf 'round %d  %-6s %-6s %10.0f tps\n' "$round" "$kind" "$t" "$tps"
        done
    done
done

printf '\n%-6s %-26s %12s %12s\n' kind target "median tps" "x plain"
for kind in nokey key; do
    plain=$(tr ' ' '\n' <<<"${results[plain-$kind]}" | sed '/^$/d' | median)
    for t in "${targets[@]}"; do
        m=$(tr ' ' '\n' <<<"${results[$t-$kind]}" | sed '/^$/d' | median)
        printf '%-6s %-26s %12.0f %11.2fx\n' "$kind" "${TABLE[$t]}" "$m" "$(awk -v a="$m" -v b="$plain" 'BEGIN {print a / b}')"
    done
done
