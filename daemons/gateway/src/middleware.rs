//! Middleware of the gateway's request path: who the client is (trusted forwarded-for,
//! IPv6 prefix), bearer-token verification, rate limits, CORS, and the `/auth/*` proxy
//! with the limits that protect the auth daemon's bcrypt work.
//!
//! Rate limits come in two kinds. The per-request buckets (client IP, user) are decided
//! in process and shared through Redis in the background ([`crate::limiter`]): they sit
//! on every request, including the cached read path. The buckets in front of bcrypt
//! (`POST /auth/login` per email and per client IP across all emails, `POST
//! /auth/register` per client IP) are checked strictly in Redis on each such request —
//! they guard password guessing and the auth daemon's CPU, and a hash costs far more than
//! the round trip. When Redis is unreachable both kinds fall back to in-process buckets.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use taskflow_kit::web::{self, problem, Resp};

use crate::app::{App, LimitHeaders};
use crate::kv::{Bucket, Limit};
use crate::limiter::{Key, Rate};
use crate::routes::AuthRoute;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Per-request facts the middleware gathered.
pub struct Ctx {
    /// The client's rate-limit identity (IPv6 cut to its prefix).
    pub ip: IpAddr,
    pub user: Option<i64>,
    pub token: Option<String>,
    pub limit: Option<Limit>,
}

pub fn header_str<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub fn valid_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

pub fn method_not_allowed(allowed: &str) -> Resp {
    let mut r = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("allowed: {allowed}"),
    );
    if let Ok(v) = HeaderValue::from_str(allowed) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

pub fn unauthorized(detail: &str) -> Resp {
    let mut r = problem(StatusCode::UNAUTHORIZED, detail);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

impl App {
    /// The client key of a request: the trusted-forwarded-for client, cut to the
    /// configured IPv6 prefix.
    pub(crate) fn client_ip(&self, req: &Request<Incoming>, peer: SocketAddr) -> IpAddr {
        let forwarded = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        let ip = self.trusted.client(peer.ip(), forwarded);
        web::client_key(ip, self.cfg.rate_limit.ipv6_prefix)
    }

    fn general_rate(&self) -> Rate {
        Rate::per_second(self.cfg.rate_limit.per_second, self.cfg.rate_limit.burst)
    }

    /// Charges the client IP bucket and, when authenticated, the user bucket, in process;
    /// returns the 429.
    pub(crate) fn rate_limit(&self, ctx: &mut Ctx) -> Option<Resp> {
        if !self.cfg.rate_limit.enabled {
            return None;
        }
        let rate = self.general_rate();
        let mut keys = [(Key::Ip(ctx.ip), rate), (Key::User(0), rate)];
        let keys = match ctx.user {
            Some(u) => {
                keys[1].0 = Key::User(u);
                &keys[..]
            }
            None => &keys[..1],
        };
        let (l, unknown) = self.limiter.check_new(keys);
        if unknown {
            // Fetched in the background: the first request of a key this instance has
            // not seen is decided on the local bucket (bounded over-admission).
            self.limiter.ask(keys, &self.kv);
        }
        ctx.limit = Some(l);
        (!l.allowed).then(|| too_many(&l))
    }

    /// The strict (Redis) check in front of bcrypt: the client IP's general bucket, its
    /// bucket for auth work, and `email`'s login bucket for a login.
    async fn auth_limit(
        &self,
        ctx: &mut Ctx,
        kind: AuthRoute,
        email: Option<&str>,
    ) -> Option<Resp> {
        let rl = &self.cfg.rate_limit;
        if !rl.enabled {
            return None;
        }
        let per_minute = |n: u32, burst: u32| Rate {
            interval_us: (60_000_000 / u64::from(n.max(1))).max(1),
            burst: burst.max(1),
        };
        let mut keys = vec![(Key::Ip(ctx.ip), self.general_rate())];
        if matches!(kind, AuthRoute::Login | AuthRoute::Register) {
            keys.push((
                Key::Named(format!("rl2:auth-ip:{}", ctx.ip)),
                per_minute(rl.auth_per_ip_per_minute, rl.auth_per_ip_burst),
            ));
        }
        if let Some(email) = email {
            keys.push((
                Key::Named(format!(
                    "rl2:login:{:016x}",
                    xxhash_rust::xxh64::xxh64(email.as_bytes(), 0)
                )),
                per_minute(rl.login_per_minute, rl.login_per_minute),
            ));
        }
        let buckets: Vec<Bucket> = keys
            .iter()
            .map(|(k, r)| Bucket {
                key: k.redis_key(),
                interval_us: r.interval_us,
                burst: r.burst,
            })
            .collect();
        let l = match self.kv.limit(&buckets).await {
            Ok((l, backlogs)) => {
                for ((k, r), b) in keys.iter().zip(backlogs) {
                    self.limiter.learn(k, *r, b);
                }
                l
            }
            Err(e) => {
                tracing::warn!(error = %e, "rate limiter unavailable (Redis); deciding in process");
                self.limiter.check(&keys)
            }
        };
        ctx.limit = Some(l);
        (!l.allowed).then(|| too_many(&l))
    }

    /// `/auth/*`: the limits for the route, then the auth daemon. The login email comes
    /// from the body, so the body is read first (bounded, with the body timeout).
    pub(crate) async fn auth_route(
        &self,
        kind: AuthRoute,
        req: Request<Incoming>,
        ctx: &mut Ctx,
    ) -> Resp {
        let (parts, body) = req.into_parts();
        let body = match web::read_body(body).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let email = (kind == AuthRoute::Login)
            .then(|| {
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| {
                        v.get("email")
                            .and_then(|e| e.as_str())
                            .map(|e| e.trim().to_lowercase())
                    })
            })
            .flatten();
        let limited = match kind {
            AuthRoute::Login | AuthRoute::Register => {
                self.auth_limit(ctx, kind, email.as_deref()).await
            }
            AuthRoute::Other => self.rate_limit(ctx),
        };
        let resp = match limited {
            Some(r) => r,
            None => self.proxy_auth(parts, body).await,
        };
        with_limit_headers(resp, ctx, &self.limit_headers)
    }

    pub(crate) fn cors(&self, origin: Option<&HeaderValue>, h: &mut HeaderMap) {
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

    pub(crate) fn preflight(&self, req: &Request<Incoming>) -> Resp {
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

    pub(crate) fn authenticate(&self, h: &HeaderMap) -> Result<(i64, String), Resp> {
        let value = header_str(h, &header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing bearer token"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("malformed Authorization header"))?;
        match self.verifier.verify(token) {
            Ok(id) => Ok((id, token.to_owned())),
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                Err(unauthorized("invalid or expired token"))
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
}

fn too_many(l: &Limit) -> Resp {
    let mut r = problem(
        StatusCode::TOO_MANY_REQUESTS,
        "rate limit exceeded; retry later",
    );
    let secs = l.retry_after_ms.div_ceil(1000).max(1);
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

pub fn with_limit_headers(mut r: Resp, ctx: &Ctx, fixed: &LimitHeaders) -> Resp {
    let Some(l) = ctx.limit else { return r };
    let h = r.headers_mut();
    h.insert(RATELIMIT_LIMIT.clone(), fixed.limit.clone());
    h.insert(RATELIMIT_REMAINING.clone(), HeaderValue::from(l.remaining));
    h.insert(
        RATELIMIT_RESET.clone(),
        HeaderValue::from(l.reset_ms.div_ceil(1000)),
    );
    h.insert(RATELIMIT_POLICY.clone(), fixed.policy.clone());
    r
}
