//! API fuzzing: schemathesis (from PyPI) against the real `notifyd serve` binary, driven by
//! the OpenAPI document the service itself serves at `/api/openapi.json`, with a valid
//! token for user 42 on a fresh database seeded with notifications.
//!
//! It runs every check (`--checks all`): no 5xx, status codes, content types, headers
//! and bodies as declared, schema-valid requests accepted, schema-invalid ones rejected,
//! auth not ignored, unsupported methods refused. Plus one check of our own,
//! `sse_events_are_notifications`: every event of a 200 stream is `event: notification`
//! with `id` equal to its data's `id`, ids ascending past the cursor, and data that is a
//! `Notification` as the document defines it.
//!
//! What is adjusted, and why (nothing else is):
//! * The seed data holds a notification with id 2^63-1 (`OVERRIDING SYSTEM VALUE`): a
//!   schema-valid `after` above every id the user ever had is, as documented, `400
//!   invalid_cursor` (a cursor the service never issued), which the schema cannot
//!   express. With the top id taken, every schema-valid `after` is a real cursor, so
//!   `positive_data_acceptance` stays on.
//! * Long polls: a valid `wait` above 1 s is cut to 1 s (a hook), so that a poll with
//!   nothing newer than its cursor does not hold the run for up to 30 s. Invalid `wait`
//!   values are not touched: their rejection is still tested.
//! * The stream never ends by itself: schemathesis reads at most 5 events or 2 s of it.
//! * Two documented rules that OpenAPI cannot state are accepted when
//!   `positive_data_acceptance` trips on them (a `filter_failure` hook, matched on the
//!   400 answer's exact message): `wait` needs `after`, and a token may be sent once
//!   (the header, or `access_token` on the stream, not both: the `ignored_auth` probes
//!   add a bad `access_token` next to the configured header, and get this 400).
//! * Known bugs this test found, reported and not fixed yet, are accepted the same way
//!   and printed as `FUZZ KNOWN BUG` on every run (`KNOWN_BUGS` in the hooks): delete an
//!   entry once the fix lands, and the test holds the fix.
//! * While the document declares the stream's 200 body as `{"type": "string"}`, the
//!   `response_schema_conformance` failure on its events is accepted: OpenAPI before 3.2
//!   has `schema` of `text/event-stream` describe each event, so schemathesis checks
//!   every event object against "string". Our own SSE check validates the events
//!   instead. Once the document describes one event there (or adds `itemSchema`), the
//!   filter turns itself off.
//!
//! Budget: `NOTIFYD_FUZZ_EXAMPLES` cases per operation and phase (default 40) with a fixed
//! `NOTIFYD_FUZZ_SEED` (default 20261201), so CI runs are reproducible; about a minute on
//! 2 cores. schemathesis comes from `NOTIFYD_SCHEMATHESIS`, else `.notifyd/venv`, else
//! PATH (scripts/test.sh installs it). Missing, the test fails; it never skips.

mod common;
#[path = "faults/support.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::TestDb;
use support::{Proc, run_cli};

const USER: &str = "42";
/// The whole schemathesis run, at most.
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// The schemathesis hooks (a Python module written next to the config for the run).
const HOOKS: &str = r#"
# Written by tests/fuzz_api.rs for one schemathesis run; the reasons are documented there.
import json
import os

import jsonschema_rs
import schemathesis

STREAM = "/api/notifications/stream"

with open(os.environ["NOTIFYD_FUZZ_OPENAPI"], encoding="utf-8") as f:
    SPEC = json.load(f)

# With the document's components next to it, so that its `$ref`s (`Digest`) resolve.
NOTIFICATION = jsonschema_rs.validator_for(
    dict(SPEC["components"]["schemas"]["Notification"], components=SPEC["components"])
)
STREAM_200 = SPEC["paths"][STREAM]["get"]["responses"]["200"]["content"]["text/event-stream"]
# The document still has `schema` describe the whole body as a string.
LEGACY_STREAM_SCHEMA = "itemSchema" not in STREAM_200 and STREAM_200.get("schema") == {"type": "string"}

# Documented 400 answers to combinations that OpenAPI cannot forbid.
DOCUMENTED_REJECTIONS = (
    "`wait` needs `after`",
    "send the token once",
)

# Server or document bugs this test found, reported and not fixed yet: accepted so that CI
# stays green meanwhile, and printed on every run. Delete an entry once it is fixed.
KNOWN_BUGS = (
    # Empty: the one this test found (`Last-Event-ID` declared without a minimum, refused
    # when negative) is fixed in the document.
)

dropped = {"count": 0}


def _valid_long_wait(wait):
    if isinstance(wait, bool):
        return False
    if isinstance(wait, str) and wait.isascii() and wait.isdigit():
        wait = int(wait)
    return isinstance(wait, int) and 1 < wait <= 30


