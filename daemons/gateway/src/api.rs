//! The gateway's REST surface (SPEC §2): the request pipeline and the task handlers.
//!
//! Every request passes, in order: request id (taken from `X-Request-Id` or minted) →
//! canonical path or 308/404 ([`crate::routes`]) → `/healthz` → CORS preflight → docs →
//! bearer-token verification for `/tasks` → rate limits ([`crate::middleware`]) → the
//! handler → CORS, `RateLimit-*` and `X-Request-Id` response headers → metrics and one
//! access-log line inside the request's span. `/metrics` and `/readyz` are not here: they
//! are on the ops listener (`ops_listen`).
//!
//! Task reads go through the in-process cache, then Redis, then the shards
//! ([`crate::hotcache`] explains how the levels stay coherent). Redis trouble degrades
//! instead of failing: rate limits are decided in process, the Redis cache is skipped;
//! only id allocation and `Idempotency-Key` requests need Redis and answer 503.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use taskflow_contracts::{Task, TaskEvent, TaskEventType};
use tracing::Instrument as _;

use crate::app::App;
use crate::hotcache::Lookup;
use crate::input::{self, Mode, Rejection, Valid};
use crate::kv::Cached;
use crate::middleware::{
    header_str, method_not_allowed, unauthorized, valid_request_id, with_limit_headers, Ctx,
    X_REQUEST_ID,
};
use crate::routes::{self, Route};
use crate::store::{self, ListFilter, StoreError};
use taskflow_kit::web::{self, problem, problem_with, FieldError, Resp};

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

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
            .map_or_else(
                || {
                    let n = self.rid_counter.fetch_add(1, Ordering::Relaxed);
                    format!("{}-{n}", self.rid_prefix)
                },
                str::to_owned,
            );
        let method = req.method().clone();
        let span =
            tracing::info_span!("request", request_id = %rid, %method, path = %req.uri().path());
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
            let elapsed_us = started.elapsed().as_micros() as u64;
            if status.is_server_error() {
                tracing::warn!(status = status.as_u16(), elapsed_us, "request failed");
            } else {
                tracing::debug!(status = status.as_u16(), elapsed_us, "request");
            }
            resp
        }
        .instrument(span)
        .await
    }

    /// Routing and middleware; the handlers are in [`App::tasks`] and
    /// [`App::auth_route`].
    async fn dispatch(&self, req: Request<Incoming>, peer: SocketAddr) -> (&'static str, Resp) {
        if let Err(r) = routes::canonical(req.uri().path(), req.uri().query()) {
            return ("noncanonical", r);
        }
        let route = Route::of(req.uri().path());
        let method = req.method().clone();
        match route {
            Route::Health => {
                return (
                    "ops",
                    web::json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
                )
            }
            // CORS preflight: answered before authentication, as browsers send no token.
            _ if method == Method::OPTIONS
                && req
                    .headers()
                    .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) =>
            {
                return ("preflight", self.preflight(&req))
            }
            Route::Docs => return ("docs", crate::docs::serve(req.uri().path(), &method)),
            // WebSocket: authenticates in-band (SPEC §3), so before the bearer check; the
            // per-IP connection cap is the hub's.
            Route::Notifications => {
                let ip = self.client_ip(&req, peer);
                return ("websocket", self.notifications.accept(req, ip));
            }
            _ => {}
        }
        let mut ctx = Ctx {
            ip: self.client_ip(&req, peer),
            user: None,
            token: None,
            limit: None,
        };
        if let Route::Auth(kind) = route {
            return ("auth", self.auth_route(kind, req, &mut ctx).await);
        }
        let auth_failure = if route.needs_token() {
            match self.authenticate(req.headers()) {
                Ok((user, token)) => {
                    ctx.user = Some(user);
                    ctx.token = Some(token);
                    None
                }
                Err(r) => Some(r),
            }
        } else {
            None
        };
        if let Some(r) = self.rate_limit(&mut ctx) {
            return ("limited", with_limit_headers(r, &ctx, &self.limit_headers));
        }
        if let Some(r) = auth_failure {
            return (
                "unauthorized",
                with_limit_headers(r, &ctx, &self.limit_headers),
            );
        }
        let resp = self.tasks(route, &method, req, &ctx).await;
        (
            route.label(&method),
            with_limit_headers(resp, &ctx, &self.limit_headers),
        )
    }

    /// `/`, `/tasks` and `/tasks/{id}` once authenticated and within limits.
    async fn tasks(
        &self,
        route: Route,
        method: &Method,
        req: Request<Incoming>,
        ctx: &Ctx,
    ) -> Resp {
        match (route, method) {
            (Route::Root, &Method::GET) => web::json(
                StatusCode::OK,
                &serde_json::json!({"message": "API is working"}),
            ),
            (Route::Root, _) => method_not_allowed("GET"),
            (Route::Tasks, &Method::GET) => self.list(ctx, req.uri().query().unwrap_or("")).await,
            (Route::Tasks, &Method::POST) => self.create(ctx, req).await,
            (Route::Tasks, _) => method_not_allowed("GET, POST"),
            (Route::Task(id), &Method::GET) => self.get(id, req.headers()).await,
            (Route::Task(id), &Method::PUT) => self.update(ctx, id, req, Mode::Replace).await,
            (Route::Task(id), &Method::PATCH) => self.update(ctx, id, req, Mode::Patch).await,
            (Route::Task(id), &Method::DELETE) => self.delete(ctx, id, req.headers()).await,
            (Route::Task(_), _) => method_not_allowed("GET, PUT, PATCH, DELETE"),
            (Route::NoSuchTask, _) => problem(StatusCode::NOT_FOUND, "no such task"),
            _ => problem(StatusCode::NOT_FOUND, "no such route"),
        }
    }

    /// The ids among `ids` (comma-separated) that the auth daemon knows.
    async fn existing_users(&self, token: &str, ids: &str) -> Result<HashSet<i64>, Resp> {
        let url = format!("{}/auth/users?limit=500&ids={ids}", self.auth_url);
        match self.http.get(url).bearer_auth(token).send().await {
            Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                Ok(v) => Ok(v["data"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|u| u["id"].as_i64()).collect())
                    .unwrap_or_default()),
                Err(e) => {
                    tracing::warn!(error = %e, "auth daemon sent a broken user list");
                    Err(problem(StatusCode::BAD_GATEWAY, "auth service failed"))
                }
            },
            Ok(r) => {
                tracing::warn!(
                    status = r.status().as_u16(),
                    "auth daemon refused the user lookup"
                );
                Err(problem(StatusCode::BAD_GATEWAY, "cannot verify users"))
            }
            Err(e) => {
                tracing::warn!(error = %e, "auth daemon unreachable");
                Err(problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot verify users: auth service unavailable",
                ))
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
        let found = self.existing_users(token, &ids).await?;
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

    /// After a committed write: kick the outbox relay, update this instance's cache
    /// before the response goes out, then Redis (version-checked, announced to the other
    /// instances). A Redis failure leaves the task in `unsynced` until a retry lands, so
    /// neither level can serve what the write replaced.
    async fn after_write(&self, id: i64, state: Cached, performer: Option<i64>) {
        self.kick.notify_one();
        match &state {
            Cached::Live { version, json } => {
                self.hot
                    .changed(id, *version, Some(Bytes::from(json.clone())), false);
            }
            Cached::Deleted { version } => self.hot.changed(id, *version, None, true),
        }
        if let Err(e) = self
            .kv
            .cache(id, &state, self.cfg.cache_ttl_secs, true)
            .await
        {
            tracing::warn!(error = %e, task_id = id, "cannot update the Redis cache after a write; retrying in the background");
            self.unsynced.add(id, state);
        }
        if let Err(e) = self.kv.after_write(id, performer).await {
            tracing::warn!(error = %e, task_id = id, "cannot update the performer map after a write");
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
        let performer = task.performer_id;
        let state = Cached::Live {
            version: task.version,
            json,
        };
        self.after_write(id, state, Some(performer)).await;
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

    /// A single task: the in-process cache, else Redis (unless this instance has a write
    /// Redis missed for it), else the shards; each level a read passes is filled.
    async fn get(&self, id: i64, h: &HeaderMap) -> Resp {
        let inm = header_str(h, &header::IF_NONE_MATCH);
        match self.hot.get(id) {
            Lookup::Hit { version, body } => return cached_response(version, body, inm),
            Lookup::Deleted => return problem(StatusCode::NOT_FOUND, "no such task"),
            Lookup::Miss => {}
        }
        let epoch = self.hot.epoch();
        if !self.unsynced.contains(id) {
            match self.kv.cached(id).await {
                Ok(Some(state)) => {
                    self.hot.fill(id, &state, epoch);
                    return match state {
                        Cached::Live { version, json } => {
                            cached_response(version, Bytes::from(json), inm)
                        }
                        Cached::Deleted { .. } => problem(StatusCode::NOT_FOUND, "no such task"),
                    };
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cache unavailable"),
            }
        }
        match self.locate(id).await {
            Ok(Some(task)) => {
                let (resp, json) = task_response(StatusCode::OK, &task);
                let state = Cached::Live {
                    version: task.version,
                    json,
                };
                let _ = self
                    .kv
                    .cache(id, &state, self.cfg.cache_ttl_secs, false)
                    .await;
                self.hot.fill(id, &state, epoch);
                if inm.is_some_and(|l| etag_matches(l, task.version)) {
                    return not_modified(task.version);
                }
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
        let decide = |old: Task| updated(&v, old, user, if_match.as_deref());
        match self.locked(id, decide).await {
            Ok(Some((task, _))) => {
                let (resp, json) = task_response(StatusCode::OK, &task);
                let state = Cached::Live {
                    version: task.version,
                    json,
                };
                self.after_write(id, state, Some(task.performer_id)).await;
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
            Ok(Some((old, _))) => {
                // The tombstone outranks every version the task ever had.
                let state = Cached::Deleted {
                    version: old.version + 1,
                };
                self.after_write(id, state, None).await;
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            Ok(None) => problem(StatusCode::NOT_FOUND, "no such task"),
            Err(r) => r,
        }
    }
}

fn not_modified(version: i64) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    r.headers_mut().insert(header::ETAG, etag(version));
    r
}

/// A task from a cache level: its JSON as stored, or 304 for a matching `If-None-Match`.
fn cached_response(version: i64, body: Bytes, if_none_match: Option<&str>) -> Resp {
    if if_none_match.is_some_and(|l| etag_matches(l, version)) {
        return not_modified(version);
    }
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ETAG, etag(version));
    r
}

/// The task after an update by `user`, with its event; the 403/412/422 when refused.
fn updated(
    v: &Valid,
    old: Task,
    user: i64,
    if_match: Option<&str>,
) -> Result<(Option<Task>, TaskEvent), Resp> {
    if old.creator_id != user && old.performer_id != user {
        return Err(problem(
            StatusCode::FORBIDDEN,
            "only the creator or the performer may update a task",
        ));
    }
    if let Some(list) = if_match {
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
}
