//! The layout's rules, checked on the source: the read service imports none of the
//! worker's modules, the shared names live in a leaf module, and the production binary
//! carries no benchmark harness. A change that crosses a layer fails here, not in review.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn src(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(rel)
}

/// `crate::<module>` paths a file names, outside comments.
fn crate_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let name: String = rest[at + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
            rest = &rest[at + 7..];
        }
    }
    found
}

#[test]
fn the_read_service_imports_nothing_of_the_worker() {
    const WORKER: [&str; 9] = [
        "claim", "pipeline", "validate", "sanitize", "store", "digest", "worker", "cleanup", "ops",
    ];
    for file in rust_files(&src("serve")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for name in crate_paths(&text) {
            assert!(
                !WORKER.contains(&name.as_str()),
                "{} uses crate::{name}: the read service must not depend on the worker \
                 (shared names belong in src/contract.rs)",
                file.display()
            );
        }
    }
}

#[test]
fn the_contract_is_a_leaf() {
    let text = std::fs::read_to_string(src("contract.rs")).unwrap();
    assert_eq!(crate_paths(&text), Vec::<String>::new());
}

#[test]
fn the_production_binary_has_no_bench_command() {
    let text = std::fs::read_to_string(src("config.rs")).unwrap();
    assert!(
        !text.contains("Bench("),
        "the bench harness is its own binary"
    );
    // A single file, or a directory with its modules (src/bin/notifyd-bench/main.rs).
    assert!(
        src("bin/notifyd-bench.rs").is_file() || src("bin/notifyd-bench/main.rs").is_file(),
        "the bench binary's source is gone"
    );
}
