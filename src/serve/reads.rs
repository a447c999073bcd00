//! Every SQL statement of the read service, and nothing else.
//!
//! Each statement names the user in `WHERE user_id = $1`, bound from the verified token
//! (there is no other way in), so a request can only ever read its own user's rows.
//! All statements are index lookups on the primary key `(user_id, id)`, the partial
//! index `notifications_unread (user_id, id) WHERE read_at IS NULL`, or the primary key of
//! `notify.notification_horizons`; none scans more than one user's rows.
//!
//! Two shapes:
//! * `page`: the rows only, when the caller already holds a fresh [`Snapshot`];
//! * `page_with_snapshot`: the rows and the user's [`Snapshot`] (newest id, newest unread
//!   id, unread count, retention horizon) in ONE statement, so both come from the same
//!   database snapshot and a cache miss costs one round trip.

use chrono::{DateTime, Utc};
use serde::ser::{Error as _, SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use super::connections::ReadPool;
use super::rfc3339;
use super::watermark::Snapshot;

/// Which notifications a request reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    All,
    Unread,
}

macro_rules! page_after {
    ($filter:literal) => {
        concat!(
            "SELECT id, event_type, body, link, created_at, read_at, digest
             FROM notify.notifications
             WHERE user_id = $1 AND id > $2",
            $filter,
            "
             ORDER BY id
             LIMIT $3"
        )
    };
}

// The newest page, newest first; callers put it in ascending order.
macro_rules! page_latest {
    ($filter:literal) => {
        concat!(
            "SELECT id, event_type, body, link, created_at, read_at, digest
             FROM notify.notifications
             WHERE user_id = $1",
            $filter,
            "
             ORDER BY id DESC
             LIMIT $2"
        )
    };
}

macro_rules! with_snapshot {
    ($page:expr) => {
        concat!(
            "WITH page AS (",
            $page,
            ")
             SELECT m.newest, m.newest_unread, m.unread, m.horizon,
                    p.id, p.event_type, p.body, p.link, p.created_at, p.read_at, p.digest
             FROM (SELECT
                     (SELECT max(id) FROM notify.notifications
                      WHERE user_id = $1) AS newest,
                     (SELECT max(id) FROM notify.notifications
                      WHERE user_id = $1 AND read_at IS NULL) AS newest_unread,
                     (SELECT count(*) FROM notify.notifications
                      WHERE user_id = $1 AND read_at IS NULL) AS unread,
                     (SELECT deleted_through FROM notify.notification_horizons
                      WHERE user_id = $1) AS horizon
                  ) AS m
             LEFT JOIN page AS p ON true
             ORDER BY p.id"
        )
    };
}

const PAGE_AFTER_ALL: &str = page_after!("");
const PAGE_AFTER_UNREAD: &str = page_after!(" AND read_at IS NULL");
const PAGE_LATEST_ALL: &str = page_latest!("");
const PAGE_LATEST_UNREAD: &str = page_latest!(" AND read_at IS NULL");
const FULL_AFTER_ALL: &str = with_snapshot!(page_after!(""));
const FULL_AFTER_UNREAD: &str = with_snapshot!(page_after!(" AND read_at IS NULL"));
const FULL_LATEST_ALL: &str = with_snapshot!(page_latest!(""));
const FULL_LATEST_UNREAD: &str = with_snapshot!(page_latest!(" AND read_at IS NULL"));

/// A page of rows, oldest first. `after: None` is the newest page.
pub async fn page(
    pool: &ReadPool,
    user: &str,
    feed: Feed,
    after: Option<i64>,
    limit: i64,
) -> Result<PageRows, sqlx::Error> {
    let rows = match after {
        Some(after) => {
            let sql = match feed {
                Feed::All => PAGE_AFTER_ALL,
                Feed::Unread => PAGE_AFTER_UNREAD,
            };
            pool.fetch(|| sqlx::query(sql).bind(user).bind(after).bind(limit))
                .await?
        }
        None => {
            let sql = match feed {
                Feed::All => PAGE_LATEST_ALL,
                Feed::Unread => PAGE_LATEST_UNREAD,
            };
            let mut rows = pool
                .fetch(|| sqlx::query(sql).bind(user).bind(limit))
                .await?;
            rows.reverse();
            rows
        }
    };
    Ok(PageRows { rows, first: 0 })
}

