//! The backend developer docs in `jobs/` are executable, and this keeps them true:
//! `jobs/enqueue.sql` runs verbatim under psql, `jobs/examples/*.json` are valid events,
//! `jobs/enqueue_example.py` runs verbatim under python3 with psycopg 3, and
//! `jobs/README.md` names every constraint the migrations define.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{TestDb, process};
use notifyd::pipeline::Outcome;
use sqlx::Row;

fn jobs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Run a command; panic with its output when it cannot start or fails.
fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e} (is it installed and on PATH?)"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A login role in this database's backend role of `notifyd grants`, as a backend would
/// connect; it may also create its own tables in `public` (the example's business table).
/// Everything in `jobs/` runs as it.
async fn backend_url(db: &TestDb) -> String {
    let roles = db.grant_roles().await;
    let url = db.login_as(&roles.backend).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT CREATE ON SCHEMA public TO {}_login",
        roles.backend
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    url
}

fn psql_file(url: &str, file: &Path) -> Output {
    run(
        Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f"])
            .arg(file),
        &format!("psql -f {}", file.display()),
    )
}

/// The statements of `enqueue.sql` marked `-- name: <name>`: the text from the marker to the
/// first line that ends with `;`, comment lines dropped.
fn named_statements() -> BTreeMap<String, String> {
    let sql = read(&jobs_dir().join("enqueue.sql"));
    let mut out = BTreeMap::new();
    let mut lines = sql.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("-- name:") else {
            continue;
        };
        let mut stmt = String::new();
        for l in lines.by_ref() {
            if l.trim_start().starts_with("--") {
                continue;
            }
            stmt.push_str(l);
            stmt.push('\n');
            if l.trim_end().ends_with(';') {
                break;
            }
        }
        out.insert(name.trim().to_owned(), stmt);
    }
    out
}

async fn outcome_by_body(db: &TestDb, body: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT o.outcome FROM notify.event_outcomes AS o
         JOIN notify.events AS e ON e.id = o.event_id WHERE e.body = $1",
    )
    .bind(body)
    .fetch_one(&db.pool)
    .await
    .unwrap_or_else(|e| panic!("event {body:?}: {e}"))
}

