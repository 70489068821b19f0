//! `caregate bench`: the end-to-end load benchmark of issue 7, and the baselines that bound it.
//!
//! One run, on loopback only:
//! 1. **disk**: write 4 KiB and `fsync` a few thousand times in the data directory's filesystem
//!    (p50/p99). A durable group commit cannot be faster than one fsync, so `throughput × fsync
//!    p50` is how many records each commit must carry on average.
//! 2. **gateway**: start `caregate serve` (this same executable) on the example ICS in a temporary
//!    data directory, or use `--url` (refused unless the host is `127.0.0.1`, `localhost` or
//!    `::1`, and every address it resolves to is loopback); get an access token per partner
//!    with the example config's demo keys (SMART Backend Services), then per record size:
//!    - warm-up, then a closed-loop steady-state window at maximum load: every connection (or
//!      HTTP/2 stream) sends its next record as soon as the previous answer arrives;
//!    - a paced (open-loop) window at 70 % of the measured maximum, where latency is measured
//!      from each request's *scheduled* send time, so a stall is not hidden by the generator
//!      waiting for it (coordinated omission);
//!    - the same closed loop against a **bare TLS endpoint**: hyper + rustls inside this process
//!      with the gateway's TLS settings (TLS 1.3, aws-lc-rs, P-256 certificate), which reads the
//!      whole body and echoes it back with 201 — what the network stack, TLS and HTTP cost with
//!      no FHIR work and no disk.
//! 3. **report**: records/s, latency p50/p99/p99.9, statuses, CPU seconds used by the gateway
//!    and by this process (from `/proc`), and the ratios gateway ÷ bare TLS and gateway ÷ fsync.
//!
//! Records come from [`caregate_testkit::synth`] (the synthetic ICS day) padded to each size;
//! each request rewrites the record's business identifier so that no two requests are the same
//! record (the gateway would otherwise answer an identical create as a retry). Targets from the
//! issue are printed next to the results, never asserted. The exit status is 1 if the gateway
//! answered any 5xx or a connection failed, else 0.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use caregate_testkit::synth::{PARTNERS, SynthConfig, records};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use crate::launch::{GatewayProcess, LoadedConfig, PartnerCredentials};

/// Options of `caregate bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// The gateway configuration to start (its partners' demo keys are read from keys/ beside
    /// it). Its listen address and data directory are replaced by loopback and a temp dir.
    #[arg(long, default_value = "deploy/example/caregate.toml")]
    config: PathBuf,
    /// Benchmark a gateway that is already running at this loopback URL instead of starting one.
    #[arg(long)]
    url: Option<String>,
    /// The PEM certificate to trust for --url (e.g. data/dev-certificate.pem).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Where to probe fsync with --url (default: the system temp directory).
    #[arg(long)]
    fsync_dir: Option<PathBuf>,
    /// TLS keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// `http1` or `http2`.
    #[arg(long, default_value = "http1", value_parser = ["http1", "http2"])]
    protocol: String,
    /// Concurrent streams per connection with --protocol http2.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Seconds of steady state at maximum load per record size (the 70 % window is half as long,
    /// the bare TLS window a third).
    #[arg(long, default_value_t = 15)]
    duration: u64,
    /// Seconds of warm-up before each maximum-load window.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Record sizes in bytes.
    #[arg(long, default_value = "2048,8192", value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Seed of the synthetic records.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// fsync samples (the probe also stops after 15 s).
    #[arg(long, default_value_t = 2000)]
    fsync_samples: usize,
    /// Keep the started gateway's temporary data directory and print where it is.
    #[arg(long)]
    keep_data: bool,
}

/// Records that must not be replayed byte for byte: `(partner index, path, head, tail)` around
/// the record's own identifier value.
#[derive(Debug)]
struct Prepared {
    partner: usize,
    path: String,
    head: Bytes,
    tail: Bytes,
}

/// What one window measured.
#[derive(Debug)]
struct Window {
    seconds: f64,
    latency_us: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    connection_errors: u64,
}

