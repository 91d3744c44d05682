//! The route table, on canonical paths only (issue 12).
//!
//! Limits are chosen by route (the per-email login bucket for `POST /auth/login`, …), so
//! the route the limits see must be the route the request reaches. `/auth/login/` and
//! `/auth//login` once reached the auth daemon's login handler while the gateway saw "not
//! the login route" and skipped the login limits. Now a path is matched only in its
//! canonical form — no empty segment, no `.`/`..` segment, no percent-escape — and a
//! request for anything else never reaches a handler: a path that only differs by slashes
//! is redirected (308 keeps method and body) to its canonical form, where every limit
//! applies; dot segments and escapes, which no route needs, answer 404. The auth daemon
//! is forwarded the canonical path, so both sides agree on what was asked.

use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};
use taskflow_kit::web::{problem, Resp};

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Root,
    Health,
    /// `/openapi.json`, the Swagger UI.
    Docs,
    /// `/auth/*`, proxied to the auth daemon.
    Auth(AuthRoute),
    Tasks,
    Task(i64),
    /// `/tasks/notifications`, the WebSocket endpoint (SPEC §3).
    Notifications,
    /// `/tasks/{x}` where `x` is not a task id.
    NoSuchTask,
    NotFound,
}

/// The auth routes that cost a bcrypt hash get their own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthRoute {
    Login,
    Register,
    Other,
}

impl Route {
    /// The route of a canonical path (see [`canonical`]).
    pub fn of(path: &str) -> Route {
        let rest = path.strip_prefix('/').unwrap_or(path);
        // No allocation: this runs on every request.
        let mut segs = rest.split('/');
        match (segs.next(), segs.next(), segs.next()) {
            (Some(""), None, _) => Route::Root,
            (Some("healthz"), None, _) => Route::Health,
            (Some("openapi.json"), None, _) | (Some("swagger"), _, _) => Route::Docs,
            (Some("auth"), Some("login"), None) => Route::Auth(AuthRoute::Login),
            (Some("auth"), Some("register"), None) => Route::Auth(AuthRoute::Register),
            (Some("auth"), _, _) => Route::Auth(AuthRoute::Other),
            (Some("tasks"), None, _) => Route::Tasks,
            (Some("tasks"), Some("notifications"), None) => Route::Notifications,
            (Some("tasks"), Some(id), None) => id
                .parse::<i64>()
                .ok()
                .filter(|i| *i > 0)
                .map_or(Route::NoSuchTask, Route::Task),
            _ => Route::NotFound,
        }
    }

    /// The metrics label.
    pub fn label(self, method: &Method) -> &'static str {
        match (self, method) {
            (Route::Root, _) => "root",
            (Route::Health, _) => "ops",
            (Route::Docs, _) => "docs",
            (Route::Notifications, _) => "websocket",
            (Route::Auth(_), _) => "auth",
            (Route::Tasks, &Method::GET) => "list_tasks",
            (Route::Tasks, &Method::POST) => "create_task",
            (Route::Tasks, _) => "tasks",
            (Route::Task(_), &Method::GET) => "get_task",
            (Route::Task(_), &Method::PUT) => "put_task",
            (Route::Task(_), &Method::PATCH) => "patch_task",
            (Route::Task(_), &Method::DELETE) => "delete_task",
            (Route::Task(_) | Route::NoSuchTask, _) => "task",
            (Route::NotFound, _) => "unknown",
        }
    }

    /// Routes that need a bearer token.
    pub fn needs_token(self) -> bool {
        matches!(self, Route::Tasks | Route::Task(_) | Route::NoSuchTask)
    }
}

/// `Ok` for a canonical path; else the response that replaces routing: 308 to the
/// canonical form for extra slashes, 404 for dot segments and percent-escapes.
pub fn canonical(path: &str, query: Option<&str>) -> Result<(), Resp> {
    if path == "/" {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(problem(StatusCode::NOT_FOUND, "no such route"));
    };
    if rest
        .split('/')
        .any(|s| s == "." || s == ".." || s.contains('%'))
    {
        return Err(problem(
            StatusCode::NOT_FOUND,
            "no such route (paths are matched as written: no dot segments or escapes)",
        ));
    }
    if !rest.split('/').any(str::is_empty) {
        return Ok(());
    }
    let mut target = String::with_capacity(path.len());
    for s in rest.split('/').filter(|s| !s.is_empty()) {
        target.push('/');
        target.push_str(s);
    }
    if target.is_empty() {
        target.push('/');
    }
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    let mut r = problem(
        StatusCode::PERMANENT_REDIRECT,
        &format!("the canonical path is {target}"),
    );
    if let Ok(v) = HeaderValue::from_str(&target) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Err(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(path: &str, query: Option<&str>) -> Option<String> {
        match canonical(path, query) {
            Ok(()) => None,
            Err(r) => Some(format!(
                "{} {}",
                r.status().as_u16(),
                r.headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
            )),
        }
    }

    #[test]
    fn canonical_paths_pass() {
        for p in [
            "/",
            "/auth/login",
            "/tasks",
            "/tasks/12",
            "/swagger/index.html",
        ] {
            assert_eq!(redirect(p, None), None, "{p}");
        }
    }

    #[test]
    fn every_bypass_form_is_refused_or_redirected() {
        assert_eq!(
            redirect("/auth/login/", None).as_deref(),
            Some("308 /auth/login")
        );
        assert_eq!(
            redirect("/auth//login", None).as_deref(),
            Some("308 /auth/login")
        );
        assert_eq!(
            redirect("//auth/login", None).as_deref(),
            Some("308 /auth/login")
        );
        assert_eq!(
            redirect("/tasks//", Some("limit=5")).as_deref(),
            Some("308 /tasks?limit=5")
        );
        assert_eq!(redirect("//", None).as_deref(), Some("308 /"));
        for p in [
            "/auth/./login",
            "/auth/x/../login",
            "/auth/%6cogin",
            "/auth/login%2f",
        ] {
            assert_eq!(redirect(p, None).as_deref(), Some("404 "), "{p}");
        }
    }

    #[test]
    fn routes() {
        assert_eq!(Route::of("/auth/login"), Route::Auth(AuthRoute::Login));
        assert_eq!(
            Route::of("/auth/register"),
            Route::Auth(AuthRoute::Register)
        );
        assert_eq!(Route::of("/auth/users/3"), Route::Auth(AuthRoute::Other));
        assert_eq!(Route::of("/tasks/7"), Route::Task(7));
        assert_eq!(Route::of("/tasks/0"), Route::NoSuchTask);
        assert_eq!(Route::of("/tasks/x"), Route::NoSuchTask);
        assert_eq!(Route::of("/tasks/1/2"), Route::NotFound);
        assert_eq!(Route::of("/"), Route::Root);
    }
}