/// A page of rows, oldest first, and the user's snapshot, from one statement.
pub async fn page_with_snapshot(
    pool: &ReadPool,
    user: &str,
    feed: Feed,
    after: Option<i64>,
    limit: i64,
) -> Result<(PageRows, Snapshot), sqlx::Error> {
    let mut rows = match after {
        Some(after) => {
            let sql = match feed {
                Feed::All => FULL_AFTER_ALL,
                Feed::Unread => FULL_AFTER_UNREAD,
            };
            pool.fetch(|| sqlx::query(sql).bind(user).bind(after).bind(limit))
                .await?
        }
        None => {
            let sql = match feed {
                Feed::All => FULL_LATEST_ALL,
                Feed::Unread => FULL_LATEST_UNREAD,
            };
            pool.fetch(|| sqlx::query(sql).bind(user).bind(limit))
                .await?
        }
    };
    let snapshot = match rows.first() {
        Some(r) => Snapshot {
            newest: r.try_get::<Option<i64>, _>(0)?.unwrap_or(0),
            newest_unread: r.try_get::<Option<i64>, _>(1)?.unwrap_or(0),
            unread: r.try_get::<Option<i64>, _>(2)?.unwrap_or(0),
            horizon: r.try_get::<Option<i64>, _>(3)?.unwrap_or(0),
        },
        None => Snapshot::default(),
    };
    // An empty page is one row of the LEFT JOIN with no notification in it.
    if rows.len() == 1 && rows[0].try_get::<Option<i64>, _>(4)?.is_none() {
        rows.clear();
    }
    Ok((PageRows { rows, first: 4 }, snapshot))
}

/// The notifications of a page as the database sent them, written straight into the
/// response (no per-row structs, no string copies). Columns `first..first + 7` of each
/// row are the [`super::api::Notification`] fields, in the order of the queries above.
#[derive(Default)]
pub struct PageRows {
    rows: Vec<PgRow>,
    first: usize,
}

impl PageRows {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The id of the last (newest) notification.
    pub fn last_id(&self) -> Option<i64> {
        self.rows.last().and_then(|r| r.try_get(self.first).ok())
    }

    /// Each notification on its own, oldest first: its id and the JSON object a page
    /// holds for it (for the stream, whose events carry one notification each).
    pub fn items(&self) -> Result<Vec<(i64, String)>, sqlx::Error> {
        self.rows
            .iter()
            .map(|row| {
                let id = row.try_get::<i64, _>(self.first)?;
                let json = serde_json::to_string(&RowJson(row, self.first))
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                Ok((id, json))
            })
            .collect()
    }
}

impl std::fmt::Debug for PageRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageRows")
            .field("len", &self.rows.len())
            .finish()
    }
}

impl Serialize for PageRows {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.rows.len()))?;
        for row in &self.rows {
            seq.serialize_element(&RowJson(row, self.first))?;
        }
        seq.end()
    }
}

struct RowJson<'a>(&'a PgRow, usize);

impl Serialize for RowJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let RowJson(row, at) = *self;
        let get = |e: sqlx::Error| S::Error::custom(e);
        let mut n = s.serialize_struct("Notification", 7)?;
        n.serialize_field("id", &row.try_get::<i64, _>(at).map_err(get)?)?;
        n.serialize_field("event_type", row.try_get::<&str, _>(at + 1).map_err(get)?)?;
        n.serialize_field("body", row.try_get::<&str, _>(at + 2).map_err(get)?)?;
        n.serialize_field(
            "link",
            &row.try_get::<Option<&str>, _>(at + 3).map_err(get)?,
        )?;
        let created: DateTime<Utc> = row.try_get(at + 4).map_err(get)?;
        n.serialize_field("created_at", &Rfc3339(Some(created)))?;
        let read: Option<DateTime<Utc>> = row.try_get(at + 5).map_err(get)?;
        n.serialize_field("read_at", &Rfc3339(read))?;
        let digest: Option<serde_json::Value> = row.try_get(at + 6).map_err(get)?;
        n.serialize_field("digest", &digest)?;
        n.end()
    }
}

struct Rfc3339(Option<DateTime<Utc>>);

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        rfc3339::serialize_option(&self.0, s)
    }
}

/// Readiness: the database answers.
pub async fn ping(pool: &ReadPool) -> Result<(), sqlx::Error> {
    pool.fetch(|| sqlx::query("SELECT 1")).await.map(|_| ())
}

/// Fail with a clear message when this service's migration has not been applied.
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    let ready: bool = crate::db::fetch_one(
        pool,
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_class AS c
                            JOIN pg_namespace AS n ON n.oid = c.relnamespace
                            WHERE n.nspname = 'notify' AND c.relname = 'notification_horizons')",
        ),
    )
    .await?;
    anyhow::ensure!(
        ready,
        "the database lacks the read service's migration (notify.notification_horizons): \
         run `notifyd migrate` first"
    );
    Ok(())
}