impl Window {
    fn new(seconds: f64) -> anyhow::Result<Self> {
        Ok(Self {
            seconds,
            latency_us: Histogram::new_with_bounds(1, 120_000_000, 3)
                .context("histogram bounds")?,
            statuses: BTreeMap::new(),
            connection_errors: 0,
        })
    }

    fn merge(&mut self, other: &Window) -> anyhow::Result<()> {
        self.latency_us
            .add(&other.latency_us)
            .context("merge histograms")?;
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        self.connection_errors += other.connection_errors;
        Ok(())
    }

    fn success(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    fn server_errors(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum()
    }

    fn rate(&self) -> f64 {
        self.success() as f64 / self.seconds.max(1e-9)
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Where and how to connect.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    authority: String,
    tls: Arc<rustls::ClientConfig>,
    http2: bool,
}

/// One connection's request sender.
#[derive(Clone)]
enum Sender {
    Http1(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(u16, usize), hyper::Error> {
        let response = match self {
            Self::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Self::Http2(sender) => {
                let mut sender = sender.clone();
                sender.ready().await?;
                sender.send_request(request).await?
            }
        };
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body.len()))
    }
}

impl Target {
    async fn connect(&self) -> anyhow::Result<Sender> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("cannot connect to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .context("TLS handshake failed")?;
        let io = TokioIo::new(tls);
        if self.http2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Ok(Sender::Http2(sender))
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(connection);
            Ok(Sender::Http1(Arc::new(tokio::sync::Mutex::new(sender))))
        }
    }

    fn request(
        &self,
        record: &Prepared,
        serial: u64,
        run_tag: &str,
        tokens: &[String],
    ) -> anyhow::Result<http::Request<Full<Bytes>>> {
        let id = format!("bench-{run_tag}-{serial:012}");
        let mut body = Vec::with_capacity(record.head.len() + id.len() + record.tail.len());
        body.extend_from_slice(&record.head);
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(&record.tail);
        let uri = if self.http2 {
            format!("https://{}{}", self.authority, record.path)
        } else {
            record.path.clone()
        };
        let mut builder = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/fhir+json")
            .header(http::header::ACCEPT, "application/fhir+json")
            .header(
                http::header::AUTHORIZATION,
                format!(
                    "Bearer {}",
                    tokens.get(record.partner).map_or("", String::as_str)
                ),
            );
        if !self.http2 {
            builder = builder.header(http::header::HOST, &self.authority);
        }
        Ok(builder.body(Full::new(Bytes::from(body)))?)
    }
}

/// How a window drives load.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// Each sender slot sends the next request when the previous one is answered.
    ClosedLoop,
    /// This many requests per second in total, on a fixed schedule.
    Rate(f64),
}

/// What every load window shares: the records, the partners' tokens, and the serial that makes
/// each request a new record.
struct Load {
    pool: Arc<Vec<Prepared>>,
    tokens: Arc<Vec<String>>,
    run_tag: Arc<String>,
    serial: Arc<AtomicU64>,
}

