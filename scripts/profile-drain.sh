#!/usr/bin/env bash
# Where the time of a drain goes: one `notifyd worker` (release build) drains a backlog on a
# scratch database, and this prints
#   * the throughput;
#   * the CPU seconds of the worker process and of the Postgres backends that served it
#     (read from /proc, so only when Postgres runs on this machine), per 1,000 jobs;
#   * the mean wall time of each step of a batch (claim, load, sanitize, store, ack), from
#     the worker's own debug events, per 1,000 jobs;
#   * with perf installed and PROFILE_PERF=1, the worker's hottest functions.
#
#   scripts/profile-drain.sh
#
# Env: DATABASE_URL (else scripts/postgres.sh), PROFILE_EVENTS (100000), PROFILE_USERS
#      (20000), PROFILE_FLUSHERS (4), PROFILE_FETCH_BATCH (1000),
#      PROFILE_PERF (0), BENCH_NO_BUILD=1 (use the existing target/release/notifyd).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NOTIFYD_REPO"

EVENTS="${PROFILE_EVENTS:-100000}"
USERS="${PROFILE_USERS:-20000}"
FLUSHERS="${PROFILE_FLUSHERS:-4}"
FETCH="${PROFILE_FETCH_BATCH:-1000}"
SCRATCH="notifyd_profile_$$"
WORK=$(mktemp -d)
WORKER_PID=""

cleanup() {
    set +e
    [[ -n "$WORKER_PID" ]] && kill "$WORKER_PID" 2>/dev/null && wait "$WORKER_PID" 2>/dev/null
    if [[ -n "${PSQL:-}" && -n "${DATABASE_URL:-}" ]]; then
        "$PSQL" -X -q -d "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $SCRATCH WITH (FORCE)" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT

ensure_cargo
if [[ -z "${DATABASE_URL:-}" ]]; then
    # shellcheck source=scripts/postgres.sh
    source "$NOTIFYD_REPO/scripts/postgres.sh"
fi
PSQL=$(find_pg_tool psql) || die "psql not found (install postgresql-client)"
if [[ "${BENCH_NO_BUILD:-}" != 1 ]]; then
    step "Build (cargo build --release)"
    cargo build --release --locked
fi
BIN="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/notifyd"

step "Scratch database $SCRATCH: $EVENTS events over $USERS users"
"$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -c "CREATE DATABASE $SCRATCH" >/dev/null
URL=$(url_for_database "$DATABASE_URL" "$SCRATCH")
DATABASE_URL="$URL" "$BIN" migrate 2>/dev/null
"$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$URL" <<SQL
INSERT INTO notify.events (user_id, event_type, body)
SELECT 'u' || (g % $USERS + 1), (ARRAY['new_message','status_change','system_alert'])[g % 3 + 1],
       'You have a new message from <b>user ' || g || '</b>'
FROM generate_series(1, $EVENTS) AS g;
VACUUM ANALYZE;
SQL

step "Drain with one worker ($FLUSHERS in flight, fetch batch $FETCH)"
DATABASE_URL="$URL" NOTIFYD_RATE_LIMIT=1000000 \
    NOTIFYD_STORE_FLUSHERS="$FLUSHERS" NOTIFYD_FETCH_BATCH="$FETCH" NOTIFYD_LOG_FORMAT=json \
    RUST_LOG="warn,notifyd::claim=debug,notifyd::pipeline=debug" \
    "$BIN" worker >"$WORK/worker.log" 2>&1 </dev/null &
WORKER_PID=$!
PERF_PID=""
if [[ "${PROFILE_PERF:-0}" == 1 ]] && have perf; then
    perf record -F 499 -g -p "$WORKER_PID" -o "$WORK/perf.data" >/dev/null 2>&1 &
    PERF_PID=$!
fi
# Done when no claimable job is left (a few pages of the claim index) and then every event
# has an outcome. The exact count alone reads every event row, tens of ms of Postgres CPU
# per poll, which would be charged to the drain being profiled.
drained() {
    [[ "$("$PSQL" -X -t -A -d "$URL" -c "SELECT EXISTS (SELECT 1 FROM apalis.jobs WHERE job_type = 'notifyd.events' AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts)))")" == f ]] &&
        [[ "$("$PSQL" -X -t -A -d "$URL" -c "SELECT count(*) FROM notify.event_outcomes WHERE outcome IS NULL")" == 0 ]]
}
until drained; do
    kill -0 "$WORKER_PID" 2>/dev/null || { tail -n 20 "$WORK/worker.log" >&2; die "the worker exited"; }
    sleep 0.2
done
cpu_secs() { awk '{printf "%.2f\n", ($14 + $15) / 100}' "/proc/$1/stat" 2>/dev/null || echo 0; }
WORKER_CPU=$(cpu_secs "$WORKER_PID")
PG_CPU=0
for pid in $(pgrep -f "postgres: .*$SCRATCH" || true); do
    PG_CPU=$(awk -v a="$PG_CPU" -v b="$(cpu_secs "$pid")" 'BEGIN {print a + b}')
done
if [[ -n "$PERF_PID" ]]; then kill -INT "$PERF_PID" 2>/dev/null; wait "$PERF_PID" 2>/dev/null || true; fi
RATE=$("$PSQL" -X -t -A -d "$URL" -c \
    "SELECT round(count(*) / extract(epoch FROM max(processed_at) - min(processed_at))) FROM notify.event_outcomes")

python3 - "$WORK/worker.log" "$EVENTS" "$RATE" "$WORKER_CPU" "$PG_CPU" <<'PY'
import json, sys
path, events, rate, wcpu, pcpu = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
steps = {k: [] for k in ("claim_ms", "load_ms", "sanitize_ms", "store_ms", "process_ms", "settle_ms", "commit_ms")}
jobs = []
for line in open(path):
    try:
        fields = json.loads(line)  # flattened: the event's fields are top-level keys
    except ValueError:
        continue
    for k in steps:
        if k in fields:
            steps[k].append(float(fields[k]))
    if "settle_ms" in fields:
        jobs.append(int(fields.get("jobs", 0)))
per_k = lambda total: total / events * 1000
print()
print(f"drain: {events} events, {rate} jobs/s")
print(f"cpu per 1,000 jobs: worker {per_k(wcpu) * 1000:.1f} ms, postgres backends {per_k(pcpu) * 1000:.1f} ms"
      + ("" if pcpu else " (not on this machine?)"))
mean_batch = sum(jobs) / len(jobs) if jobs else 0
print(f"batches: {len(jobs)}, mean {mean_batch:.0f} jobs")
for k, v in steps.items():
    if v:
        mean = sum(v) / len(v)
        print(f"  {k:<12} mean {mean:7.1f} ms per batch, {mean / mean_batch * 1000 if mean_batch else 0:7.1f} ms per 1,000 jobs")
PY
if [[ -n "$PERF_PID" ]]; then
    echo
    echo "worker hot spots (perf, self time):"
    perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
        | grep -E '^ +[0-9.]+%' | head -15
fi
