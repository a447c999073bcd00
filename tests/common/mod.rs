//! Test harness: a fresh, migrated database per test, cloned from a template that is
//! migrated once per migration set, so tests run in parallel and in any order.
//!
//! The server comes from `NOTIFYD_TEST_DATABASE_URL` or `DATABASE_URL` (any database on
//! it; the role needs CREATEDB). `scripts/test.sh` sets it up.

#![allow(dead_code)]

use std::hash::{Hash, Hasher};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

use notifyd::claim::Processor;
use notifyd::claim::backend::{ClaimedBatch, ClaimedJob, claim_events};
use notifyd::claim::maintenance;
use notifyd::pipeline::{Outcome, Pipeline};
use notifyd::store::RateLimit;

pub fn server_url() -> String {
    std::env::var("NOTIFYD_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .expect("set NOTIFYD_TEST_DATABASE_URL or DATABASE_URL (scripts/test.sh does)")
}

/// The same server, another database.
pub fn url_for(db: &str) -> String {
    let mut url = url::Url::parse(&server_url()).expect("database URL parses");
    url.set_path(&format!("/{db}"));
    url.to_string()
}

fn template_name() -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for m in notifyd::db::migrator().iter() {
        m.version.hash(&mut h);
        m.checksum.hash(&mut h);
    }
    format!("notifyd_tpl_{:016x}", h.finish())
}

async fn admin() -> PgConnection {
    PgConnection::connect(&server_url())
        .await
        .expect("connect to the test server")
}

async fn ensure_template(admin: &mut PgConnection, name: &str) {
    // Serialise template creation across parallel test processes.
    sqlx::query("SELECT pg_advisory_lock(7301)")
        .execute(&mut *admin)
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut *admin)
            .await
            .unwrap();
    if !exists {
        let building = format!("{name}_building");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {building} WITH (FORCE)"
        )))
        .execute(&mut *admin)
        .await
        .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {building}")))
            .execute(&mut *admin)
            .await
            .unwrap();
        let pool = PgPool::connect(&url_for(&building)).await.unwrap();
        notifyd::db::migrate(&pool).await.expect("migrations apply");
        pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {building} RENAME TO {name}"
        )))
        .execute(&mut *admin)
        .await
        .unwrap();
    }
    sqlx::query("SELECT pg_advisory_unlock(7301)")
        .execute(&mut *admin)
        .await
        .unwrap();
}

