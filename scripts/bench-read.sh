#!/usr/bin/env bash
# Read-service benchmark: `notifyd serve` over HTTP (wrk) against the database's own rate
# for the same SQL (pgbench), measured in the same run on the same machine.
#
#   scripts/bench-read.sh
#
# What it does: a scratch database on the DATABASE_URL server (or the private cluster of
# scripts/postgres.sh), migrated, seeded with BENCH_USERS users x BENCH_PER_USER
# notifications; a release `notifyd serve` on it (per-user limit raised out of the way);
# then BENCH_RUNS rounds of:
#   (a) empty polls: GET /api/notifications?after=<the user's newest id>, rotating over
#       BENCH_TOKEN_USERS users' tokens, vs. pgbench running the page query with that
#       cursor (it returns no row) for random users of the same set;
#   (b) 50-row pages: GET /api/notifications?after=<the user's first id>&limit=50 vs.
#       pgbench running the same page query.
# It prints each run and the medians, and the ratios service/database. The scratch
# database is dropped at the end.
#
# Env: DATABASE_URL (else scripts/postgres.sh), BENCH_USERS (1000), BENCH_PER_USER (100),
#      BENCH_TOKEN_USERS (100), BENCH_SECONDS (10), BENCH_RUNS (3), BENCH_CLIENTS (8: wrk
#      connections and pgbench clients alike), BENCH_WRK_THREADS (1), BENCH_PORT (18080),
#      BENCH_RUST_LOG (warn: no per-request log lines; "info" logs every request),
#      BENCH_SSLMODE (disable: sslmode for both the service and pgbench, unless the URL
#      sets one),
#      BENCH_NO_BUILD=1 (use the existing target/release/notifyd).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NOTIFYD_REPO"

USERS="${BENCH_USERS:-1000}"
PER_USER="${BENCH_PER_USER:-100}"
TOKEN_USERS="${BENCH_TOKEN_USERS:-100}"
SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
RUNS="${BENCH_RUNS:-3}"
WRK_THREADS="${BENCH_WRK_THREADS:-1}"
CLIENTS="${BENCH_CLIENTS:-8}"
PORT_="${BENCH_PORT:-18080}"
((TOKEN_USERS <= USERS)) || die "BENCH_TOKEN_USERS must not exceed BENCH_USERS"
((PER_USER >= 52)) || die "BENCH_PER_USER must be at least 52 (a 50-row page after the first id)"

WORK=$(mktemp -d)
SCRATCH="notifyd_bench_read_$$"
SERVE_PID=""
LOGS="$NOTIFYD_STATE/logs"
mkdir -p "$LOGS"

