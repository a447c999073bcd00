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
#
# Installs what the tests need when it is missing (each step is a no-op when it is there):
# psycopg 3 for python3, Debian's chromium and node (tests/browser.rs), the browser tests'
# and the browser client's node modules (`npm ci` in tests/browser and clients/js, again
# only when package-lock.json changed; then the client is built with tsc), schemathesis in
# the venv .notifyd/venv (tests/fuzz_api.rs, via NOTIFYD_SCHEMATHESIS), and the JWT
# libraries of tests/jwt/requirements.txt there too (tests/serve_jwt_libraries.rs), and
# Debian's pgbouncer (tests/pooler.rs starts private instances of it; NOTIFYD_PGBOUNCER).
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

# The browser tests (tests/browser.rs) drive Debian's Chromium with playwright-core.
ensure_chromium() {
    local bin="${CHROMIUM:-/usr/bin/chromium}"
    [[ -x "$bin" ]] && return 0
    [[ -n "${CHROMIUM:-}" ]] && die "CHROMIUM=$CHROMIUM is not an executable"
    apt_install chromium || die "could not install chromium with apt-get (the browser tests need /usr/bin/chromium)"
    [[ -x "$bin" ]] || die "apt-get installed chromium, but $bin is not there"
}

ensure_node() {
    if ! have node || ! have npm; then
        apt_install nodejs npm || die "node and npm are needed for the browser tests; install Node.js >= 18"
    fi
    local major
    major=$(node -p 'process.versions.node.split(".")[0]')
    [[ "$major" -ge 18 ]] || die "node $(node --version) is too old for the browser tests: install Node.js >= 18"
}

# <dir>/node_modules from the committed lock file, with `npm ci` only when it is missing
# or was installed from another lock file (a hash of it is kept beside the modules).
ensure_node_modules() {
    local dir="$NOTIFYD_REPO/$1" module="$2" stamp want
    stamp="$dir/node_modules/.notifyd-lock.sha256"
    want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -d "$dir/node_modules/$module" ]]; then
        return 0
    fi
    log "installing node modules (npm ci in $1)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in $1 failed"
    printf '%s\n' "$want" > "$stamp"
}

# The browser client (clients/js): its dist/ with tsc, which also type-checks it; a few
# seconds, so always (a stale dist/ would test old code).
build_js_client() {
    (cd "$NOTIFYD_REPO/clients/js" && npm run --silent build) || die "the browser client (clients/js) does not build"
}

# The project's venv (.notifyd/venv), made when it has no pip yet (Debian's python3-venv is
# installed when python3 cannot make one).
ensure_venv() {
    local venv="$1"
    [[ -x "$venv/bin/pip" ]] && return 0
    rm -rf "$venv"
    mkdir -p "$NOTIFYD_STATE"
    if ! python3 -m venv "$venv"; then
        rm -rf "$venv"
        apt_install python3-venv || die "python3 cannot make a venv (install python3-venv)"
        python3 -m venv "$venv" || die "python3 -m venv $venv failed"
    fi
}

# schemathesis (tests/fuzz_api.rs) in its own venv, .notifyd/venv; the test finds it
# through NOTIFYD_SCHEMATHESIS.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
    local venv="$NOTIFYD_STATE/venv" bin
    bin="$venv/bin/schemathesis"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
    if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -qF "version $SCHEMATHESIS_VERSION"; then
        export NOTIFYD_SCHEMATHESIS="$bin"
        return 0
    fi
    ensure_venv "$venv"
    log "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION" \
        || die "pip could not install schemathesis $SCHEMATHESIS_VERSION into $venv"
    export NOTIFYD_SCHEMATHESIS="$bin"
}

# The JWT libraries of Python backends (tests/serve_jwt_libraries.rs mints real tokens with
# them) into the same venv, from tests/jwt/requirements.txt (pinned): pip runs only when an
# installed version differs from the file. The test finds the venv's python through
# NOTIFYD_JWT_PYTHON.
ensure_jwt_libraries() {
    local venv="$NOTIFYD_STATE/venv" req="$NOTIFYD_REPO/tests/jwt/requirements.txt"
    [[ -x "$venv/bin/pip" ]] || die "$venv has no pip (ensure_schemathesis makes the venv)"
    export NOTIFYD_JWT_PYTHON="$venv/bin/python"
    "$NOTIFYD_JWT_PYTHON" - "$req" <<'PY' && return 0
import sys
from importlib.metadata import PackageNotFoundError, version
for line in open(sys.argv[1]):
    name, _, pinned = line.split("#")[0].strip().partition("==")
    try:
        if name and version(name) != pinned:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
    log "installing the JWT test libraries (tests/jwt/requirements.txt) into $venv"
    "$venv/bin/pip" install --quiet -r "$req" \
        || die "pip could not install tests/jwt/requirements.txt into $venv"
}

