//! A hermetic PostgreSQL server for tests (issue 8): `initdb` into a temporary directory, the
//! server on a free loopback port with its unix socket in that directory, one fresh database per
//! test, and everything stopped and removed afterwards.
//!
//! The machine's PostgreSQL binaries are found through `pg_config --bindir`, then
//! `/usr/lib/postgresql/<newest>/bin` (Debian's `postgresql` package, e.g. `postgresql-15`).
//! Without them [`PgServer::start`] returns `None` and tests print
//! [`SKIPPED_NO_POSTGRES`] and pass without running.
//!
//! `initdb` and `postgres` refuse to run as root (tests in containers often do): as root the
//! server runs as the `postgres` user (else `nobody`) through `runuser`, in a directory chowned to
//! that user.
//!
//! TLS ([`PgServerOptions::tls`]): `ssl = on` with a given certificate and key (e.g. issued by
//! [`crate::partner_server::TestCa`]), optionally refusing TCP connections without TLS
//! (`pg_hba.conf` with `hostssl` lines only). With TLS, the superuser is trusted and every other
//! role authenticates with SCRAM-SHA-256 over TCP (so channel binding can be tested); the unix
//! socket stays trusted for set-up.
//!
//! Cleanup: dropping a [`PgServer`] stops the server (`pg_ctl stop -m immediate`: a throw-away
//! cluster needs no shutdown checkpoint) and removes the directory. A server kept in a `static`
//! (one per test binary, [`shared`]) is never dropped, so a small watchdog shell waits for the
//! test process to exit and then does the same.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a test prints when it cannot run for lack of PostgreSQL.
pub const SKIPPED_NO_POSTGRES: &str = "skipped: PostgreSQL binaries not found (install Debian's `postgresql` package, e.g. `apt-get install postgresql-15`)";

/// The superuser `initdb` creates (trust authentication on loopback only).
const SUPERUSER: &str = "caregate";

/// How to start a [`PgServer`].
#[derive(Debug, Clone, Default)]
pub struct PgServerOptions {
    /// Serve TLS.
    pub tls: Option<PgServerTls>,
}

/// A test server's TLS.
#[derive(Debug, Clone)]
pub struct PgServerTls {
    /// The server's certificate (chain), PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// Refuse TCP connections without TLS (`hostssl` only in `pg_hba.conf`).
    pub required: bool,
}

/// A running throw-away PostgreSQL server.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    /// The temporary directory: `data/` (the cluster), `socket/`, `server.log`.
    root: PathBuf,
    port: u16,
    /// `Some(user)` when the server runs as another user (we are root).
    run_as: Option<String>,
    watchdog: Option<Child>,
    databases: AtomicU64,
    /// `ssl = on` with `tls/server.crt` and `tls/server.key`.
    tls: bool,
}

/// The server shared by every test of this test binary (started on first use), or `None` if the
/// PostgreSQL binaries are not installed. Panics if they are installed but the server cannot
/// start: that is a broken machine, not a reason to skip.
pub fn shared() -> Option<&'static PgServer> {
    static SERVER: OnceLock<Option<PgServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            PgServer::start().map(|started| started.unwrap_or_else(|error| panic!("{error}")))
        })
        .as_ref()
}

impl PgServer {
    /// Start a server, or `None` if no PostgreSQL binaries were found.
    pub fn start() -> Option<Result<Self, String>> {
        Self::start_with(&PgServerOptions::default())
    }

    /// Start a server with `options`, or `None` if no PostgreSQL binaries were found.
    pub fn start_with(options: &PgServerOptions) -> Option<Result<Self, String>> {
        let bin = find_bindir()?;
        Some(Self::start_in(bin, options))
    }

