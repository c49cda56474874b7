//! The public API's HTTP/1 server: a bounded number of connections, each
//! closed when a client is too slow to send its request headers.
//!
//! A connection holds a slot from accept to close; with every slot taken,
//! new connections wait in the listen backlog until one closes. Headers (of
//! the first request, and of each later one on a kept-alive connection,
//! counted from the moment the server waits for them) must arrive within the
//! header timeout, so an idle or stalled connection gives its slot back. The
//! body deadline is enforced where bodies are read (`read_body`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::PhaseLabels;

/// Connection limits of the public API.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Most connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
}

/// Connection metrics, shared with the service's registry.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionMetrics {
    pub(crate) open: Gauge,
    pub(crate) timeouts: Family<PhaseLabels, Counter>,
}

/// Serves `app` on `listener` until `shutdown`, then stops accepting, lets
/// each connection finish its request in flight and returns once all closed.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).half_close(true);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("the slot semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        metrics.open.inc();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    // Finish the request in flight, then close; idle connections close now.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    metrics.timeouts.get_or_create(&PhaseLabels { phase: "headers".into() }).inc();
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
            metrics.open.dec();
            drop(permit);
        });
    }
    drop(listener);
    // Every slot back means every connection closed (the drain timeout bounds the wait).
    let _ = slots.acquire_many(limits.max_connections.min(u32::MAX as usize) as u32).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const HEADERS: Duration = Duration::from_millis(400);

    async fn start(
        max_connections: usize,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>, ConnectionMetrics) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app =
            Router::new().route("/ok", get(|| async { "ok" })).route("/echo", post(|body: String| async { body }));
        let limits = ConnectionLimits { max_connections, header_read_timeout: HEADERS };
        let (metrics, shutdown) = (ConnectionMetrics::default(), CancellationToken::new());
        let task = tokio::spawn(serve(listener, app, limits, metrics.clone(), shutdown.clone()));
        (addr, shutdown, task, metrics)
    }

    /// Sends `request` on a fresh connection and reads until the server closes it.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("answered").unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Waits (at most 10 s) for the server to close `s`; returns what it sent.
    async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        read.expect("the server closes a slow connection").ok();
        out
    }

    #[tokio::test]
    async fn slow_headers_are_cut_off_while_others_are_served() {
        let (addr, shutdown, task, metrics) = start(8).await;
        let started = Instant::now();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        // Normal clients are served meanwhile.
        for _ in 0..3 {
            let answer = exchange(addr, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");
        }
        // A kept-alive connection idle after its request is closed the same way.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut first = [0u8; 12];
        kept.read_exact(&mut first).await.unwrap();
        let answered = Instant::now();
        for s in [&mut idle, &mut partial] {
            until_closed(s).await;
            assert!(started.elapsed() >= HEADERS, "closed after the header timeout, not before");
        }
        let rest = String::from_utf8(until_closed(&mut kept).await).unwrap();
        assert!(answered.elapsed() >= HEADERS && rest.ends_with("ok"), "{rest}");
        assert!(started.elapsed() < HEADERS + Duration::from_secs(5));
        assert_eq!(metrics.timeouts.get_or_create(&PhaseLabels { phase: "headers".into() }).get(), 3);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops").unwrap();
        assert_eq!(metrics.open.get(), 0);
    }

    #[tokio::test]
    async fn beyond_the_cap_connections_wait_for_a_free_slot() {
        let (addr, shutdown, task, _) = start(2).await;
        let started = Instant::now();
        let mut held = [TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap()];
        for s in &mut held {
            s.write_all(b"GET /ok HTTP/1.1\r\n").await.unwrap();
        }
        // Served only once a held connection timed out and gave its slot back.
        let answer =
            exchange(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi").await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"), "{answer}");
        assert!(started.elapsed() >= HEADERS, "the third connection waited: {:?}", started.elapsed());
        // Shutdown closes idle keep-alive connections and returns.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut first = [0u8; 12];
        kept.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        shutdown.cancel();
        until_closed(&mut kept).await;
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops").unwrap();
    }
}
