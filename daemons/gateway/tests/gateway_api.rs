//! The gateway end to end against real infrastructure started by taskflow-localstack:
//! PostgreSQL (auth DB + one task shard, until the shard proxy is usable), Redis, the
//! tansu Kafka-API broker, and the real auth daemon.
//!
//! One infrastructure set is started once and the sections run in order on it (starting
//! PostgreSQL and the broker dominates the cost); each section names what it checks.
//! Needs the auth binary: `cargo build -p taskflow-auth` (or `make build`) first.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod common;
use common::stack::{self, Proc};
use common::task_events;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::Method as M;
use serde_json::{json, Value};
use taskflow_localstack::{binary_path, free_port, NotifySocket};

/// The shared infrastructure and the auth daemon every section uses.
struct Infra {
    stack: stack::Infra,
    auth_url: String,
    _auth: Proc,
}

impl std::ops::Deref for Infra {
    type Target = stack::Infra;
    fn deref(&self) -> &stack::Infra {
        &self.stack
    }
}

impl std::ops::DerefMut for Infra {
    fn deref_mut(&mut self) -> &mut stack::Infra {
        &mut self.stack
    }
}

impl Infra {
    async fn start() -> Infra {
        let stack = stack::Infra::start(false).await;
        let (auth, auth_url) = stack.auth("auth", "bcrypt_cost = 4").await;
        Infra {
            stack,
            auth_url,
            _auth: auth,
        }
    }

    fn gateway_config(&self, name: &str, port: u16, extra: &str) -> PathBuf {
        self.stack.gateway_config(name, port, &self.auth_url, extra)
    }

    async fn gateway(&self, name: &str, extra: &str, notify: Option<&Path>) -> (Proc, String) {
        let port = free_port().unwrap();
        let cfg = self.gateway_config(name, port, extra);
        self.stack.spawn_gateway(name, &cfg, port, notify).await
    }
}

struct Http {
    base: String,
    client: reqwest::Client,
    /// Every exchange, checked against openapi.json at the end of the test.
    log: std::sync::Mutex<Vec<Exchange>>,
}

