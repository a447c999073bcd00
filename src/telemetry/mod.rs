//! Telemetry: logs ([`init`], one for every subcommand) and Prometheus metrics
//! ([`series`]).
//!
//! Logs are human-readable lines by default, one JSON object per line with
//! `--log-format json`. The filter comes from `RUST_LOG` (default `info`); it is never set
//! from inside the program.

pub mod series;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
