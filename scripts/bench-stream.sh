#!/usr/bin/env bash
# Real-time delivery benchmark: enqueue-to-SSE latency through a running worker, and the
# memory of many idle streams on one serve process.
#
#   scripts/bench-stream.sh
#
# What it does: a scratch database on the DATABASE_URL server (or the private cluster of
# scripts/postgres.sh), migrated; a release `notifyd worker` and `notifyd serve` on it
# (per-user request limit and stream caps raised out of the way); then
#   (a) latency: one SSE stream per user for BENCH_USERS users, then BENCH_RATE events/s
#       for BENCH_SECONDS s enqueued with plain SQL INSERTs into notify.events,
#       round-robin over the users (each body carries the time just before its INSERT);
#       prints enqueue -> SSE receipt p50/p99/max, and fails unless every event arrived
#       exactly once;
#   (b) idle streams: opens BENCH_STREAMS streams (one per user) against the same serve
#       process, holds them BENCH_HOLD_SECS s (heartbeats flowing), and prints the serve
#       process's RSS before, once all are open, and after holding.
# The load generator is examples/bench_stream.rs (not part of the product). The scratch
# database is dropped at the end.
#
# Env: DATABASE_URL (else scripts/postgres.sh), BENCH_USERS (1000), BENCH_RATE (200),
#      BENCH_SECONDS (20), BENCH_STREAMS (10000), BENCH_HOLD_SECS (20),
#      BENCH_HEARTBEAT_SECS (15), BENCH_PORT (18093), BENCH_RUST_LOG (warn),
#      BENCH_SSLMODE (disable, unless the URL sets one),
#      BENCH_NO_BUILD=1 (use the existing target/release binaries).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NOTIFYD_REPO"

USERS="${BENCH_USERS:-1000}"
RATE="${BENCH_RATE:-200}"
SECONDS_LOAD="${BENCH_SECONDS:-20}"
STREAMS="${BENCH_STREAMS:-10000}"
HOLD="${BENCH_HOLD_SECS:-20}"
HEARTBEAT="${BENCH_HEARTBEAT_SECS:-15}"
PORT_="${BENCH_PORT:-18093}"
# The worker's per-user cap (100 an hour) must not suppress benchmark events.
((RATE * SECONDS_LOAD <= USERS * 100)) ||
    die "BENCH_RATE x BENCH_SECONDS must not exceed 100 x BENCH_USERS (the per-user hourly cap)"

SCRATCH="notifyd_bench_stream_$$"
SERVE_PID="" WORKER_PID=""
LOGS="$NOTIFYD_STATE/logs"
mkdir -p "$LOGS"

