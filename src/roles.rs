//! Least-privilege roles: `notifyd grants`, and the read service's check of its own role.
//!
//! Three group roles, created `NOLOGIN` (notifyd handles no passwords): operators create
//! login roles their own way (password, certificate, IAM) and `GRANT notify_reader TO
//! app_reader`. Members inherit the privileges (the default `INHERIT`).
//! * **backend** (`notify_backend`): the public contract and nothing else. INSERT (and
//!   SELECT: the idempotency trigger and `INSERT … RETURNING id` read the table) on
//!   `notify.events` (and, for ORMs, the view `notify.new_events`); read and write `notify.preferences`; SELECT `notify.notifications`
//!   and UPDATE of its `read_at` column only; SELECT `notify.event_outcomes`; SELECT and
//!   INSERT on `notify.event_types` (adding a type is one INSERT, jobs/README.md), and
//!   UPDATE of its `priority`, `critical`, `max_per_window` and `digest_label` columns
//!   (setting a priority or a cap, marking a type critical: one UPDATE each); it cannot
//!   rename or delete one. No access to the queue: the enqueue trigger writes
//!   `notify.queue_*` as its owner (migration `20261206000001_enqueue_as_owner.sql`).
//! * **worker** (`notify_worker`): every statement of the claim, store, digest sweep,
//!   cleanup, heartbeat and rotation paths, read off the code, and no more. TRUNCATE on the
//!   queue's four slot tables only (the rotation empties a drained slot that way), no DDL,
//!   no right on
//!   `notify.preferences` but SELECT, and none on `notify.queue_settings` but SELECT
//!   (a failed attempt's backoff reads it). It may DELETE notifications and events
//!   (retention), and it has UPDATE on `notify.notifications.read_at` only because a row
//!   lock (`FOR UPDATE SKIP LOCKED`, retention's bounded delete) needs UPDATE on some
//!   column; it never writes it. It does not own the tables, so the vacuum safety net
//!   stays off for it (autovacuum does the work; see `cleanup::vacuum_if_needed`).
//! * **reader** (`notify_reader`, for `notifyd serve`): SELECT on `notify.notifications`
//!   and `notify.notification_horizons`, which is all the read service reads. It writes
//!   nothing; LISTEN needs no grant.
//!
//! The operator commands (`status`, `jobs`, `cleanup`, `migrate`, `grants`) run as the
//! owner, the role that migrated.
//!
//! Idempotent: every run revokes everything the three roles hold on the two schemas and
//! grants the list again, in one transaction, so the result is exactly the list whatever
//! an earlier run or a hand-made GRANT left. It must run as the owner of the schemas (the
//! role that ran `notifyd migrate`; a managed server's database owner is fine), and
//! creating a missing role needs CREATEROLE; without it the command says which role to
//! create and stops before granting anything.

use anyhow::Context;
use clap::Args;
use sqlx::PgPool;

use crate::db;

/// Settings of `notifyd grants`.
#[derive(Debug, Clone, Args)]
pub struct GrantsArgs {
    /// The backend's role: enqueue, preferences, read state.
    #[arg(long, env = "NOTIFYD_BACKEND_ROLE", default_value = "notify_backend")]
    pub backend_role: String,

    /// The worker's role (`notifyd worker`).
    #[arg(long, env = "NOTIFYD_WORKER_ROLE", default_value = "notify_worker")]
    pub worker_role: String,

    /// The read service's role (`notifyd serve`): SELECT only.
    #[arg(long, env = "NOTIFYD_READER_ROLE", default_value = "notify_reader")]
    pub reader_role: String,
}