struct Exchange {
    method: M,
    path: String,
    status: u16,
    content_type: String,
    body: Value,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Http {
    fn new(base: &str) -> Self {
        Http {
            base: base.to_owned(),
            client: reqwest::Client::new(),
            log: std::sync::Mutex::new(Vec::new()),
        }
    }

    async fn send(
        &self,
        method: M,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut rb = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(t) = token {
            rb = rb.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        self.log.lock().unwrap().push(Exchange {
            method,
            path: path.to_owned(),
            status,
            content_type: headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            body: body.clone(),
        });
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: M, path: &str, token: Option<&str>, body: Option<Value>) -> Reply {
        self.send(method, path, token, body, &[]).await
    }
}

async fn count_tasks(infra: &Infra) -> i64 {
    let c = infra.shard.client("tasks").await.unwrap();
    c.query_one("SELECT count(*) FROM tasks", &[])
        .await
        .unwrap()
        .get(0)
}

async fn wait_for_event(bootstrap: &str, kind: &str, task_id: i64) -> Value {
    for _ in 0..30 {
        let events = task_events(bootstrap).await;
        if let Some(e) = events
            .into_iter()
            .find(|e| e["type"] == kind && e["task"]["id"] == task_id)
        {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("no {kind} event for task {task_id} reached Kafka");
}

fn sign(infra: &Infra, claims: &Value, alg_none: bool) -> String {
    use base64_like::b64;
    if alg_none {
        let h = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let p = b64(claims.to_string().as_bytes());
        return format!("{h}.{p}.");
    }
    let pem = std::fs::read(infra.dir.path().join("jwt-private.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        claims,
        &key,
    )
    .unwrap()
}

mod base64_like {
    pub fn b64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

#[test]
fn bad_config_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pub.pem"), "not a key").unwrap();
    let auth_bin = binary_path("taskflow-auth").expect("cargo build -p taskflow-auth first");
    assert!(Command::new(auth_bin)
        .arg("--generate-keys")
        .arg(dir.path())
        .status()
        .unwrap()
        .success());
    let key_line = format!(
        "jwt_public_key_file = \"{}\"\n",
        dir.path().join("jwt-public.pem").display()
    );
    for (body, key) in [
        ("listen = \"nowhere\"\n", "listen"),
        (
            "jwt_public_key_file = \"/nonexistent/k.pem\"\n",
            "jwt_public_key_file",
        ),
        (
            &format!(
                "jwt_public_key_file = \"{}\"\n",
                dir.path().join("pub.pem").display()
            ),
            "jwt_public_key_file",
        ),
        ("[rate_limit]\nburst = 0\n", "rate_limit.burst"),
        ("cors_origins = [\"not an origin\"]\n", "cors_origins"),
        ("redis_url = \"nope://x\"\n", "redis_url"),
        ("trusted_proxies = [\"proxy.example\"]\n", "trusted_proxies"),
        ("trust_forwarded_for = true\n", "trust_forwarded_for"),
        ("[server]\nmax_connections = 0\n", "server.max_connections"),
        ("[rate_limit]\nipv6_prefix = 0\n", "rate_limit.ipv6_prefix"),
        ("[local_cache]\nttl_ms = 0\n", "local_cache.ttl_ms"),
    ] {
        let cfg = dir.path().join("g.toml");
        let text = if body.contains("jwt_public_key_file") {
            body.to_owned()
        } else {
            format!("{key_line}{body}")
        };
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_taskflow-gateway"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(78),
            "{body}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{body}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_end_to_end() {
    let mut infra = Infra::start().await;
    let notify = NotifySocket::bind().unwrap();
    let high = "[rate_limit]\nper_second = 100000\nburst = 100000\nlogin_per_minute = 100000\n\
                auth_per_ip_per_minute = 100000\nauth_per_ip_burst = 100000\n";
    let (mut gw, base) = infra.gateway("gw-main", high, Some(notify.path())).await;
    notify
        .wait_for_assignment("READY=1", Duration::from_secs(10))
        .await
        .unwrap();
    let h = Http::new(&base);

    // ── The seed README's requests, verbatim and in order ──────────────────────────────
    let r = h
        .call(
            M::POST,
            "/auth/register",
            None,
            Some(json!({
                "email": "user@example.com", "name": "John Doe", "password": "securepassword"
            })),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"id": 1, "email": "user@example.com", "name": "John Doe"})
    );
    let r = h
        .call(
            M::POST,
            "/auth/login",
            None,
            Some(json!({
                "email": "user@example.com", "password": "securepassword"
            })),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["id"], "1");
    assert_eq!(r.body["email"], "user@example.com");
    assert_eq!(r.body["name"], "John Doe");
    let t1 = r.body["token"].as_str().unwrap().to_owned();
    // The create example names users 2, 3 and 4; they register first.
    let mut tokens = vec![String::new(), t1.clone()];
    for i in 2..=5 {
        let email = format!("u{i}@example.com");
        let r = h.call(M::POST, "/auth/register", None, Some(json!({"email": email, "name": format!("User {i}"), "password": "securepassword"}))).await;
        assert_eq!(r.status, 201);
        assert_eq!(r.body["id"], i);
        let r = h
            .call(
                M::POST,
                "/auth/login",
                None,
                Some(json!({"email": email, "password": "securepassword"})),
            )
            .await;
        tokens.push(r.body["token"].as_str().unwrap().to_owned());
    }
    let r = h
        .call(
            M::POST,
            "/tasks",
            Some(&t1),
            Some(json!({
                "title": "Complete project",
                "description": "Finish the backend implementation",
                "performer_id": 2,
                "creator_id": 1,
                "observer_ids": [3, 4],
                "status": "pending"
            })),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["id"], 1);
    assert_eq!(r.body["performer_id"], 2);
    assert_eq!(r.body["creator_id"], 1);
    assert_eq!(r.body["observer_ids"], json!([3, 4]));
    assert_eq!(r.body["status"], "pending");
    assert_eq!(r.body["version"], 1);
    assert_eq!(r.headers["location"], "/tasks/1");
    assert_eq!(r.headers["etag"], "\"1\"");
    let r = h
        .call(
            M::GET,
            "/tasks?performer_id=2&status=pending",
            Some(&t1),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"][0]["id"], 1);
    assert!(r.body["next_cursor"].is_null());
    let r = h.call(M::GET, "/tasks/1", Some(&t1), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["title"], "Complete project");
    let r = h
        .call(
            M::PUT,
            "/tasks/1",
            Some(&t1),
            Some(json!({
                "title": "Updated title",
                "description": "Updated description",
                "performer_id": 2,
                "creator_id": 1,
                "status": "in_progress"
            })),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["title"], "Updated title");
    assert_eq!(r.body["status"], "in_progress");
    assert_eq!(r.body["observer_ids"], json!([]));
    assert_eq!(r.body["version"], 2);
    let r = h.call(M::DELETE, "/tasks/1", Some(&t1), None).await;
    assert_eq!(r.status, 204);
    let r = h.call(M::GET, "/tasks/1", Some(&t1), None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    for kind in ["task.created", "task.updated", "task.deleted"] {
        let e = wait_for_event(&infra.kafka.bootstrap(), kind, 1).await;
        assert_eq!(e["v"], 1);
        assert_eq!(e["actor_id"], 1);
    }

    // ── Misc routes, CORS, request ids ─────────────────────────────────────────────────
    let r = h.call(M::GET, "/", None, None).await;
    assert_eq!(r.body, json!({"message": "API is working"}));
    assert!(r.headers.contains_key("x-request-id"));
    let r = h
        .send(
            M::GET,
            "/",
            None,
            None,
            &[
                ("x-request-id", "abc-123"),
                ("origin", "http://localhost:5173"),
            ],
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "http://localhost:5173"
    );
    let r = h
        .send(
            M::GET,
            "/",
            None,
            None,
            &[("origin", "http://evil.example")],
        )
        .await;
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    let r = h
        .send(
            M::OPTIONS,
            "/tasks",
            None,
            None,
            &[
                ("origin", "http://localhost:5173"),
                ("access-control-request-method", "POST"),
            ],
        )
        .await;
    assert_eq!(r.status, 204);
    assert!(r.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Authorization"));
    assert_eq!(h.call(M::GET, "/nope", None, None).await.status, 404);
    assert_eq!(
        h.call(M::DELETE, "/tasks", Some(&t1), None).await.status,
        405
    );
    let r = h.call(M::GET, "/openapi.json", None, None).await;
    assert_eq!(r.body["openapi"], "3.1.0");
    let r = h.call(M::GET, "/swagger/index.html", None, None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.as_str().unwrap().contains("swagger-ui-bundle.js"));
    assert_eq!(
        h.call(M::GET, "/swagger/swagger-ui-bundle.js", None, None)
            .await
            .status,
        200
    );
    // Metrics and detailed readiness are on the ops listener only.
    for p in ["/metrics", "/readyz"] {
        assert_eq!(h.call(M::GET, p, None, None).await.status, 404, "{p}");
    }
    let ops = infra.ops_base("gw-main");
    let text = reqwest::get(format!("{ops}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("taskflow_gateway_http_requests"));
    let r = reqwest::get(format!("{ops}/readyz")).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = h.call(M::GET, "/auth/me", Some(&t1), None).await;
    assert_eq!((r.status, r.body["id"].clone()), (200, json!(1)));

    // ── Token failures ─────────────────────────────────────────────────────────────────
    let before = count_tasks(&infra).await;
    assert_eq!(h.call(M::GET, "/tasks", None, None).await.status, 401);
    let r = h
        .send(
            M::GET,
            "/tasks",
            None,
            None,
            &[("authorization", "Token abc")],
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        h.call(M::GET, "/tasks", Some("not.a.jwt"), None)
            .await
            .status,
        401
    );
    let expired = sign(
        &infra,
        &json!({"sub": "1", "email": "user@example.com", "name": "J", "iat": now() - 7200, "exp": now() - 3600}),
        false,
    );
    assert_eq!(
        h.call(M::GET, "/tasks", Some(&expired), None).await.status,
        401
    );
    let none = sign(
        &infra,
        &json!({"sub": "1", "email": "user@example.com", "name": "J", "iat": now(), "exp": now() + 3600}),
        true,
    );
    assert_eq!(
        h.call(M::GET, "/tasks", Some(&none), None).await.status,
        401
    );
    let other_dir = tempfile::tempdir().unwrap();
    assert!(Command::new(binary_path("taskflow-auth").unwrap())
        .arg("--generate-keys")
        .arg(other_dir.path())
        .status()
        .unwrap()
        .success());
    let other_key = jsonwebtoken::EncodingKey::from_ed_pem(
        &std::fs::read(other_dir.path().join("jwt-private.pem")).unwrap(),
    )
    .unwrap();
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &json!({"sub": "1", "email": "x", "name": "x", "iat": now(), "exp": now() + 3600}),
        &other_key,
    )
    .unwrap();
    let r = h
        .call(
            M::POST,
            "/tasks",
            Some(&forged),
            Some(json!({"title": "x", "performer_id": 1})),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let good = sign(
        &infra,
        &json!({"sub": "1", "email": "user@example.com", "name": "J", "iat": now(), "exp": now() + 3600}),
        false,
    );
    assert_eq!(
        h.call(M::GET, "/tasks", Some(&good), None).await.status,
        200
    );
    assert_eq!(count_tasks(&infra).await, before);

    // ── Validation: every bad field is a problem+json and nothing is stored ────────────
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"title": "", "performer_id": 2}), 422, "title"),
        (json!({"title": "   ", "performer_id": 2}), 422, "title"),
        (
            json!({"title": "x".repeat(256), "performer_id": 2}),
            422,
            "title",
        ),
        (
            json!({"title": "ok", "description": "d".repeat(10_001), "performer_id": 2}),
            422,
            "description",
        ),
        (
            json!({"title": "ok", "performer_id": 2, "status": "done"}),
            422,
            "status",
        ),
        (json!({"title": "ok"}), 422, "performer_id"),
        (
            json!({"title": "ok", "performer_id": 0}),
            422,
            "performer_id",
        ),
        (
            json!({"title": "ok", "performer_id": 999}),
            422,
            "performer_id",
        ),
        (
            json!({"title": "ok", "performer_id": 2, "observer_ids": [3, 998]}),
            422,
            "observer_ids",
        ),
        (
            json!({"title": "ok", "performer_id": "2"}),
            400,
            "performer_id",
        ),
        (json!({"title": 5, "performer_id": 2}), 400, "title"),
        (
            json!({"title": "ok", "performer_id": 2, "observer_ids": "3"}),
            400,
            "observer_ids",
        ),
        (
            json!({"title": "ok", "performer_id": 2, "creator_id": 2}),
            403,
            "creator_id",
        ),
    ];
    for (body, status, field) in cases {
        let r = h
            .call(M::POST, "/tasks", Some(&t1), Some(body.clone()))
            .await;
        assert_eq!(r.status, status, "{body} → {}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert_eq!(r.body["status"], status);
        let fields: Vec<String> = r.body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap().to_owned())
            .collect();
        assert!(fields.iter().any(|f| f == field), "{body}: {fields:?}");
    }
    let raw = reqwest::Client::new();
    let r = raw
        .post(format!("{base}/tasks"))
        .bearer_auth(&t1)
        .body("{\"title\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = raw
        .post(format!("{base}/tasks"))
        .bearer_auth(&t1)
        .body(vec![b'x'; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        h.call(M::GET, "/tasks?limit=0", Some(&t1), None)
            .await
            .status,
        400
    );
    assert_eq!(
        h.call(M::GET, "/tasks?limit=501", Some(&t1), None)
            .await
            .status,
        400
    );
    assert_eq!(
        h.call(M::GET, "/tasks?status=nope", Some(&t1), None)
            .await
            .status,
        400
    );
    assert_eq!(count_tasks(&infra).await, before);

    // ── Authorization matrix: creator 1, performer 2, observer 3, stranger 5 ─────────
    let r = h
        .call(
            M::POST,
            "/tasks",
            Some(&t1),
            Some(json!({"title": "matrix", "performer_id": 2, "observer_ids": [3]})),
        )
        .await;
    assert_eq!(r.status, 201);
    let tid = r.body["id"].as_i64().unwrap();
    let path = format!("/tasks/{tid}");
    for u in [1, 2, 3, 5] {
        assert_eq!(
            h.call(M::GET, &path, Some(&tokens[u]), None).await.status,
            200,
            "read by {u}"
        );
    }
    for (u, want) in [(1, 200), (2, 200), (3, 403), (5, 403)] {
        let r = h
            .call(
                M::PATCH,
                &path,
                Some(&tokens[u]),
                Some(json!({"description": format!("by {u}")})),
            )
            .await;
        assert_eq!(r.status, want, "update by {u}: {}", r.body);
    }
    for u in [2, 3, 5] {
        assert_eq!(
            h.call(M::DELETE, &path, Some(&tokens[u]), None)
                .await
                .status,
            403,
            "delete by {u}"
        );
    }
    // ETag / If-Match.
    let r = h.call(M::GET, &path, Some(&t1), None).await;
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, "\"3\"");
    let r = h
        .send(M::GET, &path, Some(&t1), None, &[("if-none-match", &etag)])
        .await;
    assert_eq!(r.status, 304);
    let r = h
        .send(
            M::PATCH,
            &path,
            Some(&t1),
            Some(json!({"status": "completed"})),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(r.status, 412);
    let r = h
        .send(
            M::PATCH,
            &path,
            Some(&t1),
            Some(json!({"status": "completed"})),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["etag"], "\"4\"");
    let r = h
        .call(
            M::PUT,
            &path,
            Some(&t1),
            Some(json!({"title": "t", "performer_id": 2, "status": "pending", "creator_id": 3})),
        )
        .await;
    assert_eq!(r.status, 422);
    // Performer change (one shard here; through the proxy this is the two-phase move).
    let r = h
        .call(
            M::PATCH,
            &path,
            Some(&tokens[2]),
            Some(json!({"performer_id": 4})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["performer_id"], 4);
    assert_eq!(r.body["observer_ids"], json!([3]));
    let r = h
        .call(M::GET, "/tasks?performer_id=4", Some(&t1), None)
        .await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        h.call(
            M::PATCH,
            &path,
            Some(&tokens[2]),
            Some(json!({"title": "no longer mine"}))
        )
        .await
        .status,
        403
    );
    let r = h
        .send(M::DELETE, &path, Some(&t1), None, &[("if-match", "\"1\"")])
        .await;
    assert_eq!(r.status, 412);
    assert_eq!(h.call(M::DELETE, &path, Some(&t1), None).await.status, 204);
    assert_eq!(h.call(M::DELETE, &path, Some(&t1), None).await.status, 404);

    // ── Idempotency-Key ────────────────────────────────────────────────────────────────
    let body = json!({"title": "once", "performer_id": 3});
    let a = h
        .send(
            M::POST,
            "/tasks",
            Some(&t1),
            Some(body.clone()),
            &[("idempotency-key", "k-1")],
        )
        .await;
    let before = count_tasks(&infra).await;
    let b = h
        .send(
            M::POST,
            "/tasks",
            Some(&t1),
            Some(body),
            &[("idempotency-key", "k-1")],
        )
        .await;
    assert_eq!((a.status, b.status), (201, 201));
    assert_eq!(a.body, b.body);
    assert_eq!(b.headers["idempotent-replayed"], "true");
    assert_eq!(b.headers["location"], a.headers["location"]);
    assert_eq!(count_tasks(&infra).await, before);
    let c = h
        .send(
            M::POST,
            "/tasks",
            Some(&t1),
            Some(json!({"title": "other"})),
            &[("idempotency-key", "k-1")],
        )
        .await;
    assert_eq!(c.status, 422);

    // ── Pagination: every task exactly once, in id order ───────────────────────────────
    let mut created = Vec::new();
    for i in 0..12 {
        let r = h
            .call(
                M::POST,
                "/tasks",
                Some(&t1),
                Some(json!({"title": format!("p{i}"), "performer_id": 1 + (i % 5)})),
            )
            .await;
        assert_eq!(r.status, 201);
        created.push(r.body["id"].as_i64().unwrap());
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("/tasks?creator_id=1&limit=5&cursor={c}"),
            None => "/tasks?creator_id=1&limit=5".to_owned(),
        };
        let r = h.call(M::GET, &q, Some(&t1), None).await;
        assert_eq!(r.status, 200);
        seen.extend(
            r.body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_i64().unwrap()),
        );
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(seen, sorted, "pages overlap or are out of order");
    assert!(created.iter().all(|id| seen.contains(id)));
    let r = h
        .call(M::GET, "/tasks?observer_id=3", Some(&t1), None)
        .await;
    assert_eq!(r.status, 200);

    // ── Redis loses its data: ids keep growing, reads fall back to the shards ──────────
    let max_before = *created.iter().max().unwrap();
    infra.redis.flushall().await.unwrap();
    let r = h
        .call(M::GET, &format!("/tasks/{max_before}"), Some(&t1), None)
        .await;
    assert_eq!(r.status, 200);
    let r = h
        .call(
            M::POST,
            "/tasks",
            Some(&t1),
            Some(json!({"title": "after flush", "performer_id": 2})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.body["id"].as_i64().unwrap() > max_before);

    // ── Redis stopped: reads and updates degrade gracefully; creates need ids (503) ───
    let keep = r.body["id"].as_i64().unwrap();
    infra.redis.stop().await.unwrap();
    let r = h
        .call(M::GET, &format!("/tasks/{keep}"), Some(&t1), None)
        .await;
    assert_eq!(r.status, 200, "read without Redis: {}", r.body);
    let r = h
        .call(M::GET, "/tasks?creator_id=1&limit=5", Some(&t1), None)
        .await;
    assert_eq!(r.status, 200, "list without Redis: {}", r.body);
    let r = h
        .call(
            M::PATCH,
            &format!("/tasks/{keep}"),
            Some(&t1),
            Some(json!({"status": "in_progress"})),
        )
        .await;
    assert_eq!(r.status, 200, "update without Redis: {}", r.body);
    let r = h
        .call(
            M::POST,
            "/tasks",
            Some(&t1),
            Some(json!({"title": "no ids", "performer_id": 2})),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    infra.redis.start().await.unwrap();
    let mut created_again = None;
    for _ in 0..50 {
        let r = h
            .call(
                M::POST,
                "/tasks",
                Some(&t1),
                Some(json!({"title": "redis is back", "performer_id": 2})),
            )
            .await;
        if r.status == 201 {
            created_again = r.body["id"].as_i64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        created_again.unwrap() > keep,
        "ids after a Redis restart must keep growing"
    );

    // ── Broker down during a write; gateway killed right after the commit ─────────────
    infra.kafka.stop().await.unwrap();
    let r = h
        .call(
            M::POST,
            "/tasks",
            Some(&t1),
            Some(json!({"title": "while kafka is down", "performer_id": 3})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let down_id = r.body["id"].as_i64().unwrap();
    let unsent: i64 = infra
        .shard
        .client("tasks")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM outbox WHERE sent_at IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(unsent >= 1);
    // Kill the gateway hard: the event must still be delivered (by the next instance).
    gw.kill9();
    infra.kafka.start().await.unwrap();
    let (gw2, base2) = infra.gateway("gw-main-2", high, None).await;
    let e = wait_for_event(&infra.kafka.bootstrap(), "task.created", down_id).await;
    assert_eq!(e["task"]["title"], "while kafka is down");
    let h2 = Http::new(&base2);
    assert_eq!(
        h2.call(M::GET, &format!("/tasks/{down_id}"), Some(&t1), None)
            .await
            .status,
        200
    );
    let c = infra.shard.client("tasks").await.unwrap();
    for _ in 0..50 {
        let n: i64 = c
            .query_one("SELECT count(*) FROM outbox WHERE sent_at IS NULL", &[])
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM outbox WHERE sent_at IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "outbox rows left unsent");

    // ── Rate limits shared by two instances (their own Redis database) ────────────────
    let low = "[rate_limit]\nper_second = 1\nburst = 3\nlogin_per_minute = 2\n";
    let (ga, base_a) = start_with_redis_db(&infra, "gw-a", low).await;
    let (gb, base_b) = start_with_redis_db(&infra, "gw-b", low).await;
    let (ha, hb) = (Http::new(&base_a), Http::new(&base_b));
    // Per-email login limit: 2 per minute, whatever the password.
    for _ in 0..2 {
        let r = ha
            .call(
                M::POST,
                "/auth/login",
                None,
                Some(json!({"email": "u5@example.com", "password": "wrong-password"})),
            )
            .await;
        assert_eq!(r.status, 401);
    }
    let r = hb
        .call(
            M::POST,
            "/auth/login",
            None,
            Some(json!({"email": "u5@example.com", "password": "securepassword"})),
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.body);
    // The IP bucket had 3: two logins spent two, the refused one spent nothing.
    let r = ha.call(M::GET, "/", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["ratelimit-limit"], "3");
    assert_eq!(r.headers["ratelimit-remaining"], "0");
    // Per-request buckets are decided in process and reconciled through Redis every
    // rate_limit.sync_ms (50 ms): instance B sees A's last request after that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = hb.call(M::GET, "/", None, None).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(ha.call(M::GET, "/", None, None).await.status, 200);

    // ── Graceful stop: STOPPING=1 and exit 0 ───────────────────────────────────────────
    let mut g = gw2;
    nix::sys::signal::kill(g.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut child = g.take().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    drop((ga, gb));
    for http in [&h, &h2, &ha, &hb] {
        check_against_openapi(&http.log.lock().unwrap());
    }
    let _ = &infra.auth_db;
}

/// A gateway whose Redis URL points at database 1 (so its rate-limit buckets are its own
/// and shared only with other instances configured the same way).
async fn start_with_redis_db(infra: &Infra, name: &str, extra: &str) -> (Proc, String) {
    let port = free_port().unwrap();
    let path = infra.gateway_config(name, port, "");
    let text = std::fs::read_to_string(&path).unwrap();
    let redis_line = format!("redis_url = \"{}\"", infra.redis.url());
    let text = text.replace(
        &redis_line,
        &format!("redis_url = \"{}/1\"", infra.redis.url()),
    );
    let rl = extra
        .split_once("[rate_limit]")
        .map(|(_, r)| r)
        .unwrap_or("");
    std::fs::write(&path, format!("{text}\n[rate_limit]\n{rl}")).unwrap();
    infra.spawn_gateway(name, &path, port, None).await
}

/// The OpenAPI path template a concrete path belongs to.
fn template(path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').collect();
    segs.iter()
        .enumerate()
        .map(|(i, s)| {
            if i > 0 && !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
                "{id}"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let ptr = r.trim_start_matches('#');
            resolve(
                doc,
                doc.pointer(ptr)
                    .unwrap_or_else(|| panic!("dangling $ref {r}")),
            )
        }
        None => v,
    }
}

/// A small JSON-Schema subset: type, required, properties, items, enum, const.
fn conforms(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => true,
        });
        if !ok {
            return Err(format!("{at}: {v} is not {types:?}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let Some(c) = schema.get("const") {
        if c != v {
            return Err(format!("{at}: {v} != {c}"));
        }
    }
    if let (Some(req), Some(obj)) = (
        schema.get("required").and_then(Value::as_array),
        v.as_object(),
    ) {
        for k in req.iter().filter_map(Value::as_str) {
            if !obj.contains_key(k) {
                return Err(format!("{at}: missing required `{k}`"));
            }
        }
    }
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        v.as_object(),
    ) {
        for (k, sub) in props {
            if let Some(val) = obj.get(k) {
                conforms(doc, sub, val, &format!("{at}.{k}"))?;
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, it) in arr.iter().enumerate() {
            conforms(doc, items, it, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Every status the gateway answered is documented for that route, errors are
/// problem+json, and JSON bodies conform to the documented schema.
fn check_against_openapi(log: &[Exchange]) {
    let doc: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    for x in log {
        let t = template(&x.path);
        if x.method == M::OPTIONS || (t.starts_with("/swagger/") && t != "/swagger/index.html") {
            continue;
        }
        if x.status == 404 && doc["paths"].get(&t).is_none() {
            continue; // an unknown route, on purpose
        }
        let op = &doc["paths"][&t][x.method.as_str().to_lowercase()];
        if x.status == 405 {
            continue;
        }
        assert!(op.is_object(), "{} {t} is not in openapi.json", x.method);
        let resp = op["responses"]
            .get(x.status.to_string())
            .map(|r| resolve(&doc, r))
            .unwrap_or_else(|| {
                panic!(
                    "{} {t} answered {} which openapi.json does not list",
                    x.method, x.status
                )
            });
        if x.status >= 400 {
            assert_eq!(
                x.content_type, "application/problem+json",
                "{} {t} {}",
                x.method, x.status
            );
        }
        if let Some(schema) = resp.pointer("/content/application~1json/schema") {
            if x.content_type.starts_with("application/json") {
                conforms(
                    &doc,
                    schema,
                    &x.body,
                    &format!("{} {t} {}", x.method, x.status),
                )
                .unwrap_or_else(|e| panic!("response does not match openapi.json: {e}"));
            }
        }
        if let Some(schema) = resp.pointer("/content/application~1problem+json/schema") {
            conforms(
                &doc,
                schema,
                &x.body,
                &format!("{} {t} {}", x.method, x.status),
            )
            .unwrap_or_else(|e| panic!("problem does not match openapi.json: {e}"));
        }
    }
}