# The Python client's tests (clients/python/tests): the pinned packages of
# clients/python/requirements-test.txt (Django, SQLAlchemy, psycopg 3, pytest, mypy) and the
# package itself (pip install ./clients/python) in .notifyd/venv. Reinstalled only when
# those files change (a hash of them is kept in the venv).
ensure_python_client() {
    local venv="$NOTIFYD_STATE/venv" dir="$NOTIFYD_REPO/clients/python" stamp want
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
    stamp="$venv/.notifyd-python-client.sha256"
    want=$(cd "$dir" && find pyproject.toml requirements-test.txt README.md src -type f \
        -not -path '*/__pycache__/*' -not -path '*.egg-info/*' | LC_ALL=C sort \
        | xargs sha256sum | sha256sum | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
        && "$venv/bin/python" -c 'import notifyd, django, sqlalchemy, psycopg, pytest, mypy' 2>/dev/null; then
        return 0
    fi
    ensure_venv "$venv"
    log "installing the Python client and its test packages into $venv"
    "$venv/bin/pip" install --quiet -r "$dir/requirements-test.txt" \
        || die "pip could not install clients/python/requirements-test.txt into $venv"
    # A build left in the tree could carry files that src/ no longer has.
    rm -rf "$dir/build" "$dir"/src/*.egg-info
    "$venv/bin/pip" install --quiet --force-reinstall --no-deps "$dir" \
        || die "pip install ./clients/python failed"
    rm -rf "$dir/build" "$dir"/src/*.egg-info
    printf '%s\n' "$want" > "$stamp"
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
# Debian's pgbouncer binary for tests/pooler.rs, which runs private instances of it (its own
# ini, port and process per test); the package's system service is not used.
ensure_pgbouncer() {
    local bin="${NOTIFYD_PGBOUNCER:-/usr/sbin/pgbouncer}"
    if [[ ! -x "$bin" ]] && have pgbouncer; then bin=$(command -v pgbouncer); fi
    if [[ ! -x "$bin" ]]; then
        [[ -n "${NOTIFYD_PGBOUNCER:-}" ]] && die "NOTIFYD_PGBOUNCER=$NOTIFYD_PGBOUNCER is not an executable"
        apt_install pgbouncer || die "could not install pgbouncer with apt-get (tests/pooler.rs needs it)"
        bin=/usr/sbin/pgbouncer
        [[ -x "$bin" ]] || die "apt-get installed pgbouncer, but $bin is not there"
    fi
    export NOTIFYD_PGBOUNCER="$bin"
}

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

begin "Browser tests: chromium, node modules, the browser client"
ensure_chromium
ensure_node
ensure_node_modules tests/browser playwright-core
ensure_node_modules clients/js esbuild
build_js_client
log "$("${CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null || echo chromium), node $(node --version)"

begin "Connection pooler: pgbouncer"
ensure_pgbouncer
log "$("$NOTIFYD_PGBOUNCER" --version 2>/dev/null | head -n 1)"

begin "API fuzzing: schemathesis"
ensure_schemathesis
"$NOTIFYD_SCHEMATHESIS" --version

begin "JWT libraries: flask-jwt-extended, simplejwt, PyJWT"
ensure_jwt_libraries
"$NOTIFYD_JWT_PYTHON" -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("PyJWT", "flask-jwt-extended", "djangorestframework-simplejwt", "Django")))'

begin "Python client: Django, SQLAlchemy, pytest and clients/python"
ensure_python_client
"$NOTIFYD_STATE/venv/bin/python" -c 'import django, sqlalchemy, psycopg, pytest; print("django", django.__version__, "sqlalchemy", sqlalchemy.__version__, "psycopg", psycopg.__version__, "pytest", pytest.__version__)'

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

# The Python client's tests, against the debug binary the cargo tests built (the same
# invocation, so this build is a no-op after them). Exit 5 (no tests collected) fails too.
if [[ $# -eq 0 ]]; then
    begin "Python client tests (pytest in clients/python)"
    cargo build ${locked[@]+"${locked[@]}"} --bin notifyd
    export NOTIFYD_BIN="$NOTIFYD_REPO/target/debug/notifyd"
    pytest_rc=0
    (cd "$NOTIFYD_REPO/clients/python" && "$NOTIFYD_STATE/venv/bin/python" -m pytest -p no:cacheprovider) \
        || pytest_rc=$?
    if [[ $pytest_rc -eq 5 ]]; then die "pytest collected no tests in clients/python/tests"; fi
    [[ $pytest_rc -eq 0 ]] || die "the Python client tests failed (pytest exit $pytest_rc)"
fi

current=""
step "All checks passed in $((SECONDS - started)) s"
