#!/usr/bin/env bash
# README command 1: run the whole system locally.
#
# Postgres (scripts/postgres.sh) -> release build -> `notifyd migrate` -> `notifyd worker`
# and `notifyd serve` in the background (logs in .notifyd/logs/) -> a few demo events
# for user 42 through the public SQL contract -> the resulting notifications, and the
# curl command to read them over HTTP, and the address of the demo inbox page (serve runs
# with --demo for user 42 here: the page shows new notifications live, over SSE). Then it
# keeps running until Ctrl-C, which stops worker and serve (the Postgres cluster keeps
# running; scripts/postgres.sh stop).
#
# Env: DATABASE_URL (else a private cluster), NOTIFYD_JWT_SECRET (else a random dev
# secret), NOTIFYD_LISTEN / PORT (where serve listens), NOTIFYD_DEMO=0 (no demo page),
# NOTIFYD_RUN_ONCE=1 (stop and exit 0 after the demo), plus the NOTIFYD_PG_* variables of
# scripts/postgres.sh.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NOTIFYD_REPO"

LOGS="$NOTIFYD_STATE/logs"
PIDS_DIR="$NOTIFYD_STATE/run"
mkdir -p "$LOGS" "$PIDS_DIR"
CHILDREN=()

# ------------------------------------------------------------ process handling

