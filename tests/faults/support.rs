//! Process-level helpers for the fault-injection tests: spawn the real `notifyd` binary,
//! signal it, read its metrics, poll the database for conditions (never sleep for a guessed
//! time), and check the delivery invariants.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sqlx::PgPool;

pub const BIN: &str = env!("CARGO_BIN_EXE_notifyd");

/// Short liveness settings: a worker silent for 3 s shows as gone in `notifyd status`.
pub const HEARTBEAT_SECS: u64 = 1;
pub const MISSED_HEARTBEATS: u64 = 3;

pub const JWT_SECRET: &str = "faults-test-secret-0123456789abcdef0123456789";

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults-logs");
    std::fs::create_dir_all(&dir).expect("log dir");
    dir
}

/// A running `notifyd` process. Killed (SIGKILL) when dropped, so no test leaves one behind.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    pub metrics_port: Option<u16>,
    pub http_port: Option<u16>,
    exited: Option<ExitStatus>,
}

impl Proc {
    fn spawn(
        name: &str,
        args: &[&str],
        database_url: &str,
        env: &[(&str, String)],
        metrics_port: Option<u16>,
        http_port: Option<u16>,
    ) -> Proc {
        let log = log_dir().join(format!(
            "{name}-{}-{:04x}.log",
            std::process::id(),
            fastrand::u16(..)
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "info,sqlx=warn")
            .env("NOTIFYD_LOG_FORMAT", "human")
            .env_remove("PORT")
            .env_remove("NOTIFYD_LISTEN")
            .env_remove("NOTIFYD_METRICS_LISTEN")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        if let Some(port) = metrics_port {
            cmd.env("NOTIFYD_METRICS_LISTEN", format!("127.0.0.1:{port}"));
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn notifyd");
        Proc {
            name: name.to_owned(),
            child,
            log,
            metrics_port,
            http_port,
            exited: None,
        }
    }

    /// `notifyd worker` named `name` (its apalis instances are `name-0`, `name-1`, ...), with
    /// short heartbeats, no cleanup loop (finished rows stay, for inspection) and a metrics
    /// listener. `env` overrides any of it.
    pub fn worker(database_url: &str, name: &str, env: &[(&str, String)]) -> Proc {
        let mut all: Vec<(&str, String)> = vec![
            ("NOTIFYD_WORKER_NAME", name.to_owned()),
            ("NOTIFYD_HEARTBEAT_SECS", HEARTBEAT_SECS.to_string()),
            ("NOTIFYD_MISSED_HEARTBEATS", MISSED_HEARTBEATS.to_string()),
            ("NOTIFYD_POLL_INTERVAL_MS", "10".into()),
            ("NOTIFYD_CLEANUP_INTERVAL_SECS", "0".into()),
            ("NOTIFYD_QUEUE_METRICS_SECS", "1".into()),
            ("NOTIFYD_FETCH_BATCH", "200".into()),
            ("NOTIFYD_DB_POOL", "6".into()),
        ];
        all.extend(env.iter().cloned());
        Proc::spawn(
            name,
            &["worker"],
            database_url,
            &all,
            Some(free_port()),
            None,
        )
    }

    /// `notifyd serve` on a free port.
    pub fn serve(database_url: &str, name: &str, env: &[(&str, String)]) -> Proc {
        let port = free_port();
        let mut all: Vec<(&str, String)> = vec![
            ("NOTIFYD_LISTEN", format!("127.0.0.1:{port}")),
            ("NOTIFYD_JWT_SECRET", JWT_SECRET.to_owned()),
            ("NOTIFYD_USER_REQUESTS_PER_MINUTE", "100000".into()),
            // The suite's role is the server's superuser (tests/roles.rs runs serve as
            // the reader role).
            ("NOTIFYD_ALLOW_WRITABLE_ROLE", "1".into()),
        ];
        all.extend(env.iter().cloned());
        Proc::spawn(name, &["serve"], database_url, &all, None, Some(port))
    }

    /// `serve` with its Prometheus listener on a port of its own.
    pub fn serve_with_metrics(database_url: &str, name: &str) -> Proc {
        let port = free_port();
        let env = vec![
            ("NOTIFYD_LISTEN", format!("127.0.0.1:{port}")),
            ("NOTIFYD_JWT_SECRET", JWT_SECRET.to_owned()),
            ("NOTIFYD_ALLOW_WRITABLE_ROLE", "1".into()),
        ];
        Proc::spawn(
            name,
            &["serve"],
            database_url,
            &env,
            Some(free_port()),
            Some(port),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {} ({}) failed", self.pid(), self.name);
    }

    /// `kill -9`, and reap it.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        self.exited = Some(self.child.wait().expect("reap"));
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn sigstop(&self) {
        self.signal("STOP");
    }

    pub fn sigcont(&self) {
        self.signal("CONT");
    }

    /// Still running (not exited).
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait().expect("try_wait") {
            Some(status) => {
                self.exited = Some(status);
                false
            }
            None => true,
        }
    }

    /// Wait for the process to exit, at most `limit`. Polls; never sleeps a guessed time.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if !self.is_running() {
                return self.exited;
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- {} ({}), last lines:\n{}",
            self.name,
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// The `/metrics` text, or `None` if the listener does not answer.
    pub async fn metrics_text(&self) -> Option<String> {
        let port = self.metrics_port?;
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    }

    /// One sample from `/metrics`: `series` is the name with its labels exactly as
    /// rendered, e.g. `notifyd_events_total{outcome="stored"}`. 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await.unwrap_or_default();
        sample(&text, series)
    }

    /// Wait until the process answers on its metrics (worker) or HTTP (serve) port.
    pub async fn wait_listening(&mut self, limit: Duration) {
        let port = self.http_port.or(self.metrics_port).expect("a port");
        let path = if self.http_port.is_some() {
            "/healthz"
        } else {
            "/metrics"
        };
        let deadline = Instant::now() + limit;
        loop {
            let ok = reqwest::Client::new()
                .get(format!("http://127.0.0.1:{port}{path}"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(
                self.is_running(),
                "{} exited at start\n{}",
                self.name,
                self.log_tail()
            );
            assert!(
                Instant::now() < deadline,
                "{} never listened\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` on the read service; the status code, or `None` if it does not answer.
    pub async fn http_status(&self, path: &str, token: Option<&str>) -> Option<u16> {
        let port = self.http_port?;
        let mut req = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .timeout(Duration::from_secs(3));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.ok().map(|r| r.status().as_u16())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A sample's value in a Prometheus text exposition (0 when absent).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Run `notifyd <args>` to completion; (exit code, stdout, stderr).
pub fn run_cli(database_url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .env("NOTIFYD_JWT_SECRET", JWT_SECRET)
        .env("NOTIFYD_HEARTBEAT_SECS", HEARTBEAT_SECS.to_string())
        .env("NOTIFYD_MISSED_HEARTBEATS", MISSED_HEARTBEATS.to_string())
        .output()
        .expect("run notifyd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Poll `check` every 10 ms until it returns `Some`, or panic after `limit` with `what`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Insert `users × per_user` events in one statement, bodies unique per test
/// (`{tag}-{user}-{k}`), users `user-0..`.
pub async fn enqueue(pool: &PgPool, tag: &str, users: i64, per_user: i64) {
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body)
         SELECT 'user-' || (g % $2), 'new_message', $3 || '-' || (g % $2) || '-' || g
         FROM generate_series(0, $1 * $2 - 1) AS g",
    )
    .bind(per_user)
    .bind(users)
    .bind(tag)
    .execute(pool)
    .await
    .expect("enqueue");
}

pub async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// Events that have an outcome.
pub async fn done_events(pool: &PgPool) -> i64 {
    scalar(
        pool,
        "SELECT count(*) FROM notify.event_outcomes WHERE outcome IS NOT NULL",
    )
    .await
}

/// Jobs claimed (and not finished) by worker process `name`: the queue rows its open claim
/// transactions hold locked (a row lock leaves the row's `xmax` set to the locker's
/// transaction id, and the worker's sessions carry its name in `application_name`).
pub async fn held_by(pool: &PgPool, name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT xmax FROM notify.queue_0 UNION ALL SELECT xmax FROM notify.queue_1
                               UNION ALL SELECT xmax FROM notify.queue_2
                               UNION ALL SELECT xmax FROM notify.queue_3) AS j
         WHERE xmax IN (SELECT backend_xid FROM pg_stat_activity
                        WHERE application_name = 'notifyd-worker:' || $1
                          AND backend_xid IS NOT NULL)",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .expect("held_by")
}

/// Due jobs that a claim could not take right now: rows of the queue's slot tables held by
/// some session's row lock. Counted in one statement (a snapshot of the slots' jobs against
/// the ones `FOR UPDATE SKIP LOCKED` can lock); with no worker running, 0 means every
/// job is claimable. The statement locks the rows it can for an instant (autocommit).
pub async fn unclaimable(pool: &PgPool) -> i64 {
    scalar(
        pool,
        "WITH f0 AS (SELECT 1 FROM notify.queue_0 FOR UPDATE SKIP LOCKED),
              f1 AS (SELECT 1 FROM notify.queue_1 FOR UPDATE SKIP LOCKED),
              f2 AS (SELECT 1 FROM notify.queue_2 FOR UPDATE SKIP LOCKED),
              f3 AS (SELECT 1 FROM notify.queue_3 FOR UPDATE SKIP LOCKED)
         SELECT (SELECT count(*) FROM notify.queue WHERE place <> 'later')
              - (SELECT count(*) FROM f0) - (SELECT count(*) FROM f1)
              - (SELECT count(*) FROM f2) - (SELECT count(*) FROM f3)",
    )
    .await
}

/// Database sessions of worker process `name`.
pub async fn sessions_of(pool: &PgPool, name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'notifyd-worker:' || $1",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .expect("sessions_of")
}

/// Jobs of our queue with work left (due, claimed, not due yet or waiting to retry).
pub async fn live_jobs(pool: &PgPool) -> i64 {
    scalar(pool, "SELECT count(*) FROM notify.queue").await
}

/// Wait until every one of `total` events has an outcome and no job has work left.
pub async fn wait_drained(pool: &PgPool, total: i64, limit: Duration, procs: &mut [&mut Proc]) {
    let deadline = Instant::now() + limit;
    loop {
        if done_events(pool).await == total && live_jobs(pool).await == 0 {
            return;
        }
        if Instant::now() >= deadline {
            let tails: Vec<String> = procs.iter().map(|p| p.log_tail()).collect();
            panic!(
                "not drained after {limit:?}: {} of {total} events done, {} live jobs\n{}",
                done_events(pool).await,
                live_jobs(pool).await,
                tails.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the delivery invariants found.
#[derive(Debug, Default)]
pub struct Delivery {
    pub events: i64,
    pub without_outcome: i64,
    pub stored: i64,
    pub rate_limited: i64,
    pub notifications: i64,
    /// Notifications whose event is not `stored`, or stored events without one.
    pub mismatched: i64,
    /// Bodies delivered more than once (bodies are unique per event): user-visible duplicates.
    pub duplicate_bodies: i64,
    /// Most notifications any user got.
    pub max_per_user: i64,
}

pub async fn delivery(pool: &PgPool) -> Delivery {
    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE outcome IS NULL),
                count(*) FILTER (WHERE outcome = 'stored'),
                count(*) FILTER (WHERE outcome = 'rate_limited')
         FROM notify.event_outcomes",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    Delivery {
        events: row.0,
        without_outcome: row.1,
        stored: row.2,
        rate_limited: row.3,
        // Digests (no event) are the digest tests' business.
        notifications: scalar(
            pool,
            "SELECT count(*) FROM notify.notifications WHERE event_id IS NOT NULL",
        )
        .await,
        mismatched: scalar(
            pool,
            // A notification without its event, a suppressed event with a notification,
            // or `stored` written on an event row whose notification is missing (only a
            // deleted notification leaves that, and these tests delete none).
            "SELECT count(*) FROM notify.events AS e
             FULL JOIN (SELECT * FROM notify.notifications WHERE event_id IS NOT NULL) AS n
                    ON n.event_id = e.id
             WHERE e.id IS NULL
                OR (n.id IS NOT NULL AND e.outcome <> 'stored')
                OR (n.id IS NULL AND e.outcome = 'stored')",
        )
        .await,
        duplicate_bodies: scalar(
            pool,
            "SELECT COALESCE(sum(c - 1), 0)::int8 FROM
               (SELECT count(*) AS c FROM notify.notifications GROUP BY user_id, body) AS x",
        )
        .await,
        max_per_user: scalar(
            pool,
            "SELECT COALESCE(max(c), 0) FROM
               (SELECT count(*) AS c FROM notify.notifications GROUP BY user_id) AS x",
        )
        .await,
    }
}

/// Every event has exactly one outcome, every `stored` one exactly one notification, and
/// nobody sees a notification twice.
pub fn assert_exactly_once(d: &Delivery, expected_events: i64) {
    assert_eq!(d.events, expected_events, "{d:?}");
    assert_eq!(d.without_outcome, 0, "events without an outcome: {d:?}");
    assert_eq!(d.notifications, d.stored, "{d:?}");
    assert_eq!(
        d.mismatched, 0,
        "stored events and notifications differ: {d:?}"
    );
    assert_eq!(
        d.duplicate_bodies, 0,
        "a notification was delivered twice: {d:?}"
    );
}
