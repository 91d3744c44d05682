//! WebSocket notifications at `/tasks/notifications` (SPEC §3, issue 10).
//!
//! - [`feed`]: reads all of `notify_events` (every instance, from the end) and hands each
//!   notification to the hub;
//! - [`hub`]: user → open connections, per-IP caps, non-blocking fan-out;
//! - [`session`]: one connection's protocol (authenticate, pushes, pings, closes).
//!
//! The REST router only calls [`Notifications::accept`] for `/tasks/notifications`
//! (`routes::Route::Notifications`).

pub mod feed;
pub mod hub;
pub mod session;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use taskflow_kit::web::{problem, Resp};
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::jwt::Verifier;
use hub::{Hub, HubMetrics};
use session::Context;

/// The notification endpoint: accepts upgrades, owns the hub and the feed.
pub struct Notifications {
    ctx: Arc<Context>,
}

impl Notifications {
    /// Builds the hub and starts the `notify_events` feed (it retries on its own until the
    /// broker and topic are there, so start-up does not wait for it).
    pub fn start(
        cfg: &GatewayConfig,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Notifications> {
        let verifier = Verifier::load(&cfg.jwt_public_key_file)
            .map_err(|e| anyhow::anyhow!("jwt_public_key_file: {e}"))?;
        let hub = Hub::new(
            cfg.websocket.max_connections_per_ip,
            HubMetrics::register(registry),
        );
        tokio::spawn(feed::run(
            hub.clone(),
            cfg.kafka_brokers.clone(),
            cfg.notify_events_topic.clone(),
            shutdown.clone(),
        ));
        Ok(Notifications {
            ctx: Arc::new(Context {
                hub,
                verifier: Arc::new(verifier),
                cfg: cfg.websocket.clone(),
                shutdown,
            }),
        })
    }

    /// Answers a request for `/tasks/notifications`: 101 and a session task, or a problem response.
    pub fn accept(&self, mut req: Request<Incoming>, ip: IpAddr) -> Resp {
        if req.method() != hyper::Method::GET || !fastwebsockets::upgrade::is_upgrade_request(&req)
        {
            self.ctx.hub.metrics.refused.inc();
            let mut r = problem(
                StatusCode::UPGRADE_REQUIRED,
                "this endpoint speaks WebSocket only (GET with Upgrade: websocket)",
            );
            r.headers_mut().insert(
                hyper::header::UPGRADE,
                hyper::header::HeaderValue::from_static("websocket"),
            );
            return r;
        }
        let Some(slot) = self.ctx.hub.admit(ip) else {
            return problem(
                StatusCode::TOO_MANY_REQUESTS,
                "too many WebSocket connections from this address",
            );
        };
        let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
            Ok(r) => r,
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    &format!("bad WebSocket upgrade: {e}"),
                )
            }
        };
        let ctx = self.ctx.clone();
        self.ctx.hub.sessions.spawn(async move {
            match upgrade.await {
                Ok(ws) => session::run(ctx, ws, slot).await,
                Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
            }
        });
        let (parts, _) = response.into_parts();
        Response::from_parts(parts, Full::new(Bytes::new()))
    }

    /// After shutdown was signalled: waits (bounded) until every session sent its close.
    pub async fn drain(&self, within: Duration) {
        self.ctx.hub.sessions.close();
        if tokio::time::timeout(within, self.ctx.hub.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("some WebSocket sessions did not close in time");
        }
    }
}