# Stop one process: SIGTERM, wait up to 10 s, then SIGKILL.
stop_pid() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        warn "pid $pid did not stop after 10 s: killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    set +e
    trap - EXIT INT TERM
    local pid
    if ((${#CHILDREN[@]} > 0)); then
        log "stopping worker and serve"
        for pid in "${CHILDREN[@]}"; do kill -TERM "$pid" 2>/dev/null; done
        for pid in "${CHILDREN[@]}"; do stop_pid "$pid"; done
    fi
    rm -f "$PIDS_DIR/worker.pid" "$PIDS_DIR/serve.pid"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A worker or serve left behind by an earlier run of this script (e.g. one killed with
# SIGKILL) would hold the HTTP port: stop it, but only if it really is notifyd.
stop_leftover() {
    local name="$1" file="$PIDS_DIR/$1.pid" pid cmd=""
    [[ -f "$file" ]] || return 0
    pid=$(<"$file")
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        if [[ -r "/proc/$pid/cmdline" ]]; then
            cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
        else
            cmd=$(ps -o args= -p "$pid" 2>/dev/null || true)
        fi
        if [[ "$cmd" == *notifyd* ]]; then
            log "stopping notifyd $name (pid $pid) left over from an earlier run"
            kill -TERM "$pid" 2>/dev/null || true
            local i
            for ((i = 0; i < 50; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

# start NAME ARGS...: run the binary in the background, output to .notifyd/logs/NAME.log.
start() {
    local name="$1"
    shift
    stop_leftover "$name"
    printf '=== %s: notifyd %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >"$LOGS/$name.log"
    "$BIN" "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
    local pid=$!
    CHILDREN+=("$pid")
    printf '%s\n' "$pid" >"$PIDS_DIR/$name.pid"
    log "started notifyd $* (pid $pid, log .notifyd/logs/$name.log)"
    printf -v "PID_$name" '%s' "$pid"
}

# Fail (with the log tail) if worker or serve has exited.
check_alive() {
    local name pid
    for name in worker serve; do
        pid="PID_$name"
        pid="${!pid}"
        if ! kill -0 "$pid" 2>/dev/null; then
            local rc=0
            wait "$pid" 2>/dev/null || rc=$?
            log "last lines of .notifyd/logs/$name.log:"
            tail -n 25 "$LOGS/$name.log" >&2 || true
            die "notifyd $name exited (status $rc)"
        fi
    done
}

# ------------------------------------------------------------ start everything

ensure_cargo

step "PostgreSQL"
# shellcheck source=scripts/postgres.sh
source "$NOTIFYD_REPO/scripts/postgres.sh"
PSQL=$(find_pg_tool psql) || die "psql not found (install postgresql-client)"
psql_db() { "$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" "$@"; }

step "Build (cargo build --release)"
locked=()
if [[ -f Cargo.lock ]]; then locked=(--locked); fi
cargo build --release ${locked[@]+"${locked[@]}"}
target_dir="${CARGO_TARGET_DIR:-target}"
BIN="$(cd "$target_dir" && pwd)/release/notifyd"
[[ -x "$BIN" ]] || die "the build produced no $BIN"

step "Migrate (notifyd migrate)"
"$BIN" migrate

step "Start worker and serve"
if [[ -z "${NOTIFYD_JWT_SECRET:-}" && -z "${NOTIFYD_JWT_PUBLIC_KEY:-}" ]]; then
    # 36 random bytes -> 48 base64 characters. Dev only: a new one on every run.
    NOTIFYD_JWT_SECRET=$(head -c 36 /dev/urandom | base64)
    log "NOTIFYD_JWT_SECRET is unset: using a random development secret for this run"
fi
export NOTIFYD_JWT_SECRET
listen="${NOTIFYD_LISTEN:-}"
if [[ -z "$listen" && -n "${PORT:-}" ]]; then listen="0.0.0.0:$PORT"; fi
listen="${listen:-127.0.0.1:8080}"
http_port="${listen##*:}"
http_host="${listen%:*}"
case "$http_host" in 0.0.0.0 | "" | "[::]" | "::") http_host=127.0.0.1 ;; esac
HTTP="http://$http_host:$http_port"

# The demo page hands out tokens for user 42 to anyone who can reach it: on by default
# here (a local development run), never in the Procfile.
export NOTIFYD_DEMO="${NOTIFYD_DEMO:-1}" NOTIFYD_DEMO_USER="${NOTIFYD_DEMO_USER:-42}"
if [[ "$NOTIFYD_DEMO" == 1 && "$http_host" != 127.* && "$http_host" != localhost ]]; then
    warn "demo mode on a non-loopback address ($listen): anyone who reaches it can read user $NOTIFYD_DEMO_USER's notifications (NOTIFYD_DEMO=0 turns it off)"
fi

# A development run uses the cluster's superuser for everything; serve refuses a role that
# can write unless told (docs/OPERATIONS.md, Database roles, for the production setup).
export NOTIFYD_ALLOW_WRITABLE_ROLE="${NOTIFYD_ALLOW_WRITABLE_ROLE:-1}"

start worker worker
start serve serve

# serve is ready when /healthz answers (or, without curl, when its port accepts).
deadline=$((SECONDS + 30))
while :; do
    check_alive
    if have curl; then
        curl -fsS -o /dev/null --max-time 2 "$HTTP/healthz" 2>/dev/null && break
    else
        (exec 7<>"/dev/tcp/${http_host//[\[\]]/}/$http_port") 2>/dev/null && break
    fi
    if ((SECONDS >= deadline)); then
        tail -n 25 "$LOGS/serve.log" >&2 || true
        die "notifyd serve does not answer on $HTTP/healthz after 30 s"
    fi
    sleep 0.3
done
log "serve answers on $HTTP"

# ------------------------------------------------------------ demo

step "Demo: enqueue four events for user 42 (plain SQL, the backend's contract)"
demo_sql="INSERT INTO notify.events (user_id, event_type, body, link) VALUES
  ('42', 'new_message',   'You have a new message from Alice', '/messages/1'),
  ('42', 'status_change', 'Your order #1001 has shipped', '/orders/1001'),
  ('42', 'system_alert',  'Scheduled maintenance tonight at 22:00 UTC', NULL),
  ('42', 'new_message',   '<script>alert(1)</script>Hello <b>Alice</b>', '/messages/2')
RETURNING id"
printf '%s;\n' "$demo_sql" >&2
ids=$(psql_db -t -A -c "$demo_sql" | grep -E '^[0-9]+$' | paste -sd, -)
[[ -n "$ids" ]] || die "the demo INSERT returned no event ids"

log "waiting (at most 30 s) for the worker to process events $ids"
want=$(($(tr -cd , <<<"$ids" | wc -c) + 1))
deadline=$((SECONDS + 30))
stored=0
processed=0
while :; do
    check_alive
    stored=$(psql_db -t -A -c "SELECT count(*) FROM notify.notifications WHERE user_id = '42' AND event_id IN ($ids)")
    processed=$(psql_db -t -A -c "SELECT count(*) FROM notify.event_outcomes WHERE event_id IN ($ids) AND outcome IS NOT NULL" 2>/dev/null || echo 0)
    if ((stored >= want || processed >= want || SECONDS >= deadline)); then break; fi
    sleep 0.2
done

step "Notifications of user 42 (notify.notifications)"
psql_db -P pager=off -c "SELECT id, event_type, body, link, created_at, read_at
  FROM notify.notifications WHERE user_id = '42' AND event_id IN ($ids) ORDER BY id"
echo "The last event was enqueued as '<script>alert(1)</script>Hello <b>Alice</b>':"
echo "it is stored as plain text, markup removed."
if ((stored < want)); then
    psql_db -P pager=off -c "SELECT event_id, event_type, outcome, outcome_reason
      FROM notify.event_outcomes WHERE event_id IN ($ids) ORDER BY event_id" 2>/dev/null || true
    if ((processed >= want)); then
        warn "only $stored of $want demo events became notifications (see the outcomes above:"
        warn "user 42 may have switched a type off, or hit the hourly rate limit)"
    else
        log "last lines of .notifyd/logs/worker.log:"
        tail -n 25 "$LOGS/worker.log" >&2 || true
        if [[ "${NOTIFYD_RUN_ONCE:-}" == 1 ]]; then
            die "only $stored of $want demo events became notifications within 30 s"
        fi
        warn "only $stored of $want demo events became notifications within 30 s"
    fi
fi

step "Over HTTP"
token=""
if [[ -n "${NOTIFYD_JWT_SECRET:-}" ]]; then
    token=$("$BIN" token --sub 42 2>>"$LOGS/token.log" | awk 'NF { t = $NF } END { print t }') || token=""
fi
if [[ "$token" =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]]; then
    echo "A token for user 42 (valid for this run's NOTIFYD_JWT_SECRET):"
    echo
    echo "  curl -H \"Authorization: Bearer $token\" $HTTP/api/notifications"
    echo
    if have curl; then
        echo "which answers:"
        curl -sS --max-time 5 -H "Authorization: Bearer $token" "$HTTP/api/notifications" || true
        echo
    fi
else
    log "(no token: 'notifyd token --sub 42' is not available, so no curl example)"
fi
if [[ "$NOTIFYD_DEMO" == 1 ]]; then
    echo
    echo "${_n_bold}Demo inbox: open $HTTP/demo/ in a browser${_n_off} (user $NOTIFYD_DEMO_USER; new"
    echo "notifications appear live, e.g. after the psql INSERT below)."
    echo
fi
echo "Health: curl $HTTP/healthz"
echo "Logs:   tail -f .notifyd/logs/worker.log .notifyd/logs/serve.log"
echo "Enqueue more: psql \"$(redact_url "$DATABASE_URL")\" -c \"INSERT INTO notify.events (user_id, event_type, body) VALUES ('42', 'system_alert', 'Hi')\""

if [[ "${NOTIFYD_RUN_ONCE:-}" == 1 ]]; then
    log "NOTIFYD_RUN_ONCE=1: stopping"
    exit 0
fi

step "Running: worker and serve are up (Ctrl-C stops them)"
while :; do
    check_alive
    sleep 1 &
    wait $! || true
done
