//! The read service, `notifyd serve`: each user's notifications over HTTP, read-only,
//! authenticated with the backend's JWTs, by polling, long-polling or Server-Sent Events.
//! Also `notifyd token`, a development helper, and an opt-in demo inbox ([`demo`]).
//!
//! A request goes through, in order: request log span → security headers → CORS (when
//! configured) → size limits → timeout → router → [`auth::CurrentUser`] (token, then the
//! per-user request limit) → handler ([`api`], [`stream`]) → cache ([`watermark`]) or SQL
//! ([`reads`], one round trip on a [`connections::ReadPool`] connection). Long-polls and
//! streams then wait in memory on the [`hub`], which the same LISTEN connection feeds.
//!
//! Invariants:
//! * the only user a handler can read is the token's `sub` ([`auth::CurrentUser`]);
//! * the service never writes: read state and preferences belong to the backend;
//! * an empty poll (nothing newer than the cursor) is answered from memory while the
//!   LISTEN connection is up, and from the database otherwise; both give the same answer;
//! * every error is a JSON `{"error": {"code", "message"}}` ([`error::ApiError`]);
//! * an idle stream or long-poll costs no database work; one LISTEN connection per
//!   process serves them all ([`hub`]);
//! * shutdown: on the signal the server stops accepting, ends every stream and answers
//!   every long-poll at once ([`hub::Hub::close`]), finishes in-flight requests for at
//!   most the shutdown timeout, and returns.
//!
//! `app(state)` builds the router (tests use it); [`Service`] owns the background tasks
//! (LISTEN, periodic sweeps); [`run`] wires both to the command line.

pub mod api;
pub mod auth;
pub mod connections;
pub mod demo;
pub mod error;
pub mod hub;
pub mod limit;
pub mod middleware;
pub mod openapi;
pub mod reads;
pub mod session;
pub mod stream;
pub mod watermark;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::HeaderValue;
use axum::routing::get;
use axum::serve::ListenerExt;
use clap::Args;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use auth::{JwtArgs, Verifier};
use connections::ReadPool;
use demo::Demo;
use hub::{Hub, StreamLimits};
use limit::{UserLimiter, UserRate};
use watermark::{CacheSettings, Watermarks};

/// How long `/readyz` waits for `SELECT 1`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the cache and the rate limiter forget idle users.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Settings of `notifyd serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on, host:port. Default 127.0.0.1:8080, or 0.0.0.0:$PORT when PORT
    /// is set.
    #[arg(long, env = "NOTIFYD_LISTEN")]
    pub listen: Option<String>,

    /// Port to listen on, on all interfaces, when NOTIFYD_LISTEN is not set (set by
    /// platforms such as Heroku).
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,

    #[command(flatten)]
    pub jwt: JwtArgs,

    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,

    /// Requests each user may make per rate window (a burst of this many, refilled
    /// evenly over the window). Counted per serve process.
    #[arg(long, env = "NOTIFYD_USER_REQUESTS_PER_MINUTE", default_value_t = 120,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub user_requests_per_minute: u32,

    /// Length of the per-user rate window in seconds (60: per minute).
    #[arg(long, env = "NOTIFYD_USER_RATE_WINDOW_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub user_rate_window_secs: u64,

    /// Origins allowed to call the API from a browser (CORS), comma-separated, e.g.
    /// https://app.example.com. None by default: cross-origin browser reads are refused.
    #[arg(long, env = "NOTIFYD_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Database connections for reads (the LISTEN connection comes on top).
    #[arg(long, env = "NOTIFYD_SERVE_DB_POOL", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=500))]
    pub db_pool: u32,

    /// Seconds a request may take before it is answered 503.
    #[arg(long, env = "NOTIFYD_REQUEST_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_timeout_secs: u64,

    /// Seconds to finish in-flight requests after SIGTERM before exiting anyway.
    #[arg(long, env = "NOTIFYD_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub shutdown_timeout_secs: u64,

    /// Seconds a cached per-user watermark is trusted before it is re-read (a bound on
    /// staleness should a change notification ever be missed), and idle seconds after
    /// which it is dropped.
    #[arg(long, env = "NOTIFYD_CACHE_TTL_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub cache_ttl_secs: u64,

    /// Most users whose watermarks are cached at once (beyond it, polls query the
    /// database).
    #[arg(long, env = "NOTIFYD_CACHE_MAX_USERS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(64..=100_000_000))]
    pub cache_max_users: u64,

    #[command(flatten)]
    pub stream: StreamArgs,

    #[command(flatten)]
    pub demo: DemoArgs,

    #[command(flatten)]
    pub session: session::SessionArgs,
}

