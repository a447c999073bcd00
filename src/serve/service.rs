//! The read service's lifecycle: [`Service`] owns the background tasks (the LISTEN loop
//! and the periodic sweeps) and serves the router until shutdown; [`run`] wires it to the
//! command line; [`print_token`] is `notifyd token`.
//!
//! Shutdown: on the signal the server stops accepting, ends every stream and answers every
//! long-poll at once ([`super::hub::Hub::close`]), finishes in-flight requests for at most
//! the shutdown timeout, and returns.

use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::serve::ListenerExt;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::settings::{ServeArgs, Settings, TokenArgs};
use super::state::AppState;
use super::{app, auth, reads, session, watermark};
use crate::telemetry::series;

/// How often the cache and the rate limiter forget idle users.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

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
        let reloader = auth::reload_on_sighup(&state, shutdown.clone());
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
            tasks: [Some(listener), Some(sweeper), reloader]
                .into_iter()
                .flatten()
                .collect(),
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
        series::serve(listen, shutdown.clone()).await?;
    }
    tracing::info!(
        address = %tcp.local_addr().map_or(address.clone(), |a| a.to_string()),
        jwt = ?settings.verifier,
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
