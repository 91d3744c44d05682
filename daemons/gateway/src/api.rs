//! The gateway's REST surface (SPEC §2): routing, middleware and the task handlers.
//!
//! Every request passes, in order: request id (taken from `X-Request-Id` or minted) →
//! ops endpoints (`/healthz`, `/readyz`, `/metrics`, never limited) → CORS preflight →
//! bearer-token verification for `/tasks` → one Redis rate-limit call charging the
//! client IP bucket and, when authenticated, the user bucket (plus the per-email login
//! bucket for `/auth/login`) → the handler → CORS, `RateLimit-*` and `X-Request-Id`
//! response headers → metrics and one access-log line inside the request's span.
//!
//! Redis trouble degrades instead of failing: rate limits and the cache are skipped with
//! a warning; only id allocation and `Idempotency-Key` requests need Redis and answer 503.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use taskflow_contracts::{Task, TaskEvent, TaskEventType};
use taskflow_kit::http::Readiness;
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::config::GatewayConfig;
use crate::input::{self, Mode, Rejection, Valid};
use crate::jwt::Verifier;
use crate::kv::{Bucket, Kv, Limit};
use crate::store::{self, ListFilter, Store, StoreError};
use taskflow_kit::web::{self, problem, problem_with, FieldError, Resp};

const OPENAPI: &str = include_str!("../openapi.json");

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/swagger/index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../assets/swagger/index.html"),
    },
    Asset {
        path: "/swagger/swagger-ui.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/swagger/swagger-ui.css"),
    },
    Asset {
        path: "/swagger/swagger-ui-bundle.js",
        content_type: "application/javascript; charset=utf-8",
        body: include_bytes!("../assets/swagger/swagger-ui-bundle.js"),
    },
    Asset {
        path: "/swagger/swagger-ui-standalone-preset.js",
        content_type: "application/javascript; charset=utf-8",
        body: include_bytes!("../assets/swagger/swagger-ui-standalone-preset.js"),
    },
    Asset {
        path: "/swagger/swagger-initializer.js",
        content_type: "application/javascript; charset=utf-8",
        body: include_bytes!("../assets/swagger/swagger-initializer.js"),
    },
    Asset {
        path: "/swagger/favicon-32x32.png",
        content_type: "image/png",
        body: include_bytes!("../assets/swagger/favicon-32x32.png"),
    },
];

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

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
    pub readiness: Readiness,
    pub registry: Registry,
    pub metrics: web::HttpMetrics,
    pub notifications: Arc<crate::ws::Notifications>,
}

/// Per-request facts the middleware gathered.
struct Ctx {
    ip: IpAddr,
    user: Option<i64>,
    token: Option<String>,
    limit: Option<Limit>,
}

fn header_str<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn valid_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// Whether an `If-Match` / `If-None-Match` list names `version` (or is `*`).
fn etag_matches(list: &str, version: i64) -> bool {
    let want = format!("\"{version}\"");
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == want)
}

fn method_not_allowed(allowed: &str) -> Resp {
    let mut r = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("allowed: {allowed}"),
    );
    if let Ok(v) = HeaderValue::from_str(allowed) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

fn unauthorized(detail: &str) -> Resp {
    let mut r = problem(StatusCode::UNAUTHORIZED, detail);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn store_error(e: &StoreError) -> Resp {
    match e {
        StoreError::Pool(_) => {
            tracing::warn!(error = %e, "database unavailable");
            problem(StatusCode::SERVICE_UNAVAILABLE, "task storage unavailable")
        }
        _ => {
            tracing::error!(error = %e, "database error");
            problem(StatusCode::SERVICE_UNAVAILABLE, "task storage error")
        }
    }
}

fn rejection(r: Rejection) -> Resp {
    match r {
        Rejection::Malformed(detail, errs) => problem_with(StatusCode::BAD_REQUEST, &detail, &errs),
        Rejection::Invalid(errs) => problem_with(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the request has invalid fields",
            &errs,
        ),
    }
}

fn task_response(status: StatusCode, task: &Task) -> (Resp, String) {
    let json = serde_json::to_string(task).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(json.clone())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ETAG, etag(task.version));
    (r, json)
}