/// Settings of the notification stream (`GET /api/notifications/stream`).
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// Seconds of silence after which a stream sends a heartbeat comment, so that
    /// proxies keep idle streams open (and vanished clients are noticed).
    #[arg(long, env = "NOTIFYD_STREAM_HEARTBEAT_SECS",
          default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stream_heartbeat_secs: u64,

    /// Streams one user may hold open at once on this process; beyond it, 429.
    #[arg(long, env = "NOTIFYD_MAX_STREAMS_PER_USER",
          default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_streams_per_user: u64,

    /// Streams this process holds open at once, all users together; beyond it, 503.
    #[arg(long, env = "NOTIFYD_MAX_STREAMS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_streams: u64,
}

impl Default for StreamArgs {
    fn default() -> Self {
        StreamArgs {
            stream_heartbeat_secs: 15,
            max_streams_per_user: 5,
            max_streams: 20_000,
        }
    }
}

/// Demo mode: an inbox page at `/demo/` and tokens for one demo user. Never in
/// production.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Serve the demo inbox at /demo/ and hand out tokens for the demo user at
    /// /demo/token to anyone who asks. For trying notifyd out, never for production.
    /// Needs NOTIFYD_JWT_SECRET.
    #[arg(long, env = "NOTIFYD_DEMO", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub demo: bool,

    /// The user id (JWT `sub`) of demo mode's tokens.
    #[arg(long, env = "NOTIFYD_DEMO_USER", default_value = "42")]
    pub demo_user: String,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            demo: false,
            demo_user: "42".to_owned(),
        }
    }
}

/// Settings of `notifyd token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user id (JWT `sub`).
    #[arg(long)]
    pub sub: String,

    /// Lifetime of the token in seconds.
    #[arg(long, env = "NOTIFYD_TOKEN_TTL_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub ttl_secs: u64,

    #[command(flatten)]
    pub jwt: JwtArgs,
}

/// Checked settings, ready to build a [`Service`].
#[derive(Debug)]
pub struct Settings {
    pub verifier: Verifier,
    pub user_rate: UserRate,
    pub cors_origins: Vec<HeaderValue>,
    pub db_pool: u32,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub cache: CacheSettings,
    pub stream_heartbeat: Duration,
    pub stream_limits: StreamLimits,
    /// Demo mode, when on.
    pub demo: Option<Demo>,
}

impl ServeArgs {
    /// Check every setting; the error names the variable at fault.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings {
            verifier: Verifier::from_args(&self.jwt)?,
            user_rate: UserRate {
                per_window: NonZeroU32::new(self.user_requests_per_minute)
                    .context("NOTIFYD_USER_REQUESTS_PER_MINUTE must be at least 1")?,
                window: Duration::from_secs(self.user_rate_window_secs),
            },
            cors_origins: middleware::parse_origins(&self.cors_origins)?,
            db_pool: self.db_pool,
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            cache: CacheSettings {
                ttl: Duration::from_secs(self.cache_ttl_secs),
                max_users: usize::try_from(self.cache_max_users).unwrap_or(usize::MAX),
            },
            stream_heartbeat: Duration::from_secs(self.stream.stream_heartbeat_secs),
            stream_limits: StreamLimits {
                per_user: usize::try_from(self.stream.max_streams_per_user).unwrap_or(usize::MAX),
                total: usize::try_from(self.stream.max_streams).unwrap_or(usize::MAX),
            },
            demo: if self.demo.demo {
                Some(Demo::new(&self.jwt, &self.demo.demo_user)?)
            } else {
                None
            },
        })
    }

    /// Where to listen: NOTIFYD_LISTEN, else 0.0.0.0:$PORT, else 127.0.0.1:8080.
    pub fn listen_address(&self) -> String {
        match (self.listen.as_deref().map(str::trim), self.port) {
            (Some(listen), _) if !listen.is_empty() => listen.to_owned(),
            (_, Some(port)) => format!("0.0.0.0:{port}"),
            _ => "127.0.0.1:8080".to_owned(),
        }
    }
}

