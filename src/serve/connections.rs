//! The read service's database connections: a fixed number of plain connections, lent
//! to one statement at a time.
//!
//! Why not sqlx's `PgPool` for the reads: it pings the server when it hands out a
//! connection (`test_before_acquire`) and again when the connection comes back (always,
//! in sqlx 0.9), so a one-statement read costs three round trips, and the two pings cost
//! as much as the read itself. Here a read costs one.
//!
//! Invariants:
//! * at most `size` connections exist, and each serves one statement at a time;
//! * a connection goes back to the idle set only after its statement completed; a
//!   lease dropped mid-statement (request timeout, client gone) or after an error closes
//!   its connection, so a connection with unread results or an unknown state is never
//!   reused;
//! * a broken connection is replaced on demand; a read that failed on a reused
//!   connection because the connection was gone is retried once on a new one (reads are
//!   idempotent);
//! * connections older than [`MAX_AGE`] are closed when they come back, so server-side
//!   memory and configuration changes do not outlive them forever;
//! * every read runs with `statement_timeout` set, so a read abandoned by its request does
//!   not keep running on the server: `SET` once per connection, or, through a transaction
//!   pooler (`NOTIFYD_DB_POOLER=transaction`), as `SET LOCAL` in the `BEGIN` of a
//!   transaction around the read, which is also what keeps the read's unnamed statement on
//!   one server connection (see `db.rs`). Never as a startup parameter, which a pooler
//!   refuses or drops.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgArguments, PgConnectOptions, PgRow};
use sqlx::query::Query;
use sqlx::{ConnectOptions, PgConnection, Postgres};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Connections are closed when they come back after this long.
pub const MAX_AGE: Duration = Duration::from_secs(30 * 60);

pub struct ReadPool {
    options: PgConnectOptions,
    /// `SET statement_timeout = ...` for a new connection, or, through a transaction
    /// pooler, `BEGIN; SET LOCAL statement_timeout = ...` for every read.
    timeout_sql: String,
    pooled: bool,
    idle: Mutex<Vec<(PgConnection, Instant)>>,
    permits: Semaphore,
}

impl ReadPool {
    /// Connect lazily with `options`, at most `size` connections, each with
    /// `statement_timeout` set.
    pub fn new(options: PgConnectOptions, size: u32, statement_timeout: Duration) -> Self {
        let pooled = crate::db::pooler() == crate::db::Pooler::Transaction;
        let ms = statement_timeout.as_millis();
        let timeout_sql = if pooled {
            format!("BEGIN; SET LOCAL statement_timeout = {ms}")
        } else {
            format!("SET statement_timeout = {ms}")
        };
        ReadPool {
            options,
            timeout_sql,
            pooled,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size.max(1) as usize),
        }
    }

    async fn lease(&self) -> Result<Lease<'_>, sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (conn, born, reused) = match idle {
            Some((conn, born)) => (conn, born, true),
            None => {
                let mut conn = self.options.connect().await?;
                if !self.pooled {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(self.timeout_sql.clone()))
                        .execute(&mut conn)
                        .await?;
                }
                (conn, Instant::now(), false)
            }
        };
        Ok(Lease {
            pool: self,
            conn: Some(conn),
            born,
            reused,
            _permit: permit,
        })
    }

    /// Run the query `make` builds, and return all its rows.
    pub async fn fetch<'q>(
        &self,
        make: impl Fn() -> Query<'q, Postgres, PgArguments>,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        let mut retried = false;
        loop {
            let mut lease = self.lease().await?;
            let conn = lease.conn.as_mut().expect("a lease holds its connection");
            let rows = if self.pooled {
                self.fetch_in_transaction(conn, make()).await
            } else {
                make().fetch_all(&mut *conn).await
            };
            match rows {
                Ok(rows) => {
                    lease.release();
                    return Ok(rows);
                }
                // The server closed an idle connection (restart, idle timeout, network).
                // Reads are idempotent: try once more on a new connection.
                Err(sqlx::Error::Io(e)) if lease.reused && !retried => {
                    tracing::debug!(error = %e, "reused connection was gone: retrying");
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn fetch_in_transaction<'q>(
        &self,
        conn: &mut PgConnection,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        let mut tx =
            sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(self.timeout_sql.clone()))
                .await?;
        let rows = query.persistent(false).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Connections currently idle.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One connection lent out. Dropped without [`Lease::release`], it closes the connection.
struct Lease<'a> {
    pool: &'a ReadPool,
    conn: Option<PgConnection>,
    born: Instant,
    reused: bool,
    _permit: SemaphorePermit<'a>,
}

impl Lease<'_> {
    fn release(mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.born.elapsed() < MAX_AGE {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((conn, self.born));
        } else {
            // Say goodbye properly; the permit is free at once.
            tokio::spawn(async move {
                let _ = sqlx::Connection::close(conn).await;
            });
        }
    }
}
