//! HTTP plumbing shared by the daemons with a REST surface (gateway, auth): the accept
//! loop with a graceful drain, JSON and `application/problem+json` (RFC 9457) responses,
//! bounded body reading, JSON parsing whose errors name the offending field, query-string
//! decoding, and request metrics.
//!
//! Routing and middleware stay in each daemon: the gateway and the auth daemon have a
//! handful of routes each, not enough to justify a framework, and they must not depend on
//! each other.

// A rejected request *is* its response: handlers return `Result<T, Resp>` and the error
// side is only ever built once per failed request, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub type Resp = Response<Full<Bytes>>;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Resp {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        FieldError {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// An RFC 9457 problem document.
pub fn problem(status: StatusCode, detail: &str) -> Resp {
    problem_with(status, detail, &[])
}

pub fn problem_with(status: StatusCode, detail: &str, errors: &[FieldError]) -> Resp {
    let mut body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    if !errors.is_empty() {
        body["errors"] = serde_json::json!(errors);
    }
    let mut r = json(status, &body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

/// Reads a body of at most [`BODY_LIMIT`] bytes; 413 beyond, 400 on a broken stream,
/// 408 (and the connection closed) when it does not arrive within the server's body read
/// timeout ([`ServerLimits::body_read_timeout_ms`]; 10 s outside [`serve`]).
pub async fn read_body(body: Incoming) -> Result<Bytes, Resp> {
    let limit = BODY_TIMEOUT
        .try_with(|d| *d)
        .unwrap_or(Duration::from_secs(10));
    let Ok(read) = tokio::time::timeout(limit, Limited::new(body, BODY_LIMIT).collect()).await
    else {
        let mut r = problem(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        );
        r.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return Err(r);
    };
    match read {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body exceeds 1 MiB",
            ))
        }
        Err(e) => Err(problem(
            StatusCode::BAD_REQUEST,
            &format!("cannot read request body: {e}"),
        )),
    }
}

/// Parses JSON; a syntax or type error is a 400 naming the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Resp> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." || path.is_empty() {
            let msg = inner.to_string();
            msg.split('`').nth(1).map(str::to_owned).unwrap_or_default()
        } else {
            path
        };
        let detail = if field.is_empty() {
            format!("malformed JSON: {inner}")
        } else {
            format!("field `{field}`: {inner}")
        };
        let errors = if field.is_empty() {
            vec![]
        } else {
            vec![FieldError::new(&field, inner.to_string())]
        };
        problem_with(StatusCode::BAD_REQUEST, &detail, &errors)
    })
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub status: u16,
}

/// Request counters and latency, registered once.
pub struct HttpMetrics {
    pub requests: Family<RouteLabels, Counter>,
    pub latency: Histogram,
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RouteLabels, Counter>::default();
        let latency = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            latency.clone(),
        );
        HttpMetrics { requests, latency }
    }

    pub fn observe(&self, route: &'static str, status: StatusCode, started: Instant) {
        self.requests
            .get_or_create(&RouteLabels {
                route,
                status: status.as_u16(),
            })
            .inc();
        self.latency.observe(started.elapsed().as_secs_f64());
    }
}

/// Limits of the HTTP server, the `[server]` table of the gateway's and the auth daemon's
/// configuration (docs/configuration.md).
///
/// Why each exists: without a header timeout a client can hold a connection forever by
/// sending one header byte a minute (slowloris); without a body timeout the same works
/// with a declared `Content-Length` that never arrives; without connection caps one host
/// can take every file descriptor. The caps apply to TCP peers (the address that actually
/// connected), IPv6 peers grouped by [`ServerLimits::ipv6_prefix`] since one host
/// usually owns a whole /64.
#[derive(Debug, Clone, Copy, serde::Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerLimits {
    /// Milliseconds a client may take to send a request's headers.
    pub header_read_timeout_ms: u64,
    /// Milliseconds a handler waits for a request body to arrive in full (408 after).
    pub body_read_timeout_ms: u64,
    /// Open connections over all clients; beyond it new ones get 503 and are closed.
    pub max_connections: usize,
    /// Open connections per client address (IPv6: per prefix).
    pub max_connections_per_ip: usize,
    /// IPv6 peers sharing this many leading bits count as one client.
    pub ipv6_prefix: u8,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            ipv6_prefix: 64,
        }
    }
}

