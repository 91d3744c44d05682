//! The auth daemon's routes and their rules (SPEC §2, issue 4).
//!
//! | route | |
//! |---|---|
//! | `POST /auth/register` | 201 `{id, email, name}`; 409 on a taken email (case-insensitive) |
//! | `POST /auth/login` | 200 `{token, email, name, id}` with `id` a string; 401 otherwise |
//! | `GET /auth/me`, `/auth/users`, `/auth/users/{id}` | need a valid bearer token |
//! | `PATCH /auth/me {email?, name?}` | the caller's own user; same email rule as register |
//! | `GET /.well-known/jwks.json` | the public key |
//!
//! The `/auth` prefix is optional so the daemon also answers when reached directly.
//!
//! Login does the same work whether or not the email exists: an unknown email is checked
//! against a dummy hash of the configured cost, so response time does not reveal which
//! emails are registered. bcrypt runs on blocking threads through a bounded queue
//! ([`crate::hashing`]: workers, waiting requests and wait time all capped, 503 with
//! `Retry-After` beyond), so hashing never stalls the async workers that serve other
//! requests and a flood of logins cannot make the admitted ones wait without bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use taskflow_contracts::Claims;

use crate::hashing::{BcryptPool, HashError};
use crate::keys::SigningKeys;
use crate::users::{StoreError, User, Users};
use taskflow_kit::web::{self, problem, problem_with, FieldError, Resp};

/// Shared state of the request handlers.
pub struct App {
    pub users: Users,
    pub keys: SigningKeys,
    pub token_ttl_secs: u64,
    pub bcrypt_cost: u32,
    /// A hash of a random password at the configured cost, verified against for unknown
    /// emails.
    pub dummy_hash: String,
    pub hashing: BcryptPool,
    pub metrics: web::HttpMetrics,
}

#[derive(Deserialize)]
struct RegisterBody {
    email: String,
    name: String,
    password: String,
}

/// `PATCH /auth/me`: the fields to change; absent ones stay.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    email: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct LoginBody {
    email: String,
    password: String,
}

const MAX_PASSWORD_BYTES: usize = 72;

/// Why `email` cannot be registered, if it cannot: it must be an address the notify
/// daemon's mailer accepts — checked with the very parser it mails with
/// ([`taskflow_kit::email::mail_address`]), so nobody can register an address that
/// is later refused on every event — and, on top of that, have a dotted domain.
pub fn email_problem(email: &str) -> Option<String> {
    if let Err(e) = taskflow_kit::email::mail_address(email) {
        return Some(e.to_string());
    }
    (!valid_email(email)).then(|| "must be a valid email address".to_owned())
}

