//! The gateway's shared state, apart from the code that uses it (the request pipeline in
//! `api`, the middleware in `middleware`), so those modules depend on it and not on each
//! other.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use hyper::header::HeaderValue;
use tokio::sync::Notify;

use crate::clientip::TrustedProxies;
use crate::config::GatewayConfig;
use crate::hotcache::{HotCache, Unsynced};
use crate::jwt::Verifier;
use crate::kv::Kv;
use crate::limiter::Limiter;
use crate::store::Store;
use taskflow_kit::web;

/// Shared state of the request handlers.
pub struct App {
    pub cfg: Arc<GatewayConfig>,
    pub verifier: Verifier,
    pub store: Store,
    pub kv: Kv,
    pub http: reqwest::Client,
    pub auth_url: String,
    /// Users known to exist (users are never deleted, so this only grows; bounded).
    pub known_users: Mutex<HashSet<i64>>,
    pub kick: Arc<Notify>,
    pub metrics: web::HttpMetrics,
    pub trusted: TrustedProxies,
    pub limiter: Arc<Limiter>,
    pub hot: Arc<HotCache>,
    pub unsynced: Arc<Unsynced>,
    /// Request ids minted here: a per-process random prefix and a counter (a UUID per
    /// request cost a syscall on the hot path).
    pub rid_prefix: String,
    pub rid_counter: AtomicU64,
    pub limit_headers: LimitHeaders,
    /// `/tasks/notifications`: the WebSocket hub and its `notify_events` feed.
    pub notifications: Arc<crate::ws::Notifications>,
}

/// The `RateLimit-Limit` and `RateLimit-Policy` values, the same for every response:
/// computed once.
pub struct LimitHeaders {
    pub limit: HeaderValue,
    pub policy: HeaderValue,
}

impl LimitHeaders {
    pub fn new(cfg: &GatewayConfig) -> Self {
        let rl = &cfg.rate_limit;
        LimitHeaders {
            limit: HeaderValue::from(rl.burst),
            policy: HeaderValue::from_str(&format!("{};w=1;burst={}", rl.per_second, rl.burst))
                .unwrap_or_else(|_| HeaderValue::from_static("")),
        }
    }
}