cleanup() {
    set +e
    for pid in "$SERVE_PID" "$WORKER_PID"; do
        if [[ -n "$pid" ]]; then kill -TERM "$pid" 2>/dev/null; fi
    done
    for pid in "$SERVE_PID" "$WORKER_PID"; do
        if [[ -n "$pid" ]]; then wait "$pid" 2>/dev/null; fi
    done
    if [[ -n "${PSQL:-}" && -n "${DATABASE_URL:-}" ]]; then
        "$PSQL" -X -q -d "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $SCRATCH WITH (FORCE)" >/dev/null 2>&1
    fi
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
have curl || apt_install curl || die "curl not found"
# Every stream is a socket on both ends: raise the open-file limit as far as allowed.
hard=$(ulimit -Hn)
if [[ "$hard" == unlimited ]] || ((hard > 1048576)); then hard=1048576; fi
ulimit -n "$hard"
need=$((STREAMS + USERS + 1024))
(($(ulimit -n) >= need)) ||
    die "open-file limit $(ulimit -n) is below $need: raise the hard limit (ulimit -Hn) or lower BENCH_STREAMS"

if [[ "${BENCH_NO_BUILD:-}" != 1 ]]; then
    step "Build (cargo build --release, with the load generator)"
    locked=()
    if [[ -f Cargo.lock ]]; then locked=(--locked); fi
    cargo build --release ${locked[@]+"${locked[@]}"} --bin notifyd --example bench_stream
fi
TARGET="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release"
BIN="$TARGET/notifyd"
LOAD="$TARGET/examples/bench_stream"
[[ -x "$BIN" && -x "$LOAD" ]] || die "no $BIN or $LOAD (build them with cargo build --release --bin notifyd --example bench_stream)"

step "Scratch database $SCRATCH"
"$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -c "CREATE DATABASE $SCRATCH" >/dev/null
SSLMODE="${BENCH_SSLMODE:-disable}"
BENCH_URL=$(url_for_database "$DATABASE_URL" "$SCRATCH" "$SSLMODE")
DATABASE_URL="$BENCH_URL" "$BIN" migrate 2>>"$LOGS/bench-stream.log"

step "Start notifyd worker and notifyd serve on 127.0.0.1:$PORT_"
if curl -sS -o /dev/null --max-time 1 "http://127.0.0.1:$PORT_/" 2>/dev/null; then
    die "something already listens on port $PORT_: set BENCH_PORT"
fi
export NOTIFYD_JWT_SECRET
NOTIFYD_JWT_SECRET=$(head -c 36 /dev/urandom | base64)
DATABASE_URL="$BENCH_URL" RUST_LOG="${BENCH_RUST_LOG:-warn}" \
    "$BIN" worker >"$LOGS/bench-stream-worker.log" 2>&1 </dev/null &
WORKER_PID=$!
DATABASE_URL="$BENCH_URL" NOTIFYD_LISTEN="127.0.0.1:$PORT_" \
    NOTIFYD_USER_REQUESTS_PER_MINUTE=10000000 NOTIFYD_MAX_STREAMS=$((STREAMS + USERS + 100)) \
    NOTIFYD_STREAM_HEARTBEAT_SECS="$HEARTBEAT" RUST_LOG="${BENCH_RUST_LOG:-warn}" \
    NOTIFYD_ALLOW_WRITABLE_ROLE=1 "$BIN" serve >"$LOGS/bench-stream-serve.log" 2>&1 </dev/null &
SERVE_PID=$!
deadline=$((SECONDS + 30))
until curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$PORT_/readyz" 2>/dev/null; do
    kill -0 "$SERVE_PID" 2>/dev/null || { tail -n 20 "$LOGS/bench-stream-serve.log" >&2; die "serve exited"; }
    ((SECONDS < deadline)) || die "serve does not answer on port $PORT_"
    sleep 0.2
done
kill -0 "$WORKER_PID" 2>/dev/null || { tail -n 20 "$LOGS/bench-stream-worker.log" >&2; die "worker exited"; }
rss() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }
RSS_START=$(rss "$SERVE_PID")

step "(a) Latency: $USERS streams, $RATE events/s for $SECONDS_LOAD s"
out=$("$LOAD" --base "http://127.0.0.1:$PORT_" latency --database-url "$BENCH_URL" \
    --users "$USERS" --rate "$RATE" --secs "$SECONDS_LOAD") || die "the latency run failed"
read -r sent got dups achieved p50 p99 max starved < <(printf '%s\n' "$out" | sed -n 's/^RESULT //p')

step "(b) Idle streams: $STREAMS, held $HOLD s (heartbeat every $HEARTBEAT s)"
out=$("$LOAD" --base "http://127.0.0.1:$PORT_" idle --streams "$STREAMS" --pid "$SERVE_PID" \
    --hold-secs "$HOLD") || die "the idle run failed"
read -r n open_secs rss_before rss_open rss_held ended < <(printf '%s\n' "$out" | sed -n 's/^RESULT //p')

step "Results"
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
pgv=$("$PSQL" -X -A -t -d "$BENCH_URL" -c 'SHOW server_version')
echo "machine: $(nproc) cores${cpu:+ ($cpu)}, PostgreSQL $pgv, worker, serve and load generator on the same host"
printf 'latency, enqueue (INSERT) -> SSE event received: %s events at %.1f/s over %s users (%s received, %s duplicates, %s users without events)\n' \
    "$sent" "$achieved" "$USERS" "$got" "$dups" "$starved"
printf '  p50 %.1f ms   p99 %.1f ms   max %.1f ms\n' "$p50" "$p99" "$max"
printf 'idle streams: %s open in %s s; serve RSS %.1f MiB at start, %.1f MiB before, %.1f MiB with all open, %.1f MiB after %s s (%.1f KiB per stream)\n' \
    "$n" "$open_secs" "$(awk -v k="$RSS_START" 'BEGIN {print k / 1024}')" \
    "$(awk -v k="$rss_before" 'BEGIN {print k / 1024}')" "$(awk -v k="$rss_open" 'BEGIN {print k / 1024}')" \
    "$(awk -v k="$rss_held" 'BEGIN {print k / 1024}')" "$HOLD" \
    "$(awk -v a="$rss_held" -v b="$rss_before" -v n="$n" 'BEGIN {print (n > 0 ? (a - b) / n : 0)}')"