/// Minimal syntactic email check: one `@`, non-empty local part, a dotted domain, no
/// spaces or control characters, 3–254 characters.
pub fn valid_email(email: &str) -> bool {
    let len = email.chars().count();
    if !(3..=254).contains(&len) || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

/// `/` or `/seg/seg…` with no empty, `.` or `..` segment and no percent-escape.
fn canonical(path: &str) -> bool {
    path == "/"
        || path.strip_prefix('/').is_some_and(|rest| {
            rest.split('/')
                .all(|s| !s.is_empty() && s != "." && s != ".." && !s.contains('%'))
        })
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn store_error(e: &StoreError) -> Resp {
    match e {
        StoreError::DuplicateEmail => problem(StatusCode::CONFLICT, "email already registered"),
        StoreError::Pool(_) => {
            tracing::warn!(error = %e, "database unavailable");
            problem(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
        StoreError::Db(_) => {
            tracing::error!(error = %e, "database error");
            problem(StatusCode::INTERNAL_SERVER_ERROR, "database error")
        }
    }
}

impl App {
    /// Entry point of every request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, _peer: SocketAddr) -> Resp {
        let started = Instant::now();
        let path = req.uri().path().to_owned();
        let (route, resp) = if path == "/healthz" {
            (
                "ops",
                web::json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            )
        } else {
            self.route(req, &path).await
        };
        self.metrics.observe(route, resp.status(), started);
        resp
    }

    async fn route(&self, req: Request<Incoming>, path: &str) -> (&'static str, Resp) {
        // Only canonical paths match: `/auth//login` or `/auth/login/` reaching the login
        // handler would let them skip limits keyed on the path (issue 12).
        if !canonical(path) {
            return ("unknown", problem(StatusCode::NOT_FOUND, "no such route"));
        }
        let rel = match path.strip_prefix("/auth") {
            Some(r) if r.starts_with('/') => r,
            _ => path,
        };
        let segs: Vec<&str> = rel.trim_start_matches('/').split('/').collect();
        let method = req.method().clone();
        match segs.as_slice() {
            [".well-known", "jwks.json"] if path.starts_with("/.well-known") => (
                "jwks",
                only(&method, Method::GET)
                    .unwrap_or_else(|| web::json(StatusCode::OK, &self.keys.jwks())),
            ),
            ["register"] => (
                "register",
                match only(&method, Method::POST) {
                    Some(r) => r,
                    None => self.register(req).await,
                },
            ),
            ["login"] => (
                "login",
                match only(&method, Method::POST) {
                    Some(r) => r,
                    None => self.login(req).await,
                },
            ),
            ["me"] if method == Method::PATCH => ("update_me", self.update_me(req).await),
            ["me"] => (
                "me",
                match only(&method, Method::GET) {
                    Some(r) => r,
                    None => self.me(&req).await,
                },
            ),
            ["users"] => (
                "users",
                match only(&method, Method::GET) {
                    Some(r) => r,
                    None => self.list(&req).await,
                },
            ),
            ["users", id] => (
                "user",
                match only(&method, Method::GET) {
                    Some(r) => r,
                    None => self.get(&req, id).await,
                },
            ),
            _ => ("unknown", problem(StatusCode::NOT_FOUND, "no such route")),
        }
    }

    /// The 503 for bcrypt work refused by the pool's bounds, or a 500 for a failed one.
    fn busy(&self, e: &HashError) -> Resp {
        match e {
            HashError::QueueFull | HashError::TimedOut => {
                tracing::warn!(error = %e, "password check refused");
                let mut r = problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many password checks in progress; retry shortly",
                );
                if let Ok(v) = HeaderValue::from_str(&self.hashing.retry_after_secs().to_string()) {
                    r.headers_mut().insert(RETRY_AFTER, v);
                }
                r
            }
            HashError::Closed => problem(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
            HashError::Worker(_) => {
                tracing::error!(error = %e, "bcrypt task failed");
                problem(StatusCode::INTERNAL_SERVER_ERROR, "cannot check password")
            }
        }
    }

    async fn hash(&self, password: String) -> Result<String, Resp> {
        let cost = self.bcrypt_cost;
        match self.hashing.run(move || bcrypt::hash(password, cost)).await {
            Ok(Ok(h)) => Ok(h),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "bcrypt hash failed");
                Err(problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot hash password",
                ))
            }
            Err(e) => Err(self.busy(&e)),
        }
    }

    async fn verify(&self, password: String, hash: String) -> Result<bool, Resp> {
        match self
            .hashing
            .run(move || bcrypt::verify(password, &hash))
            .await
        {
            Ok(Ok(ok)) => Ok(ok),
            Ok(Err(e)) => {
                // A corrupt stored hash: treat as a failed login, but say so in the log.
                tracing::error!(error = %e, "bcrypt verify failed");
                Ok(false)
            }
            Err(e) => Err(self.busy(&e)),
        }
    }

    async fn register(&self, req: Request<Incoming>) -> Resp {
        let bytes = match web::read_body(req.into_body()).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let body: RegisterBody = match web::parse_json(&bytes) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let email = body.email.trim().to_owned();
        let name = body.name.trim().to_owned();
        let mut errors = Vec::new();
        if let Some(problem) = email_problem(&email) {
            errors.push(FieldError::new("email", problem));
        }
        let name_len = name.chars().count();
        if !(1..=100).contains(&name_len) {
            errors.push(FieldError::new("name", "must be 1 to 100 characters"));
        }
        if body.password.chars().count() < 8 {
            errors.push(FieldError::new("password", "must be at least 8 characters"));
        } else if body.password.len() > MAX_PASSWORD_BYTES {
            errors.push(FieldError::new("password", "must be at most 72 bytes"));
        }
        if !errors.is_empty() {
            return problem_with(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the request has invalid fields",
                &errors,
            );
        }
        let hash = match self.hash(body.password).await {
            Ok(h) => h,
            Err(r) => return r,
        };
        match self.users.insert(&email, &name, &hash).await {
            Ok(user) => web::json(
                StatusCode::CREATED,
                &serde_json::json!({"id": user.id, "email": user.email, "name": user.name}),
            ),
            Err(e) => store_error(&e),
        }
    }

    async fn login(&self, req: Request<Incoming>) -> Resp {
        let bytes = match web::read_body(req.into_body()).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let body: LoginBody = match web::parse_json(&bytes) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let found = match self.users.by_email(body.email.trim()).await {
            Ok(f) => f,
            Err(e) => return store_error(&e),
        };
        // Same work either way: verify against the real hash or the dummy one.
        let (hash, user) = match found {
            Some(c) => (c.password_hash, Some(c.user)),
            None => (self.dummy_hash.clone(), None),
        };
        let password_ok = match self.verify(body.password, hash).await {
            Ok(ok) => ok,
            Err(r) => return r,
        };
        let Some(user) = user.filter(|_| password_ok) else {
            return problem(StatusCode::UNAUTHORIZED, "invalid email or password");
        };
        let iat = now_secs();
        let claims = Claims {
            sub: user.id.to_string(),
            email: user.email.clone(),
            name: user.name.clone(),
            iat,
            exp: iat.saturating_add(i64::try_from(self.token_ttl_secs).unwrap_or(86_400)),
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.keys.kid.clone());
        match jsonwebtoken::encode(&header, &claims, &self.keys.encoding) {
            Ok(token) => web::json(
                StatusCode::OK,
                &serde_json::json!({
                    "token": token,
                    "email": user.email,
                    "name": user.name,
                    "id": user.id.to_string(),
                }),
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot sign token");
                problem(StatusCode::INTERNAL_SERVER_ERROR, "cannot issue token")
            }
        }
    }

    /// The caller's claims from `Authorization: Bearer …`, or a 401.
    fn authenticate(&self, req: &Request<Incoming>) -> Result<Claims, Resp> {
        let unauthorized = |detail: &str| {
            let mut r = problem(StatusCode::UNAUTHORIZED, detail);
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            r
        };
        let header = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("missing bearer token"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("malformed Authorization header"))?;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.keys.decoding, &validation)
            .map_err(|_| unauthorized("invalid or expired token"))?;
        if data.claims.user_id().is_none() {
            return Err(unauthorized("invalid token subject"));
        }
        Ok(data.claims)
    }

    async fn me(&self, req: &Request<Incoming>) -> Resp {
        let claims = match self.authenticate(req) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let id = claims.user_id().unwrap_or_default();
        match self.users.by_id(id).await {
            Ok(Some(u)) => web::json(StatusCode::OK, &u),
            Ok(None) => problem(StatusCode::NOT_FOUND, "user no longer exists"),
            Err(e) => store_error(&e),
        }
    }

    /// `PATCH /auth/me {email?, name?}`: the caller changes their own address or name,
    /// under the same rules as registration (an address the mailer would refuse → 422).
    async fn update_me(&self, req: Request<Incoming>) -> Resp {
        let claims = match self.authenticate(&req) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let bytes = match web::read_body(req.into_body()).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let body: UpdateBody = match web::parse_json(&bytes) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let email = body.email.as_deref().map(str::trim);
        let name = body.name.as_deref().map(str::trim);
        let mut errors = Vec::new();
        if let Some(problem) = email.and_then(email_problem) {
            errors.push(FieldError::new("email", problem));
        }
        if name.is_some_and(|n| !(1..=100).contains(&n.chars().count())) {
            errors.push(FieldError::new("name", "must be 1 to 100 characters"));
        }
        if !errors.is_empty() {
            return problem_with(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the request has invalid fields",
                &errors,
            );
        }
        let id = claims.user_id().unwrap_or_default();
        match self.users.update(id, email, name).await {
            Ok(Some(u)) => web::json(StatusCode::OK, &u),
            Ok(None) => problem(StatusCode::NOT_FOUND, "user no longer exists"),
            Err(e) => store_error(&e),
        }
    }

    async fn get(&self, req: &Request<Incoming>, id: &str) -> Resp {
        if let Err(r) = self.authenticate(req) {
            return r;
        }
        let Some(id) = id.parse::<i64>().ok().filter(|i| *i > 0) else {
            return problem_with(
                StatusCode::BAD_REQUEST,
                "user id must be a positive integer",
                &[FieldError::new("id", "must be a positive integer")],
            );
        };
        match self.users.by_id(id).await {
            Ok(Some(u)) => web::json(StatusCode::OK, &u),
            Ok(None) => problem(StatusCode::NOT_FOUND, "no such user"),
            Err(e) => store_error(&e),
        }
    }

    /// `GET /auth/users?limit=&cursor=&ids=1,2,3` → `{data, next_cursor}`.
    async fn list(&self, req: &Request<Incoming>) -> Resp {
        if let Err(r) = self.authenticate(req) {
            return r;
        }
        let mut limit: i64 = 50;
        let mut after: i64 = 0;
        let mut ids: Option<Vec<i64>> = None;
        let mut errors = Vec::new();
        for (k, v) in taskflow_kit::web::query_pairs(req.uri().query().unwrap_or("")) {
            match k.as_str() {
                "limit" => match v.parse::<i64>() {
                    Ok(n) if (1..=500).contains(&n) => limit = n,
                    _ => errors.push(FieldError::new("limit", "must be an integer from 1 to 500")),
                },
                "cursor" => match v.parse::<i64>() {
                    Ok(n) if n >= 0 => after = n,
                    _ => errors.push(FieldError::new("cursor", "invalid cursor")),
                },
                "ids" => {
                    let parsed: Result<Vec<i64>, _> = v
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::parse::<i64>)
                        .collect();
                    match parsed {
                        Ok(list) if list.len() <= 500 => ids = Some(list),
                        _ => errors.push(FieldError::new(
                            "ids",
                            "must be up to 500 comma-separated integers",
                        )),
                    }
                }
                _ => {}
            }
        }
        if !errors.is_empty() {
            return problem_with(StatusCode::BAD_REQUEST, "invalid query parameters", &errors);
        }
        let mut users: Vec<User> = match self.users.list(after, limit + 1, ids.as_deref()).await {
            Ok(u) => u,
            Err(e) => return store_error(&e),
        };
        let next_cursor = if users.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
            users.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            users.last().map(|u| u.id.to_string())
        } else {
            None
        };
        web::json(
            StatusCode::OK,
            &serde_json::json!({"data": users, "next_cursor": next_cursor}),
        )
    }
}