/// The grants of each role, after its schema-wide revoke. `{}` is the role.
const BACKEND: &[&str] = &[
    "GRANT USAGE ON SCHEMA notify TO {}",
    // Every column but `txid` (migration 20261208000001): notifyd's own, the intake's key;
    // an INSERT that names it is refused, so a backend cannot hide an event from the intake.
    "GRANT SELECT, INSERT (user_id, event_type, body, link, idempotency_key, run_at, created_at, outcome, outcome_reason, processed_at) ON notify.events TO {}",
    "GRANT SELECT, INSERT ON notify.new_events TO {}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON notify.preferences TO {}",
    "GRANT SELECT, UPDATE (read_at) ON notify.notifications TO {}",
    "GRANT SELECT ON notify.event_outcomes TO {}",
    // The checks of notify.events call these (migration 20261207000200): explicit, so a
    // database that revoked EXECUTE from PUBLIC still takes the backend's INSERT.
    "GRANT EXECUTE ON FUNCTION notify.event_user_id_is_valid(text), notify.event_body_is_valid(text), notify.event_link_is_safe(text), notify.event_type_is_known(text), notify.event_row_is_valid(text, text, text, text, text, text) TO {}",
    "GRANT SELECT, INSERT, UPDATE (priority, critical, max_per_window, digest_label) ON notify.event_types TO {}",
];

const WORKER: &[&str] = &[
    "GRANT USAGE ON SCHEMA notify, apalis TO {}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON apalis.workers TO {}",
    "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON notify.queue_0, notify.queue_1, notify.queue_2, notify.queue_3 TO {}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON notify.queue_later, notify.queue_dead TO {}",
    "GRANT SELECT, UPDATE ON notify.queue_slots TO {}",
    "GRANT SELECT ON notify.queue TO {}",
    "GRANT SELECT, DELETE, UPDATE (outcome, outcome_reason, processed_at) ON notify.events TO {}",
    // Its outcome UPDATE runs the checks of notify.events too.
    "GRANT EXECUTE ON FUNCTION notify.event_user_id_is_valid(text), notify.event_body_is_valid(text), notify.event_link_is_safe(text), notify.event_type_is_known(text), notify.event_row_is_valid(text, text, text, text, text, text) TO {}",
    // The intake (migration 20261208000001, `claim::intake`).
    "GRANT SELECT ON notify.intake TO {}",
    "GRANT SELECT, INSERT, DELETE ON notify.intake_steps TO {}",
    "GRANT EXECUTE ON FUNCTION notify.take_in(integer, integer), notify.take_in_step(integer, integer), notify.intake_waiting(), notify.intake_backlog(), notify.intake_has_waiting(integer) TO {}",
    "GRANT SELECT, INSERT, DELETE, UPDATE (read_at) ON notify.notifications TO {}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON notify.rate_windows TO {}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON notify.digest_pending TO {}",
    "GRANT SELECT, INSERT, UPDATE ON notify.notification_horizons TO {}",
    "GRANT SELECT ON notify.preferences, notify.queue_settings, notify.event_types TO {}",
];

const READER: &[&str] = &[
    "GRANT USAGE ON SCHEMA notify TO {}",
    "GRANT SELECT ON notify.notifications, notify.notification_horizons TO {}",
];

/// A role name notifyd accepts: a plain lower-case identifier, so it needs no quoting
/// rules of its own and reads the same in SQL and in docs.
fn check_name(variable: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    anyhow::ensure!(
        ok,
        "{variable} must be a lower-case identifier (a-z, 0-9, _; at most 63 characters), not {name:?}"
    );
    Ok(())
}