impl ServerLimits {
    /// Checks the values; `table` is the key prefix used in errors (`server`).
    pub fn validate(&self, table: &str) -> Result<(), crate::config::ConfigError> {
        use crate::config::ConfigError;
        for (key, v) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(
                    format!("{table}.{key}"),
                    "must be at least 1",
                ));
            }
        }
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                format!("{table}.max_connections"),
                "must be at least 1",
            ));
        }
        if self.max_connections_per_ip == 0 || self.max_connections_per_ip > self.max_connections {
            return Err(ConfigError::invalid(
                format!("{table}.max_connections_per_ip"),
                "must be 1 to max_connections",
            ));
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            return Err(ConfigError::invalid(
                format!("{table}.ipv6_prefix"),
                "must be 1 to 128",
            ));
        }
        Ok(())
    }
}

/// The address a client is counted under: IPv4 as is (IPv4-mapped IPv6 too), IPv6 cut to
/// its first `v6_prefix` bits — a host gets a /64 from its provider and can pick any
/// address in it, so counting per /128 would let it multiply every per-IP limit.
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let bits = u128::from(v6);
            let keep = u32::from(v6_prefix.min(128));
            let mask = if keep == 0 {
                0
            } else {
                u128::MAX << (128 - keep)
            };
            IpAddr::V6(std::net::Ipv6Addr::from(bits & mask))
        }
    }
}

tokio::task_local! {
    /// The body read timeout of the server the current request came through; read by
    /// [`read_body`] so handlers need not carry it around.
    static BODY_TIMEOUT: Duration;
}

/// Open connections per client key; the guard gives its slot back when dropped.
#[derive(Default)]
struct PerIp {
    open: Mutex<HashMap<IpAddr, usize>>,
}

struct IpSlot {
    table: Arc<PerIp>,
    key: IpAddr,
}

impl PerIp {
    fn acquire(self: &Arc<Self>, key: IpAddr, cap: usize) -> Option<IpSlot> {
        let mut m = self.open.lock().ok()?;
        let n = m.entry(key).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            key,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.table.open.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

/// Written to a connection refused by a cap, without waiting for its request: the client
/// learns why, and a slow reader cannot hold the accept loop (`try_write` never blocks).
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 97\r\n\r\n{\"type\":\"about:blank\",\"title\":\"Service Unavailable\",\"status\":503,\"detail\":\"too many connections\"}";

/// Serves HTTP/1.1 on `listener` until `shutdown`, then waits for in-flight requests.
/// Enforces `limits`: header and body read timeouts and the connection caps.
///
/// Connections are served `with_upgrades`, so a handler may take over the socket
/// (`hyper::upgrade::on`, e.g. for a WebSocket); an upgraded socket belongs to whoever
/// took it and is not part of the drain (its owner watches `shutdown` itself). hyper-util's
/// `GracefulShutdown` cannot watch an upgradeable HTTP/1 connection, so the drain is done
/// here: each connection task starts a graceful shutdown of its connection when `shutdown`
/// fires, and a task tracker waits for all of them.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    shutdown: CancellationToken,
    limits: ServerLimits,
    handler: Arc<H>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let tracker = tokio_util::task::TaskTracker::new();
    let total = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let body_timeout = Duration::from_millis(limits.body_read_timeout_ms);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let key = client_key(peer.ip(), limits.ipv6_prefix);
        let slots = total
            .clone()
            .try_acquire_owned()
            .ok()
            .zip(per_ip.acquire(key, limits.max_connections_per_ip));
        let Some(slots) = slots else {
            tracing::debug!(%peer, "connection refused: connection cap reached");
            let _ = stream.try_write(BUSY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let fut = BODY_TIMEOUT.scope(body_timeout, handler(req, peer));
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slots);
        });
    }
    drop(listener);
    tracing::info!("listener closed; draining connections");
    tracker.close();
    tracker.wait().await;
}

/// Decodes an `application/x-www-form-urlencoded` query string into pairs, in order.
/// Malformed escapes are kept literally, as browsers do.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_group_ipv6_by_prefix() {
        let ip = |s: &str| {
            s.parse::<IpAddr>()
                .unwrap_or(IpAddr::V4([0, 0, 0, 0].into()))
        };
        assert_eq!(client_key(ip("203.0.113.7"), 64), ip("203.0.113.7"));
        assert_eq!(client_key(ip("::ffff:203.0.113.7"), 64), ip("203.0.113.7"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1"), 64),
            client_key(ip("2001:db8:1:2:ffff::2"), 64)
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1"), 64),
            client_key(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(client_key(ip("2001:db8:1:2::1"), 48), ip("2001:db8:1::"));
        assert_eq!(client_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            query_pairs("ids=1%2C2&limit=5&x&name=J+D%C3%A9&&bad=%zz%4"),
            vec![
                ("ids".to_owned(), "1,2".to_owned()),
                ("limit".to_owned(), "5".to_owned()),
                ("x".to_owned(), String::new()),
                ("name".to_owned(), "J Dé".to_owned()),
                ("bad".to_owned(), "%zz%4".to_owned()),
            ]
        );
    }
}