/// Counters for tests and operators.
#[derive(Debug, Default)]
pub struct Metrics {
    queries: AtomicU64,
    cache_answers: AtomicU64,
}

impl Metrics {
    fn count_query(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }

    fn count_cache_answer(&self) {
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

struct Inner {
    pool: ReadPool,
    verifier: Verifier,
    limiter: UserLimiter,
    cache: Arc<Watermarks>,
    hub: Arc<Hub>,
    metrics: Metrics,
    request_timeout: Duration,
    stream_heartbeat: Duration,
    demo: Option<Demo>,
    cors_origins: Vec<HeaderValue>,
    openapi: axum::body::Bytes,
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

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

    fn openapi_json(&self) -> axum::body::Bytes {
        self.0.openapi.clone()
    }
}

/// The router with every layer. Without a [`Service`] the cache stays off (every read
/// queries the database), which is correct, only slower.
pub fn app(state: AppState) -> Router {
    let cors = middleware::cors(&state.0.cors_origins);
    let mut router = Router::new()
        .route("/api/notifications", get(api::list))
        .route("/api/notifications/unread", get(api::unread))
        .route("/api/notifications/stream", get(stream::stream))
        .route("/api/openapi.json", get(api::openapi))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz));
    if state.demo().is_some() {
        router = router
            .route("/", get(demo::root))
            .route("/demo", get(demo::root))
            .route("/demo/", get(demo::index))
            .route("/demo/inbox.js", get(demo::script))
            .route("/demo/inbox.css", get(demo::style))
            .route("/demo/token", get(demo::token));
    }
    let router = router
        // Counts and latencies by route pattern and status on /metrics; a route layer, so
        // that the matched pattern (never the raw path) is known.
        .route_layer(axum::middleware::from_fn(crate::metrics::track_http))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::timeout,
        ))
        .layer(axum::middleware::from_fn(middleware::limits))
        .with_state(state);
    let router = match cors {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router
        .layer(axum::middleware::map_response(middleware::security_headers))
        .layer(middleware::trace())
}

/// A running read service: its state and its background tasks (the LISTEN loop and the
/// periodic sweeps), which stop on shutdown or when this is dropped.
pub struct Service {
    state: AppState,
    shutdown_timeout: Duration,
    tasks: Vec<JoinHandle<()>>,
}

impl Service {
    /// Start the background tasks. `listen_pool` (a pool of one) gives the LISTEN
    /// connection; the reads open their own connections with the same options.
    pub fn start(
        listen_pool: PgPool,
        settings: Settings,
        shutdown: watch::Receiver<bool>,
    ) -> Service {
        let options = (*listen_pool.connect_options()).clone();
        Service::start_with(options, Some(listen_pool), settings, shutdown)
    }

    /// [`Service::start`], with the reads' connection `options` of their own, and without
    /// a LISTEN connection when `listen_pool` is `None` (the cache stays off, and waiters
    /// re-read periodically, as while a listener is down).
    pub fn start_with(
        options: PgConnectOptions,
        listen_pool: Option<PgPool>,
        settings: Settings,
        shutdown: watch::Receiver<bool>,
    ) -> Service {
        let shutdown_timeout = settings.shutdown_timeout;
        let state = AppState::new(options, settings);
        let listener = match listen_pool {
            Some(listen_pool) => tokio::spawn(watermark::listen(
                state.0.cache.clone(),
                state.0.hub.clone(),
                listen_pool,
                shutdown.clone(),
            )),
            None => tokio::spawn(async {}),
        };
        let sweeper = {
            let state = state.clone();
            let stop = crate::shutdown::wait(shutdown);
            tokio::spawn(async move {
                tokio::pin!(stop);
                let mut every = tokio::time::interval(SWEEP_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = every.tick() => {
                            state.cache().sweep();
                            state.limiter().sweep();
                        }
                        _ = &mut stop => return,
                    }
                }
            })
        };
        Service {
            state,
            shutdown_timeout,
            tasks: vec![listener, sweeper],
        }
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn router(&self) -> Router {
        app(self.state.clone())
    }

