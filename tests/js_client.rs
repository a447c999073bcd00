//! The browser client's bundle that the demo page serves (`src/serve/demo/notifyd-client.js`,
//! committed so that `cargo build` needs no node) is what clients/js/src builds today: the
//! pinned esbuild bundles the sources again and the bytes must be equal.
//!
//! Needs node and `npm ci` in clients/js; scripts/test.sh installs both. Missing ones fail
//! the test, they never skip it.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_demo_bundle_of_the_client_is_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/js");
    assert!(
        dir.join("node_modules/esbuild/package.json").is_file(),
        "clients/js/node_modules is missing: cd clients/js && npm ci (scripts/test.sh does)"
    );
    let out = Command::new("node")
        .arg("scripts/bundle.mjs")
        .arg("check-demo")
        .current_dir(&dir)
        .output()
        .expect("node is not installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
