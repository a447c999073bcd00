//! The demo inbox page and the browser client (clients/js) in a real browser: Debian's
//! headless Chromium, driven by playwright-core from node scripts in tests/browser, against
//! the real `notifyd worker` and `notifyd serve --demo` binaries on a fresh database.
//!
//! `demo_inbox_in_chromium` (inbox.test.mjs): a notification appears in under 1 s after its
//! INSERT (the figure is printed); an XSS corpus, through the worker and written raw past
//! it, runs nothing, opens no dialog and adds no element; and after a SIGKILL and restart of
//! the serve process every notification is shown exactly once.
//! `js_client_in_chromium` (client.test.mjs): see [`js_client_in_chromium`].
//!
//! The scripts ask this test to kill and restart serve over a line protocol (`CONTROL
//! kill-serve` / `CONTROL start-serve` on their stdout, `ok <command>` on their stdin).
//! The two tests run one at a time (.config/nextest.toml).
//!
//! Needs node, `/usr/bin/chromium` (or `CHROMIUM`), `npm ci` in tests/browser and in
//! clients/js, and the client built (`npm run build`); scripts/test.sh does all of it.
//! Missing ones fail the test, they never skip it.

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

fn client_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/js")
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
    env: Vec<(&'static str, String)>,
    child: Option<Child>,
    starts: u32,
}

impl Serve {
    fn new(database_url: &str) -> Serve {
        Serve::with_env(database_url, "serve", Vec::new())
    }

    /// With extra settings, logging to `serve-<name>-<pid>.log`.
    fn with_env(database_url: &str, name: &str, env: Vec<(&'static str, String)>) -> Serve {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        Serve {
            port: free_port(),
            log: dir.join(format!("{name}-{}.log", std::process::id())),
            database_url: database_url.to_owned(),
            env,
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
                .envs(self.env.iter().map(|(k, v)| (k, v)))
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

/// Run a node script of tests/browser with `env`, answering its CONTROL lines by killing
/// and restarting `serve`; panics unless it exits 0. Returns its `FIGURES` lines.
async fn run_node(
    script: &str,
    env: &[(&str, String)],
    serve: &mut Serve,
    logs: &[&dyn Fn() -> String],
) -> Vec<String> {
    let mut node = tokio::process::Command::new("node")
        .arg(browser_dir().join(script))
        .current_dir(browser_dir())
        .envs(env.iter().map(|(k, v)| (k, v)))
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
    let tails = |serve: &Serve| {
        std::iter::once(serve.log_tail())
            .chain(logs.iter().map(|f| f()))
            .collect::<Vec<_>>()
            .join("\n")
    };

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
                panic!("{script} did not finish within {NODE_LIMIT:?}\n{}", tails(serve));
            }
        }
    }
    let status = node.wait().await.expect("node exit");
    assert!(
        status.success(),
        "{script} failed (node exited with {status}); see the output above\n{}",
        tails(serve)
    );
    for f in &figures {
        eprintln!("{f}");
    }
    figures
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

    let env = [
        ("NOTIFYD_URL", serve.url()),
        ("DATABASE_URL", db.url.clone()),
        ("NOTIFYD_DEMO_USER", DEMO_USER.to_owned()),
    ];
    let figures = run_node("inbox.test.mjs", &env, &mut serve, &[&|| worker.log_tail()]).await;
    assert!(
        figures.iter().any(|f| f.contains("appear latency")),
        "node exited 0 without the latency figure: did every scenario run?"
    );
    assert!(serve.starts >= 2, "serve was never restarted");
}

/// The browser client of clients/js (through the demo page, which runs on it, and a small
/// React app on its hook) in tests/browser/client.test.mjs: one stream for six tabs,
/// leader hand-over, a SIGKILL of serve, streaming refused, no Web Locks, a token that
/// expires mid-stream. Two serve processes: `serve` (metrics on, so the test can read how
/// many streams it holds) and `short` (demo tokens of 8 s, no leeway, so every stream
/// outlives its token unless the client renews it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_in_chromium() {
    check_prerequisites();
    let app = client_dir().join("dist/react.js");
    assert!(
        app.is_file(),
        "{} is missing: build the client (cd clients/js && npm ci && npm run build; scripts/test.sh does)",
        app.display()
    );
    let db = TestDb::new().await;
    let mut worker = Proc::worker(
        &db.url,
        "client-worker",
        &[("NOTIFYD_RATE_LIMIT", "100000".to_owned())],
    );
    worker.wait_listening(Duration::from_secs(30)).await;
    let metrics = free_port();
    // A heartbeat each second: a stream whose tab went away is noticed (and uncounted) fast.
    let mut serve = Serve::with_env(
        &db.url,
        "client-serve",
        vec![
            ("NOTIFYD_METRICS_LISTEN", format!("127.0.0.1:{metrics}")),
            ("NOTIFYD_STREAM_HEARTBEAT_SECS", "1".to_owned()),
        ],
    );
    serve.start().await;
    let mut short = Serve::with_env(
        &db.url,
        "client-serve-short",
        vec![
            ("NOTIFYD_DEMO_TOKEN_TTL_SECS", "8".to_owned()),
            ("NOTIFYD_JWT_LEEWAY_SECS", "0".to_owned()),
            ("NOTIFYD_STREAM_HEARTBEAT_SECS", "1".to_owned()),
        ],
    );
    short.start().await;

    let env = [
        ("NOTIFYD_URL", serve.url()),
        ("NOTIFYD_SHORT_URL", short.url()),
        ("NOTIFYD_METRICS_URL", format!("http://127.0.0.1:{metrics}")),
        ("DATABASE_URL", db.url.clone()),
        ("NOTIFYD_DEMO_USER", DEMO_USER.to_owned()),
        ("NOTIFYD_CLIENT_DIR", client_dir().display().to_string()),
    ];
    let short_tail = || short.log_tail();
    let figures = run_node(
        "client.test.mjs",
        &env,
        &mut serve,
        &[&short_tail, &|| worker.log_tail()],
    )
    .await;
    assert!(
        figures.iter().any(|f| f.contains("token renewal")),
        "node exited 0 without the token figure: did every scenario run?"
    );
    assert!(serve.starts >= 2, "serve was never restarted");
}
