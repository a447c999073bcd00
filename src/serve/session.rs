//! How `notifyd serve` reaches the database: the role check at startup, the LISTEN
//! connection, and the reads' connection options.
//!
//! * **Its role writes nothing.** The service faces the internet, so at startup it checks
//!   that its role is not a superuser and can write no table or view of `notify` or
//!   `apalis` ([`crate::roles::write_access`]), and refuses to start otherwise, naming the
//!   role and what it could write, unless `NOTIFYD_ALLOW_WRITABLE_ROLE` says that this is
//!   intended (development, tests), in which case it warns at every start. The role to use
//!   is the reader role of `notifyd grants`.
//! * **LISTEN needs a real session.** Through a transaction pooler a LISTEN is lost as soon
//!   as the pooler hands the server connection to someone else, so there the listener uses
//!   `NOTIFYD_LISTEN_DATABASE_URL` (pointing past the pooler). Without one the service runs
//!   without its listener: one warning at startup, the cache stays off (every poll reads the
//!   database) and long-polls and streams re-read every 1–2 s ([`super::hub`]'s fallback, as
//!   while a listener is down). Every answer stays correct; only wake-ups are later.

use std::str::FromStr;

use anyhow::Context;
use clap::Args;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

use crate::db::{self, Pooler};
use crate::roles;

/// The read service's database settings beyond DATABASE_URL.
#[derive(Debug, Clone, Default, Args)]
pub struct SessionArgs {
    /// A direct (or session-pooled) connection URL for serve's LISTEN connection, when
    /// DATABASE_URL goes through a transaction pooler. Default: DATABASE_URL (and, through
    /// a transaction pooler, no LISTEN: polling).
    #[arg(long, env = "NOTIFYD_LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<String>,

    /// Start even when the database role may write notifyd's tables or is a superuser
    /// (development and tests; in production use the reader role of `notifyd grants`).
    #[arg(long, env = "NOTIFYD_ALLOW_WRITABLE_ROLE", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_writable_role: bool,
}

/// Check the schema and the role, and open the LISTEN pool: the reads' connection
/// options, and the LISTEN pool if there is to be one.
pub async fn connect(
    database_url: &str,
    args: &SessionArgs,
) -> anyhow::Result<(PgConnectOptions, Option<PgPool>)> {
    let read_options = PgConnectOptions::from_str(database_url)
        .context("DATABASE_URL is not a valid postgres:// URL")?;
    let check = db::connect(database_url, 1, "notifyd-serve-check").await?;
    db::check_schema(&check).await?;
    super::reads::check_schema(&check).await?;
    check_role(&check, args.allow_writable_role).await?;
    let listen_url = args
        .listen_database_url
        .as_deref()
        .filter(|u| !u.trim().is_empty());
    let listen_pool = match (listen_url, db::pooler()) {
        (Some(url), _) => {
            check.close().await;
            Some(
                db::connect(url, 1, "notifyd-serve-listen")
                    .await
                    .context("cannot connect to NOTIFYD_LISTEN_DATABASE_URL")?,
            )
        }
        (None, Pooler::Transaction) => {
            check.close().await;
            tracing::warn!(
                "DATABASE_URL goes through a transaction pooler (NOTIFYD_DB_POOLER=transaction) \
                 and NOTIFYD_LISTEN_DATABASE_URL is not set: serving without LISTEN, so every \
                 poll reads the database and long-polls and streams re-read every 1-2 s; set \
                 NOTIFYD_LISTEN_DATABASE_URL to a connection past the pooler for instant wake-ups"
            );
            None
        }
        (None, _) => Some(check),
    };
    Ok((read_options, listen_pool))
}

async fn check_role(pool: &PgPool, allowed: bool) -> anyhow::Result<()> {
    let access = roles::write_access(pool)
        .await
        .context("cannot check the database role's privileges")?;
    if access.is_read_only() {
        tracing::info!(role = %access.role, "database role is read-only");
        return Ok(());
    }
    let what = if access.superuser {
        format!("role {} is a superuser", access.role)
    } else {
        format!(
            "role {} may write {}",
            access.role,
            access.writable.join(", ")
        )
    };
    anyhow::ensure!(
        allowed,
        "{what}: the read service faces the internet and must not be able to write. Run it \
         as the reader role (`notifyd grants` creates notify_reader; GRANT it to a login \
         role and put that role in DATABASE_URL), or set NOTIFYD_ALLOW_WRITABLE_ROLE=1 to \
         start anyway"
    );
    tracing::warn!(
        role = %access.role,
        superuser = access.superuser,
        writable = ?access.writable,
        "THE READ SERVICE'S DATABASE ROLE CAN WRITE ({what}); started anyway because \
         NOTIFYD_ALLOW_WRITABLE_ROLE is set. Use the reader role of `notifyd grants` in \
         production"
    );
    Ok(())
}
