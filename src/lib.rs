//! notifyd: events enqueued by SQL become per-user notifications, served over HTTP.
//!
//! The modules follow the data:
//!
//! ```text
//! notify.events ─trigger─▶ apalis.jobs ─▶ claim ─▶ batch ─▶ pipeline:
//!     validate ▶ sanitize ▶ store (preferences ▶ rate limit ▶ insert, one transaction)
//!                                        │
//! frontend ◀── serve ◀── notify.notifications
//! ```
//!
//! Guarantees: the queue is at-least-once (a job can run twice after a crash or a rescue),
//! the effect is exactly-once (one notification per event, enforced by a unique key, and
//! every outcome decided once under the user's lock: a stored event's record is its
//! notification, the others are written on the event row), and the per-user rate limit is
//! exact across any number of worker replicas.

pub mod config;
pub mod db;
pub mod shutdown;
pub mod telemetry;

pub mod batch;
pub mod claim;
pub mod cleanup;
pub mod pipeline;
pub mod sanitize;
pub mod store;
pub mod validate;
pub mod worker;

pub mod metrics;
pub mod ops;
pub mod roles;

pub mod bench;
pub mod serve;
