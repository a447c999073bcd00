//! Least-privilege roles (`notifyd grants`) and a managed Postgres (a database owner that
//! is no superuser): what each role may do, that every forbidden write fails, that the
//! worker runs as its role and serve as the reader, that serve refuses a writable role,
//! and that every command works for a non-superuser owner.

mod common;
#[path = "faults/support.rs"]
mod support;

use std::time::Duration;

use common::TestDb;
use sqlx::PgPool;
use support::*;

async fn pool_for(url: &str) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("connect as the role")
}

/// Every statement must fail with a permission error.
async fn assert_refused(pool: &PgPool, role: &str, statements: &[&str]) {
    for sql in statements {
        let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(pool)
            .await;
        match r {
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("permission denied") || text.contains("must be owner"),
                    "{role}: `{sql}` failed, but not for want of privilege: {text}"
                );
            }
            Ok(_) => panic!("{role} may run `{sql}`, which it must not"),
        }
    }
}

async fn assert_allowed(pool: &PgPool, role: &str, statements: &[&str]) {
    for sql in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{role}: `{sql}` failed: {e}"));
    }
}

/// The three roles' privileges on notifyd's tables, columns and schemas, as text.
async fn privileges(db: &TestDb, roles: &common::Roles) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT grantee || ' ' || privilege_type || ' ' || table_schema || '.' || table_name
         FROM information_schema.role_table_grants
         WHERE grantee = ANY($1) AND table_schema IN ('notify', 'apalis')
         UNION ALL
         SELECT grantee || ' ' || privilege_type || ' ' || table_schema || '.' || table_name
                || '.' || column_name
         FROM information_schema.column_privileges
         WHERE grantee = ANY($1) AND table_schema IN ('notify', 'apalis')
           AND (grantee, table_schema, table_name, privilege_type) NOT IN (
               SELECT grantee, table_schema, table_name, privilege_type
               FROM information_schema.role_table_grants)
         UNION ALL
         SELECT r.rolname || ' ' || p.privilege_type || ' schema ' || n.nspname
         FROM pg_namespace AS n, aclexplode(n.nspacl) AS p JOIN pg_roles AS r ON r.oid = p.grantee
         WHERE n.nspname IN ('notify', 'apalis') AND r.rolname = ANY($1)
         ORDER BY 1",
    )
    .bind(vec![
        roles.backend.clone(),
        roles.worker.clone(),
        roles.reader.clone(),
    ])
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn grants_are_idempotent_and_exactly_the_list() {
    let db = TestDb::new().await;
    let roles = db.grant_roles().await;
    let first = privileges(&db, &roles).await;
    assert!(
        first.contains(&format!(
            "{} UPDATE notify.notifications.read_at",
            roles.backend
        )),
        "{first:#?}"
    );
    // A hand-made grant (too much) is taken back by the next run; the rest is unchanged.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT DELETE ON notify.notifications TO {r}; GRANT USAGE ON SCHEMA apalis TO {r}",
        r = roles.reader
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    assert_ne!(privileges(&db, &roles).await, first);
    let again = db.grant_roles().await;
    assert_eq!(privileges(&db, &again).await, first);
    // The reader reads two tables and writes nothing.
    let reader: Vec<&String> = first
        .iter()
        .filter(|p| p.starts_with(&format!("{} ", roles.reader)))
        .collect();
    assert_eq!(
        reader,
        vec![
            &format!("{} SELECT notify.notification_horizons", roles.reader),
            &format!("{} SELECT notify.notifications", roles.reader),
            &format!("{} USAGE schema notify", roles.reader),
        ]
    );
    // A bad name is refused before anything is granted.
    let e = notifyd::roles::run_grants(
        &db.pool,
        &notifyd::roles::GrantsArgs {
            backend_role: "Robert'); DROP TABLE x;--".into(),
            worker_role: roles.worker.clone(),
            reader_role: roles.reader.clone(),
        },
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("NOTIFYD_BACKEND_ROLE"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forbidden_write_fails_and_every_needed_one_works() {
    let db = TestDb::new().await;
    let roles = db.grant_roles().await;
    let backend = pool_for(&db.login_as(&roles.backend).await).await;
    let worker = pool_for(&db.login_as(&roles.worker).await).await;
    let reader = pool_for(&db.login_as(&roles.reader).await).await;

    // The backend: the public contract (the enqueue trigger writes the queue as owner).
    assert_allowed(
        &backend,
        "backend",
        &[
            "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
             VALUES ('42', 'new_message', 'hello', 'k1')",
            "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
             VALUES ('42', 'new_message', 'hello', 'k1')",
            "INSERT INTO notify.preferences (user_id, event_type, enabled)
             VALUES ('42', 'status_change', false)
             ON CONFLICT (user_id, event_type) DO UPDATE SET enabled = EXCLUDED.enabled",
            "DELETE FROM notify.preferences WHERE user_id = '42'",
            "UPDATE notify.notifications SET read_at = now() WHERE user_id = '42'",
            "SELECT count(*) FROM notify.event_outcomes",
            "INSERT INTO notify.event_types (name) VALUES ('weekly_digest')",
            // Caps and critical types: one UPDATE each (jobs/README.md).
            "UPDATE notify.event_types SET max_per_window = 50 WHERE name = 'status_change'",
            "UPDATE notify.event_types SET critical = true, max_per_window = 5
             WHERE name = 'weekly_digest'",
            // The ORM view: a repeat of key k1 through it answers with the original row.
            "INSERT INTO notify.new_events (user_id, event_type, body, idempotency_key)
             VALUES ('42', 'new_message', 'hello', 'k1') RETURNING id",
        ],
    )
    .await;
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM notify.queue").await,
        1,
        "one job for one event (the repeated key added none)"
    );
    assert_refused(
        &backend,
        "backend",
        &[
            "SELECT 1 FROM apalis.jobs",
            "SELECT 1 FROM notify.queue",
            "SELECT 1 FROM notify.queue_0",
            "INSERT INTO notify.queue_0 (event_id, run_at) VALUES (1, now())",
            "INSERT INTO notify.queue_later (event_id, run_at) VALUES (1, now())",
            "DELETE FROM notify.queue_dead",
            "UPDATE notify.queue_slots SET state = 'clean'",
            "SELECT * FROM notify.claim_jobs(10)",
            "DELETE FROM notify.notifications",
            "UPDATE notify.notifications SET body = 'x'",
            "INSERT INTO notify.notifications (user_id, event_id, event_type, body, created_at)
             VALUES ('42', 1, 'new_message', 'forged', now())",
            "UPDATE notify.events SET outcome = 'stored'",
            "DELETE FROM notify.events",
            "TRUNCATE notify.events",
            "UPDATE notify.queue_settings SET max_attempts = 1",
            "DELETE FROM notify.event_types",
            "UPDATE notify.event_types SET name = 'renamed' WHERE name = 'system_alert'",
            "SELECT 1 FROM notify.rate_windows",
            "SELECT 1 FROM notify.digest_pending",
        ],
    )
    .await;

    // The worker: what the pipeline needs, through notifyd's own code paths.
    let p = common::Runner::new(worker.clone(), Default::default());
    let id: i64 = sqlx::query_scalar("SELECT id FROM notify.events LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let out = common::process(&p, &[id]).await;
    assert!(
        matches!(out[0], notifyd::pipeline::Outcome::Stored { .. }),
        "{out:?}"
    );
    // Held back and digested, as the worker role: the store counts, the sweep sends.
    let held: i64 = sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body)
         VALUES ('77', 'new_message', 'one too many') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut limited = common::Runner::new(
        worker.clone(),
        notifyd::store::RateLimit {
            limit: 1,
            window: Duration::from_secs(3600),
        },
    );
    // Two hours ago (the window has room again by now), so the sweep runs on the clock.
    limited.now = Some(chrono::Utc::now() - chrono::Duration::hours(2));
    let two = common::process(&limited, &[held, held_2(&db).await]).await;
    assert_eq!(two[1].label(), "rate_limited", "{two:?}");
    let sent = notifyd::digest::run_once(&worker, limited.rate, None)
        .await
        .expect("the digest sweep as the worker role");
    assert_eq!(sent.digests, 1);
    notifyd::cleanup::run_once(
        &worker,
        notifyd::cleanup::Retention {
            keep: Duration::ZERO,
            batch: 100,
        },
    )
    .await
    .expect("retention as the worker role");
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM notify.notifications").await,
        0
    );
    // The rotation as the worker role: a slot period elapsed, slot 0 (now empty) drains,
    // and on the next tick it is seen empty and truncated (TRUNCATE on the slot tables).
    sqlx::query("UPDATE notify.queue_slots SET changed_at = now() - interval '1 hour'")
        .execute(&db.pool)
        .await
        .unwrap();
    let t1 = notifyd::claim::rotation::tick(&worker)
        .await
        .expect("a tick as the worker");
    assert_eq!(t1.rotated_to, Some(1), "{t1:?}");
    let t2 = notifyd::claim::rotation::tick(&worker)
        .await
        .expect("a tick as the worker");
    assert_eq!(t2.truncated, 1, "{t2:?}");
    // Not the tables' owner: the vacuum safety net skips them (and says so), no error.
    let vacuumed = notifyd::cleanup::vacuum_if_needed(&worker, 0)
        .await
        .unwrap();
    assert!(vacuumed.is_empty(), "{vacuumed:?}");
    assert_refused(
        &worker,
        "worker",
        &[
            "INSERT INTO notify.events (user_id, event_type, body) VALUES ('1', 'new_message', 'x')",
            "UPDATE notify.events SET body = 'x'",
            "UPDATE notify.notifications SET body = 'x'",
            "INSERT INTO notify.preferences (user_id, event_type, enabled) VALUES ('1', 'new_message', false)",
            "UPDATE notify.preferences SET enabled = true",
            "UPDATE notify.queue_settings SET max_attempts = 1",
            "INSERT INTO notify.event_types (name) VALUES ('x')",
            "SELECT 1 FROM apalis.jobs",
            "INSERT INTO apalis.jobs (job, id, job_type) VALUES ('\\x7b7d', '01ARZ3NDEKTSV4RRFFQ69G5FAV', 'x')",
            "TRUNCATE apalis.jobs",
            "TRUNCATE notify.queue_later",
            "TRUNCATE notify.queue_dead",
            "INSERT INTO notify.queue_slots (slot, state) VALUES (3, 'clean')",
            "DELETE FROM notify.queue_slots",
            "UPDATE notify.queue_settings SET slot_secs = 1",
            "ALTER TABLE notify.queue_0 ADD COLUMN x int",
            "TRUNCATE notify.notifications",
            "DROP TABLE notify.rate_windows",
            "CREATE TABLE notify.extra (x int)",
        ],
    )
    .await;

    // The reader: SELECT on what serve reads, and nothing else.
    assert_allowed(
        &reader,
        "reader",
        &[
            "SELECT id, event_type, body, link, created_at, read_at FROM notify.notifications",
            "SELECT deleted_through FROM notify.notification_horizons",
            "LISTEN notifyd_notifications",
        ],
    )
    .await;
    assert_refused(
        &reader,
        "reader",
        &[
            "INSERT INTO notify.notifications (user_id, event_id, event_type, body, created_at)
             VALUES ('42', 1, 'new_message', 'forged', now())",
            "UPDATE notify.notifications SET read_at = now()",
            "DELETE FROM notify.notifications",
            "DELETE FROM notify.notification_horizons",
            "INSERT INTO notify.events (user_id, event_type, body) VALUES ('1', 'new_message', 'x')",
            "SELECT 1 FROM notify.events",
            "SELECT 1 FROM notify.preferences",
            "SELECT 1 FROM apalis.jobs",
            "SELECT 1 FROM notify.queue",
            "SELECT 1 FROM notify.queue_0",
            "SELECT 1 FROM notify.queue_dead",
            "TRUNCATE notify.notifications",
        ],
    )
    .await;
    let access = notifyd::roles::write_access(&reader).await.unwrap();
    assert!(access.is_read_only(), "{access:?}");
    let access = notifyd::roles::write_access(&worker).await.unwrap();
    assert!(
        access.writable.contains(&"notify.notifications".to_owned()),
        "{access:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_as_its_role_and_serve_only_as_a_read_only_one() {
    let db = TestDb::new().await;
    let roles = db.grant_roles().await;
    let backend = pool_for(&db.login_as(&roles.backend).await).await;
    let worker_url = db.login_as(&roles.worker).await;
    let reader_url = db.login_as(&roles.reader).await;

    enqueue(&backend, "roles", 200, 5).await;
    let mut worker = Proc::worker(
        &worker_url,
        "role-w",
        &[("NOTIFYD_CLEANUP_INTERVAL_SECS", "1".into())],
    );
    wait_drained(&db.pool, 1000, Duration::from_secs(120), &mut [&mut worker]).await;
    assert_exactly_once(&delivery(&db.pool).await, 1000);
    assert!(
        !worker.log_text().contains("permission denied"),
        "{}",
        worker.log_tail()
    );

    // The reader starts without any flag and serves.
    let deny = [("NOTIFYD_ALLOW_WRITABLE_ROLE", "0".to_owned())];
    let mut serve = Proc::serve(&reader_url, "role-serve", &deny);
    serve.wait_listening(Duration::from_secs(20)).await;
    let token = {
        let (code, out, err) = run_cli(&reader_url, &["token", "--sub", "user-3"]);
        assert_eq!(code, 0, "{err}");
        out.trim().to_owned()
    };
    assert_eq!(
        serve.http_status("/api/notifications", Some(&token)).await,
        Some(200)
    );
    assert_eq!(serve.http_status("/readyz", None).await, Some(200));

    // A role that can write is refused, naming the role and what it could write.
    for (url, role, what) in [
        (db.url.as_str(), "postgres", "superuser"),
        (worker_url.as_str(), "worker", "notify.notifications"),
    ] {
        let mut refused = Proc::serve(url, "role-refused", &deny);
        let status = refused.wait_exit(Duration::from_secs(20)).await;
        assert!(
            status.is_some_and(|s| !s.success()),
            "serve as the {role} role did not refuse to start:\n{}",
            refused.log_text()
        );
        let log = refused.log_text();
        assert!(
            log.contains(what) && log.contains("NOTIFYD_ALLOW_WRITABLE_ROLE"),
            "{log}"
        );
    }
    // With the explicit flag it starts, warning.
    let mut allowed = Proc::serve(&db.url, "role-allowed", &[]);
    allowed.wait_listening(Duration::from_secs(20)).await;
    assert!(
        allowed.log_text().contains("CAN WRITE"),
        "{}",
        allowed.log_text()
    );
}

/// A managed server: the database's owner has CREATEROLE but no superuser, and every
/// command runs as it.
struct Managed {
    name: String,
    owner: String,
    url: String,
}

impl Managed {
    async fn new() -> Managed {
        let name = format!(
            "notifyd_managed_{}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let owner = format!("{name}_owner");
        let mut admin = sqlx::PgConnection::connect(&common::server_url())
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {owner} LOGIN CREATEROLE NOSUPERUSER NOCREATEDB"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name} OWNER {owner}"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        let mut url = url::Url::parse(&common::url_for(&name)).unwrap();
        url.set_username(&owner).unwrap();
        url.set_password(None).unwrap();
        Managed {
            name,
            owner,
            url: url.to_string(),
        }
    }
}

use sqlx::Connection;

impl Drop for Managed {
    fn drop(&mut self) {
        let (name, owner) = (self.name.clone(), self.owner.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(mut admin) = sqlx::PgConnection::connect(&common::server_url()).await else {
                    return;
                };
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await;
                let roles: Vec<String> = sqlx::query_scalar(
                    "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)",
                )
                .bind(format!("{name}_"))
                .fetch_all(&mut admin)
                .await
                .unwrap_or_default();
                for role in roles.iter().filter(|r| **r != owner) {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
                        .execute(&mut admin)
                        .await;
                }
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE {owner}")))
                    .execute(&mut admin)
                    .await;
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_for_a_database_owner_that_is_not_a_superuser() {
    let m = Managed::new().await;
    let (code, _, err) = run_cli(&m.url, &["migrate"]);
    assert_eq!(code, 0, "migrate as a non-superuser owner: {err}");
    let (code, _, err) = run_cli(&m.url, &["migrate"]);
    assert_eq!(code, 0, "migrate again: {err}");
    let owner_pool = pool_for(&m.url).await;
    // hstore (apalis's metadata column) is a trusted extension: the owner may create it.
    assert_eq!(
        scalar(
            &owner_pool,
            "SELECT count(*) FROM pg_extension WHERE extname = 'hstore'"
        )
        .await,
        1
    );
    let names = [
        format!("{}_backend", m.name),
        format!("{}_worker", m.name),
        format!("{}_reader", m.name),
    ];
    let grants = [
        "grants",
        "--backend-role",
        &names[0],
        "--worker-role",
        &names[1],
        "--reader-role",
        &names[2],
    ];
    let (code, out, err) = run_cli(&m.url, &grants);
    assert_eq!(code, 0, "grants as the owner (CREATEROLE): {err}");
    assert!(out.contains("granted"), "{out}");
    let (code, _, err) = run_cli(&m.url, &grants);
    assert_eq!(code, 0, "grants again: {err}");

    enqueue(&owner_pool, "managed", 100, 3).await;
    let mut worker = Proc::worker(&m.url, "managed-w", &[]);
    wait_drained(
        &owner_pool,
        300,
        Duration::from_secs(120),
        &mut [&mut worker],
    )
    .await;
    assert_exactly_once(&delivery(&owner_pool).await, 300);
    drop(worker);
    for args in [
        &["status"][..],
        &["jobs", "stats"][..],
        &["jobs", "settings"][..],
        &["cleanup"][..],
    ] {
        let (code, out, err) = run_cli(&m.url, args);
        assert_eq!(code, 0, "notifyd {args:?} as the owner: {out}{err}");
    }
    let mut serve = Proc::serve(&m.url, "managed-serve", &[]);
    serve.wait_listening(Duration::from_secs(20)).await;
    assert_eq!(serve.http_status("/readyz", None).await, Some(200));
    // The vacuum safety net runs for the owner (it owns the tables).
    notifyd::cleanup::vacuum_if_needed(&owner_pool, 0)
        .await
        .expect("the owner may vacuum");

    // Without CREATEROLE, grants says which role to create and grants nothing.
    let mut admin = sqlx::PgConnection::connect(&common::server_url())
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {} NOCREATEROLE",
        m.owner
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let missing = format!("{}_other", m.name);
    let (code, _, err) = run_cli(
        &m.url,
        &[
            "grants",
            "--backend-role",
            &names[0],
            "--worker-role",
            &names[1],
            "--reader-role",
            &missing,
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains(&missing) && err.contains("CREATEROLE") && err.contains("CREATE ROLE"),
        "{err}"
    );
}

/// One more event for user 77, enqueued as the owner.
async fn held_2(db: &common::TestDb) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body)
         VALUES ('77', 'status_change', 'two too many') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}
