//! The names the worker, the read service, the operator commands and the migrations share:
//! the queue's name and the notification channels. A leaf module (it imports nothing of the crate), so that the
//! read service never depends on the worker to learn a channel name, and a name is changed
//! in one place.
//!
//! Each of these is also written in SQL (the migrations' triggers, the store statement);
//! the tests assert that the SQL and these constants agree.

/// The queue's name: the worker type of the instances in `apalis.workers`, and the
/// `apalis.jobs.job_type` of the jobs that releases before the own queue (migration
/// `20261207000001_own_queue.sql`) wrote, which `notifyd migrate` moves into it.
pub const QUEUE: &str = "notifyd.events";

/// The channel on which a committed batch announces new notifications, for the read
/// service's in-memory watermarks. Each payload is a JSON array of `[user_id, max_id]`
/// pairs; the store statement splits a batch's users into payloads of at most about
/// 7,000 bytes (Postgres refuses 8,000). NOTIFY is transactional: listeners hear it only
/// if the batch commits.
pub const ANNOUNCE_CHANNEL: &str = "notifyd_notifications";

/// The channel of the triggers on `notify.notifications` (UPDATE, DELETE, TRUNCATE).
/// Payload: a JSON array of user ids, or `*` for "everyone".
pub const READ_STATE_CHANNEL: &str = "notifyd_read_state";
