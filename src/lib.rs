//! notifyd: events enqueued by SQL become per-user notifications, served over HTTP.
//!
//! The modules follow the data:
//!
//! ```text
//! notify.events ─trigger─▶ apalis.jobs ─▶ claim ─▶ pipeline:
//!     validate ▶ sanitize ▶ store (preferences ▶ rate limit ▶ insert), in the claim's transaction
//!                                        │
//! frontend ◀── serve ◀── notify.notifications
//! ```
//!
//! Guarantees: the queue is at-least-once (a job can run twice, for example when two
//! queue rows name one event), the effect is exactly-once (one notification per event,
//! enforced by a unique key, and every outcome decided once under the user's lock: a
//! stored event's record is its notification, the others are written on the event row),
//! and the per-user rate limit is exact across any number of worker replicas.
//!
//! What both sides share (queue name, channels) is in [`contract`]; the read service
//! ([`serve`]) imports nothing of the worker's modules.

// What both sides share.
pub mod contract;

// The worker, in the order the data flows.
pub mod claim;
pub mod pipeline;
pub mod validate;
pub mod sanitize;
pub mod store;
pub mod digest;
pub mod worker;
pub mod cleanup;

// The read service.
pub mod serve;

// Operators' commands.
pub mod ops;
pub mod roles;

// Infrastructure.
pub mod config;
pub mod db;
pub mod shutdown;
pub mod telemetry;