/// `notifyd grants`.
pub async fn run_grants(pool: &PgPool, args: &GrantsArgs) -> anyhow::Result<()> {
    let roles = [
        ("NOTIFYD_BACKEND_ROLE", args.backend_role.as_str(), BACKEND),
        ("NOTIFYD_WORKER_ROLE", args.worker_role.as_str(), WORKER),
        ("NOTIFYD_READER_ROLE", args.reader_role.as_str(), READER),
    ];
    for (variable, name, _) in &roles {
        check_name(variable, name)?;
    }
    anyhow::ensure!(
        args.backend_role != args.worker_role
            && args.backend_role != args.reader_role
            && args.worker_role != args.reader_role,
        "the backend, worker and reader roles must be three different roles"
    );
    let (me, can_create, owns): (String, bool, bool) = sqlx::query_as(
        "SELECT current_user::text, r.rolsuper OR r.rolcreaterole,
                pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = 'notify'), 'USAGE')
            AND pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = 'apalis'), 'USAGE')
         FROM pg_roles AS r WHERE r.rolname = current_user",
    )
    .fetch_one(pool)
    .await
    .context("cannot read the current role")?;
    anyhow::ensure!(
        owns,
        "role {me} does not own the notify and apalis schemas: run `notifyd grants` as the \
         role that ran `notifyd migrate`"
    );
    let mut tx = pool.begin().await?;
    for (variable, name, _) in &roles {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        if exists {
            continue;
        }
        anyhow::ensure!(
            can_create,
            "role {name} ({variable}) does not exist, and {me} may not create roles (it needs \
             CREATEROLE): create it with `CREATE ROLE {name} NOLOGIN`, or choose an existing \
             role, and run `notifyd grants` again"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE ROLE {name} NOLOGIN")))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("cannot create role {name} ({variable})"))?;
        tracing::info!(role = name, "created role (NOLOGIN)");
    }
    for (variable, name, grants) in &roles {
        let mut sql = format!(
            "REVOKE ALL ON ALL TABLES IN SCHEMA notify, apalis FROM {name};
             REVOKE ALL ON ALL SEQUENCES IN SCHEMA notify, apalis FROM {name};
             REVOKE ALL ON SCHEMA notify, apalis FROM {name};"
        );
        for grant in *grants {
            sql.push_str(&grant.replace("{}", name));
            sql.push_str(";\n");
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("cannot grant the privileges of {name} ({variable})"))?;
    }
    tx.commit().await?;
    println!(
        "granted: backend {}, worker {}, reader {} (NOLOGIN roles: GRANT them to your login roles)",
        args.backend_role, args.worker_role, args.reader_role
    );
    Ok(())
}

/// What the current role may do that a read-only service should not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteAccess {
    pub role: String,
    pub superuser: bool,
    /// Tables and views of `notify` and `apalis` it may write (INSERT, UPDATE, DELETE or
    /// TRUNCATE, on the table or on any column).
    pub writable: Vec<String>,
}

impl WriteAccess {
    pub fn is_read_only(&self) -> bool {
        !self.superuser && self.writable.is_empty()
    }
}

/// The current role's write access to notifyd's tables (inherited privileges and
/// ownership included).
pub async fn write_access(pool: &PgPool) -> Result<WriteAccess, sqlx::Error> {
    let (role, superuser, writable): (String, bool, Vec<String>) = db::fetch_optional(
        pool,
        sqlx::query_as(
            "SELECT current_user::text, r.rolsuper,
                    ARRAY(SELECT c.oid::regclass::text
                          FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
                          WHERE n.nspname IN ('notify', 'apalis')
                            AND c.relkind IN ('r', 'p', 'v')
                            AND (has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')
                                 OR has_any_column_privilege(c.oid, 'INSERT, UPDATE'))
                          ORDER BY 1)
             FROM pg_roles AS r WHERE r.rolname = current_user",
        ),
    )
    .await?
    .unwrap_or_default();
    Ok(WriteAccess {
        role,
        superuser,
        writable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_plain_identifiers() {
        assert!(check_name("X", "notify_reader").is_ok());
        assert!(check_name("X", "_r2").is_ok());
        for bad in ["", "Reader", "2r", "r;drop", "r r", "\"r\""] {
            let e = check_name("NOTIFYD_READER_ROLE", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("NOTIFYD_READER_ROLE"), "{e}");
        }
    }

    #[test]
    fn every_grant_names_its_role() {
        for g in BACKEND.iter().chain(WORKER).chain(READER) {
            assert!(g.starts_with("GRANT ") && g.ends_with(" TO {}"), "{g}");
        }
        assert!(
            READER
                .iter()
                .all(|g| !g.contains("INSERT") && !g.contains("UPDATE") && !g.contains("DELETE"))
        );
        assert!(BACKEND.iter().all(|g| !g.contains("apalis")));
    }
}
