//! The read service's settings: `notifyd serve`'s and `notifyd token`'s flags, checked
//! into [`Settings`] before anything connects, so that a bad value fails at startup with
//! the name of its variable.

use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::Context;
use axum::http::HeaderValue;
use clap::Args;

use super::auth::{JwtArgs, Verifier};
use super::demo::Demo;
use super::hub::StreamLimits;
use super::limit::UserRate;
use super::middleware;
use super::watermark::CacheSettings;

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
    pub metrics: crate::telemetry::series::MetricsArgs,

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
    pub session: super::session::SessionArgs,
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

    /// Lifetime in seconds of the tokens /demo/token hands out (short ones show the
    /// client renewing tokens mid-stream).
    #[arg(long, env = "NOTIFYD_DEMO_TOKEN_TTL_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub demo_token_ttl_secs: u64,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            demo: false,
            demo_user: "42".to_owned(),
            demo_token_ttl_secs: 3600,
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
                Some(
                    Demo::new(&self.jwt, &self.demo.demo_user)?
                        .with_token_ttl(self.demo.demo_token_ttl_secs),
                )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::openapi;
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