/// `None` when the method is allowed, else a 405 problem.
fn only(method: &Method, allowed: Method) -> Option<Resp> {
    if *method == allowed {
        return None;
    }
    let mut r = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("use {allowed} for this route"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(allowed.as_str()) {
        r.headers_mut().insert(hyper::header::ALLOW, v);
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert!(valid_email("user@example.com"));
        assert!(valid_email("a.b+c@x.io"));
        for bad in [
            "", "a", "a@b", "@x.io", "a@.io", "a b@x.io", "a@x..io", "a@b@c.io",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn only_canonical_paths_route() {
        for ok in ["/", "/auth/login", "/login", "/.well-known/jwks.json"] {
            assert!(canonical(ok), "{ok}");
        }
        for bad in [
            "/auth/login/",
            "/auth//login",
            "//auth/login",
            "/auth/./login",
            "/auth/x/../login",
            "/auth/%6cogin",
            "",
        ] {
            assert!(!canonical(bad), "{bad}");
        }
    }

    #[test]
    fn registration_refuses_what_the_mailer_refuses() {
        assert_eq!(email_problem("user@example.com"), None);
        let long_local = format!("{}@example.com", "a".repeat(65));
        for bad in [long_local.as_str(), "a\"b@example.com", "a@b"] {
            assert!(email_problem(bad).is_some(), "{bad}");
        }
    }
}