impl App {
    /// Entry point of every request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        let started = Instant::now();
        let rid = header_str(req.headers(), &X_REQUEST_ID)
            .filter(|s| valid_request_id(s))
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let span = tracing::info_span!("request", request_id = %rid, %method, %path);
        async move {
            let origin = req.headers().get(header::ORIGIN).cloned();
            let (route, mut resp) = self.dispatch(req, peer).await;
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&rid) {
                h.insert(X_REQUEST_ID.clone(), v);
            }
            self.cors(origin.as_ref(), h);
            let status = resp.status();
            self.metrics.observe(route, status, started);
            if status.is_server_error() {
                tracing::warn!(
                    status = status.as_u16(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "request failed"
                );
            } else {
                tracing::debug!(
                    status = status.as_u16(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "request"
                );
            }
            resp
        }
        .instrument(span)
        .await
    }

    fn cors(&self, origin: Option<&HeaderValue>, h: &mut HeaderMap) {
        let Some(origin) = origin else { return };
        let allowed = self
            .cfg
            .cors_origins
            .iter()
            .any(|o| o == "*" || o.as_bytes() == origin.as_bytes());
        if !allowed {
            return;
        }
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(
                "ETag, Location, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, RateLimit-Policy, X-Request-Id",
            ),
        );
    }

    fn client_ip(&self, req: &Request<Incoming>, peer: SocketAddr) -> IpAddr {
        if self.cfg.trust_forwarded_for {
            if let Some(ip) = req
                .headers()
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse::<IpAddr>().ok())
            {
                return ip;
            }
        }
        peer.ip()
    }

    async fn dispatch(&self, req: Request<Incoming>, peer: SocketAddr) -> (&'static str, Resp) {
        let path = req.uri().path().to_owned();
        if let Some(r) =
            taskflow_kit::http::ops_response(&path, &self.readiness, Some(&self.registry))
        {
            return ("ops", r);
        }
        // CORS preflight: answered before authentication, as browsers send no token.
        if req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return ("preflight", self.preflight(&req));
        }
        if let Some(r) = static_route(&path, req.method()) {
            return ("docs", r);
        }
        // WebSocket: authenticates in-band (SPEC §3), so before the bearer check.
        if path == crate::ws::PATH {
            let ip = self.client_ip(&req, peer);
            return ("websocket", self.notifications.accept(req, ip));
        }

        let mut ctx = Ctx {
            ip: self.client_ip(&req, peer),
            user: None,
            token: None,
            limit: None,
        };
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let is_tasks = segs.first() == Some(&"tasks");
        let is_auth = segs.first() == Some(&"auth");

        // Authentication for the task API.
        let mut auth_failure = None;
        if is_tasks {
            match self.authenticate(req.headers()) {
                Ok((user, token)) => {
                    ctx.user = Some(user);
                    ctx.token = Some(token);
                }
                Err(r) => auth_failure = Some(r),
            }
        }

        // Login attempts are limited per email as well; that needs the body.
        let mut extra = Vec::new();
        if is_auth && path == "/auth/login" && req.method() == Method::POST {
            let (parts, body) = req.into_parts();
            let login_body = match web::read_body(body).await {
                Ok(b) => {
                    if let Some(email) = serde_json::from_slice::<serde_json::Value>(&b)
                        .ok()
                        .and_then(|v| {
                            v.get("email")
                                .and_then(|e| e.as_str())
                                .map(|e| e.trim().to_lowercase())
                        })
                    {
                        let per_min = u64::from(self.cfg.rate_limit.login_per_minute);
                        extra.push(Bucket {
                            key: format!(
                                "rl:login:{:016x}",
                                xxhash_rust::xxh64::xxh64(email.as_bytes(), 0)
                            ),
                            interval_ms: 60_000 / per_min.max(1),
                            burst: self.cfg.rate_limit.login_per_minute,
                        });
                    }
                    (parts, b)
                }
                Err(r) => return ("auth", r),
            };
            let (route, resp) = match self.rate_limit(&mut ctx, extra).await {
                Some(r) => ("auth", r),
                None => ("auth", self.proxy_auth(login_body.0, login_body.1).await),
            };
            return (route, with_limit_headers(resp, &ctx, &self.cfg));
        }

        // A cached single-task read is the hot path: fetch the cache entry in the same
        // Redis round trip as the rate-limit check (the multiplexed connection pipelines
        // the two commands).
        let prefetch = match (segs.as_slice(), req.method()) {
            (["tasks", id], &Method::GET) if auth_failure.is_none() => id.parse::<i64>().ok(),
            _ => None,
        };
        let (limited, mut cached) = match prefetch {
            Some(id) => {
                let (l, c) = tokio::join!(self.rate_limit(&mut ctx, extra), self.kv.cached(id));
                (l, Some(c))
            }
            None => (self.rate_limit(&mut ctx, extra).await, None),
        };
        if let Some(r) = limited {
            return ("limited", with_limit_headers(r, &ctx, &self.cfg));
        }
        if let Some(r) = auth_failure {
            return ("unauthorized", with_limit_headers(r, &ctx, &self.cfg));
        }

        let method = req.method().clone();
        let (route, resp) = match (segs.as_slice(), &method) {
            ([""], &Method::GET) => (
                "root",
                web::json(
                    StatusCode::OK,
                    &serde_json::json!({"message": "API is working"}),
                ),
            ),
            ([""], _) => ("root", method_not_allowed("GET")),
            (["auth", ..], _) => {
                let (parts, body) = req.into_parts();
                match web::read_body(body).await {
                    Ok(b) => ("auth", self.proxy_auth(parts, b).await),
                    Err(r) => ("auth", r),
                }
            }
            (["tasks"], &Method::GET) => (
                "list_tasks",
                self.list(&ctx, req.uri().query().unwrap_or("")).await,
            ),
            (["tasks"], &Method::POST) => ("create_task", self.create(&ctx, req).await),
            (["tasks"], _) => ("tasks", method_not_allowed("GET, POST")),
            (["tasks", id], m) => {
                let Some(id) = id.parse::<i64>().ok().filter(|i| *i > 0) else {
                    return ("task", problem(StatusCode::NOT_FOUND, "no such task"));
                };
                match *m {
                    Method::GET => ("get_task", self.get(id, req.headers(), cached.take()).await),
                    Method::PUT => ("put_task", self.update(&ctx, id, req, Mode::Replace).await),
                    Method::PATCH => ("patch_task", self.update(&ctx, id, req, Mode::Patch).await),
                    Method::DELETE => ("delete_task", self.delete(&ctx, id, req.headers()).await),
                    _ => ("task", method_not_allowed("GET, PUT, PATCH, DELETE")),
                }
            }
            _ => ("unknown", problem(StatusCode::NOT_FOUND, "no such route")),
        };
        (route, with_limit_headers(resp, &ctx, &self.cfg))
    }

    fn preflight(&self, req: &Request<Incoming>) -> Resp {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        let origin = req.headers().get(header::ORIGIN);
        let allowed = origin.is_some_and(|o| {
            self.cfg
                .cors_origins
                .iter()
                .any(|c| c == "*" || c.as_bytes() == o.as_bytes())
        });
        if allowed {
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("Authorization, Content-Type, If-Match, If-None-Match, Idempotency-Key, X-Request-Id"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
        r
    }

    fn authenticate(&self, h: &HeaderMap) -> Result<(i64, String), Resp> {
        let value = header_str(h, &header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing bearer token"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("malformed Authorization header"))?;
        match self.verifier.verify(token) {
            Ok((_, id)) => Ok((id, token.to_owned())),
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                Err(unauthorized("invalid or expired token"))
            }
        }
    }

    /// Charges the IP bucket, the user bucket when known, and `extra`; returns the 429.
    async fn rate_limit(&self, ctx: &mut Ctx, extra: Vec<Bucket>) -> Option<Resp> {
        let rl = &self.cfg.rate_limit;
        if !rl.enabled {
            return None;
        }
        let interval = 1000 / u64::from(rl.per_second).max(1);
        let mut buckets = vec![Bucket {
            key: format!("rl:ip:{}", ctx.ip),
            interval_ms: interval.max(1),
            burst: rl.burst,
        }];
        if let Some(u) = ctx.user {
            buckets.push(Bucket {
                key: format!("rl:user:{u}"),
                interval_ms: interval.max(1),
                burst: rl.burst,
            });
        }
        buckets.extend(extra);
        match self.kv.limit(&buckets).await {
            Ok(l) => {
                ctx.limit = Some(l);
                if l.allowed {
                    None
                } else {
                    let mut r = problem(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate limit exceeded; retry later",
                    );
                    let secs = l.retry_after_ms.div_ceil(1000).max(1);
                    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                        r.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    Some(r)
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "rate limiter unavailable (Redis); request allowed");
                None
            }
        }
    }

    /// Forwards an `/auth/*` request to the auth daemon.
    async fn proxy_auth(&self, parts: hyper::http::request::Parts, body: Bytes) -> Resp {
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let url = format!("{}{pq}", self.auth_url);
        let Ok(method) = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()) else {
            return problem(StatusCode::METHOD_NOT_ALLOWED, "unsupported method");
        };
        let mut rb = self.http.request(method, url).body(body);
        for name in [
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::ACCEPT,
            X_REQUEST_ID.clone(),
        ] {
            if let Some(v) = parts.headers.get(&name).and_then(|v| v.to_str().ok()) {
                rb = rb.header(name.as_str(), v);
            }
        }
        match rb.send().await {
            Ok(r) => {
                let status =
                    StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                let ct = r
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let www = r
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let allow = r
                    .headers()
                    .get("allow")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                match r.bytes().await {
                    Ok(b) => {
                        let mut resp = Response::new(Full::new(b));
                        *resp.status_mut() = status;
                        for (name, v) in [
                            (header::CONTENT_TYPE, ct),
                            (header::WWW_AUTHENTICATE, www),
                            (header::ALLOW, allow),
                        ] {
                            if let Some(v) = v.and_then(|v| HeaderValue::from_str(&v).ok()) {
                                resp.headers_mut().insert(name, v);
                            }
                        }
                        resp
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "auth daemon response broken");
                        problem(StatusCode::BAD_GATEWAY, "auth service failed")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "auth daemon unreachable");
                problem(StatusCode::SERVICE_UNAVAILABLE, "auth service unavailable")
            }
        }
    }

    /// 422 naming `performer_id` / `observer_ids` entries that are not users.
    async fn ensure_users(
        &self,
        token: &str,
        performer: Option<i64>,
        observers: &[i64],
    ) -> Result<(), Resp> {
        let mut wanted: Vec<i64> = observers.iter().copied().chain(performer).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let unknown: Vec<i64> = match self.known_users.lock() {
            Ok(k) => wanted
                .iter()
                .copied()
                .filter(|id| !k.contains(id))
                .collect(),
            Err(_) => wanted.clone(),
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let ids = unknown
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let url = format!("{}/auth/users?limit=500&ids={ids}", self.auth_url);
        let found: HashSet<i64> = match self.http.get(url).bearer_auth(token).send().await {
            Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                Ok(v) => v["data"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|u| u["id"].as_i64()).collect())
                    .unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "auth daemon sent a broken user list");
                    return Err(problem(StatusCode::BAD_GATEWAY, "auth service failed"));
                }
            },
            Ok(r) => {
                tracing::warn!(
                    status = r.status().as_u16(),
                    "auth daemon refused the user lookup"
                );
                return Err(problem(StatusCode::BAD_GATEWAY, "cannot verify users"));
            }
            Err(e) => {
                tracing::warn!(error = %e, "auth daemon unreachable");
                return Err(problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot verify users: auth service unavailable",
                ));
            }
        };
        if let Ok(mut k) = self.known_users.lock() {
            if k.len() > 100_000 {
                k.clear();
            }
            k.extend(found.iter().copied());
        }
        let mut errs = Vec::new();
        if let Some(p) = performer.filter(|p| !found.contains(p) && unknown.contains(p)) {
            errs.push(FieldError::new(
                "performer_id",
                format!("no user with id {p}"),
            ));
        }
        let missing: Vec<String> = observers
            .iter()
            .filter(|o| unknown.contains(o) && !found.contains(o))
            .map(i64::to_string)
            .collect();
        if !missing.is_empty() {
            errs.push(FieldError::new(
                "observer_ids",
                format!("no user with id {}", missing.join(", ")),
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(problem_with(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown users",
                &errs,
            ))
        }
    }

    /// A new global id from Redis, re-seeding the counter from the shards if it was lost.
    async fn next_id(&self) -> Result<i64, Resp> {
        let unavailable = |e: redis::RedisError| {
            tracing::warn!(error = %e, "cannot allocate a task id (Redis)");
            problem(StatusCode::SERVICE_UNAVAILABLE, "cannot allocate a task id")
        };
        if let Some(id) = self.kv.next_id().await.map_err(unavailable)? {
            return Ok(id);
        }
        let max = self.store.max_id().await.map_err(|e| store_error(&e))?;
        let floor = if max == 0 {
            0
        } else {
            max + crate::kv::RESEED_MARGIN
        };
        tracing::warn!(
            max_id = max,
            seed = floor,
            "task id counter missing in Redis; re-seeded from the shards"
        );
        self.kv.seed_ids(floor).await.map_err(unavailable)?;
        match self.kv.next_id().await.map_err(unavailable)? {
            Some(id) => Ok(id),
            None => Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "task id counter vanished",
            )),
        }
    }

    async fn after_write(&self, id: i64, task: Option<&Task>, json: Option<&str>) {
        self.kick.notify_one();
        if let Err(e) = self.kv.after_write(id, task.map(|t| t.performer_id)).await {
            tracing::warn!(error = %e, task_id = id, "cannot update Redis after a write; cache entry may be stale until its TTL");
        }
        if let (Some(t), Some(j)) = (task, json) {
            let _ = self
                .kv
                .cache(id, t.version, j, self.cfg.cache_ttl_secs, false)
                .await;
        }
    }

    async fn create(&self, ctx: &Ctx, req: Request<Incoming>) -> Resp {
        let (Some(user), Some(token)) = (ctx.user, ctx.token.as_deref()) else {
            return unauthorized("missing bearer token");
        };
        let idem = match header_str(req.headers(), &IDEMPOTENCY_KEY) {
            None => None,
            Some(k)
                if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Some(format!("idem:{user}:{k}"))
            }
            Some(_) => {
                return problem_with(
                    StatusCode::BAD_REQUEST,
                    "invalid Idempotency-Key",
                    &[FieldError::new(
                        "Idempotency-Key",
                        "1 to 255 visible ASCII characters",
                    )],
                )
            }
        };
        let bytes = match web::read_body(req.into_body()).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let fingerprint = format!("{:016x}", xxhash_rust::xxh64::xxh64(&bytes, 0));
        let Some(key) = idem else {
            return self.create_inner(user, token, &bytes).await;
        };
        match self.kv.idem_claim(&key, 60).await {
            Ok(None) => {}
            Ok(Some(record)) => return replay(&record, &fingerprint),
            Err(e) => {
                tracing::warn!(error = %e, "idempotency store unavailable");
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot honour Idempotency-Key now",
                );
            }
        }
        let resp = self.create_inner(user, token, &bytes).await;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            let _ = self.kv.idem_release(&key).await;
            return resp;
        }
        let (parts, body) = resp.into_parts();
        let body_bytes = http_body_util::BodyExt::collect(body)
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let hdr = |n: &HeaderName| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let record = serde_json::json!({
            "fingerprint": fingerprint,
            "status": parts.status.as_u16(),
            "content_type": hdr(&header::CONTENT_TYPE),
            "location": hdr(&header::LOCATION),
            "etag": hdr(&header::ETAG),
            "body": String::from_utf8_lossy(&body_bytes),
        });
        if let Err(e) = self
            .kv
            .idem_store(&key, &record.to_string(), self.cfg.idempotency_ttl_secs)
            .await
        {
            tracing::warn!(error = %e, "cannot store the idempotent response");
        }
        Response::from_parts(parts, Full::new(body_bytes))
    }

    async fn create_inner(&self, user: i64, token: &str, bytes: &[u8]) -> Resp {
        let v: Valid = match input::parse_task(bytes).and_then(|i| input::validate(i, Mode::Create))
        {
            Ok(v) => v,
            Err(r) => return rejection(r),
        };
        if v.creator_id.is_some_and(|c| c != user) {
            return problem_with(
                StatusCode::FORBIDDEN,
                "tasks are created by the caller",
                &[FieldError::new("creator_id", "must be your own user id")],
            );
        }
        let performer = v.performer_id.unwrap_or(user);
        let observers = v.observer_ids.unwrap_or_default();
        if let Err(r) = self.ensure_users(token, Some(performer), &observers).await {
            return r;
        }
        let id = match self.next_id().await {
            Ok(id) => id,
            Err(r) => return r,
        };
        let now = store::now_micros();
        let task = Task {
            id,
            title: v.title.unwrap_or_default(),
            description: v.description.unwrap_or_default(),
            performer_id: performer,
            creator_id: user,
            observer_ids: observers,
            status: v.status.unwrap_or_default(),
            created_at: now,
            updated_at: now,
            version: 1,
        };
        let event = TaskEvent::new(TaskEventType::Created, user, task.clone(), None);
        if let Err(e) = self
            .store
            .create(&task, &event, &self.cfg.task_events_topic)
            .await
        {
            return store_error(&e);
        }
        let (mut resp, json) = task_response(StatusCode::CREATED, &task);
        if let Ok(loc) = HeaderValue::from_str(&format!("/tasks/{id}")) {
            resp.headers_mut().insert(header::LOCATION, loc);
        }
        self.after_write(id, Some(&task), Some(&json)).await;
        resp
    }

    /// Finds the task's performer: the Redis map, else a scatter read (remembered).
    async fn locate(&self, id: i64) -> Result<Option<Task>, StoreError> {
        let mapped = match self.kv.performer_of(id).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "performer map unavailable; scattering");
                None
            }
        };
        if let Some(p) = mapped {
            if let Some(t) = self.store.get(id, Some(p)).await? {
                return Ok(Some(t));
            }
        }
        let mut found = self.store.get(id, None).await?;
        if found.is_none() && mapped.is_some() {
            // The map says the task exists: it may be between its two shards' commits of
            // a move (the old one committed the delete, the new one not yet the insert).
            // That window is milliseconds; look once more before answering 404.
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            found = self.store.get(id, None).await?;
        }
        if let Some(t) = &found {
            let _ = self.kv.remember_performer(id, t.performer_id).await;
        }
        Ok(found)
    }

    async fn get(
        &self,
        id: i64,
        h: &HeaderMap,
        prefetched: Option<redis::RedisResult<Option<(i64, String)>>>,
    ) -> Resp {
        let inm = header_str(h, &header::IF_NONE_MATCH).map(str::to_owned);
        let not_modified = |version: i64| {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r.headers_mut().insert(header::ETAG, etag(version));
            r
        };
        let cached = match prefetched {
            Some(c) => c,
            None => self.kv.cached(id).await,
        };
        match cached {
            Ok(Some((version, json))) => {
                if inm.as_deref().is_some_and(|l| etag_matches(l, version)) {
                    return not_modified(version);
                }
                let mut r = Response::new(Full::new(Bytes::from(json)));
                let hh = r.headers_mut();
                hh.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                hh.insert(header::ETAG, etag(version));
                return r;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cache unavailable"),
        }
        match self.locate(id).await {
            Ok(Some(task)) => {
                if inm
                    .as_deref()
                    .is_some_and(|l| etag_matches(l, task.version))
                {
                    return not_modified(task.version);
                }
                let (resp, json) = task_response(StatusCode::OK, &task);
                let _ = self
                    .kv
                    .cache(id, task.version, &json, self.cfg.cache_ttl_secs, true)
                    .await;
                resp
            }
            Ok(None) => problem(StatusCode::NOT_FOUND, "no such task"),
            Err(e) => store_error(&e),
        }
    }

    async fn list(&self, _ctx: &Ctx, query: &str) -> Resp {
        let q = match input::parse_list_query(query) {
            Ok(q) => q,
            Err(errs) => {
                return problem_with(StatusCode::BAD_REQUEST, "invalid query parameters", &errs)
            }
        };
        let filter = ListFilter {
            performer_id: q.performer_id,
            creator_id: q.creator_id,
            observer_id: q.observer_id,
            status: q.status,
            after_id: q.after_id,
            limit: q.limit + 1,
        };
        let mut tasks = match self.store.list(&filter).await {
            Ok(t) => t,
            Err(e) => return store_error(&e),
        };
        let page = usize::try_from(q.limit).unwrap_or(50);
        let next_cursor = if tasks.len() > page {
            tasks.truncate(page);
            tasks.last().map(|t| t.id.to_string())
        } else {
            None
        };
        web::json(
            StatusCode::OK,
            &serde_json::json!({"data": tasks, "next_cursor": next_cursor}),
        )
    }

    /// Runs a locked write; follows the task once if it moved between locate and lock.
    async fn locked<F>(&self, id: i64, decide: F) -> Result<Option<(Task, TaskEvent)>, Resp>
    where
        F: Fn(Task) -> Result<(Option<Task>, TaskEvent), Resp>,
    {
        for _ in 0..3 {
            let current = match self.locate(id).await {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(None),
                Err(e) => return Err(store_error(&e)),
            };
            match self
                .store
                .write_locked(
                    id,
                    current.performer_id,
                    &self.cfg.task_events_topic,
                    &decide,
                )
                .await
            {
                Ok(Ok(Some(done))) => return Ok(Some(done)),
                Ok(Ok(None)) => {
                    // Moved or deleted meanwhile: forget the stale map entry and look again.
                    let _ = self.kv.after_write(id, None).await;
                }
                Ok(Err(r)) => return Err(r),
                Err(e) => return Err(store_error(&e)),
            }
        }
        Err(problem(
            StatusCode::CONFLICT,
            "the task changed concurrently; retry",
        ))
    }

    async fn update(&self, ctx: &Ctx, id: i64, req: Request<Incoming>, mode: Mode) -> Resp {
        let (Some(user), Some(token)) = (ctx.user, ctx.token.as_deref()) else {
            return unauthorized("missing bearer token");
        };
        let if_match = header_str(req.headers(), &header::IF_MATCH).map(str::to_owned);
        let bytes = match web::read_body(req.into_body()).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let v = match input::parse_task(&bytes).and_then(|i| input::validate(i, mode)) {
            Ok(v) => v,
            Err(r) => return rejection(r),
        };
        if v.performer_id.is_some() || v.observer_ids.as_ref().is_some_and(|o| !o.is_empty()) {
            if let Err(r) = self
                .ensure_users(
                    token,
                    v.performer_id,
                    v.observer_ids.as_deref().unwrap_or(&[]),
                )
                .await
            {
                return r;
            }
        }
        let decide = |old: Task| -> Result<(Option<Task>, TaskEvent), Resp> {
            if old.creator_id != user && old.performer_id != user {
                return Err(problem(
                    StatusCode::FORBIDDEN,
                    "only the creator or the performer may update a task",
                ));
            }
            if let Some(list) = &if_match {
                if !etag_matches(list, old.version) {
                    return Err(problem(
                        StatusCode::PRECONDITION_FAILED,
                        "the task was modified (ETag mismatch)",
                    ));
                }
            }
            if v.creator_id.is_some_and(|c| c != old.creator_id) {
                return Err(problem_with(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "creator_id cannot be changed",
                    &[FieldError::new(
                        "creator_id",
                        "must equal the task's creator",
                    )],
                ));
            }
            let mut new = old.clone();
            if let Some(t) = &v.title {
                new.title.clone_from(t);
            }
            if let Some(d) = &v.description {
                new.description.clone_from(d);
            }
            if let Some(p) = v.performer_id {
                new.performer_id = p;
            }
            if let Some(o) = &v.observer_ids {
                new.observer_ids.clone_from(o);
            }
            if let Some(s) = v.status {
                new.status = s;
            }
            new.version = old.version + 1;
            new.updated_at = store::now_micros();
            let event = TaskEvent::new(TaskEventType::Updated, user, new.clone(), Some(old));
            Ok((Some(new), event))
        };
        match self.locked(id, decide).await {
            Ok(Some((task, _))) => {
                let (resp, json) = task_response(StatusCode::OK, &task);
                self.after_write(id, Some(&task), Some(&json)).await;
                resp
            }
            Ok(None) => problem(StatusCode::NOT_FOUND, "no such task"),
            Err(r) => r,
        }
    }

    async fn delete(&self, ctx: &Ctx, id: i64, h: &HeaderMap) -> Resp {
        let Some(user) = ctx.user else {
            return unauthorized("missing bearer token");
        };
        let if_match = header_str(h, &header::IF_MATCH).map(str::to_owned);
        let decide = |old: Task| -> Result<(Option<Task>, TaskEvent), Resp> {
            if old.creator_id != user {
                return Err(problem(
                    StatusCode::FORBIDDEN,
                    "only the creator may delete a task",
                ));
            }
            if let Some(list) = &if_match {
                if !etag_matches(list, old.version) {
                    return Err(problem(
                        StatusCode::PRECONDITION_FAILED,
                        "the task was modified (ETag mismatch)",
                    ));
                }
            }
            let event = TaskEvent::new(TaskEventType::Deleted, user, old.clone(), Some(old));
            Ok((None, event))
        };
        match self.locked(id, decide).await {
            Ok(Some(_)) => {
                self.after_write(id, None, None).await;
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            Ok(None) => problem(StatusCode::NOT_FOUND, "no such task"),
            Err(r) => r,
        }
    }
}

/// Replays a stored idempotent response (or refuses a reuse / in-flight duplicate).
fn replay(record: &str, fingerprint: &str) -> Resp {
    if record == "pending" {
        return problem(
            StatusCode::CONFLICT,
            "a request with this Idempotency-Key is in progress",
        );
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(record) else {
        return problem(
            StatusCode::CONFLICT,
            "a request with this Idempotency-Key is in progress",
        );
    };
    if v["fingerprint"].as_str() != Some(fingerprint) {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this Idempotency-Key was used with a different request body",
        );
    }
    let status = v["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut r = Response::new(Full::new(Bytes::from(
        v["body"].as_str().unwrap_or("").to_owned(),
    )));
    *r.status_mut() = status;
    let h = r.headers_mut();
    for (name, key) in [
        (header::CONTENT_TYPE, "content_type"),
        (header::LOCATION, "location"),
        (header::ETAG, "etag"),
    ] {
        if let Some(val) = v[key].as_str().and_then(|s| HeaderValue::from_str(s).ok()) {
            h.insert(name, val);
        }
    }
    h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    r
}

