//! A private PgBouncer (Debian's package, `NOTIFYD_PGBOUNCER` or /usr/sbin/pgbouncer) for one
//! test: its own ini in a temporary directory, a free loopback port, trust authentication,
//! every database of the suite's Postgres behind it. Stopped (SIGTERM, then SIGKILL) when
//! dropped. The system's pgbouncer service, if any, is never used.

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Bouncer {
    child: Child,
    pub port: u16,
    dir: PathBuf,
    log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn binary() -> PathBuf {
    let bin = std::env::var("NOTIFYD_PGBOUNCER").unwrap_or_else(|_| "/usr/sbin/pgbouncer".into());
    let bin = PathBuf::from(bin);
    assert!(
        bin.is_file(),
        "pgbouncer is not installed at {} (scripts/test.sh installs Debian's package; or set \
         NOTIFYD_PGBOUNCER)",
        bin.display()
    );
    bin
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Bouncer {
    /// Start one in `pool_mode` (`transaction` or `session`) with at most `pool_size` server
    /// connections per database and user; `users` may log in (trust).
    pub async fn start(pool_mode: &str, pool_size: u32, users: &[&str]) -> Bouncer {
        let server = url::Url::parse(&crate::common::server_url()).expect("server URL");
        let host = server.host_str().unwrap_or("127.0.0.1").to_owned();
        let server_port = server.port().unwrap_or(5432);
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "notifyd-pgbouncer-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        // pgbouncer refuses to run as root: then it runs as `nobody`, which must read these.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut all_users = vec!["postgres"];
        all_users.extend_from_slice(users);
        let auth: String = all_users
            .iter()
            .map(|u| format!("\"{u}\" \"\"\n"))
            .collect();
        let ini = format!(
            "[databases]\n\
             * = host={host} port={server_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {auth_file}\n\
             pool_mode = {pool_mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits\n\
             server_reset_query = DISCARD ALL\n",
            auth_file = dir.join("users.txt").display(),
        );
        for (name, text) in [("users.txt", auth), ("pgbouncer.ini", ini)] {
            let path = dir.join(name);
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .expect("write pgbouncer config");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let log = dir.join("pgbouncer.log");
        let file = std::fs::File::create(&log).expect("pgbouncer log");
        let mut cmd = Command::new(binary());
        if is_root() {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start pgbouncer");
        let mut bouncer = Bouncer {
            child,
            port,
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                bouncer.child.try_wait().expect("try_wait").is_none(),
                "pgbouncer exited at start:\n{}",
                bouncer.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "pgbouncer never listened:\n{}",
                bouncer.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bouncer
    }

    /// The URL of `database` through this pgbouncer, as `user`.
    pub fn url(&self, database: &str, user: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