    /// Serve on `tcp` until `shutdown`, then drain for at most the shutdown timeout.
    pub async fn serve(
        self,
        tcp: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let drain = self.shutdown_timeout;
        let tcp = tcp.tap_io(|stream| {
            // Small JSON answers on keep-alive connections: do not wait for Nagle.
            let _ = stream.set_nodelay(true);
        });
        let hub = self.state.hub().clone();
        let signal = crate::shutdown::wait(shutdown.clone());
        let server = axum::serve(tcp, self.router()).with_graceful_shutdown(async move {
            signal.await;
            // Streams never end by themselves, and long-polls could hold the drain for
            // their whole wait: end them now, so that shutdown waits only for reads.
            hub.close();
        });
        let deadline = async {
            crate::shutdown::wait(shutdown).await;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            r = std::future::IntoFuture::into_future(server) => r.context("the HTTP server failed")?,
            _ = deadline => tracing::warn!(
                timeout = ?drain,
                "requests still in flight at the shutdown timeout: stopping anyway"
            ),
        }
        tracing::info!("read service stopped");
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// `notifyd serve`.
pub async fn run(
    database_url: &str,
    args: ServeArgs,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Settings first: a bad one fails before anything connects.
    let settings = args.settings()?;
    let address = args.listen_address();
    let (read_options, listen_pool) = session::connect(database_url, &args.session).await?;
    let tcp = TcpListener::bind(&address)
        .await
        .with_context(|| format!("cannot listen on {address} (NOTIFYD_LISTEN or PORT)"))?;
    if let Some(listen) = args.metrics.listen() {
        crate::metrics::serve(listen, shutdown.clone()).await?;
    }
    tracing::info!(
        address = %tcp.local_addr().map_or(address.clone(), |a| a.to_string()),
        algorithm = ?settings.verifier.algorithm(),
        user_requests = settings.user_rate.per_window.get(),
        per_secs = settings.user_rate.window.as_secs(),
        cors_origins = settings.cors_origins.len(),
        stream_heartbeat_secs = settings.stream_heartbeat.as_secs(),
        max_streams_per_user = settings.stream_limits.per_user,
        max_streams = settings.stream_limits.total,
        "serving the read API"
    );
    if let Some(demo) = &settings.demo {
        tracing::warn!(
            demo_user = demo.user(),
            "DEMO MODE IS ON (NOTIFYD_DEMO): anyone who can reach this service gets a token \
             for user {} at /demo/token and can read that user's notifications; never enable \
             it in production",
            demo.user()
        );
    }
    let service = Service::start_with(read_options, listen_pool, settings, shutdown.clone());
    // Open the first read connection now: a bad setting shows at startup, and the first
    // request does not pay for the connection.
    reads::ping(service.state().pool())
        .await
        .context("cannot query the database at DATABASE_URL")?;
    service.serve(tcp, shutdown).await
}

/// `notifyd token`: print an HS256 token for `--sub`.
pub fn print_token(args: TokenArgs) -> anyhow::Result<()> {
    let token = auth::mint(&args.jwt, &args.sub, Duration::from_secs(args.ttl_secs))?;
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["notifyd"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().serve
    }

    #[test]
    fn listen_address_precedence() {
        let mut a = args(&[]);
        a.listen = None;
        a.port = None;
        assert_eq!(a.listen_address(), "127.0.0.1:8080");
        a.port = Some(5000);
        assert_eq!(a.listen_address(), "0.0.0.0:5000");
        a.listen = Some("127.0.0.1:9000".into());
        assert_eq!(a.listen_address(), "127.0.0.1:9000");
    }

    #[test]
    fn openapi_builds() {
        let json = openapi::json();
        assert!(json.contains("/api/notifications/unread"));
    }
}