#[tokio::test]
async fn enqueue_sql_runs_verbatim_and_its_events_become_the_documented_outcomes() {
    let db = TestDb::new().await;
    let backend_url = backend_url(&db).await;
    let backend = sqlx::PgPool::connect(&backend_url).await.unwrap();
    psql_file(&backend_url, &jobs_dir().join("enqueue.sql"));

    // What the file enqueued: 14 events (13 due, 1 delayed), one job each; the repeats of an
    // idempotency key and the rolled-back transaction added nothing.
    assert_eq!(db.count("SELECT count(*) FROM notify.events").await, 14);
    assert_eq!(db.count("SELECT count(*) FROM notify.queue").await, 14);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM notify.events WHERE idempotency_key = 'message:1002:new_message'"
        )
        .await,
        1
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM notify.events
             WHERE idempotency_key = 'example:rolled-back' OR body LIKE '%rolled back%'"
        )
        .await,
        0
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM notify.queue_later AS j JOIN notify.events AS e
               ON j.event_id = e.id
             WHERE e.idempotency_key = 'trial-ending:42' AND j.run_at > now() + interval '23 hours'"
        )
        .await,
        1,
        "the delayed event's job is due in a day"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.event_types WHERE name = 'weekly_digest'")
            .await,
        1
    );

    // Run what the worker would claim now (everything due) through the real pipeline.
    let due: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM notify.events WHERE run_at <= now() ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(due.len(), 13);
    let out = process(&db.pipeline(), &due).await;
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Outcome::Stored { .. }))
            .count(),
        12,
        "{out:?}"
    );
    assert_eq!(
        outcome_by_body(&db, "Order #2001 has shipped")
            .await
            .as_deref(),
        Some("opted_out"),
        "user 45 switched status changes off"
    );
    assert_eq!(
        outcome_by_body(&db, "You have a new message from Dave")
            .await
            .as_deref(),
        Some("stored"),
        "user 45's other types are delivered"
    );
    assert_eq!(
        outcome_by_body(&db, "Your trial ends in 24 hours").await,
        None,
        "the delayed event is not processed yet"
    );
    let links: BTreeMap<String, Option<String>> = sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT body, link FROM notify.notifications",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(
        links["Your report is ready"].as_deref(),
        Some("/reports/77?format=pdf#summary")
    );
    assert_eq!(
        links["Read the incident write-up"].as_deref(),
        Some("https://status.example.com/incidents/12")
    );
    assert_eq!(
        links["Scheduled maintenance on Sunday 02:00-03:00 UTC"],
        None
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications WHERE user_id = '7d9f2c1e-5b7a-4c3e-9a61-0f2b8e4d1c55'")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications WHERE event_type = 'weekly_digest'")
            .await,
        1
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM notify.notifications
             WHERE body = 'New terms of service take effect on 1 January'"
        )
        .await,
        3
    );

    // The documented queries, taken from the file, give the right answers afterwards.
    let q = named_statements();
    for name in [
        "enqueue_new_message",
        "enqueue_idempotent",
        "enqueue_delayed",
        "set_preference",
        "mark_read",
        "event_status",
        "suppressed_counts",
        "invalid_reasons",
        "backlog",
        "list_preferences",
        "set_type_cap",
        "add_critical_type",
    ] {
        assert!(q.contains_key(name), "enqueue.sql lost `-- name: {name}`");
    }
    // The backend's role set the cap and added the critical type.
    let (cap, critical): (Option<i32>, bool) = sqlx::query_as(
        "SELECT (SELECT max_per_window FROM notify.event_types WHERE name = 'weekly_digest'),
                (SELECT critical FROM notify.event_types WHERE name = 'payment_failed')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((cap, critical), (Some(20), true));
    let suppressed: Vec<(String, String, i64, i64, i64)> =
        sqlx::query_as(sqlx::AssertSqlSafe(q["suppressed_counts"].clone()))
            .fetch_all(&backend)
            .await
            .unwrap();
    assert_eq!(
        suppressed,
        vec![("45".into(), "status_change".into(), 0, 1, 0)]
    );
    let (_, outcome, _, _): (
        i64,
        Option<String>,
        Option<String>,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = sqlx::query_as(sqlx::AssertSqlSafe(q["event_status"].clone()))
        .fetch_one(&backend)
        .await
        .unwrap();
    assert_eq!(outcome.as_deref(), Some("stored"));
    let backlog: (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(q["backlog"].clone()))
        .fetch_one(&backend)
        .await
        .unwrap();
    assert_eq!(backlog, (0, 1));
    let prefs: Vec<(String, bool)> =
        sqlx::query_as(sqlx::AssertSqlSafe(q["list_preferences"].clone()))
            .fetch_all(&backend)
            .await
            .unwrap();
    assert!(
        prefs.contains(&("status_change".into(), false)),
        "{prefs:?}"
    );
    assert!(prefs.contains(&("new_message".into(), true)), "{prefs:?}");
    // An event that is only markup is refused by the worker; the documented query shows why.
    let bad = db
        .enqueue("46", "new_message", "<script>alert(1)</script>")
        .await;
    process(&db.pipeline(), &[bad]).await;
    let invalid = sqlx::query(sqlx::AssertSqlSafe(q["invalid_reasons"].clone()))
        .fetch_all(&backend)
        .await
        .unwrap();
    assert_eq!(invalid.len(), 1);
    assert_eq!(invalid[0].get::<i64, _>("id"), bad);
    assert!(
        invalid[0]
            .get::<String, _>("outcome_reason")
            .contains("no text left")
    );

    // Mark-read, exactly as in DESIGN.md and the README: only the user's own ids change.
    let mine: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM notify.notifications WHERE user_id = '42' ORDER BY id LIMIT 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let theirs: i64 = sqlx::query_scalar(
        "SELECT id FROM notify.notifications WHERE user_id = '43' ORDER BY id LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let ids: Vec<i64> = mine.iter().copied().chain([theirs]).collect();
    let r = sqlx::query(
        "UPDATE notify.notifications SET read_at = now() WHERE user_id = $1 AND id = ANY($2)",
    )
    .bind("42")
    .bind(&ids)
    .execute(&backend)
    .await
    .unwrap();
    assert_eq!(r.rows_affected(), 2);
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications WHERE read_at IS NOT NULL")
            .await,
        2
    );
    let r = sqlx::query(sqlx::AssertSqlSafe(q["mark_all_read"].clone()))
        .execute(&backend)
        .await
        .unwrap();
    assert!(r.rows_affected() > 0);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM notify.notifications WHERE user_id <> '42' AND read_at IS NOT NULL"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn the_json_examples_are_valid_events_one_per_seeded_type() {
    let db = TestDb::new().await;
    let columns: BTreeSet<&str> = [
        "user_id",
        "event_type",
        "body",
        "link",
        "idempotency_key",
        "run_at",
    ]
    .into();
    let mut types = BTreeSet::new();
    let mut examples = Vec::new();
    for entry in std::fs::read_dir(jobs_dir().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let obj = value.as_object().expect("an object of column values");
        for key in obj.keys() {
            assert!(
                columns.contains(key.as_str()),
                "{}: {key} is not a column the backend sets",
                path.display()
            );
        }
        let ty = obj["event_type"].as_str().unwrap().to_owned();
        assert_eq!(
            path.file_stem().unwrap().to_str().unwrap(),
            ty,
            "{} is named after its type",
            path.display()
        );
        types.insert(ty);
        examples.push(value);
    }
    // `digest` is the worker's own type: it cannot be enqueued.
    let seeded: BTreeSet<String> =
        sqlx::query_scalar("SELECT name FROM notify.event_types WHERE name <> 'digest'")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(types, seeded, "one example per seeded event type");

    let mut ids = Vec::new();
    for ex in &examples {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO notify.events (user_id, event_type, body, link, idempotency_key)
             SELECT r.user_id, r.event_type, r.body, r.link, r.idempotency_key
             FROM jsonb_populate_record(NULL::notify.events, $1) AS r
             RETURNING id",
        )
        .bind(ex)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("example {ex} refused: {e}"));
        ids.push(id);
    }
    let out = process(&db.pipeline(), &ids).await;
    for (ex, (id, o)) in examples.iter().zip(ids.iter().zip(&out)) {
        assert!(matches!(o, Outcome::Stored { .. }), "{ex}: {o:?}");
        let (body, link): (String, Option<String>) =
            sqlx::query_as("SELECT body, link FROM notify.notifications WHERE event_id = $1")
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            body,
            ex["body"].as_str().unwrap(),
            "examples are plain text"
        );
        assert_eq!(
            link.as_deref(),
            ex["link"].as_str(),
            "examples use normalised links"
        );
    }
}