    fn start_in(bin: PathBuf, options: &PgServerOptions) -> Result<Self, String> {
        let root = std::env::temp_dir().join(format!(
            "caregate-pg-{}-{}",
            std::process::id(),
            unique_suffix()
        ));
        std::fs::create_dir_all(root.join("socket"))
            .map_err(|error| format!("cannot create {}: {error}", root.display()))?;
        if let Some(tls) = &options.tls {
            write_tls_files(&root, tls)?;
        }
        let run_as = if is_root() {
            Some(unprivileged_user()?)
        } else {
            None
        };
        if let Some(user) = &run_as {
            chown_tree(&root, user)?;
        }
        let mut server = Self {
            bin,
            root,
            port: 0,
            run_as,
            watchdog: None,
            databases: AtomicU64::new(0),
            tls: options.tls.is_some(),
        };
        server.initdb()?;
        if let Some(tls) = &options.tls {
            server.write_hba(tls.required)?;
        }
        // A free port can be taken by someone else between our probe and the server's bind:
        // try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port()?;
            match server.pg_ctl_start() {
                Ok(()) => {
                    server.watchdog = server.spawn_watchdog().ok();
                    return Ok(server);
                }
                Err(error) => last_error = error,
            }
        }
        Err(format!("PostgreSQL did not start: {last_error}"))
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("socket")
    }

    /// A connection string (libpq key/value form) for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={database}",
            self.port
        )
    }

    /// A connection string for `database` as the superuser over the unix socket (trusted, no
    /// TLS whatever the server's TLS options).
    pub fn socket_url(&self, database: &str) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname={database}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// Create a new, empty database and return its connection string (TCP, see [`Self::url`]).
    pub fn create_database(&self) -> Result<String, String> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("test_{n}");
        // Over the unix socket: trusted whatever the TCP rules (a TLS-only server).
        let output = Command::new(self.bin.join("createdb"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, &name])
            .output()
            .map_err(|error| format!("cannot run createdb: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "createdb failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(self.url(&name))
    }

    /// A command running `program` from the PostgreSQL binaries as the server's user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(path);
                command
            }
            None => Command::new(path),
        }
    }

    fn initdb(&self) -> Result<(), String> {
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(self.root.join("data"))
            .args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
            ])
            .arg("--no-sync")
            .output()
            .map_err(|error| format!("cannot run initdb: {error}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// `pg_hba.conf` for a TLS server: the socket trusted; over TCP the superuser trusted and
    /// other roles by SCRAM-SHA-256; `hostssl` only if TLS is `required`.
    fn write_hba(&self, required: bool) -> Result<(), String> {
        let kind = if required { "hostssl" } else { "host" };
        let mut text = String::from("local all all trust\n");
        for network in ["127.0.0.1/32", "::1/128"] {
            text.push_str(&format!("{kind} all {SUPERUSER} {network} trust\n"));
            text.push_str(&format!("{kind} all all {network} scram-sha-256\n"));
        }
        let path = self.root.join("data").join("pg_hba.conf");
        std::fs::write(&path, text)
            .map_err(|error| format!("cannot write {}: {error}", path.display()))
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        // Loopback TCP only; the socket in our directory; small memory; fsync stays on (the
        // store's durability rule is tested against a real commit path).
        let mut options = format!(
            "-h 127.0.0.1 -p {} -k {} -c shared_buffers=16MB -c max_connections=60",
            self.port,
            self.socket_dir().display()
        );
        if self.tls {
            let dir = self.root.join("tls");
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                dir.join("server.crt").display(),
                dir.join("server.key").display()
            ));
        }
        let output = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.root.join("data"))
            .arg("-l")
            .arg(self.root.join("server.log"))
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("cannot run pg_ctl: {error}"))?;
        if output.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
            Err(format!(
                "pg_ctl start failed: {}{log}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// A shell that stops the server and removes the directory once this process has exited
    /// (for servers that are never dropped).
    fn spawn_watchdog(&self) -> std::io::Result<Child> {
        let stop = self.stop_script();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}",
            pid = std::process::id()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    }

    fn stop_script(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.root.join("data");
        let prefix = match &self.run_as {
            Some(user) => format!("runuser -u {user} -- "),
            None => String::new(),
        };
        format!(
            "{prefix}'{}' -D '{}' -m immediate -w stop >/dev/null 2>&1; rm -rf '{}'",
            pg_ctl.display(),
            data.display(),
            self.root.display()
        )
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = Command::new("sh")
            .args(["-c", &self.stop_script()])
            .stdin(Stdio::null())
            .status();
    }
}

/// `tls/server.crt` and `tls/server.key` (0600: PostgreSQL refuses a key others can read; the
/// tree is chowned to the server's user afterwards).
fn write_tls_files(root: &Path, tls: &PgServerTls) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = root.join("tls");
    std::fs::create_dir_all(&dir)
        .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    for (name, text) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    }
    Ok(())
}

fn unique_suffix() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::from(elapsed.subsec_nanos()));
    nanos ^ (NEXT.fetch_add(1, Ordering::Relaxed) << 32)
}

/// The directory with `initdb`, `pg_ctl`, `postgres` and `createdb`.
fn find_bindir() -> Option<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres", "createdb"]
            .iter()
            .all(|program| dir.join(program).is_file())
    };
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if has_all(&dir) {
            return Some(dir);
        }
    }
    // Debian keeps server binaries out of PATH: /usr/lib/postgresql/<major>/bin, newest first.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    versions
        .into_iter()
        .map(|(_, dir)| dir)
        .find(|dir| has_all(dir))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// `postgres` if that user exists, else `nobody`.
fn unprivileged_user() -> Result<String, String> {
    for user in ["postgres", "nobody"] {
        if Command::new("id")
            .arg("-u")
            .arg(user)
            .output()
            .is_ok_and(|output| output.status.success())
        {
            return Ok(user.to_owned());
        }
    }
    Err("running as root, and neither a `postgres` nor a `nobody` user exists".to_owned())
}

fn chown_tree(root: &Path, user: &str) -> Result<(), String> {
    let status = Command::new("chown")
        .args(["-R", user])
        .arg(root)
        .status()
        .map_err(|error| format!("cannot run chown: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("chown {user} {} failed", root.display()))
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|error| format!("no free loopback port: {error}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| error.to_string())
}
