# shellcheck shell=bash
# Shared helpers for scripts/*.sh. Source it, do not run it.

[[ -n "${_NOTIFYD_LIB:-}" ]] && return 0
_NOTIFYD_LIB=1

# The repository root is this file's parent's parent, wherever it is called from.
NOTIFYD_REPO=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Local state (Postgres data, logs, pid files). Ignored by git.
# shellcheck disable=SC2034 # used by the scripts that source this file
NOTIFYD_STATE="$NOTIFYD_REPO/.notifyd"

if [[ -t 2 && -z "${NO_COLOR:-}" ]]; then
    _n_bold=$'\e[1m' _n_red=$'\e[31m' _n_yellow=$'\e[33m' _n_off=$'\e[0m'
else
    _n_bold='' _n_red='' _n_yellow='' _n_off=''
fi

log()  { printf '%s\n' "notifyd: $*" >&2; }
warn() { printf '%s\n' "${_n_yellow}notifyd: warning: $*${_n_off}" >&2; }
die()  { printf '%s\n' "${_n_red}notifyd: error: $*${_n_off}" >&2; exit 1; }
step() { printf '\n%s\n' "${_n_bold}==> $*${_n_off}" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

# Run a command as root: directly, or through sudo (never prompting without a terminal).
as_root() {
    if [[ "${EUID:-$(id -u)}" -eq 0 ]]; then
        "$@"
    elif have sudo; then
        if [[ -t 0 ]]; then sudo "$@"; else sudo -n "$@"; fi
    else
        warn "root is needed to run: $* (install sudo, or run it as root)"
        return 1
    fi
}

# Install Debian packages (apt-get update runs once per script run).
apt_install() {
    have apt-get || return 1
    log "installing with apt-get: $*"
    if [[ -z "${_NOTIFYD_APT_UPDATED:-}" ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
        _NOTIFYD_APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

# Candidate PostgreSQL bin directories, one per line (may contain duplicates).
pg_bindirs() {
    local d
    if have pg_config; then pg_config --bindir 2>/dev/null || true; fi
    for d in /usr/lib/postgresql/*/bin /usr/pgsql-*/bin \
        /opt/homebrew/opt/postgresql*/bin /usr/local/opt/postgresql*/bin; do
        if [[ -d "$d" ]]; then printf '%s\n' "$d"; fi
    done
    for d in initdb psql; do
        if have "$d"; then
            d=$(command -v "$d")
            dirname "$(readlink -f "$d" 2>/dev/null || printf '%s' "$d")"
        fi
    done
}

# Major version of a PostgreSQL executable ("postgres (PostgreSQL) 15.20 ..." -> 15).
pg_major() {
    local v
    v=$("$1" -V 2>/dev/null | sed -n 's/.*(PostgreSQL) \([0-9][0-9]*\).*/\1/p')
    [[ -n "$v" ]] && printf '%s\n' "$v"
}

# Path of a client tool (psql, pg_isready): from PATH, else from a PostgreSQL bin directory.
find_pg_tool() {
    local d
    if have "$1"; then command -v "$1"; return 0; fi
    while IFS= read -r d; do
        if [[ -x "$d/$1" ]]; then printf '%s\n' "$d/$1"; return 0; fi
    done < <(pg_bindirs | sort -V -r)
    return 1
}

# Make sure cargo is on PATH (rustup installs it in ~/.cargo/bin).
ensure_cargo() {
    local home="${CARGO_HOME:-${HOME:-/root}/.cargo}"
    if ! have cargo && [[ -x "$home/bin/cargo" ]]; then
        PATH="$home/bin:$PATH"
        export PATH
    fi
    if ! have cargo; then
        local rv
        rv=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$NOTIFYD_REPO/Cargo.toml" 2>/dev/null || true)
        die "cargo not found: install Rust ${rv:+>= $rv }with rustup (https://rustup.rs), then retry"
    fi
}

# The URL $1 pointed at database $2; with $3 (an sslmode), that sslmode unless the URL
# sets one.
url_for_database() {
    local url
    url=$(printf '%s' "$1" | sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\1/$2#")
    if [[ -n "${3:-}" && "$url" != *sslmode=* ]]; then
        if [[ "$url" == *\?* ]]; then url+="&sslmode=$3"; else url+="?sslmode=$3"; fi
    fi
    printf '%s\n' "$url"
}

# Hide the password in a connection URL before printing it.
redact_url() { printf '%s\n' "$1" | sed 's#^\([a-z]*://[^:/@]*\):[^@]*@#\1:***@#'; }