/// Fail with the fix when python3 or psycopg 3 is missing, rather than with a traceback.
fn require_psycopg() {
    let ok = Command::new("python3")
        .args(["-c", "import psycopg"])
        .output()
        .map(|o| o.status.success());
    match ok {
        Ok(true) => {}
        Ok(false) => panic!(
            "python3 cannot import psycopg 3, which jobs/enqueue_example.py needs: \
             run  pip install \"psycopg[binary]\"  (scripts/test.sh does this for you)"
        ),
        Err(e) => panic!(
            "python3 is not available ({e}); install it, then  pip install \"psycopg[binary]\""
        ),
    }
}

fn run_python_example(url: &str) -> serde_json::Value {
    let out = run(
        Command::new("python3")
            .arg(jobs_dir().join("enqueue_example.py"))
            .env("DATABASE_URL", url),
        "python3 jobs/enqueue_example.py",
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!("the last line of the output is not the JSON summary ({e}):\n{stdout}")
    })
}

#[tokio::test]
async fn the_python_example_enqueues_in_the_business_transaction() {
    require_psycopg();
    let db = TestDb::new().await;
    let url = backend_url(&db).await;
    let summary = run_python_example(&url);
    assert_eq!(summary["failures"], serde_json::json!([]));

    let committed = &summary["committed"];
    let message_id = committed["message_id"].as_i64().unwrap();
    let event_id = committed["event_id"].as_i64().unwrap();
    let key = committed["idempotency_key"].as_str().unwrap();
    // The business row and its event were committed together.
    let (sender, recipient): (String, String) =
        sqlx::query_as("SELECT sender, recipient FROM public.demo_messages WHERE id = $1")
            .bind(message_id)
            .fetch_one(&db.pool)
            .await
            .expect("the committed business row exists");
    assert_eq!((sender.as_str(), recipient.as_str()), ("Alice", "42"));
    let (user, ty, body, link, ev_key): (String, String, String, Option<String>, Option<String>) =
        sqlx::query_as(
            "SELECT user_id, event_type, body, link, idempotency_key FROM notify.events WHERE id = $1",
        )
        .bind(event_id)
        .fetch_one(&db.pool)
        .await
        .expect("the committed event exists");
    assert_eq!(user, "42");
    assert_eq!(ty, "new_message");
    assert_eq!(body, "You have a new message from Alice");
    assert_eq!(link, Some(format!("/messages/{message_id}")));
    assert_eq!(ev_key.as_deref(), Some(key));
    // The retry was a no-op, and the rolled-back transaction left nothing: one event, one
    // job, one business row.
    assert_eq!(summary["retried_event_id"], serde_json::Value::Null);
    let rolled_back = &summary["rolled_back"];
    let rb_message = rolled_back["message_id"].as_i64().unwrap();
    let rb_key = rolled_back["idempotency_key"].as_str().unwrap();
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM public.demo_messages WHERE id = $1)
              + (SELECT count(*) FROM notify.events WHERE idempotency_key = $2 OR body LIKE '%Mallory%')",
    )
    .bind(rb_message)
    .bind(rb_key)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(leftovers, 0, "the rolled-back transaction left rows");
    assert_eq!(db.count("SELECT count(*) FROM notify.events").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM notify.queue").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM public.demo_messages").await,
        1
    );

    // The event is a good one.
    let out = process(&db.pipeline(), &[event_id]).await;
    assert!(matches!(out[0], Outcome::Stored { .. }), "{out:?}");

    // It can run again against the same database (the table already exists).
    let again = run_python_example(&url);
    assert_eq!(again["failures"], serde_json::json!([]));
    assert_ne!(again["committed"]["event_id"], committed["event_id"]);
    assert_eq!(db.count("SELECT count(*) FROM notify.events").await, 2);
}

