#!/usr/bin/env bash
# A real database's bad day (issue 16), measured with notifyd-bench, medians of BENCH_RUNS:
#
#   scripts/bench-bad-day.sh enqueue      # INSERT into notify.events vs a plain table (pgbench)
#   scripts/bench-bad-day.sh burst        # a burst drained before any ANALYZE vs after one,
#                                         # alternating, with 1 and 2 workers
#   scripts/bench-bad-day.sh hold SECS    # 1,000 events/s with a snapshot held SECS seconds
#   scripts/bench-bad-day.sh broadcast N  # N system_alert events beside 100 new_message/s
#
# Every run is a fresh scratch database on DATABASE_URL (notifyd-bench creates and drops it).
# Prints each run's figures and the medians. Needs a release build (`cargo build --release`,
# built here if missing). Env: DATABASE_URL, BENCH_RUNS (3), BENCH_EVENTS (200000),
# BENCH_USERS (20000), NOTIFYD_BENCH (the notifyd-bench executable), BENCH_ENQUEUE_BY
# (intake: how the queue is fed, `notifyd jobs enqueue-by`; trigger for the previous way).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NOTIFYD_REPO"

RUNS="${BENCH_RUNS:-3}"
EVENTS="${BENCH_EVENTS:-200000}"
USERS="${BENCH_USERS:-20000}"
BENCH="${NOTIFYD_BENCH:-$NOTIFYD_REPO/target/release/notifyd-bench}"
ENQUEUE_BY="${BENCH_ENQUEUE_BY:-intake}"
[[ -n "${DATABASE_URL:-}" ]] || die "set DATABASE_URL (a role that may CREATE DATABASE)"
if [[ ! -x "$BENCH" ]]; then
    ensure_cargo
    cargo build --release --locked
fi
have pgbench || die "pgbench not found (install postgresql-client or postgresql-contrib)"

# Run the bench; print the human lines to stderr and the JSON report to stdout.
bench() {
    local out
    out=$("$BENCH" --enqueue-by "$ENQUEUE_BY" "$@" 2> >(grep -v '^JSON' >&2))
    grep '^JSON ' <<<"$out" | sed 's/^JSON //'
}

# field JSON PATH: one number from a JSON report (PATH like hold.p99_ratio).
field() {
    python3 -c 'import json,sys
v=json.loads(sys.argv[1])
for k in sys.argv[2].split("."):
    v = v[int(k)] if isinstance(v, list) else v.get(k) if v is not None else None
print("nan" if v is None else v)' "$1" "$2"
}

median() { LC_ALL=C sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

case "${1:-}" in
enqueue)
    ratios=()
    for r in $(seq 1 "$RUNS"); do
        j=$(bench --enqueue-secs 10 --enqueue-rounds 3 --events 1000 --users 100 --rate 0 --ceiling-clients 0)
        ratio=$(field "$j" enqueue.ratio)
        printf 'run %d: notify.events %.0f tps, plain %.0f tps, ratio %.3f\n' "$r" \
            "$(field "$j" enqueue.events_median)" "$(field "$j" enqueue.plain_median)" "$ratio"
        ratios+=("$ratio")
    done
    printf 'enqueue ratio, median of %d runs (each a median of 3 rounds): %s\n' "$RUNS" \
        "$(printf '%s\n' "${ratios[@]}" | median)"
    ;;
burst)
    for replicas in 1 2; do
        stale=() fresh=()
        for r in $(seq 1 "$RUNS"); do
            # Alternate which goes first.
            for mode in $( ((r % 2)) && echo "stale fresh" || echo "fresh stale"); do
                flag=(); [[ "$mode" == stale ]] && flag=(--stale-stats)
                j=$(bench --events "$EVENTS" --users "$USERS" --replicas "$replicas" --rate 0 \
                    --ceiling-clients 0 "${flag[@]}")
                secs=$(field "$j" drain_wall_secs)
                printf 'replicas %d run %d %-5s drained in %.2f s\n' "$replicas" "$r" "$mode" "$secs"
                if [[ "$mode" == stale ]]; then stale+=("$secs"); else fresh+=("$secs"); fi
            done
        done
        s=$(printf '%s\n' "${stale[@]}" | median)
        f=$(printf '%s\n' "${fresh[@]}" | median)
        printf 'replicas %d: no ANALYZE %.2f s, analyzed %.2f s (medians of %d): %.2f x\n' \
            "$replicas" "$s" "$f" "$RUNS" "$(awk -v a="$s" -v b="$f" 'BEGIN {print a / b}')"
    done
    ;;
hold)
    secs="${2:?hold SECS}"
    for r in $(seq 1 "$RUNS"); do
        j=$(bench --events "$EVENTS" --users "$USERS" --rate 1000 --latency-secs 60 --hold-secs "$secs")
        printf 'run %d: baseline p99 %.1f ms, held p99 %.1f ms (%.2f x), after p99 %.1f ms, drain ratio %.3f\n' "$r" \
            "$(field "$j" latency_readable_ms.p99)" "$(field "$j" hold.held.readable.p99)" \
            "$(field "$j" hold.p99_ratio)" "$(field "$j" hold.after.readable.p99)" \
            "$(field "$j" ratio_to_ceiling)"
    done
    ;;
broadcast)
    n="${2:?broadcast N}"
    for r in $(seq 1 "$RUNS"); do
        j=$(bench --events "$EVENTS" --users "$USERS" --rate 0 --latency-secs 20 --broadcast "$n" \
            --broadcast-secs "${BENCH_BROADCAST_SECS:-150}")
        printf 'run %d: new_message p99 without %.1f ms, with the broadcast %.1f ms (while it drained %.1f ms), drained in %s s\n' "$r" \
            "$(field "$j" broadcast.baseline.readable.p99)" "$(field "$j" broadcast.during.readable.p99)" \
            "$(field "$j" broadcast.while_draining.p99)" "$(field "$j" broadcast.drained_secs)"
    done
    ;;
*)
    die "usage: scripts/bench-bad-day.sh enqueue | burst | hold SECS | broadcast N"
    ;;
esac