cleanup() {
    set +e
    if [[ -n "$SERVE_PID" ]]; then
        kill -TERM "$SERVE_PID" 2>/dev/null
        wait "$SERVE_PID" 2>/dev/null
    fi
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
PGBENCH=$(find_pg_tool pgbench || true)
if [[ -z "$PGBENCH" ]]; then
    apt_install postgresql-contrib || apt_install postgresql-client || true
    PGBENCH=$(find_pg_tool pgbench) || die "pgbench not found (install postgresql-contrib)"
fi
have wrk || apt_install wrk || die "wrk not found (apt-get install wrk)"
have curl || apt_install curl || die "curl not found"

if [[ "${BENCH_NO_BUILD:-}" != 1 ]]; then
    step "Build (cargo build --release)"
    locked=()
    if [[ -f Cargo.lock ]]; then locked=(--locked); fi
    cargo build --release ${locked[@]+"${locked[@]}"}
fi
BIN="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/notifyd"
[[ -x "$BIN" ]] || die "no $BIN (build it with cargo build --release)"

step "Scratch database $SCRATCH: migrate and seed $USERS users x $PER_USER notifications"
"$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -c "CREATE DATABASE $SCRATCH" >/dev/null
# Both sides use the same URL, so the same sslmode: on one host, TLS to Postgres would
# measure TLS libraries, not the service (BENCH_SSLMODE=prefer to include it anyway).
SSLMODE="${BENCH_SSLMODE:-disable}"
BENCH_URL=$(url_for_database "$DATABASE_URL" "$SCRATCH" "$SSLMODE")
DATABASE_URL="$BENCH_URL" "$BIN" migrate 2>>"$LOGS/bench-read.log"
# Ids are chosen so that user u's notifications are u, U+u, 2U+u, ... (U = users): its
# first id is u and its newest is (PER_USER-1)*U + u, which the load generators compute.
"$PSQL" -X -q -v ON_ERROR_STOP=1 -o /dev/null -d "$BENCH_URL" <<SQL
INSERT INTO notify.notifications (id, user_id, event_id, event_type, body, link, created_at)
OVERRIDING SYSTEM VALUE
SELECT n * $USERS + u, u::text, n * $USERS + u,
       (ARRAY['new_message', 'status_change', 'system_alert'])[1 + (n + u) % 3],
       'You have a new message from user ' || ((n * 7 + u) % 997) || ' about order #' || (n * 31 + u),
       '/messages/' || (n * $USERS + u),
       now() - make_interval(secs => ($PER_USER - n) * 60)
FROM generate_series(0, $PER_USER - 1) AS n, generate_series(1, $USERS) AS u
ORDER BY n, u;
SELECT setval(pg_get_serial_sequence('notify.notifications', 'id'), max(id))
FROM notify.notifications;
VACUUM ANALYZE notify.notifications;
SQL

step "Start notifyd serve on 127.0.0.1:$PORT_"
export NOTIFYD_JWT_SECRET
NOTIFYD_JWT_SECRET=$(head -c 36 /dev/urandom | base64)
DATABASE_URL="$BENCH_URL" NOTIFYD_LISTEN="127.0.0.1:$PORT_" \
    NOTIFYD_USER_REQUESTS_PER_MINUTE=10000000 RUST_LOG="${BENCH_RUST_LOG:-warn}" \
    NOTIFYD_ALLOW_WRITABLE_ROLE=1 "$BIN" serve >"$LOGS/bench-serve.log" 2>&1 </dev/null &
SERVE_PID=$!
deadline=$((SECONDS + 30))
until curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$PORT_/readyz" 2>/dev/null; do
    kill -0 "$SERVE_PID" 2>/dev/null || { tail -n 20 "$LOGS/bench-serve.log" >&2; die "serve exited"; }
    ((SECONDS < deadline)) || die "serve does not answer on port $PORT_"
    sleep 0.2
done

# Tokens and cursors for the wrk scripts.
{
    printf 'tokens = {'
    for ((u = 1; u <= TOKEN_USERS; u++)); do
        printf '"%s",' "$("$BIN" token --sub "$u" --ttl-secs 7200)"
    done
    printf '}\nusers = %d\nper_user = %d\n' "$USERS" "$PER_USER"
} >"$WORK/tokens.lua"

wrk_script() { # $1: empty | page
    cat "$WORK/tokens.lua"
    if [[ "$1" == empty ]]; then
        cat <<'LUA'
request = function()
  local u = math.random(#tokens)
  return wrk.format("GET", "/api/notifications?after=" .. ((per_user - 1) * users + u),
                    {["Authorization"] = "Bearer " .. tokens[u]})
end
LUA
    else
        cat <<'LUA'
request = function()
  local u = math.random(#tokens)
  return wrk.format("GET", "/api/notifications?after=" .. u .. "&limit=50",
                    {["Authorization"] = "Bearer " .. tokens[u]})
end
LUA
    fi
    cat <<'LUA'
init = function(args) math.randomseed(os.time() + math.floor(os.clock() * 1e6)) end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %.1f %.3f %.3f %.3f %d\n",
    summary.requests / (summary.duration / 1e6), latency.mean / 1000,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.timeout + e.status))
end
LUA
}
wrk_script empty >"$WORK/empty.lua"
wrk_script page >"$WORK/page.lua"

cat >"$WORK/empty.sql" <<SQL
\set u random(1, $TOKEN_USERS)
\set after ($PER_USER - 1) * $USERS + :u
SELECT id, event_type, body, link, created_at, read_at FROM notify.notifications WHERE user_id = :u::text AND id > :after ORDER BY id LIMIT 50;
SQL
cat >"$WORK/page.sql" <<SQL
\set u random(1, $TOKEN_USERS)
SELECT id, event_type, body, link, created_at, read_at FROM notify.notifications WHERE user_id = :u::text AND id > :u ORDER BY id LIMIT 50;
SQL

# Sanity: the service answers what the benchmark assumes.
t1=$(sed -n 's/^tokens = {"\([^"]*\)".*/\1/p' "$WORK/tokens.lua")
empty_body=$(curl -fsS -H "Authorization: Bearer $t1" \
    "http://127.0.0.1:$PORT_/api/notifications?after=$(((PER_USER - 1) * USERS + 1))")
[[ "$empty_body" == *'"notifications":[]'* ]] || die "unexpected empty-poll answer: $empty_body"
page_rows=$(curl -fsS -H "Authorization: Bearer $t1" \
    "http://127.0.0.1:$PORT_/api/notifications?after=1&limit=50" | grep -o '"event_type"' | wc -l)
((page_rows == 50)) || die "expected 50 rows in a page, got $page_rows"

run_wrk() { # $1: script; prints "rps mean p50 p99 errors"
    local out
    out=$(wrk -t "$WRK_THREADS" -c "$CLIENTS" -d "${2:-$SECONDS_PER_RUN}s" --latency \
        -s "$1" "http://127.0.0.1:$PORT_" 2>&1) || { printf '%s\n' "$out" >&2; die "wrk failed"; }
    printf '%s\n' "$out" | sed -n 's/^RESULT //p'
}
run_pgbench() { # $1: sql file; prints "tps mean_ms"
    local out tps lat
    out=$("$PGBENCH" -n -M prepared -f "$1" -c "$CLIENTS" -j 2 -T "$SECONDS_PER_RUN" "$BENCH_URL" 2>&1) ||
        { printf '%s\n' "$out" >&2; die "pgbench failed"; }
    tps=$(printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | tail -n 1)
    lat=$(printf '%s\n' "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p')
    printf '%s %s\n' "$tps" "$lat"
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

step "Warm-up (2 s each)"
run_wrk "$WORK/empty.lua" 2 >/dev/null
run_wrk "$WORK/page.lua" 2 >/dev/null

declare -a S_EMPTY P_EMPTY S_PAGE P_PAGE S_EMPTY_P99 S_PAGE_P99 S_EMPTY_P50 S_PAGE_P50 P_EMPTY_LAT P_PAGE_LAT
for ((run = 1; run <= RUNS; run++)); do
    step "Run $run of $RUNS (${SECONDS_PER_RUN} s per measurement)"
    read -r tps lat < <(run_pgbench "$WORK/empty.sql")
    P_EMPTY+=("$tps") P_EMPTY_LAT+=("$lat")
    read -r rps mean p50 p99 errors < <(run_wrk "$WORK/empty.lua")
    ((errors == 0)) || die "wrk saw $errors errors or non-2xx answers on empty polls"
    S_EMPTY+=("$rps") S_EMPTY_P50+=("$p50") S_EMPTY_P99+=("$p99")
    printf 'empty poll: service %9.0f req/s (mean %.3f ms, p50 %.3f ms, p99 %.3f ms) | pgbench %9.0f q/s (mean %s ms)\n' \
        "$rps" "$mean" "$p50" "$p99" "$tps" "$lat"
    read -r tps lat < <(run_pgbench "$WORK/page.sql")
    P_PAGE+=("$tps") P_PAGE_LAT+=("$lat")
    read -r rps mean p50 p99 errors < <(run_wrk "$WORK/page.lua")
    ((errors == 0)) || die "wrk saw $errors errors or non-2xx answers on page reads"
    S_PAGE+=("$rps") S_PAGE_P50+=("$p50") S_PAGE_P99+=("$p99")
    printf 'page of 50: service %9.0f req/s (mean %.3f ms, p50 %.3f ms, p99 %.3f ms) | pgbench %9.0f q/s (mean %s ms)\n' \
        "$rps" "$mean" "$p50" "$p99" "$tps" "$lat"
done

se=$(median "${S_EMPTY[@]}") pe=$(median "${P_EMPTY[@]}")
sp=$(median "${S_PAGE[@]}") pp=$(median "${P_PAGE[@]}")
step "Medians of $RUNS runs"
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
pgv=$("$PSQL" -X -A -t -d "$BENCH_URL" -c 'SHOW server_version')
echo "machine: $(nproc) cores${cpu:+ ($cpu)}, PostgreSQL $pgv on the same host"
echo "data: $USERS users x $PER_USER notifications; load over $TOKEN_USERS users; sslmode=${SSLMODE:-as in DATABASE_URL}"
echo "service: wrk -t $WRK_THREADS -c $CLIENTS -d ${SECONDS_PER_RUN}s; database: pgbench -n -M prepared -c $CLIENTS -j 2 -T $SECONDS_PER_RUN"
printf '%-12s %14s %10s %10s %16s %12s %8s\n' scenario "service req/s" "p50 ms" "p99 ms" "database q/s" "db mean ms" ratio
printf '%-12s %14.0f %10.3f %10.3f %16.0f %12.3f %7.2fx\n' "empty poll" "$se" \
    "$(median "${S_EMPTY_P50[@]}")" "$(median "${S_EMPTY_P99[@]}")" "$pe" "$(median "${P_EMPTY_LAT[@]}")" \
    "$(awk -v a="$se" -v b="$pe" 'BEGIN {print a / b}')"
printf '%-12s %14.0f %10.3f %10.3f %16.0f %12.3f %7.2fx\n' "page of 50" "$sp" \
    "$(median "${S_PAGE_P50[@]}")" "$(median "${S_PAGE_P99[@]}")" "$pp" "$(median "${P_PAGE_LAT[@]}")" \
    "$(awk -v a="$sp" -v b="$pp" 'BEGIN {print a / b}')"
echo "targets: empty poll >= 1.00x, page of 50 >= 0.60x"
