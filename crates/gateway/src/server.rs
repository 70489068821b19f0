//! The listener: TCP accept, TLS handshake, HTTP/1.1 or HTTP/2 (by ALPN), connection limits and
//! timeouts, and graceful shutdown.
//!
//! Limits enforced here (the rest are per request, in [`crate::app`]):
//! - `max_connections`: a connection over the limit is closed at once, before the TLS handshake;
//! - `tls_handshake_timeout_secs`: slow or silent handshakes are dropped;
//! - `header_read_timeout_secs` (HTTP/1.1): slow-loris headers are cut off, and an idle keep-alive
//!   connection waiting for its next request is closed after the same time;
//! - `max_header_bytes`: larger request heads get 431 (HTTP/1.1) or a stream reset (HTTP/2);
//! - `idle_timeout_secs`: a connection with no bytes moving either way is shut down gracefully.
//!
//! Shutdown: stop accepting, ask every connection to finish its in-flight requests and close,
//! and wait up to the grace period. Requests already answered were durable before their answer
//! (the store's invariant), so nothing acknowledged is lost whatever happens after.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::config::LimitsSection;
use crate::tls::{certificate_thumbprint, is_peer_error};

/// Facts about the connection a request arrived on, put in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// RFC 8705 thumbprint of the verified client certificate, if one was presented.
    pub client_cert_thumbprint: Option<String>,
}

/// Serve `router` over TLS on `listener` until `shutdown` resolves, then drain gracefully.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: LimitsSection,
    grace: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let builder = connection_builder(&limits);
    let epoch = Instant::now();
    tokio::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = limits.max_connections,
                "connection limit reached; closing new connection"
            );
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        let handshake_timeout = Duration::from_secs(limits.tls_handshake_timeout_secs);
        let idle_timeout = Duration::from_secs(limits.idle_timeout_secs);
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    if is_peer_error(&error) {
                        tracing::debug!(%error, %remote, "TLS handshake refused");
                    } else {
                        tracing::info!(%error, %remote, "TLS handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let client_cert_thumbprint = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(certificate_thumbprint);
            let info = ConnInfo {
                remote,
                client_cert_thumbprint,
            };
            let service =
                router.map_request(move |mut request: http::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(info.clone());
                    request.map(axum::body::Body::new)
                });
            let last_activity = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
            let io = TokioIo::new(Activity {
                inner: tls,
                epoch,
                last: last_activity.clone(),
            });
            let connection = builder.serve_connection(io, TowerToHyperService::new(service));
            tokio::pin!(connection);
            let mut ticker = tokio::time::interval(idle_timeout.max(Duration::from_secs(1)) / 4);
            let mut closing = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%error, %remote, "connection ended with an error");
                        }
                        break;
                    }
                    changed = stop.changed(), if !closing => {
                        let _ = changed;
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    _ = ticker.tick(), if !closing => {
                        let idle_ms = (epoch.elapsed().as_millis() as u64)
                            .saturating_sub(last_activity.load(Ordering::Relaxed));
                        if idle_ms >= idle_timeout.as_millis() as u64 {
                            tracing::debug!(%remote, "closing idle connection");
                            closing = true;
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        });
    }

    drop(listener);
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    let _ = stop_tx.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    match tokio::time::timeout(grace, connections.acquire_many(all)).await {
        Ok(_) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "grace period over; closing remaining connections"
        ),
    }
}

fn connection_builder(limits: &LimitsSection) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs))
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Envoy's edge guidance: 64 KiB stream and 1 MiB connection windows (DOMAIN.md B1).
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// An I/O wrapper that records when bytes last moved, for the idle timeout.
struct Activity<T> {
    inner: T,
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Activity<T> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
