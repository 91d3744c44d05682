//! Operational HTTP endpoints: `/healthz` (the process answers), `/readyz` (its
//! dependencies answer) and `/metrics` (Prometheus text).
//!
//! The gateway and auth daemons mount [`ops_response`] inside their own routers; daemons
//! without an HTTP API (notify, the shard proxy) run [`serve_ops`] on their metrics port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The latest known state of each dependency, set by whoever checks it.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, Result<(), String>>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the outcome of a dependency check (`"postgres"`, `"redis"`, `"shard-2"`, …).
    pub fn set(&self, name: &str, outcome: Result<(), String>) {
        if let Ok(mut m) = self.checks.lock() {
            m.insert(name.to_owned(), outcome);
        }
    }

    /// Ready when at least one check was recorded and every check passed.
    pub fn is_ready(&self) -> bool {
        self.checks
            .lock()
            .map(|m| !m.is_empty() && m.values().all(Result::is_ok))
            .unwrap_or(false)
    }

    /// `{"ready": bool, "checks": {"redis": "ok", "shard-2": "connection refused"}}`
    pub fn report(&self) -> serde_json::Value {
        let checks: serde_json::Map<String, serde_json::Value> = self
            .checks
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let s = match v {
                            Ok(()) => "ok".to_owned(),
                            Err(e) => e.clone(),
                        };
                        (k.clone(), serde_json::Value::String(s))
                    })
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({ "ready": self.is_ready(), "checks": checks })
    }
}

/// Answers `/healthz`, `/readyz` and `/metrics`; `None` for any other path.
pub fn ops_response(
    path: &str,
    readiness: &Readiness,
    metrics: Option<&Registry>,
) -> Option<Response<Full<Bytes>>> {
    match path {
        "/healthz" => Some(json(StatusCode::OK, serde_json::json!({"status": "ok"}))),
        "/readyz" => {
            let status = if readiness.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Some(json(status, readiness.report()))
        }
        "/metrics" => {
            let registry = metrics?;
            let mut text = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
                return Some(plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
            }
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Some(resp)
        }
        _ => None,
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// Binds `listen` and serves the ops endpoints until `shutdown` is cancelled.
/// Returns the bound address (useful with port 0) once listening.
pub async fn serve_ops(
    listen: SocketAddr,
    readiness: Readiness,
    metrics: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "ops accept failed");
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            let readiness = readiness.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = ops_response(req.uri().path(), &readiness, Some(&metrics))
                        .unwrap_or_else(|| plain(StatusCode::NOT_FOUND, "not found\n".into()));
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