/// Run one window over `senders` (one slot per connection × streams): `warmup` unrecorded,
/// then `seconds` recorded.
async fn drive(
    load: &Load,
    target: &Target,
    senders: &[Sender],
    pace: Pace,
    warmup: Duration,
    seconds: Duration,
) -> anyhow::Result<Window> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + seconds;
    let slots = senders.len().max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for (slot, sender) in senders.iter().enumerate() {
        let (target, sender, pool, tokens, run_tag, serial) = (
            target.clone(),
            sender.clone(),
            load.pool.clone(),
            load.tokens.clone(),
            load.run_tag.clone(),
            load.serial.clone(),
        );
        tasks.spawn(async move {
            let mut window = Window::new(seconds.as_secs_f64())?;
            let interval = match pace {
                Pace::ClosedLoop => None,
                Pace::Rate(rate) => Some(Duration::from_secs_f64(slots as f64 / rate.max(1.0))),
            };
            // Stagger paced slots across one interval so they do not fire together.
            let mut scheduled =
                start + interval.map_or(Duration::ZERO, |i| i * slot as u32 / slots as u32);
            loop {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(scheduled.into()).await;
                    scheduled += interval;
                }
                let began = match interval {
                    Some(interval) => scheduled - interval,
                    None => Instant::now(),
                };
                // A paced slot that fell behind keeps its schedule (its backlog is latency), but
                // the window never runs past twice its length.
                if began >= end || Instant::now() >= end + seconds {
                    break;
                }
                let n = serial.fetch_add(1, Ordering::Relaxed);
                let Some(record) = pool.get(n as usize % pool.len().max(1)) else {
                    break;
                };
                let request = target.request(record, n, &run_tag, &tokens)?;
                let result = sender.send(request).await;
                let recorded = began >= measure_from;
                match result {
                    Ok((status, _)) => {
                        if recorded {
                            let micros = began.elapsed().as_micros().max(1) as u64;
                            window.latency_us.saturating_record(micros);
                            *window.statuses.entry(status).or_default() += 1;
                        }
                    }
                    Err(_) => {
                        // The connection is gone: count it and stop this slot.
                        window.connection_errors += 1;
                        break;
                    }
                }
            }
            anyhow::Ok(window)
        });
    }
    let mut total = Window::new(seconds.as_secs_f64())?;
    while let Some(joined) = tasks.join_next().await {
        total.merge(&joined.context("load task panicked")??)?;
    }
    Ok(total)
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat` (Linux; clock ticks
/// assumed to be 100 Hz, the Linux default USER_HZ).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident memory of a process in MiB, from `/proc/<pid>/status`.
fn resident_mib(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Write 4 KiB and fsync, `samples` times (at most 15 s), in `dir`; latencies in µs.
fn fsync_probe(dir: &Path, samples: usize) -> anyhow::Result<Histogram<u64>> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!(".caregate-fsync-probe-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let block = [0x5au8; 4096];
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    for _ in 0..samples.max(1) {
        let began = Instant::now();
        file.write_all(&block)?;
        file.sync_all()?;
        histogram.saturating_record(began.elapsed().as_micros().max(1) as u64);
        if Instant::now() > deadline {
            break;
        }
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(histogram)
}

/// `host` is a loopback name or address; anything else is refused (this tool generates load).
fn loopback_url(url: &str) -> anyhow::Result<(String, u16)> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("--url {url} is not a URL"))?;
    if parsed.scheme() != "https" {
        bail!("--url must be https (the gateway only speaks TLS)");
    }
    let host = parsed.host_str().unwrap_or_default().to_owned();
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1") {
        bail!("refusing to load-test {host}: only 127.0.0.1, localhost and ::1 may be benchmarked");
    }
    Ok((host, parsed.port_or_known_default().unwrap_or(443)))
}

/// Resolve a loopback host to an address that accepts connections; every resolved address must
/// be loopback.
async fn resolve_loopback(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!("{host} does not resolve only to loopback addresses; refusing to load-test it");
    }
    for addr in &addrs {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(*addr);
        }
    }
    bail!("nothing listens on {host}:{port}")
}

fn client_tls(ca_pem: &[u8], http2: bool) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.context("bad PEM certificate")?)
            .context("certificate rejected")?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if http2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(Arc::new(config))
}

/// The gateway process this run started, in its temporary directory.
struct Started {
    process: GatewayProcess,
    dir: tempfile::TempDir,
}

impl Started {
    fn pid(&self) -> String {
        self.process.pid()
    }

    fn stop(self, keep: bool) -> Option<PathBuf> {
        self.process.stop(Duration::from_secs(30));
        if keep { Some(self.dir.keep()) } else { None }
    }
}

/// Start `caregate serve` on a loopback copy of `config` in a temporary data directory.
fn start_gateway(config: &Path) -> anyhow::Result<Started> {
    let mut loaded = LoadedConfig::load(config)?;
    let dir = tempfile::Builder::new()
        .prefix("caregate-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let server = loaded.table_mut("server")?;
    server.insert("listen".into(), "127.0.0.1:0".into());
    server.insert(
        "data_dir".into(),
        dir.path().join("data").display().to_string().into(),
    );
    // The admin listener (on by default) gets a free port too, beside any running gateway.
    loaded
        .table_mut("admin")?
        .insert("listen".into(), "127.0.0.1:0".into());
    let copy = dir.path().join("caregate.toml");
    loaded.write(&copy)?;
    let process = GatewayProcess::spawn(&copy, "warn", None)?;
    Ok(Started { process, dir })
}

/// Access tokens for [`PARTNERS`], in that order, signed with the demo keys beside the config.
async fn tokens(config: &Path, base_url: &str, ca_pem: &[u8]) -> anyhow::Result<Vec<String>> {
    let loaded = LoadedConfig::load(config)?;
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem)?])
        .build()?;
    let mut out = Vec::new();
    for partner in PARTNERS {
        let credentials = PartnerCredentials::load(&loaded, partner.id)
            .with_context(|| format!("in {}", config.display()))?;
        out.push(credentials.token(&client, base_url).await?);
    }
    Ok(out)
}

/// A pool of records of about `size` bytes, split around their identifier.
fn pool(seed: u64, size: usize, count: usize) -> Vec<Prepared> {
    let mut config = SynthConfig::new(seed, count.min(caregate_testkit::synth::MAX_PATIENTS));
    config.pad_to_bytes = Some(size);
    records(&config)
        .take(count)
        .filter_map(|record| {
            let at = record.body.find(&record.record_id)?;
            let partner = PARTNERS.iter().position(|p| p.id == record.partner_id)?;
            let bytes = Bytes::from(record.body.clone().into_bytes());
            Some(Prepared {
                partner,
                path: record.path(),
                head: bytes.slice(..at),
                tail: bytes.slice(at + record.record_id.len()..),
            })
        })
        .collect()
}

/// The in-process bare TLS endpoint: reads the body, echoes it with 201.
async fn bare_tls_server() -> anyhow::Result<(SocketAddr, Vec<u8>)> {
    let dev = caregate_gateway::tls::dev_certificate(&["localhost", "127.0.0.1"])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(vec![dev.cert_der], dev.key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((IpAddr::V4(Ipv4Addr::LOCALHOST), 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |request: http::Request<hyper::body::Incoming>| async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        let mut response = http::Response::new(Full::new(body));
                        *response.status_mut() = http::StatusCode::CREATED;
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/fhir+json"),
                        );
                        Ok::<_, hyper::Error>(response)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok((addr, dev.cert_pem.into_bytes()))
}

async fn open(target: &Target, connections: usize, streams: usize) -> anyhow::Result<Vec<Sender>> {
    let mut senders = Vec::new();
    for _ in 0..connections.max(1) {
        let sender = target.connect().await?;
        let per_connection = if target.http2 { streams.max(1) } else { 1 };
        senders.extend(std::iter::repeat_n(sender, per_connection));
    }
    Ok(senders)
}

fn fmt_rate(rate: f64) -> String {
    format!("{rate:>10.0}")
}

/// Run the benchmark; see the module docs.
pub(crate) fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = &args.url {
        loopback_url(url)?;
        if args.ca_cert.is_none() {
            bail!("--url needs --ca-cert (the gateway's certificate, PEM)");
        }
    }
    if args.sizes.is_empty() || args.connections == 0 || args.duration == 0 {
        bail!("--sizes, --connections and --duration must not be empty or zero");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run_async(args))
}

#[allow(clippy::print_stdout, reason = "the report is the command's output")]
async fn run_async(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let http2 = args.protocol == "http2";
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("caregate end-to-end load benchmark");
    println!(
        "  {} {} connection(s){}, {} s warm-up + {} s at maximum load + {} s at 70 % per size, seed {}, {cores} CPU(s)",
        args.protocol,
        args.connections,
        if http2 {
            format!(" x {} streams", args.streams)
        } else {
            String::new()
        },
        args.warmup,
        args.duration,
        (args.duration / 2).max(1),
        args.seed,
    );

    // The gateway: started here, or given.
    let started = match &args.url {
        None => Some(tokio::task::block_in_place(|| start_gateway(&args.config))?),
        Some(_) => None,
    };
    let outcome = measure(&args, started.as_ref(), http2).await;
    if let Some(started) = started {
        let kept = tokio::task::block_in_place(|| started.stop(args.keep_data));
        if let Some(dir) = kept {
            println!("gateway data kept in {}", dir.display());
        }
    }
    outcome
}

#[allow(clippy::print_stdout, reason = "the report is the command's output")]
async fn measure(
    args: &BenchArgs,
    started: Option<&Started>,
    http2: bool,
) -> anyhow::Result<ExitCode> {
    let (base_url, ca_pem, fsync_dir) = match (started, &args.url, &args.ca_cert) {
        (Some(started), _, _) => (
            started.process.base_url.clone(),
            started.process.cert_pem.clone(),
            started.dir.path().join("data"),
        ),
        (None, Some(url), Some(ca)) => (
            url.trim_end_matches('/').to_owned(),
            std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?,
            args.fsync_dir.clone().unwrap_or_else(std::env::temp_dir),
        ),
        _ => bail!("--url needs --ca-cert"),
    };
    let (host, port) = loopback_url(&base_url)?;
    // The started gateway listens on 127.0.0.1 whatever its public URL says.
    let addr = match started {
        Some(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        None => resolve_loopback(&host, port).await?,
    };
    println!(
        "  gateway: {base_url}{}",
        started.map_or(String::new(), |s| format!(
            " (started here, pid {}, config {})",
            s.pid(),
            args.config.display()
        ))
    );

    // 1. The disk.
    let samples = args.fsync_samples;
    let dir = fsync_dir.clone();
    let fsync = tokio::task::spawn_blocking(move || fsync_probe(&dir, samples)).await??;
    let fsync_p50 = fsync.value_at_quantile(0.5) as f64 / 1000.0;
    let fsync_p99 = fsync.value_at_quantile(0.99) as f64 / 1000.0;
    println!(
        "\ndisk: write 4 KiB + fsync x {} in {}: p50 {fsync_p50:.3} ms, p99 {fsync_p99:.3} ms (one writer: at most {:.0} commits/s)",
        fsync.len(),
        fsync_dir.display(),
        1000.0 / fsync_p50.max(1e-6)
    );

    // 2. The bare TLS endpoint and the gateway.
    let tokens = Arc::new(tokens(&args.config, &base_url, &ca_pem).await?);
    let target = Target {
        addr,
        server_name: ServerName::try_from(host.clone())?.to_owned(),
        authority: format!("{host}:{port}"),
        tls: client_tls(&ca_pem, http2)?,
        http2,
    };
    let (bare_addr, bare_pem) = bare_tls_server().await?;
    let bare = Target {
        addr: bare_addr,
        server_name: ServerName::try_from("localhost")?.to_owned(),
        authority: format!("localhost:{}", bare_addr.port()),
        tls: client_tls(&bare_pem, http2)?,
        http2,
    };
    let run_tag = Arc::new(format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let serial = Arc::new(AtomicU64::new(0));
    let gateway_pid = started.map(Started::pid);
    let warmup = Duration::from_secs(args.warmup);
    let full = Duration::from_secs(args.duration);
    let paced = Duration::from_secs((args.duration / 2).max(1));
    let bare_window = Duration::from_secs((args.duration / 3).max(1));

    let mut failed = false;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &size in &args.sizes {
        let pool = Arc::new(tokio::task::block_in_place(|| pool(args.seed, size, 4_000)));
        if pool.is_empty() {
            bail!("the generator produced no records");
        }
        let mean_bytes = pool
            .iter()
            .map(|p| p.head.len() + p.tail.len() + 20)
            .sum::<usize>()
            / pool.len();
        let load = Load {
            pool,
            tokens: tokens.clone(),
            run_tag: run_tag.clone(),
            serial: serial.clone(),
        };
        let senders = open(&target, args.connections, args.streams).await?;
        let cpu_before = (
            gateway_pid.as_deref().and_then(cpu_seconds),
            cpu_seconds("self"),
            Instant::now(),
        );
        let max = drive(&load, &target, &senders, Pace::ClosedLoop, warmup, full).await?;
        let elapsed = cpu_before.2.elapsed().as_secs_f64();
        let gateway_cpu = match (gateway_pid.as_deref().and_then(cpu_seconds), cpu_before.0) {
            (Some(after), Some(before)) => Some((after - before) / elapsed),
            _ => None,
        };
        let bench_cpu = match (cpu_seconds("self"), cpu_before.1) {
            (Some(after), Some(before)) => Some((after - before) / elapsed),
            _ => None,
        };
        let at_70 = drive(
            &load,
            &target,
            &senders,
            Pace::Rate(max.rate() * 0.7),
            Duration::from_secs(1),
            paced,
        )
        .await?;
        drop(senders);
        let bare_senders = open(&bare, args.connections, args.streams).await?;
        let bare_max = drive(
            &load,
            &bare,
            &bare_senders,
            Pace::ClosedLoop,
            Duration::from_secs(1),
            bare_window,
        )
        .await?;
        drop(bare_senders);
        for window in [&max, &at_70] {
            if window.server_errors() > 0 || window.connection_errors > 0 {
                failed = true;
            }
        }
        let label = format!("{} KB", size / 1024);
        notes.push(format!(
            "{label}: mean body {mean_bytes} B; gateway CPU {} cores, bench process {} cores during the maximum-load window; \
             gateway/bare TLS throughput {:.2}; records per fsync at maximum load ≈ {:.1}; gateway p50 / fsync p50 = {:.1}",
            gateway_cpu.map_or("n/a".into(), |c| format!("{c:.2}")),
            bench_cpu.map_or("n/a".into(), |c| format!("{c:.2}")),
            max.rate() / bare_max.rate().max(1e-9),
            max.rate() * fsync_p50 / 1000.0,
            max.ms(0.5) / fsync_p50.max(1e-6),
        ));
        rows.push((label.clone(), "gateway, maximum", max));
        rows.push((label.clone(), "gateway, 70 % paced", at_70));
        rows.push((label, "bare TLS, maximum", bare_max));
    }

    println!(
        "\n{:<6} {:<20} {:>10} {:>8} {:>8} {:>9}  statuses",
        "size", "load", "records/s", "p50 ms", "p99 ms", "p99.9 ms"
    );
    for (size, load, window) in &rows {
        let statuses: Vec<String> = window
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .chain(
                (window.connection_errors > 0)
                    .then(|| format!("connection errors: {}", window.connection_errors)),
            )
            .collect();
        println!(
            "{size:<6} {load:<20} {} {:>8.2} {:>8.2} {:>9.2}  {}",
            fmt_rate(window.rate()),
            window.ms(0.5),
            window.ms(0.99),
            window.ms(0.999),
            statuses.join(", ")
        );
    }
    println!();
    for note in &notes {
        println!("{note}");
    }
    if let Some(rss) = gateway_pid.as_deref().and_then(resident_mib) {
        println!("gateway resident memory at the end: {rss:.0} MiB");
    }
    println!(
        "targets (issue 7, reported, not asserted): >= 10,000 records/s at 2 KB, >= 3,000 at 8 KB; p99 <= 5 ms at 70 % of maximum"
    );
    if failed {
        println!("FAILED: the gateway answered 5xx or a connection failed (see statuses)");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_refuses_non_loopback_urls() {
        for url in [
            "https://example.org:8443",
            "https://10.0.0.1:8443",
            "https://127.0.0.2:8443",
            "https://localhost.example.org:8443",
            "http://127.0.0.1:8443",
        ] {
            assert!(loopback_url(url).is_err(), "{url} accepted");
        }
        for url in [
            "https://127.0.0.1:8443",
            "https://localhost:8443/",
            "https://[::1]:8443",
        ] {
            assert!(loopback_url(url).is_ok(), "{url} refused");
        }
    }

    #[test]
    fn bench_pool_splits_records_around_their_identifier() {
        let pool = pool(3, 2048, 50);
        assert_eq!(pool.len(), 50);
        for record in &pool {
            let mut body = record.head.to_vec();
            body.extend_from_slice(b"X");
            body.extend_from_slice(&record.tail);
            let value: serde_json::Value = serde_json::from_slice(&body).expect("still JSON");
            assert!(value["identifier"].to_string().contains("\"X\""));
        }
    }
}
