//! Prometheus metrics: one process-wide recorder ([`install`]), a `/metrics` listener
//! ([`serve`]) and the names the rest of the code records with. It knows nothing of the
//! pipeline: callers hand it plain numbers and labels.
//!
//! The recorder is the `metrics` facade with `metrics-exporter-prometheus`. Until
//! [`install`] runs (library use, tests), every recording call is a cheap no-op.
//!
//! Where each series comes from:
//! * `notifyd_events_total{outcome}`: once per answered job of a committed batch
//!   (`stored`, `opted_out`, `rate_limited`, `duplicate`, `invalid`, `failed`), from
//!   `pipeline::Tally`. `failed` covers refused jobs (bad payload, missing event: final)
//!   and the jobs of a batch that rolled back (claimed again later);
//!   `notifyd_job_failures_total{kind}` tells the two apart (`permanent`, `transient`).
//! * `notifyd_suppressed_total{event_type}` (the `rate_limited` answers by type, per-type
//!   caps included) and `notifyd_critical_deliveries_total` (stored events of critical
//!   types): from `pipeline::Tally`, like `notifyd_events_total`.
//! * `notifyd_digests_sent_total` and `notifyd_digest_events_total` (the suppressed events
//!   they summed up): once per committed digest sweep transaction (`digest::run_once`).
//! * `notifyd_claim_wait_seconds`: from the moment a job was enqueued (the time in its ULID,
//!   or its `run_at` if later) to the moment a worker starts it. With no backlog this is the
//!   enqueue-to-claim latency; with a backlog it is the queue wait. A retried or rescued job
//!   counts from its first enqueue.
//! * `notifyd_store_seconds`, `notifyd_batch_jobs`: one sample per claimed batch (one
//!   transaction).
//! * `notifyd_queue_*`: a periodic query in the worker (every replica reports the same
//!   values; aggregate with `max`).
//! * `notifyd_intake_events_total`: events this worker's intake copied into the queue
//!   (`claim::intake`; 0 while the enqueue trigger feeds the queue);
//!   `notifyd_intake_waiting` and `notifyd_intake_oldest_seconds`: the committed events
//!   not yet taken in, from the queue metrics loop.
//! * `notifyd_http_*`: [`track_http`], a middleware for the read service.
//! * `notifyd_streams_open`: the read service's hub, as streams open and close.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const EVENTS: &str = "notifyd_events_total";
pub const JOB_FAILURES: &str = "notifyd_job_failures_total";
pub const CLAIM_WAIT: &str = "notifyd_claim_wait_seconds";
pub const STORE_SECONDS: &str = "notifyd_store_seconds";
pub const BATCH_JOBS: &str = "notifyd_batch_jobs";
pub const QUEUE_DEPTH: &str = "notifyd_queue_depth";
pub const QUEUE_JOBS: &str = "notifyd_queue_jobs";
pub const QUEUE_LAG: &str = "notifyd_queue_lag_seconds";
pub const WORKERS_ALIVE: &str = "notifyd_workers_alive";
pub const QUEUE_SLOTS: &str = "notifyd_queue_slots";
pub const HORIZON_AGE: &str = "notifyd_oldest_xmin_age_seconds";
pub const HORIZON_XIDS: &str = "notifyd_oldest_xmin_age_transactions";
pub const HORIZON_PID: &str = "notifyd_oldest_xmin_pid";
pub const INTAKE_EVENTS: &str = "notifyd_intake_events_total";
pub const INTAKE_WAITING: &str = "notifyd_intake_waiting";
pub const INTAKE_AGE: &str = "notifyd_intake_oldest_seconds";
pub const WORKER_RESTARTS: &str = "notifyd_worker_restarts_total";
pub const HTTP_REQUESTS: &str = "notifyd_http_requests_total";
pub const HTTP_SECONDS: &str = "notifyd_http_request_duration_seconds";
pub const STREAMS_OPEN: &str = "notifyd_streams_open";
pub const SUPPRESSED: &str = "notifyd_suppressed_total";
pub const CRITICAL_DELIVERIES: &str = "notifyd_critical_deliveries_total";
pub const DIGESTS_SENT: &str = "notifyd_digests_sent_total";
pub const DIGEST_EVENTS: &str = "notifyd_digest_events_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// The `/metrics` listener setting, shared by `notifyd worker` and `notifyd serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct MetricsArgs {
    /// Address (host:port) of a separate HTTP listener serving Prometheus metrics at
    /// /metrics, e.g. 0.0.0.0:9187. Off when unset. Give each process its own port.
    #[arg(long, env = "NOTIFYD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

impl MetricsArgs {
    /// The listen address, if metrics are on.
    pub fn listen(&self) -> Option<&str> {
        self.metrics_listen
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide Prometheus recorder (idempotent) and start its upkeep task.
/// Must run inside a Tokio runtime.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(CLAIM_WAIT.into()), WAIT_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_JOBS.into()), BATCH_BUCKETS))
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            })
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        gauge!("notifyd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
        handle
    })
}