# Every phase (the coverage phase skips the map_* hooks): cut valid long-poll waits to 1 s.
@schemathesis.hook
def before_call(context, case, kwargs):
    query = case.query
    if query and _valid_long_wait(query.get("wait")):
        query["wait"] = 1
    params = kwargs.get("params")
    if isinstance(params, dict) and _valid_long_wait(params.get("wait")):
        params["wait"] = 1


def _error_message(response):
    try:
        return json.loads(response.content)["error"]["message"]
    except Exception:
        return None


@schemathesis.hook
def filter_failure(context, failure, case, response):
    keep = True
    if failure.code == "ST202" and response is not None and response.status_code == 400:
        message = _error_message(response) or ""
        if any(m in message for m in KNOWN_BUGS):
            print(f"FUZZ KNOWN BUG (reported): {case.operation.label}: {message}", flush=True)
            return False
        if any(m in message for m in DOCUMENTED_REJECTIONS):
            keep = False
    if (
        failure.code == "ST108"
        and LEGACY_STREAM_SCHEMA
        and case.operation.path == STREAM
        and response is not None
        and response.status_code == 200
    ):
        keep = False
    if not keep:
        dropped["count"] += 1
        detail = _error_message(response) if response.status_code == 400 else failure.title
        print(f"FUZZ accepted (documented): {failure.code} {case.operation.label}: {detail}", flush=True)
    return keep


def _events(text):
    for block in text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n"):
        fields = {"data": []}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                fields["data"].append(value)
            else:
                fields[name] = value
        if fields["data"]:
            fields["data"] = "\n".join(fields["data"])
            yield fields


def _cursor(case):
    headers = {k.lower(): v for k, v in (case.headers or {}).items()}
    for value in (headers.get("last-event-id"), (case.query or {}).get("after")):
        if value is None or value == "":
            continue
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    return None


@schemathesis.check
def sse_events_are_notifications(ctx, response, case):
    if case.operation.path != STREAM or response.status_code != 200:
        return None
    text = response.content.decode("utf-8")
    last = _cursor(case)
    for n, event in enumerate(_events(text)):
        if event.get("event") != "notification":
            raise AssertionError(f"event #{n} is not `event: notification`: {event!r}")
        try:
            item = json.loads(event["data"])
        except ValueError as e:
            raise AssertionError(f"event #{n}: data is not JSON ({e}): {event['data']!r}")
        errors = [e.message for e in NOTIFICATION.iter_errors(item)]
        if errors:
            raise AssertionError(f"event #{n}: data is not a Notification: {errors}: {item!r}")
        if event.get("id") != str(item["id"]):
            raise AssertionError(f"event #{n}: id {event.get('id')!r} is not the data's id {item['id']}")
        if last is not None and item["id"] <= last:
            raise AssertionError(f"event #{n}: id {item['id']} does not come after {last}")
        last = item["id"]
    return None
"#;

/// The schemathesis configuration (TOML).
const CONFIG: &str = r#"
# Written by tests/fuzz_api.rs for one schemathesis run.
headers = { Authorization = "Bearer ${NOTIFYD_FUZZ_TOKEN}" }

[[operations]]
include-path = "/api/notifications/stream"
request-timeout = 2.0
max-stream-events = 5
"#;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a valid value")),
        Err(_) => default,
    }
}

/// The schemathesis executable: NOTIFYD_SCHEMATHESIS, else .notifyd/venv, else PATH.
fn schemathesis() -> (PathBuf, String) {
    let how = "scripts/test.sh installs it (into .notifyd/venv, and sets NOTIFYD_SCHEMATHESIS)";
    let candidates: Vec<PathBuf> = match std::env::var_os("NOTIFYD_SCHEMATHESIS") {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".notifyd/venv/bin/schemathesis"),
            PathBuf::from("schemathesis"),
        ],
    };
    for bin in &candidates {
        if let Ok(out) = Command::new(bin).arg("--version").output()
            && out.status.success()
        {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            return (bin.clone(), version);
        }
    }
    panic!("schemathesis not found (tried {candidates:?}): {how}");
}

