//! The auth daemon against a real PostgreSQL cluster: readiness protocol, configuration
//! errors, and every route's contract (issue 4).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use taskflow_localstack::{free_port, AuthDb, NotifySocket};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Env {
    _db: AuthDb,
    dir: tempfile::TempDir,
    base: String,
    /// The ops listener (`/metrics`, `/readyz`).
    ops: String,
    port: u16,
    proc: Option<Proc>,
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_taskflow-auth")
}

fn write_config(
    dir: &Path,
    port: u16,
    ops_port: u16,
    db_url: &str,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("auth.toml");
    let cost = if extra.contains("bcrypt_cost") {
        ""
    } else {
        "bcrypt_cost = 4\n"
    };
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{ops_port}\"\ndatabase_url = \"{db_url}\"\njwt_private_key_file = \"{}\"\n{cost}{extra}",
            dir.join("jwt-private.pem").display()
        ),
    )
    .unwrap();
    path
}

async fn start(notify: Option<&NotifySocket>, extra: &str) -> Env {
    let db = AuthDb::start().await.unwrap();
    let mut client = db.client().await.unwrap();
    taskflow_migrations::apply_auth(&mut client).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new(bin())
        .arg("--generate-keys")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let port = free_port().unwrap();
    let ops_port = free_port().unwrap();
    let cfg = write_config(dir.path(), port, ops_port, &db.url(), extra);
    let mut cmd = Command::new(bin());
    cmd.arg("--config").arg(&cfg).stdin(Stdio::null());
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", n.path());
    }
    let child = cmd.spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let env = Env {
        _db: db,
        dir,
        base,
        ops: format!("http://127.0.0.1:{ops_port}"),
        port,
        proc: Some(Proc(child)),
    };
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{}/readyz", env.ops)).send().await {
            if r.status() == 200 {
                return env;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("auth daemon did not become ready on port {}", env.port);
}

