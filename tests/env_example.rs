//! `.env.example` lists every environment variable the binary reads, so that an operator
//! can see the whole configuration in one file. The list is taken from the clap
//! definitions themselves (every subcommand, recursively), so a new setting without an
//! entry fails here.

use std::collections::BTreeSet;

use clap::CommandFactory;
use notifyd::config::Cli;

fn env_vars(cmd: &clap::Command, out: &mut BTreeSet<String>) {
    for arg in cmd.get_arguments() {
        if let Some(env) = arg.get_env() {
            out.insert(env.to_string_lossy().into_owned());
        }
    }
    for sub in cmd.get_subcommands() {
        env_vars(sub, out);
    }
}

/// Names that `.env.example` sets or shows commented out (`NAME=` or `# NAME=`).
fn documented() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example"))
        .expect(".env.example exists at the top level");
    text.lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| l.split_once('='))
        .map(|(name, _)| name.trim())
        .filter(|name| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_environment_variable_is_in_env_example() {
    let mut used = BTreeSet::new();
    env_vars(&Cli::command(), &mut used);
    assert!(
        used.contains("DATABASE_URL") && used.contains("NOTIFYD_JWT_SECRET"),
        "the walk over the clap definitions found too little: {used:?}"
    );
    let documented = documented();
    let missing: Vec<_> = used.difference(&documented).collect();
    assert!(missing.is_empty(), "missing from .env.example: {missing:?}");
}

#[test]
fn env_example_names_no_variable_the_binary_does_not_read() {
    let mut used = BTreeSet::new();
    env_vars(&Cli::command(), &mut used);
    // RUST_LOG is read by tracing-subscriber, not by clap.
    used.insert("RUST_LOG".to_owned());
    let stale: Vec<_> = documented().difference(&used).cloned().collect();
    assert!(
        stale.is_empty(),
        "in .env.example but unknown to the binary: {stale:?}"
    );
}
