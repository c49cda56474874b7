//! A small HTTP/1.1 client (hyper) for the simulated product, the benchmarks
//! and the black-box tests of Flywheel's HTTP services.

use http_body_util::BodyExt;

/// A response read whole.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Response headers (lower-case names).
    pub headers: hyper::HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body parsed as JSON; panics with the body when it is not JSON (for tests).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Server address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with {addr}: {detail}")]
    Exchange {
        /// Server address.
        addr: std::net::SocketAddr,
        /// What failed.
        detail: String,
    },
}

/// Sends one request over a fresh connection and reads the whole response.
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<HttpResponse, HttpError> {
    let failed = |detail: String| HttpError::Exchange { addr, detail };
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|source| HttpError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(conn);
    let mut builder = hyper::Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req =
        builder.body(http_body_util::Full::new(hyper::body::Bytes::from(body))).map_err(|e| failed(e.to_string()))?;
    let response = sender.send_request(req).await.map_err(|e| failed(e.to_string()))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.map_err(|e| failed(e.to_string()))?.to_bytes().to_vec();
    Ok(HttpResponse { status, headers, body })
}

/// [`request`] that panics on transport errors, for tests.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> HttpResponse {
    request(addr, method, path, headers, body).await.unwrap_or_else(|e| panic!("{e}"))
}