fn with_limit_headers(mut r: Resp, ctx: &Ctx, cfg: &GatewayConfig) -> Resp {
    let Some(l) = ctx.limit else { return r };
    let h = r.headers_mut();
    let num = |n: u64| {
        HeaderValue::from_str(&n.to_string()).unwrap_or_else(|_| HeaderValue::from_static("0"))
    };
    h.insert("ratelimit-limit", num(u64::from(cfg.rate_limit.burst)));
    h.insert("ratelimit-remaining", num(l.remaining));
    h.insert("ratelimit-reset", num(l.reset_ms.div_ceil(1000)));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{};w=1;burst={}",
        cfg.rate_limit.per_second, cfg.rate_limit.burst
    )) {
        h.insert("ratelimit-policy", v);
    }
    r
}

/// `/openapi.json` and the embedded Swagger UI.
fn static_route(path: &str, method: &Method) -> Option<Resp> {
    let serve = |ct: &'static str, body: &'static [u8]| {
        let mut r = Response::new(Full::new(Bytes::from_static(body)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        r
    };
    let found = if path == "/openapi.json" {
        Some(serve("application/json", OPENAPI.as_bytes()))
    } else if path == "/swagger" || path == "/swagger/" {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
        r.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_static("/swagger/index.html"),
        );
        Some(r)
    } else {
        ASSETS
            .iter()
            .find(|a| a.path == path)
            .map(|a| serve(a.content_type, a.body))
    }?;
    if *method != Method::GET && *method != Method::HEAD {
        return Some(method_not_allowed("GET"));
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags() {
        assert!(etag_matches("\"3\"", 3));
        assert!(etag_matches("W/\"3\", \"4\"", 4));
        assert!(etag_matches("*", 9));
        assert!(!etag_matches("\"3\"", 4));
    }

    #[test]
    fn openapi_is_json_and_covers_routes() {
        let v: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_default();
        assert_eq!(v["openapi"], "3.1.0");
        for p in [
            "/",
            "/auth/register",
            "/auth/login",
            "/auth/me",
            "/auth/users",
            "/auth/users/{id}",
            "/tasks",
            "/tasks/{id}",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(v["paths"].get(p).is_some(), "{p} missing from openapi.json");
        }
    }
}