/// A fresh migrated database, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let template = template_name();
        let mut admin = admin().await;
        ensure_template(&mut admin, &template).await;
        let name = format!(
            "notifyd_test_{}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let mut tries = 0;
        loop {
            let r = sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {name} TEMPLATE {template}"
            )))
            .execute(&mut admin)
            .await;
            match r {
                Ok(_) => break,
                // "source database is being accessed by other users": another clone is
                // in progress; try again shortly.
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot create test database: {e}"),
            }
        }
        let _ = admin.close().await;
        let url = url_for(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await
            .expect("connect to the test database");
        TestDb { name, url, pool }
    }

    /// A runner with the default rate limit.
    pub fn pipeline(&self) -> Runner {
        Runner::new(self.pool.clone(), RateLimit::default())
    }

    /// Enqueue one event with plain SQL, as the backend does; returns its id.
    pub async fn enqueue(&self, user: &str, event_type: &str, body: &str) -> i64 {
        sqlx::query_scalar(
            "INSERT INTO notify.events (user_id, event_type, body) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(user)
        .bind(event_type)
        .bind(body)
        .fetch_one(&self.pool)
        .await
        .expect("enqueue")
    }

    /// Count rows of a query returning one bigint.
    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// Jobs of our queue that still have work to do (due or not, retries included), and
    /// committed events the intake has not taken in yet.
    pub async fn live_jobs(&self) -> i64 {
        self.count(
            "SELECT (SELECT count(*) FROM notify.queue) + (SELECT waiting FROM notify.intake_backlog())",
        )
        .await
    }

    /// Poll (not sleep for a guessed time) until the queue has no live job, or panic
    /// after `limit`.
    pub async fn wait_until_drained(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if self.live_jobs().await == 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "queue not drained after {limit:?}: {} live jobs",
                self.live_jobs().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The three roles of `notifyd grants` for one test database (roles are cluster-wide, so
/// their names carry the database's), with a login role in each.
pub struct Roles {
    pub backend: String,
    pub worker: String,
    pub reader: String,
}

impl TestDb {
    /// Run `notifyd grants` (in process, as the owner) with this database's role names.
    pub async fn grant_roles(&self) -> Roles {
        let roles = Roles {
            backend: format!("{}_backend", self.name),
            worker: format!("{}_worker", self.name),
            reader: format!("{}_reader", self.name),
        };
        notifyd::roles::run_grants(
            &self.pool,
            &notifyd::roles::GrantsArgs {
                backend_role: roles.backend.clone(),
                worker_role: roles.worker.clone(),
                reader_role: roles.reader.clone(),
            },
        )
        .await
        .expect("grants");
        roles
    }

    /// A LOGIN role `{group}_login` that is a member of `group` (created once), and the URL
    /// of this database for it.
    pub async fn login_as(&self, group: &str) -> String {
        let login = format!("{group}_login");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{login}') THEN
                     CREATE ROLE {login} LOGIN IN ROLE {group};
                 END IF;
             END $$"
        )))
        .execute(&self.pool)
        .await
        .expect("create the login role");
        let mut url = url::Url::parse(&self.url).expect("database URL parses");
        url.set_username(&login).expect("a user name fits the URL");
        url.set_password(None).expect("no password");
        url.to_string()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop the database from a separate thread with its own runtime (Drop cannot
        // await). FORCE ends this test's connections; the pool belongs to the test's
        // runtime, which is blocked here, so it must not be closed from this thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&server_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                    // The roles of `grant_roles` and `login_as` (their privileges went
                    // with the database).
                    let roles: Vec<String> = sqlx::query_scalar(
                        "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)
                         ORDER BY length(rolname) DESC",
                    )
                    .bind(format!("{name}_"))
                    .fetch_all(&mut admin)
                    .await
                    .unwrap_or_default();
                    for role in roles {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
                            .execute(&mut admin)
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

/// Processes chosen events the way the worker does: their queue rows are locked in a
/// transaction and handed to the worker's own [`Processor`] as one claimed batch, which
/// runs the pipeline, settles and commits. (The worker's claim takes whatever is due; a
/// test names its events, and may process them at an injected `now`.) Derefs to the
/// [`Pipeline`] settings (`rate`, `now`).
#[derive(Clone)]
pub struct Runner {
    pub pool: PgPool,
    pipeline: Pipeline,
}

impl Runner {
    pub fn new(pool: PgPool, rate: RateLimit) -> Self {
        Runner {
            pool,
            pipeline: Pipeline::new(rate),
        }
    }
}

impl std::ops::Deref for Runner {
    type Target = Pipeline;
    fn deref(&self) -> &Pipeline {
        &self.pipeline
    }
}

impl std::ops::DerefMut for Runner {
    fn deref_mut(&mut self) -> &mut Pipeline {
        &mut self.pipeline
    }
}

/// Run events through the worker's processing as one batch, in the order given. Each
/// event's queue row is claimed when it is there and not locked (`SKIP LOCKED`, like the
/// worker's claim); an event named twice, or whose row is gone or held by another
/// transaction, gets a stand-in job for the same event (one that points at no queue row),
/// as a second queue row for the same event would be: a job that runs twice.
pub async fn process(r: &Runner, ids: &[i64]) -> Vec<Outcome> {
    maintenance::register(&r.pool, "test-runner")
        .await
        .expect("register the test runner");
    let mut tx = r.pool.begin().await.expect("begin");
    let mut queued: std::collections::HashMap<i64, ClaimedJob> = claim_events(&mut tx, ids)
        .await
        .expect("lock the events' jobs")
        .into_iter()
        .map(|j| (j.event_id, j))
        .collect();
    let now = chrono::Utc::now().timestamp_micros();
    let jobs = ids
        .iter()
        .map(|event| {
            queued.remove(event).unwrap_or(ClaimedJob {
                slot: 0,
                tid: "(0,0)".to_owned(),
                event_id: *event,
                due_us: now,
                attempts: 0,
                priority: 0,
            })
        })
        .collect();
    let processor = Processor::new(r.pool.clone(), r.pipeline.clone(), "test-runner");
    processor
        .process(ClaimedBatch::new(tx, jobs))
        .await
        .expect("the batch commits")
        .into_iter()
        .map(|a| a.expect("no job is refused"))
        .collect()
}

/// A worker [`Processor`] on `pool` under the registered instance name `name`, for tests
/// that drive the worker's own claim ([`Processor::run_once`]) to an empty queue.
pub async fn processor(pool: &PgPool, rate: RateLimit, name: &str) -> Processor {
    maintenance::register(pool, name)
        .await
        .expect("register the worker instance");
    Processor::new(pool.clone(), Pipeline::new(rate), name)
}
