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

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

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

/// Reads a body of at most [`BODY_LIMIT`] bytes; 413 beyond, 400 on a broken stream.
pub async fn read_body(body: Incoming) -> Result<Bytes, Resp> {
    match Limited::new(body, BODY_LIMIT).collect().await {
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

/// Serves HTTP/1.1 on `listener` until `shutdown`, then waits for in-flight requests.
///
/// Connections are served `with_upgrades`, so a handler may take over the socket
/// (`hyper::upgrade::on`, e.g. for a WebSocket); an upgraded socket belongs to whoever
/// took it and is not part of the drain. hyper-util's `GracefulShutdown` cannot watch an
/// upgradeable HTTP/1 connection, so the drain is done here: each connection task starts
/// a graceful shutdown of its connection when `shutdown` fires, and a task tracker waits
/// for all of them.
pub async fn serve<H, Fut>(listener: TcpListener, shutdown: CancellationToken, handler: Arc<H>)
where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let fut = handler(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(30))
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
