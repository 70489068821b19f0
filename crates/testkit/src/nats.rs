//! A hermetic NATS server with JetStream for tests (issue 8): `nats-server` on a free loopback
//! port, its JetStream store in a temporary directory, stopped and removed on drop. On servers
//! 2.10 and later it runs with `sync_interval: always` (fsync per message, the setting the feeds
//! sink documents for loss-intolerant streams); 2.9 (Debian 12's package) has no such setting and
//! flushes on its own schedule — [`NatsServer::syncs_every_message`] says which.
//!
//! The binary is `nats-server` on `PATH`, else `/usr/sbin/nats-server` (Debian's `nats-server`
//! package). Without it [`NatsServer::start`] returns `None` and tests print
//! [`SKIPPED_NO_NATS`] and pass without running.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a test prints when it cannot run for lack of a NATS server.
pub const SKIPPED_NO_NATS: &str =
    "skipped: nats-server not found (install Debian's `nats-server` package)";

/// A running throw-away NATS server with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    sync_always: bool,
}

/// `(major, minor)` of `nats-server --version` (`nats-server: v2.9.10`).
fn version(binary: &std::path::Path) -> Option<(u32, u32)> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let number = text.split('v').nth(1)?.trim();
    let mut parts = number.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn find_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let debian = PathBuf::from("/usr/sbin/nats-server");
        debian.is_file().then_some(debian)
    })
}

impl NatsServer {
    /// Start a server, or `None` if `nats-server` is not installed. `Some(Err)` if it is installed
    /// but did not start (a broken machine, not a reason to skip).
    pub fn start() -> Option<Result<Self, String>> {
        let binary = find_binary()?;
        Some(Self::start_with(&binary))
    }

    fn start_with(binary: &std::path::Path) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("caregate-nats-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        // A free port: bind port 0, note it, release it for the server.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let store = dir.path().join("jetstream");
        let config = dir.path().join("nats.conf");
        let sync_always = version(binary).is_some_and(|v| v >= (2, 10));
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {:?}\n{}}}\n",
                store.display().to_string(),
                if sync_always {
                    "  sync_interval: always\n"
                } else {
                    ""
                }
            ),
        )
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let log = std::fs::File::create(dir.path().join("server.log"))
            .map_err(|e| format!("cannot create the server log: {e}"))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut server = Self {
            child,
            port,
            dir,
            sync_always,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "nats-server exited ({status}) before listening: {}",
                    server.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nats-server did not listen within 20 s: {}",
                    server.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URL (`nats://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether the server fsyncs every JetStream message (`sync_interval: always`, 2.10+).
    pub fn syncs_every_message(&self) -> bool {
        self.sync_always
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