/// 30 notifications for the user (links on even ids, every third read), one for another
/// user, and the user's notification with the top id (see the module docs).
async fn seed(db: &TestDb) {
    sqlx::query(
        "INSERT INTO notify.notifications
           (user_id, event_id, event_type, body, link, created_at, read_at)
         SELECT $1, g, (ARRAY['new_message', 'status_change', 'system_alert'])[1 + g % 3],
                'seeded notification ' || g, CASE WHEN g % 2 = 0 THEN '/inbox/' || g END,
                now() - make_interval(secs => 31 - g),
                CASE WHEN g % 3 = 0 THEN now() END
         FROM generate_series(1, 30) AS g",
    )
    .bind(USER)
    .execute(&db.pool)
    .await
    .expect("seed notifications");
    sqlx::query(
        "INSERT INTO notify.notifications (user_id, event_id, event_type, body, created_at)
         VALUES ('someone-else', 31, 'new_message', 'not yours', now())",
    )
    .execute(&db.pool)
    .await
    .expect("seed another user");
    sqlx::query(
        "INSERT INTO notify.notifications (id, user_id, event_id, event_type, body, link, created_at)
         OVERRIDING SYSTEM VALUE
         VALUES (9223372036854775807, $1, 32, 'system_alert', 'the top id',
                 'https://example.com/top', now())",
    )
    .bind(USER)
    .execute(&db.pool)
    .await
    .expect("seed the top id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure() {
    let (st, version) = schemathesis();
    println!("using {version} ({})", st.display());
    let examples: u32 = env_or("NOTIFYD_FUZZ_EXAMPLES", 40);
    let seed_value: u64 = env_or("NOTIFYD_FUZZ_SEED", 20_261_201);

    let db = TestDb::new().await;
    seed(&db).await;
    let mut serve = Proc::serve(
        &db.url,
        "fuzz-serve",
        &[
            ("RUST_LOG", "info,tower_http=warn,sqlx=warn".to_owned()),
            ("NOTIFYD_STREAM_HEARTBEAT_SECS", "1".to_owned()),
            ("NOTIFYD_MAX_STREAMS_PER_USER", "1000".to_owned()),
        ],
    );
    serve.wait_listening(Duration::from_secs(30)).await;
    let base = format!("http://127.0.0.1:{}", serve.http_port.expect("port"));

    let (code, token, err) = run_cli(&db.url, &["token", "--sub", USER]);
    assert_eq!(code, 0, "notifyd token failed: {err}");
    let token = token.trim().to_owned();

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "fuzz-{}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    ));
    std::fs::create_dir_all(&dir).expect("fuzz dir");
    let spec = reqwest::get(format!("{base}/api/openapi.json"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("GET /api/openapi.json")
        .text()
        .await
        .expect("openapi body");
    std::fs::write(dir.join("openapi.json"), &spec).expect("write openapi.json");
    std::fs::write(dir.join("notifyd_fuzz_hooks.py"), HOOKS).expect("write hooks");
    std::fs::write(dir.join("schemathesis.toml"), CONFIG).expect("write config");

    let mut cmd = Command::new(&st);
    cmd.arg("--config-file")
        .arg(dir.join("schemathesis.toml"))
        .arg("run")
        .arg(format!("{base}/api/openapi.json"))
        .args(["--checks", "all"])
        .args(["--max-examples", &examples.to_string()])
        .args(["--seed", &seed_value.to_string()])
        .args(["--workers", "2"])
        .args(["--request-timeout", "5"])
        .args(["--generation-database", "none"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .arg("--no-color")
        .arg("--report-junit-path")
        .arg(dir.join("junit.xml"))
        .args(["--report", "junit"])
        .current_dir(&dir)
        .env("PYTHONPATH", &dir)
        .env("SCHEMATHESIS_HOOKS", "notifyd_fuzz_hooks")
        .env("NOTIFYD_FUZZ_OPENAPI", dir.join("openapi.json"))
        .env("NOTIFYD_FUZZ_TOKEN", &token)
        .env("NO_COLOR", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!(
        "schemathesis run {base}/api/openapi.json --checks all --max-examples {examples} --seed {seed_value} (files in {})",
        dir.display()
    );
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn schemathesis");

    // Stream both outputs into the test's output as they come.
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for pipe in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                println!("st: {line}");
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "schemathesis did not finish within {RUN_LIMIT:?}\n{}",
                serve.log_tail()
            );
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().expect("schemathesis exit");
    let took = started.elapsed();
    let output = lines.join("\n");
    let summary = lines
        .iter()
        .rev()
        .find(|l| l.contains("generated"))
        .cloned()
        .unwrap_or_default();
    let accepted = lines
        .iter()
        .filter(|l| l.starts_with("FUZZ accepted"))
        .count();
    eprintln!(
        "FIGURES fuzz: {version}, {} in {:.1} s, {accepted} documented rejections accepted",
        summary.trim(),
        took.as_secs_f64()
    );

    assert!(
        serve.is_running(),
        "notifyd serve died during fuzzing\n{}",
        serve.log_tail()
    );
    assert!(
        !serve.log_text().contains("panicked"),
        "notifyd serve panicked during fuzzing\n{}",
        serve.log_tail()
    );
    assert!(
        status.success(),
        "schemathesis found failures (exit {status}); see its report above\n{}",
        serve.log_tail()
    );
    assert!(
        output.contains("Tested: 5") || output.contains("5 selected / 5 total"),
        "schemathesis did not test all five operations:\n{output}"
    );
    assert!(
        summary.contains("generated"),
        "no test-case summary in the schemathesis output:\n{output}"
    );
}
