//! The demo inbox page in a real browser: Debian's headless Chromium, driven by
//! playwright-core from tests/browser/inbox.test.mjs, against the real `notifyd worker` and
//! `notifyd serve --demo` binaries on a fresh database.
//!
//! The node script checks: a notification appears in under 1 s after its INSERT (the
//! figure is printed); an XSS corpus, through the worker and written raw past it, runs
//! nothing, opens no dialog and adds no element; and after a SIGKILL and restart of the
//! serve process every notification is shown exactly once. It asks this test to kill and
//! restart serve over a line protocol (`CONTROL kill-serve` / `CONTROL start-serve` on its
//! stdout, `ok <command>` on its stdin).
//!
//! Needs node, `/usr/bin/chromium` (or `CHROMIUM`) and `npm ci` in tests/browser;
//! scripts/test.sh installs all three. Missing ones fail the test, they never skip it.

mod common;
#[path = "faults/support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;
use support::{BIN, JWT_SECRET, Proc, free_port};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const DEMO_USER: &str = "42";
/// The whole browser run, at most.
const NODE_LIMIT: Duration = Duration::from_secs(300);

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Fail (never skip) with a clear message when a prerequisite is missing.
fn check_prerequisites() {
    let how =
        "scripts/test.sh installs it (apt-get install -y chromium; cd tests/browser && npm ci)";
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is not installed (node >= 18 is needed for the browser tests): {how}"
    );
    let browser = chromium();
    assert!(
        browser.is_file(),
        "no Chromium at {}: {how} (or set CHROMIUM to a Chromium binary)",
        browser.display()
    );
    for module in ["playwright-core", "pg"] {
        let dir = browser_dir().join("node_modules").join(module);
        assert!(
            dir.join("package.json").is_file(),
            "the node module {module} is missing from {}: {how}",
            browser_dir().join("node_modules").display()
        );
    }
}

/// `notifyd serve --demo` on a fixed port (so a restarted process is the same origin).
struct Serve {
    port: u16,
    log: PathBuf,
    database_url: String,
    child: Option<Child>,
    starts: u32,
}

impl Serve {
    fn new(database_url: &str) -> Serve {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        Serve {
            port: free_port(),
            log: dir.join(format!("serve-{}.log", std::process::id())),
            database_url: database_url.to_owned(),
            child: None,
            starts: 0,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start the process and wait until `/healthz` answers.
    async fn start(&mut self) {
        assert!(self.child.is_none(), "serve is already running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.starts += 1;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("log file");
            let child = Command::new(BIN)
                .args(["serve", "--demo"])
                .env("DATABASE_URL", &self.database_url)
                .env("NOTIFYD_LISTEN", format!("127.0.0.1:{}", self.port))
                .env("NOTIFYD_JWT_SECRET", JWT_SECRET)
                .env("NOTIFYD_DEMO_USER", DEMO_USER)
                .env("NOTIFYD_USER_REQUESTS_PER_MINUTE", "100000")
                // The suite's role is the server's superuser.
                .env("NOTIFYD_ALLOW_WRITABLE_ROLE", "1")
                .env("RUST_LOG", "info,sqlx=warn")
                .env_remove("PORT")
                .stdin(Stdio::null())
                .stdout(file.try_clone().expect("log file"))
                .stderr(file)
                .spawn()
                .expect("spawn notifyd serve");
            self.child = Some(child);
            if self.wait_healthy(deadline).await {
                return;
            }
            // It exited (the port may still be held a moment after a kill): try again.
            let _ = self.child.take().map(|mut c| c.wait());
            assert!(
                Instant::now() < deadline,
                "notifyd serve --demo did not come up on port {}\n{}",
                self.port,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// True once /healthz answers 200; false if the process exited first.
    async fn wait_healthy(&mut self, deadline: Instant) -> bool {
        let client = reqwest::Client::new();
        loop {
            let ok = client
                .get(format!("{}/healthz", self.url()))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return true;
            }
            let child = self.child.as_mut().expect("child");
            if child.try_wait().expect("try_wait").is_some() {
                return false;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("serve is running");
        let ok = Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -KILL {} failed", child.id());
        child.wait().expect("reap serve");
    }

    fn log_tail(&self) -> String {
        tail("serve", &self.log)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(name: &str, path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(40);
    format!(
        "--- {name} ({}), last lines:\n{}",
        path.display(),
        lines[from..].join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_inbox_in_chromium() {
    check_prerequisites();
    let db = TestDb::new().await;
    // The XSS corpus alone is over the default hourly limit of 100 for the one demo user.
    let mut worker = Proc::worker(
        &db.url,
        "browser-worker",
        &[("NOTIFYD_RATE_LIMIT", "100000".to_owned())],
    );
    worker.wait_listening(Duration::from_secs(30)).await;
    let mut serve = Serve::new(&db.url);
    serve.start().await;

    let script = browser_dir().join("inbox.test.mjs");
    let mut node = tokio::process::Command::new("node")
        .arg(&script)
        .current_dir(browser_dir())
        .env("NOTIFYD_URL", serve.url())
        .env("DATABASE_URL", &db.url)
        .env("NOTIFYD_DEMO_USER", DEMO_USER)
        .env("CHROMIUM", chromium())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn node");
    let mut stdin = node.stdin.take().expect("stdin");
    let mut out = BufReader::new(node.stdout.take().expect("stdout")).lines();
    let mut err = BufReader::new(node.stderr.take().expect("stderr")).lines();

    let deadline = tokio::time::Instant::now() + NODE_LIMIT;
    let (mut out_open, mut err_open) = (true, true);
    let mut figures = Vec::new();
    while out_open || err_open {
        tokio::select! {
            line = out.next_line(), if out_open => match line.expect("node stdout") {
                None => out_open = false,
                Some(line) => {
                    println!("node: {line}");
                    if line.starts_with("FIGURES") {
                        figures.push(line.clone());
                    }
                    if let Some(cmd) = line.strip_prefix("CONTROL ") {
                        match cmd.trim() {
                            "kill-serve" => serve.kill9(),
                            "start-serve" => serve.start().await,
                            other => panic!("unknown control command from node: {other}"),
                        }
                        stdin
                            .write_all(format!("ok {}\n", cmd.trim()).as_bytes())
                            .await
                            .expect("answer node");
                        stdin.flush().await.expect("flush");
                    }
                }
            },
            line = err.next_line(), if err_open => match line.expect("node stderr") {
                None => err_open = false,
                Some(line) => eprintln!("node: {line}"),
            },
            _ = tokio::time::sleep_until(deadline) => {
                let _ = node.kill().await;
                panic!(
                    "the browser tests did not finish within {NODE_LIMIT:?}\n{}\n{}",
                    serve.log_tail(),
                    worker.log_tail()
                );
            }
        }
    }
    let status = node.wait().await.expect("node exit");
    assert!(
        status.success(),
        "the browser tests failed (node exited with {status}); see the output above\n{}\n{}",
        serve.log_tail(),
        worker.log_tail()
    );
    assert!(
        figures.iter().any(|f| f.contains("appear latency")),
        "node exited 0 without the latency figure: did every scenario run?"
    );
    for f in &figures {
        eprintln!("{f}");
    }
    assert!(serve.starts >= 2, "serve was never restarted");
}