fn describe() {
    describe_counter!(EVENTS, "Jobs answered, by outcome");
    describe_counter!(
        JOB_FAILURES,
        "Jobs answered with an error: permanent (refused, not retried) or transient (retried)"
    );
    describe_histogram!(
        CLAIM_WAIT,
        "Seconds from a job becoming due (its run_at: the enqueue, or the end of a retry backoff) to a worker starting it"
    );
    describe_histogram!(STORE_SECONDS, "Seconds of the store step per claimed batch");
    describe_histogram!(BATCH_JOBS, "Jobs per claimed batch");
    describe_gauge!(
        QUEUE_DEPTH,
        "Jobs not finished yet: pending, scheduled, or waiting to retry"
    );
    describe_gauge!(QUEUE_JOBS, "Queue rows by state");
    describe_gauge!(
        QUEUE_SLOTS,
        "The queue's slot tables by rotation state (current, draining, drained, clean)"
    );
    describe_gauge!(
        HORIZON_AGE,
        "Seconds the oldest open transaction holding back vacuum in this database has been open (0 when none, or not visible to the worker's role)"
    );
    describe_gauge!(
        HORIZON_XIDS,
        "Transactions since the xmin of the oldest snapshot holding back vacuum (0 when none)"
    );
    describe_gauge!(
        HORIZON_PID,
        "Backend pid of the oldest open transaction holding back vacuum (0 when none)"
    );
    describe_gauge!(
        STREAMS_OPEN,
        "Notification streams this serve process holds open"
    );
    describe_gauge!(
        QUEUE_LAG,
        "Age in seconds of the oldest job that is due and not claimed (0 when none)"
    );
    describe_gauge!(
        WORKERS_ALIVE,
        "Workers whose last heartbeat is younger than the liveness threshold"
    );
    describe_counter!(
        WORKER_RESTARTS,
        "Restarts of the apalis worker after it stopped on its own"
    );
    describe_counter!(
        SUPPRESSED,
        "Events held back by the rate limit or their type's cap, by event type"
    );
    describe_counter!(
        CRITICAL_DELIVERIES,
        "Notifications stored for events of critical types"
    );
    describe_counter!(DIGESTS_SENT, "Digest notifications stored");
    describe_gauge!(
        INTAKE_WAITING,
        "Committed events not yet taken into the queue (intake mode; 0 with the enqueue trigger)"
    );
    describe_gauge!(
        INTAKE_AGE,
        "Seconds since the oldest committed event not yet taken in was created"
    );
    describe_counter!(
        INTAKE_EVENTS,
        "Committed events taken into the queue by this worker's intake (intake mode)"
    );
    describe_counter!(
        DIGEST_EVENTS,
        "Suppressed events summed up in the digests stored"
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by method, route and status");
    describe_histogram!(HTTP_SECONDS, "HTTP request latency in seconds");
}

/// The text exposition of every metric (empty before [`install`]).
pub fn render() -> String {
    HANDLE
        .get()
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

/// Axum handler for `GET /metrics`.
pub async fn handler() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(),
    )
        .into_response()
}

/// A router with `GET /metrics` only.
pub fn router() -> Router {
    Router::new()
        .route("/metrics", get(handler))
        .fallback(|| async { StatusCode::NOT_FOUND })
}

/// Bind the metrics listener now (so a bad address fails at startup) and serve it until
/// `shutdown`. Installs the recorder if needed.
pub async fn serve(
    listen: &str,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    install();
    let tcp = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (NOTIFYD_METRICS_LISTEN)"))?;
    let address = tcp.local_addr()?;
    tracing::info!(%address, "serving Prometheus metrics at /metrics");
    let task = tokio::spawn(async move {
        let server =
            axum::serve(tcp, router()).with_graceful_shutdown(crate::shutdown::wait(shutdown));
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "metrics listener failed");
        }
    });
    Ok((address, task))
}

/// Axum middleware (`axum::middleware::from_fn(series::track_http)`, added with
/// `Router::layer`): counts requests and records their latency by method, route (the
/// matched route pattern, never the raw path, so user ids do not become labels) and status.
pub async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    counter!(HTTP_REQUESTS, &labels).increment(1);
    histogram!(HTTP_SECONDS, &labels).record(started.elapsed().as_secs_f64());
    response
}

/// The queue gauges: depth, rows by state, lag and live workers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueGauges {
    pub depth: i64,
    /// `(state label, rows)`.
    pub jobs: Vec<(&'static str, i64)>,
    pub lag_secs: f64,
    pub workers_alive: usize,
}

/// In intake mode, the committed events not yet taken in and the oldest one's age (both 0
/// in trigger mode).
pub fn set_intake(waiting: i64, oldest_secs: f64) {
    gauge!(INTAKE_WAITING).set(waiting as f64);
    gauge!(INTAKE_AGE).set(oldest_secs);
}

/// What holds the xmin horizon back: `(age in seconds, age in transactions, pid)`, or
/// `None` when nothing does.
pub fn set_horizon(holder: Option<(f64, i64, i32)>) {
    let (secs, xids, pid) = holder.unwrap_or_default();
    gauge!(HORIZON_AGE).set(secs);
    gauge!(HORIZON_XIDS).set(xids as f64);
    gauge!(HORIZON_PID).set(f64::from(pid));
}

/// Slot tables by rotation state.
pub fn set_slots(states: &[String]) {
    for state in ["current", "draining", "drained", "clean"] {
        let n = states.iter().filter(|s| s.as_str() == state).count();
        gauge!(QUEUE_SLOTS, "state" => state).set(n as f64);
    }
}

/// Set the queue gauges.
pub fn set_queue(g: &QueueGauges) {
    gauge!(QUEUE_DEPTH).set(g.depth as f64);
    for (state, n) in &g.jobs {
        gauge!(QUEUE_JOBS, "state" => *state).set(*n as f64);
    }
    gauge!(QUEUE_LAG).set(g.lag_secs);
    gauge!(WORKERS_ALIVE).set(g.workers_alive as f64);
}
