//! What every handler shares: the read pool, the verifier, the per-user limiter, the
//! watermark cache, the hub and the counters ([`AppState`], cheap to clone).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::HeaderValue;
use sqlx::postgres::PgConnectOptions;

use super::auth::Verifier;
use super::connections::ReadPool;
use super::demo::Demo;
use super::hub::Hub;
use super::limit::UserLimiter;
use super::openapi;
use super::settings::Settings;
use super::watermark::Watermarks;

/// Counters for tests and operators.
#[derive(Debug, Default)]
pub struct Metrics {
    queries: AtomicU64,
    cache_answers: AtomicU64,
}

impl Metrics {
    pub(super) fn count_query(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_cache_answer(&self) {
        self.cache_answers.fetch_add(1, Ordering::Relaxed);
    }

    /// Notification reads that went to the database.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Empty polls answered from memory.
    pub fn cache_answers(&self) -> u64 {
        self.cache_answers.load(Ordering::Relaxed)
    }
}

pub(super) struct Inner {
    pub(super) pool: ReadPool,
    pub(super) verifier: Verifier,
    pub(super) limiter: UserLimiter,
    pub(super) cache: Arc<Watermarks>,
    pub(super) hub: Arc<Hub>,
    pub(super) metrics: Metrics,
    pub(super) request_timeout: Duration,
    pub(super) stream_heartbeat: Duration,
    pub(super) demo: Option<Demo>,
    pub(super) cors_origins: Vec<HeaderValue>,
    pub(super) openapi: axum::body::Bytes,
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState(pub(super) Arc<Inner>);

impl AppState {
    /// A state reading the database `options` point to (connections are opened on
    /// demand). Its cache stays off until a listener ([`Service::start`]) brings it live.
    pub fn new(options: PgConnectOptions, settings: Settings) -> Self {
        let options = options.application_name("notifyd-serve");
        AppState(Arc::new(Inner {
            pool: ReadPool::new(options, settings.db_pool, settings.request_timeout),
            verifier: settings.verifier,
            limiter: UserLimiter::new(settings.user_rate),
            cache: Arc::new(Watermarks::new(settings.cache)),
            hub: Arc::new(Hub::new(settings.stream_limits)),
            metrics: Metrics::default(),
            request_timeout: settings.request_timeout,
            stream_heartbeat: settings.stream_heartbeat,
            demo: settings.demo,
            cors_origins: settings.cors_origins,
            openapi: openapi::json().into(),
        }))
    }

    pub fn pool(&self) -> &ReadPool {
        &self.0.pool
    }

    pub fn verifier(&self) -> &Verifier {
        &self.0.verifier
    }

    pub fn limiter(&self) -> &UserLimiter {
        &self.0.limiter
    }

    pub fn cache(&self) -> &Watermarks {
        &self.0.cache
    }

    /// Where long-polls and streams wait (fed by the listener).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.0.hub
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn stream_heartbeat(&self) -> Duration {
        self.0.stream_heartbeat
    }

    /// Demo mode's settings, when it is on.
    pub fn demo(&self) -> Option<&Demo> {
        self.0.demo.as_ref()
    }

    pub fn request_timeout(&self) -> Duration {
        self.0.request_timeout
    }

    pub(super) fn openapi_json(&self) -> axum::body::Bytes {
        self.0.openapi.clone()
    }
}
