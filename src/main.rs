use clap::Parser;

use notifyd::config::{Cli, Command};
use notifyd::telemetry::{self, series};
use notifyd::{cleanup, db, ops, roles, serve, shutdown, worker};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.global.log_format);
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("notifyd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    db::set_pooler(cli.global.db_pooler);
    match cli.command {
        Command::Migrate => {
            let pool = db::connect(cli.global.database_url()?, 2, "notifyd-migrate").await?;
            db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Worker(args) => {
            series::install();
            worker::run(cli.global.database_url()?, args, shutdown::on_signal()).await
        }
        Command::Serve(args) => {
            series::install();
            serve::run(cli.global.database_url()?, args, shutdown::on_signal()).await
        }
        Command::Cleanup(args) => {
            let pool = db::connect(cli.global.database_url()?, 2, "notifyd-cleanup").await?;
            db::check_schema(&pool).await?;
            let report = cleanup::run_once(&pool, args.retention.retention()).await?;
            println!(
                "deleted: {} failed jobs, {} notifications, {} events, {} stale workers",
                report.failed_jobs, report.notifications, report.events, report.workers
            );
            Ok(())
        }
        Command::Token(args) => serve::print_token(args),
        Command::Status(args) => {
            let pool = db::connect(cli.global.database_url()?, 2, "notifyd-ops").await?;
            db::check_schema(&pool).await?;
            ops::run_status(&pool, &args).await
        }
        Command::Jobs(args) => {
            let pool = db::connect(cli.global.database_url()?, 2, "notifyd-ops").await?;
            db::check_schema(&pool).await?;
            ops::run_jobs(&pool, &args).await
        }
        Command::Grants(args) => {
            let pool = db::connect(cli.global.database_url()?, 1, "notifyd-grants").await?;
            db::check_schema(&pool).await?;
            roles::run_grants(&pool, &args).await
        }
    }
}