async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn readiness_and_graceful_stop() {
    let notify = NotifySocket::bind().unwrap();
    let mut env = start(Some(&notify), "").await;
    notify
        .wait_for_assignment("READY=1", Duration::from_secs(10))
        .await
        .unwrap();
    let (s, body) = call(
        reqwest::Method::GET,
        format!("{}/readyz", env.ops),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(body["checks"]["postgres"], "ok");
    let (s, text) = call(
        reqwest::Method::GET,
        format!("{}/metrics", env.ops),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(text
        .as_str()
        .unwrap_or("")
        .contains("taskflow_auth_http_requests"));
    // Neither is on the API port; `/healthz` is.
    for p in ["/metrics", "/readyz"] {
        let (s, _) = call(reqwest::Method::GET, format!("{}{p}", env.base), None, None).await;
        assert_eq!(s, 404, "{p}");
    }
    let (s, _) = call(
        reqwest::Method::GET,
        format!("{}/healthz", env.base),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);

    let mut proc = env.proc.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(proc.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    notify
        .wait_for_assignment("STOPPING=1", Duration::from_secs(10))
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || proc.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_config_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new(bin())
        .arg("--generate-keys")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    for (extra, key) in [
        ("bcrypt_cost = 3\n", "bcrypt_cost"),
        ("token_ttl_secs = \"x\"\n", "token_ttl_secs"),
        ("database_url = \"::nope\"\n", "database_url"),
    ] {
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!(
                "jwt_private_key_file = \"{}\"\n{extra}",
                dir.path().join("jwt-private.pem").display()
            ),
        )
        .unwrap();
        let out = Command::new(bin())
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{extra}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{extra}: {err}");
    }
    // A key file that is not an Ed25519 private key.
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "jwt_private_key_file = \"{}\"\n",
            dir.path().join("jwt-public.pem").display()
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("jwt_private_key_file"));
}

#[tokio::test]
async fn register_login_and_users() {
    use reqwest::Method as M;
    let env = start(None, "").await;
    let b = &env.base;

    // Register (seed README body), duplicate in another case, validation, bad JSON.
    let (s, body) = call(
        M::POST,
        format!("{b}/auth/register"),
        None,
        Some(json!({
            "email": "user@example.com", "name": "John Doe", "password": "securepassword"
        })),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(
        body,
        json!({"id": 1, "email": "user@example.com", "name": "John Doe"})
    );
    let (s, body) = call(
        M::POST,
        format!("{b}/auth/register"),
        None,
        Some(json!({
            "email": "USER@example.com", "name": "Other", "password": "securepassword"
        })),
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["status"], 409);
    let (s, body) = call(
        M::POST,
        format!("{b}/auth/register"),
        None,
        Some(json!({
            "email": "nope", "name": "", "password": "short"
        })),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["email", "name", "password"]);
    let (s, body) = call(
        M::POST,
        format!("{b}/auth/register"),
        None,
        Some(json!({
            "email": "a@b.io", "name": 5, "password": "securepassword"
        })),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(body["errors"][0]["field"], "name");
    let r = reqwest::Client::new()
        .post(format!("{b}/auth/register"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = reqwest::Client::new()
        .post(format!("{b}/auth/register"))
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Login: id is a string; wrong password and unknown email are indistinguishable.
    let (s, login) = call(
        M::POST,
        format!("{b}/auth/login"),
        None,
        Some(json!({
            "email": "user@example.com", "password": "securepassword"
        })),
    )
    .await;
    assert_eq!(s, 200, "{login}");
    assert_eq!(login["id"], "1");
    assert_eq!(login["email"], "user@example.com");
    assert_eq!(login["name"], "John Doe");
    let token = login["token"].as_str().unwrap().to_owned();
    let (s1, wrong_pw) = call(
        M::POST,
        format!("{b}/auth/login"),
        None,
        Some(json!({
            "email": "user@example.com", "password": "wrongpassword"
        })),
    )
    .await;
    let (s2, unknown) = call(
        M::POST,
        format!("{b}/auth/login"),
        None,
        Some(json!({
            "email": "nobody@example.com", "password": "securepassword"
        })),
    )
    .await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(wrong_pw, unknown);

    // Authenticated routes.
    let (s, me) = call(M::GET, format!("{b}/auth/me"), Some(&token), None).await;
    assert_eq!(s, 200);
    assert_eq!(me["id"], 1);
    assert!(me.get("password_hash").is_none());
    for i in 2..=5 {
        let (s, _) = call(M::POST, format!("{b}/auth/register"), None, Some(json!({
            "email": format!("u{i}@example.com"), "name": format!("U{i}"), "password": "securepassword"
        }))).await;
        assert_eq!(s, 201);
    }
    let (s, page) = call(
        M::GET,
        format!("{b}/auth/users?limit=2"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_cursor"], "2");
    let (_, page) = call(
        M::GET,
        format!("{b}/auth/users?limit=2&cursor=4"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(page["data"][0]["id"], 5);
    assert!(page["next_cursor"].is_null());
    let (_, page) = call(
        M::GET,
        format!("{b}/auth/users?ids=2,5,99"),
        Some(&token),
        None,
    )
    .await;
    let ids: Vec<i64> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![2, 5]);
    let (s, u) = call(M::GET, format!("{b}/auth/users/3"), Some(&token), None).await;
    assert_eq!((s, u["email"].clone()), (200, json!("u3@example.com")));
    let (s, _) = call(M::GET, format!("{b}/auth/users/999"), Some(&token), None).await;
    assert_eq!(s, 404);
    let (s, _) = call(M::GET, format!("{b}/auth/users/abc"), Some(&token), None).await;
    assert_eq!(s, 400);

    // Token failures.
    let (s, _) = call(M::GET, format!("{b}/auth/me"), None, None).await;
    assert_eq!(s, 401);
    let (s, _) = call(M::GET, format!("{b}/auth/me"), Some("garbage"), None).await;
    assert_eq!(s, 401);
    let mut parts: Vec<&str> = token.split('.').collect();
    let none_header = base64_url(br#"{"alg":"none","typ":"JWT"}"#);
    parts[0] = &none_header;
    let forged = format!("{}.{}.", parts[0], parts[1]);
    let (s, _) = call(M::GET, format!("{b}/auth/me"), Some(&forged), None).await;
    assert_eq!(s, 401);

    // Wrong method, unknown route, JWKS.
    let (s, _) = call(M::GET, format!("{b}/auth/login"), None, None).await;
    assert_eq!(s, 405);
    let (s, _) = call(M::GET, format!("{b}/auth/nothing"), None, None).await;
    assert_eq!(s, 404);
    let (s, jwks) = call(M::GET, format!("{b}/.well-known/jwks.json"), None, None).await;
    assert_eq!(s, 200);
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    let _ = env.dir.path();
}

fn base64_url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Non-canonical paths never reach a handler (issue 12): `/auth/login/` and friends once
/// reached the login handler while a limit keyed on the path did not apply.
#[tokio::test]
async fn non_canonical_paths_do_not_route() {
    let env = start(None, "").await;
    let body = json!({"email": "nobody@example.com", "password": "wrong-password"});
    let (s, _) = call(
        reqwest::Method::POST,
        format!("{}/auth/login", env.base),
        None,
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 401);
    for p in [
        "/auth/login/",
        "/auth//login",
        "//auth/login",
        "/auth/%6cogin",
    ] {
        let (s, _) = call(
            reqwest::Method::POST,
            format!("{}{p}", env.base),
            None,
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, 404, "{p}");
    }
}

/// bcrypt work is bounded: with one worker, one waiting slot and a 300 ms wait, a burst
/// of logins gets 503 + Retry-After for what does not fit instead of queueing without
/// bound, and the daemon keeps answering.
#[tokio::test]
async fn bcrypt_queue_is_bounded() {
    let env = start(
        None,
        "bcrypt_cost = 12\nbcrypt_workers = 1\nbcrypt_queue = 1\nbcrypt_queue_timeout_ms = 300\n",
    )
    .await;
    let client = reqwest::Client::new();
    let logins: Vec<_> = (0..8).map(|i| {
        let client = client.clone();
        let url = format!("{}/auth/login", env.base);
        tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"email": format!("flood{i}@example.com"), "password": "wrong-password"}))
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (r.status().as_u16(), retry)
        })
    }).collect();
    let mut results = Vec::new();
    for l in logins {
        results.push(l.await.unwrap());
    }
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s == 503).collect();
    assert!(!refused.is_empty(), "no login was refused: {results:?}");
    assert!(refused.iter().all(|(_, r)| r.is_some()), "{results:?}");
    assert!(results.iter().any(|(s, _)| *s == 401), "{results:?}");
    assert!(
        results.iter().all(|(s, _)| *s == 401 || *s == 503),
        "{results:?}"
    );
}

/// Issue 10: registration accepted addresses the notify daemon's mailer refuses (a local
/// part over 64 characters, a `"`), which then blocked notify for good. Registration and
/// `PATCH /auth/me` now refuse them with 422 naming `email`, using the mailer's parser.
#[tokio::test]
async fn addresses_the_mailer_refuses_are_refused() {
    use reqwest::Method as M;
    let env = start(None, "").await;
    let b = &env.base;
    let long_local = format!("{}@example.com", "a".repeat(65));
    for bad in [
        long_local.as_str(),
        "a\"b@example.com",
        "jürgen@example.com",
    ] {
        let (s, body) = call(
            M::POST,
            format!("{b}/auth/register"),
            None,
            Some(json!({"email": bad, "name": "Bad", "password": "securepassword"})),
        )
        .await;
        assert_eq!(s, 422, "{bad}: {body}");
        assert_eq!(body["errors"][0]["field"], "email", "{bad}: {body}");
    }
    let (s, _) = call(
        M::POST,
        format!("{b}/auth/register"),
        None,
        Some(json!({"email": "fine@example.com", "name": "Fine", "password": "securepassword"})),
    )
    .await;
    assert_eq!(s, 201);
    let (_, login) = call(
        M::POST,
        format!("{b}/auth/login"),
        None,
        Some(json!({"email": "fine@example.com", "password": "securepassword"})),
    )
    .await;
    let token = login["token"].as_str().unwrap().to_owned();

    // User updates follow the same rule.
    let (s, body) = call(
        M::PATCH,
        format!("{b}/auth/me"),
        Some(&token),
        Some(json!({"email": long_local})),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "email");
    let (s, body) = call(
        M::PATCH,
        format!("{b}/auth/me"),
        Some(&token),
        Some(json!({"email": "new@example.com", "name": "Renamed"})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        (body["email"].clone(), body["name"].clone()),
        (json!("new@example.com"), json!("Renamed"))
    );
    let (s, _) = call(
        M::PATCH,
        format!("{b}/auth/me"),
        None,
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(s, 401);
}
