#!/usr/bin/env bash
# README command 2: check formatting and lints, and run the whole test suite against a
# real PostgreSQL (scripts/postgres.sh: DATABASE_URL, or a private local cluster).
#
#   scripts/test.sh                 everything
#   scripts/test.sh -- some_filter  extra arguments go to the test runner
#
# The tests create their own databases on the DATABASE_URL server, so its role needs
# CREATEDB (the private cluster's `postgres` superuser has it). Uses cargo-nextest when
# installed, else cargo test.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NOTIFYD_REPO"

started=$SECONDS
current=""
trap 'rc=$?; if [[ $rc -ne 0 && -n "$current" ]]; then printf "\n%s\n" "${_n_red}FAILED: $current (exit $rc)${_n_off}" >&2; fi' EXIT
begin() {
    current="$1"
    step "$1"
}

python_has_psycopg() { python3 -c 'import psycopg' >/dev/null 2>&1; }

# psycopg 3 for python3: already there, else PyPI's binary wheel (pyenv, venv, conda),
# else Debian's package (a system python refuses pip installs, PEP 668), else pip itself.
ensure_psycopg() {
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
    if ! have python3; then apt_install python3 || die "python3 is not installed"; fi
    python_has_psycopg && return 0
    if python3 -m pip --version >/dev/null 2>&1; then
        log "installing psycopg[binary] with pip"
        python3 -m pip install --quiet 'psycopg[binary]' && python_has_psycopg && return 0
    fi
    if have apt-get && [[ "$(python3 -c 'import sys; print(sys.prefix)')" == /usr ]]; then
        apt_install python3-psycopg && python_has_psycopg && return 0
    fi
    if ! python3 -m pip --version >/dev/null 2>&1 && have apt-get; then
        apt_install python3-pip || true
        python3 -m pip install --quiet 'psycopg[binary]' && python_has_psycopg && return 0
    fi
    die "could not make psycopg 3 importable by $(command -v python3); install it (pip install 'psycopg[binary]') and retry"
}

# rustfmt and clippy come with rustup's default profile; add them if missing.
ensure_component() {
    local sub="$1" component="$2"
    cargo "$sub" --version >/dev/null 2>&1 && return 0
    have rustup || die "cargo $sub is not installed (and rustup is not there to add $component)"
    log "adding the $component component with rustup"
    rustup component add "$component"
}

begin "PostgreSQL"
# shellcheck source=scripts/postgres.sh
source "$NOTIFYD_REPO/scripts/postgres.sh"
export DATABASE_URL
export NOTIFYD_TEST_DATABASE_URL="$DATABASE_URL"
if psql=$(find_pg_tool psql); then
    can=$("$psql" -X -q -t -A -d "$DATABASE_URL" \
        -c "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
    [[ "$can" == t ]] || die "the role in DATABASE_URL ($(redact_url "$DATABASE_URL")) cannot create databases, and the tests create their own: use a role with CREATEDB"
fi
log "tests use $(redact_url "$DATABASE_URL")"

begin "Python: psycopg 3"
ensure_psycopg
python3 -c 'import psycopg, sys; print("python", sys.version.split()[0], "psycopg", psycopg.__version__)'

ensure_cargo
locked=()
if [[ -f Cargo.lock ]]; then locked=(--locked); fi
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

begin "Format (cargo fmt --check)"
ensure_component fmt rustfmt
cargo fmt --all -- --check

begin "Lints (cargo clippy -D warnings)"
ensure_component clippy clippy
cargo clippy --all-targets ${locked[@]+"${locked[@]}"} -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
    begin "Tests (cargo nextest run)"
    cargo nextest run ${locked[@]+"${locked[@]}"} --no-fail-fast "$@"
    # nextest does not run doctests.
    if [[ $# -eq 0 && -f src/lib.rs ]]; then
        begin "Doctests (cargo test --doc)"
        cargo test ${locked[@]+"${locked[@]}"} --doc
    fi
else
    begin "Tests (cargo test; install cargo-nextest for faster runs)"
    cargo test ${locked[@]+"${locked[@]}"} --no-fail-fast "$@"
fi

current=""
step "All checks passed in $((SECONDS - started)) s"