/// The helpers work on a connection or a cursor (with any row factory), inside the caller's
/// transaction, and report bad input as the documented psycopg errors.
#[tokio::test]
async fn the_python_helpers_behave_as_documented() {
    require_psycopg();
    let db = TestDb::new().await;
    let script = r#"
import json, sys
import psycopg
from psycopg.rows import dict_row
sys.path.insert(0, sys.argv[1])
from enqueue_example import enqueue_notification, set_preference, mark_read

result = {}
with psycopg.connect(sys.argv[2], autocommit=True) as conn:
    cur = conn.cursor(row_factory=dict_row)
    with conn.transaction():
        result["cursor_id"] = enqueue_notification(cur, 42, "status_change", "Order #7 shipped", "/orders/7")
    with conn.transaction():
        result["first"] = enqueue_notification(conn, "42", "new_message", "Hi", idempotency_key="k1")
        result["repeat"] = enqueue_notification(conn, "42", "new_message", "Hi", idempotency_key="k1")
    try:
        with conn.transaction():
            enqueue_notification(conn, "42", "new_message", "rolled back", idempotency_key="k2")
            raise RuntimeError("business failure")
    except RuntimeError:
        pass
    errors = {}
    for name, args in {
        "type": ("42", "no_such_type", "x"),
        "body": ("42", "new_message", "   "),
        "user": ("4 2", "new_message", "x"),
        "link": ("42", "new_message", "x", "javascript:alert(1)"),
    }.items():
        try:
            with conn.transaction():
                enqueue_notification(conn, *args)
        except psycopg.errors.IntegrityError as e:
            errors[name] = [e.sqlstate, e.diag.constraint_name]
    result["errors"] = errors
    # A bad notification inside a savepoint does not lose the business write.
    with conn.transaction():
        conn.execute("CREATE TABLE IF NOT EXISTS biz (id int)")
        conn.execute("INSERT INTO biz VALUES (1)")
        try:
            with conn.transaction():
                enqueue_notification(conn, "42", "new_message", "")
        except psycopg.errors.CheckViolation:
            result["savepoint"] = "caught"
    set_preference(conn, 42, "system_alert", False)
    set_preference(conn, 42, "system_alert", True)
    set_preference(conn, 42, "status_change", False)
    result["marked"] = mark_read(conn, 42, [1, 2, 3])
print(json.dumps(result))
"#;
    let out = run(
        Command::new("python3")
            .args(["-c", script])
            .arg(jobs_dir())
            .arg(backend_url(&db).await),
        "python3 (helpers)",
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(r["cursor_id"].as_i64().is_some(), "{r}");
    assert!(r["first"].as_i64().is_some(), "{r}");
    assert_eq!(r["repeat"], serde_json::Value::Null);
    assert_eq!(
        r["errors"],
        serde_json::json!({
            "type": ["23503", "events_event_type_known"],
            "body": ["23514", "events_body_length"],
            "user": ["23514", "events_user_id_valid"],
            "link": ["23514", "events_link_safe"],
        })
    );
    assert_eq!(r["savepoint"], "caught");
    assert_eq!(r["marked"], 0, "nothing stored yet, nothing to mark");
    assert_eq!(db.count("SELECT count(*) FROM biz").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM notify.events").await, 2);
    assert_eq!(
        db.count("SELECT count(*) FROM notify.events WHERE idempotency_key = 'k2'")
            .await,
        0
    );
    let prefs: Vec<(String, bool)> = sqlx::query_as(
        "SELECT event_type, enabled FROM notify.preferences WHERE user_id = '42' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        prefs,
        vec![
            ("status_change".to_owned(), false),
            ("system_alert".to_owned(), true)
        ]
    );
    // The preference applies to the queued status change.
    let id = r["cursor_id"].as_i64().unwrap();
    let out = process(&db.pipeline(), &[id]).await;
    assert_eq!(out, vec![Outcome::OptedOut]);
}

/// The README documents every constraint a bad INSERT can meet, by name, and quotes the
/// public statements from DESIGN.md exactly.
#[tokio::test]
async fn the_readme_names_every_constraint() {
    let db = TestDb::new().await;
    let readme = read(&jobs_dir().join("README.md"));
    let constraints: Vec<String> = sqlx::query_scalar(
        "SELECT c.conname FROM pg_constraint AS c
         JOIN pg_class AS t ON t.oid = c.conrelid
         JOIN pg_namespace AS n ON n.oid = t.relnamespace
         WHERE (n.nspname = 'notify' AND t.relname IN ('events', 'event_types'))
            OR c.conname LIKE 'notifyd\\_%'
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(constraints.len() >= 8, "{constraints:?}");
    for c in &constraints {
        if c.ends_with("_pkey") {
            continue;
        }
        assert!(
            readme.contains(c.as_str()),
            "jobs/README.md does not mention {c}"
        );
    }
    for statement in [
        "UPDATE notify.notifications SET read_at = now() WHERE user_id = $1 AND id = ANY($2);",
        "ON CONFLICT (user_id, event_type)\nDO UPDATE SET enabled = EXCLUDED.enabled, updated_at = now();",
        "ON CONFLICT (idempotency_key) DO NOTHING",
    ] {
        assert!(
            readme.contains(statement),
            "jobs/README.md lost {statement:?}"
        );
    }
    // Every limit in the README matches the migrations.
    for fact in [
        "1 to 128 characters",
        "1 to 1000 characters",
        "2048 characters",
        "1 to 255 characters",
    ] {
        assert!(readme.contains(fact), "jobs/README.md lost {fact:?}");
    }
}
