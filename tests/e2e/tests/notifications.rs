//! WebSocket notifications end to end (SPEC §3, issue 10): the real gateway(s), auth and
//! notify daemons against real PostgreSQL, Redis, the tansu broker and MailDev.
//!
//! - a task created, updated and deleted reaches every recipient once by email (with a
//!   readable body) and on every open WebSocket of theirs within 1 s, on whichever of two
//!   gateways they are connected to; a stranger gets nothing;
//! - each kind of bad WebSocket input is answered or closed, and everyone else is served;
//! - a connection that never authenticates is closed (1008) after 10 s; one whose token
//!   expires is closed; shutdown closes with 1001; a restarted gateway does not replay.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use taskflow_contracts::{NotifyEvent, Task, TaskEvent, TaskEventType, TaskStatus};
use taskflow_e2e::ws::{Received, WsClient};
use taskflow_e2e::{Daemon, Scratch};
use taskflow_localstack::{free_port, KafkaBroker, PgCluster, RedisServer, SmtpSink};

struct Stack {
    auth_db: PgCluster,
    shard: PgCluster,
    redis: RedisServer,
    kafka: KafkaBroker,
    smtp: SmtpSink,
    scratch: Scratch,
    _auth: Daemon,
    auth_url: String,
}

impl Stack {
    async fn start() -> Stack {
        let (auth_db, shard, redis, kafka, smtp) = tokio::join!(
            taskflow_e2e::migrated_db("auth"),
            taskflow_e2e::migrated_db("tasks"),
            RedisServer::temp(),
            KafkaBroker::temp(),
            SmtpSink::temp()
        );
        let (redis, mut kafka, smtp) = (
            redis.expect("redis"),
            kafka.expect("broker"),
            smtp.expect("smtp"),
        );
        kafka.create_topic("task_events", 3).await.expect("topic");
        kafka.create_topic("notify_events", 3).await.expect("topic");
        let scratch = Scratch::new();
        let dir = scratch.dir.path().display().to_string();
        let (code, out) = taskflow_e2e::run_to_exit("taskflow-auth", &["--generate-keys", &dir]);
        assert_eq!(code, Some(0), "{out}");
        let port = free_port().expect("port");
        let cfg = scratch.write(
            "auth.toml",
            &format!(
                "listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{}\"\ndatabase_url = \"{}\"\njwt_private_key_file = \"{}\"\nbcrypt_cost = 4\n",
                free_port().expect("port"),
                auth_db.url("auth"),
                scratch.path("jwt-private.pem").display()
            ),
        );
        let mut auth = Daemon::start("taskflow-auth", &cfg, &[]);
        auth.expect_notify("READY=1", Duration::from_secs(60)).await;
        Stack {
            auth_db,
            shard,
            redis,
            kafka,
            smtp,
            scratch,
            _auth: auth,
            auth_url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A gateway named `name` with `extra` TOML lines appended; waits for READY.
    /// Returns the daemon, its API base URL and its ops base URL (`/metrics`).
    async fn gateway(&self, name: &str, port: u16, extra: &str) -> (Daemon, String, String) {
        let ops = free_port().expect("port");
        let cfg = self.scratch.write(
            &format!("{name}.toml"),
            &format!(
                "listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{ops}\"\nauth_url = \"{}\"\njwt_public_key_file = \"{}\"\n\
                 database_url = \"{}\"\nredis_url = \"{}\"\nkafka_brokers = \"{}\"\noutbox_poll_ms = 100\n\
                 [rate_limit]\nenabled = false\n{extra}\n",
                self.auth_url,
                self.scratch.path("jwt-public.pem").display(),
                self.shard.url("tasks"),
                self.redis.url(),
                self.kafka.bootstrap(),
            ),
        );
        let mut d = Daemon::start("taskflow-gateway", &cfg, &[]);
        d.expect_notify("READY=1", Duration::from_secs(90)).await;
        (
            d,
            format!("http://127.0.0.1:{port}"),
            format!("http://127.0.0.1:{ops}"),
        )
    }

    async fn notify(&self) -> Daemon {
        let cfg = self.scratch.notify_config(
            self.auth_db.port(),
            &self.kafka.bootstrap(),
            &self.redis.url(),
            self.smtp.smtp_port(),
        );
        let mut d = Daemon::start("taskflow-notify", &cfg, &[]);
        d.expect_notify("READY=1", Duration::from_secs(60)).await;
        d
    }

    /// A signed token for `user` expiring `ttl` seconds from now (may be negative).
    fn token(&self, user: i64, ttl: i64) -> String {
        let pem = std::fs::read(self.scratch.path("jwt-private.pem")).expect("key");
        let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).expect("ed25519 key");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = json!({"sub": user.to_string(), "email": "x@example.com", "name": "X",
                            "iat": now, "exp": now + ttl});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            &claims,
            &key,
        )
        .expect("sign")
    }

    async fn publish(&self, n: &NotifyEvent) {
        let producer: FutureProducer = self.kafka.client_config().create().expect("producer");
        producer
            .send(
                FutureRecord::to("notify_events")
                    .key(&n.key())
                    .payload(&serde_json::to_vec(n).expect("json")),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }
}

/// Registers and logs in; returns (id, token).
async fn user(base: &str, email: &str, name: &str) -> (i64, String) {
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{base}/auth/register"))
        .json(&json!({"email": email, "name": name, "password": "securepassword"}))
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let login: Value = c
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": email, "password": "securepassword"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("login json");
    let id = login["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    (id, login["token"].as_str().expect("token").to_owned())
}

fn notification(user_id: i64, title: &str) -> NotifyEvent {
    let now = time::OffsetDateTime::now_utc();
    let task = Task {
        id: 77,
        title: title.into(),
        description: "d".into(),
        performer_id: user_id,
        creator_id: user_id,
        observer_ids: vec![],
        status: TaskStatus::Pending,
        created_at: now,
        updated_at: now,
        version: 1,
    };
    let ev = TaskEvent::new(TaskEventType::Created, user_id, task, None);
    NotifyEvent::for_recipient(&ev, user_id, "x@example.com")
}

async fn send(
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until each of `clients` got one notification for `event` and returns them by
/// client index; fails if any takes longer than `within` after `since`.
async fn expect_pushes(
    clients: &mut [(&str, WsClient)],
    event: &str,
    task_id: i64,
    since: Instant,
    within: Duration,
) -> BTreeMap<String, Value> {
    let mut got = BTreeMap::new();
    for (name, c) in clients.iter_mut() {
        let left = within.saturating_sub(since.elapsed());
        let v = match c.next(left).await {
            Received::Json(v) if v["type"] == "notification" => v,
            other => panic!("{name}: no {event} push within {within:?} of the write: {other:?}"),
        };
        assert_eq!(v["event"], event, "{name}: {v}");
        assert_eq!(v["task_id"], task_id, "{name}: {v}");
        assert_eq!(v["task"]["id"], task_id, "{name}: {v}");
        got.insert((*name).to_owned(), v);
    }
    got
}

#[tokio::test]
async fn task_changes_reach_every_recipient_by_mail_and_websocket_on_two_gateways() {
    let s = Stack::start().await;
    let (_g1, g1, _) = s.gateway("gw1", free_port().expect("port"), "").await;
    let (_g2, g2, _) = s.gateway("gw2", free_port().expect("port"), "").await;
    let _notify = s.notify().await;
    let (creator, creator_t) = user(&g1, "creator@example.com", "Cara Creator").await;
    let (performer, performer_t) = user(&g1, "performer@example.com", "Pat Performer").await;
    let (obs1, obs1_t) = user(&g1, "obs1@example.com", "Olga Observer").await;
    let (obs2, obs2_t) = user(&g1, "obs2@example.com", "Otto Observer").await;
    let (stranger, stranger_t) = user(&g1, "stranger@example.com", "Sam Stranger").await;

    // Recipients spread over both gateways; the performer has one connection on each.
    let mut clients = Vec::new();
    for (name, base, id, token) in [
        ("creator@g1", &g1, creator, &creator_t),
        ("performer@g1", &g1, performer, &performer_t),
        ("performer@g2", &g2, performer, &performer_t),
        ("obs1@g2", &g2, obs1, &obs1_t),
        ("obs2@g1", &g1, obs2, &obs2_t),
    ] {
        let mut c = WsClient::connect(base).await.expect("connect");
        c.authenticate(&format!("Bearer {token}"), id).await;
        clients.push((name, c));
    }
    let mut strangers = WsClient::connect(&g2).await.expect("connect");
    strangers.authenticate(stranger_t.as_str(), stranger).await;

    // Create.
    let t0 = Instant::now();
    let (st, task) = send(
        reqwest::Method::POST,
        format!("{g1}/tasks"),
        &creator_t,
        Some(
            json!({"title": "Complete project", "description": "Finish the backend",
                    "performer_id": performer, "observer_ids": [obs1, obs2]}),
        ),
    )
    .await;
    assert_eq!(st, 201, "{task}");
    let id = task["id"].as_i64().expect("id");
    let got = expect_pushes(&mut clients, "task.created", id, t0, Duration::from_secs(1)).await;
    let v = &got["obs1@g2"];
    assert_eq!(v["title"], "Complete project");
    assert_eq!(v["user_id"], obs1);
    assert_eq!(
        got["performer@g1"]["event_id"],
        got["performer@g2"]["event_id"]
    );

    // Update by the performer: pending → in_progress.
    let t0 = Instant::now();
    let (st, _) = send(
        reqwest::Method::PATCH,
        format!("{g2}/tasks/{id}"),
        &performer_t,
        Some(json!({"status": "in_progress"})),
    )
    .await;
    assert_eq!(st, 200);
    let got = expect_pushes(&mut clients, "task.updated", id, t0, Duration::from_secs(1)).await;
    assert_eq!(got["creator@g1"]["task"]["status"], "in_progress");

    // Delete by the creator.
    let t0 = Instant::now();
    let (st, _) = send(
        reqwest::Method::DELETE,
        format!("{g1}/tasks/{id}"),
        &creator_t,
        None,
    )
    .await;
    assert_eq!(st, 204);
    expect_pushes(&mut clients, "task.deleted", id, t0, Duration::from_secs(1)).await;
    assert_eq!(
        strangers.next(Duration::from_millis(500)).await,
        Received::Nothing,
        "a stranger's WebSocket got a notification"
    );

    // Mail: exactly one per recipient per event, readable.
    s.smtp
        .wait_for_messages(12, Duration::from_secs(30))
        .await
        .expect("12 mails");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mails = s.smtp.messages().await.expect("mails");
    assert_eq!(mails.len(), 12, "one mail per recipient per event, no more");
    for (verb, body_has) in [
        ("created", "was created by Cara Creator"),
        ("updated", "status: pending → in_progress"),
        ("deleted", "was deleted by Cara Creator"),
    ] {
        let subject = format!("[TaskFlow] Task #{id} {verb}: Complete project");
        let mut to: Vec<String> = mails
            .iter()
            .filter(|m| m.subject == subject)
            .flat_map(|m| m.to.clone())
            .collect();
        to.sort();
        assert_eq!(
            to,
            [
                "creator@example.com",
                "obs1@example.com",
                "obs2@example.com",
                "performer@example.com"
            ],
            "{subject}"
        );
        let m = mails.iter().find(|m| m.subject == subject).expect("mail");
        assert!(m.text.contains(body_has), "{subject}: {}", m.text);
        assert!(m.text.contains("Complete project"), "{}", m.text);
    }
    let update = mails
        .iter()
        .find(|m| m.subject.contains("updated"))
        .expect("update mail");
    assert!(
        update
            .text
            .contains(&format!("updated by Pat Performer (user {performer})")),
        "who did it: {}",
        update.text
    );
}

/// Every kind of bad input gets its answer, and a well-behaved client on the same gateway
/// is served throughout. Notifications are produced straight to `notify_events` here (no
/// notify daemon needed).
#[tokio::test]
async fn bad_websocket_input_is_answered_and_others_are_served() {
    let s = Stack::start().await;
    let port = free_port().expect("port");
    let limits =
        "[websocket]\nmax_connections_per_ip = 12\nmax_message_bytes = 1024\nsend_queue = 8\n";
    let (mut gw, base, ops) = s.gateway("gw", port, limits).await;
    // Opened first, never authenticates: checked last (SPEC §3: closed with 1008 at 10 s).
    let idle_since = Instant::now();
    let mut idle = WsClient::connect(&base).await.expect("connect");
    let idle_closed = tokio::spawn(async move {
        let got = idle.next(Duration::from_secs(15)).await;
        (got, idle_since.elapsed())
    });
    let mut good = WsClient::connect(&base).await.expect("connect");
    good.authenticate(&s.token(1, 3600), 1).await;

    // Per-IP cap (12): idle and good are open; the 11th extra connection is refused.
    let mut extra = Vec::new();
    let refused = loop {
        match WsClient::connect(&base).await {
            Ok(w) => extra.push(w),
            Err(e) => break e,
        }
        assert!(extra.len() <= 12, "per-IP cap not enforced");
    };
    assert_eq!(refused.0, Some(429), "{refused:?}");
    assert_eq!(extra.len(), 10);
    drop(extra);
    // Their slots come back once the gateway has seen the sockets close.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Non-JSON and unknown types: an error frame, the connection stays usable.
    let mut c = WsClient::connect(&base).await.expect("connect");
    for bad in ["{not json", "[1,2]", r#"{"type":"subscribe"}"#] {
        c.send_text(bad).await;
        match c.next(Duration::from_secs(2)).await {
            Received::Json(v) => {
                assert_eq!(v["type"], "error", "{bad}: {v}");
                assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            }
            other => panic!("{bad}: expected an error frame, got {other:?}"),
        }
    }
    c.authenticate(&s.token(2, 3600), 2).await;
    // Authenticating twice: an error frame, still authenticated.
    c.send_text(&json!({"type": "authenticate", "token": s.token(3, 3600)}).to_string())
        .await;
    match c.next(Duration::from_secs(2)).await {
        Received::Json(v) => assert_eq!(
            v,
            json!({"type": "error", "error": "already authenticated"})
        ),
        other => panic!("second authenticate: {other:?}"),
    }

    // Binary, oversized: closed with 1003 / 1009.
    let mut b = WsClient::connect(&base).await.expect("connect");
    b.send_binary(b"\x00\x01").await;
    assert!(matches!(
        b.next(Duration::from_secs(2)).await,
        Received::Close(1003, _)
    ));
    let mut big = WsClient::connect(&base).await.expect("connect");
    big.send_text(&"x".repeat(4096)).await;
    assert!(matches!(
        big.next(Duration::from_secs(2)).await,
        Received::Close(1009, _)
    ));

    // Bad and expired tokens: an error frame, then close 1008.
    for (what, token) in [
        ("garbage", "not.a.jwt".to_owned()),
        ("expired", s.token(4, -600)),
        ("missing", String::new()),
    ] {
        let mut t = WsClient::connect(&base).await.expect("connect");
        t.send_text(&json!({"type": "authenticate", "token": token}).to_string())
            .await;
        match t.next(Duration::from_secs(2)).await {
            Received::Json(v) => assert_eq!(v["type"], "error", "{what}: {v}"),
            other => panic!("{what}: expected an error frame, got {other:?}"),
        }
        assert!(
            matches!(
                t.next(Duration::from_secs(2)).await,
                Received::Close(1008, _)
            ),
            "{what}"
        );
    }

    // A token that expires while connected: closed 1008 at expiry.
    let mut short = WsClient::connect(&base).await.expect("connect");
    short.authenticate(&s.token(5, 2), 5).await;
    match short.next(Duration::from_secs(6)).await {
        Received::Close(1008, reason) => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("token expiry: {other:?}"),
    }

    // A reader that stops reading is cut loose; the good client still gets its push.
    let mut slow = WsClient::connect(&base).await.expect("connect");
    slow.authenticate(&s.token(6, 3600), 6).await;
    for i in 0..400 {
        let mut n = notification(6, &format!("flood {i}"));
        n.description = "y".repeat(16 * 1024);
        s.publish(&n).await;
    }
    s.publish(&notification(1, "for the good client")).await;
    let v = good.notification(Duration::from_secs(10)).await;
    assert_eq!(v["title"], "for the good client");
    let metrics = reqwest::get(format!("{ops}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("taskflow_gateway_ws_slow_disconnects_total 1"),
        "the slow reader was not disconnected:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("ws_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(slow);

    // The connection that never authenticated: closed with 1008 at 10 s.
    let (got, waited) = idle_closed.await.expect("idle watcher");
    match got {
        Received::Close(1008, reason) => assert!(reason.contains("authentication"), "{reason}"),
        other => panic!("unauthenticated connection: {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(9_500) && waited < Duration::from_secs(12),
        "closed after {waited:?}"
    );

    // Shutdown: close 1001.
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    // Reading up to STOPPING=1 also drains the watchdog datagrams queued on the test's
    // notify socket (a full socket would block the daemon's final flush).
    let _ = gw
        .notify
        .wait_for_assignment("STOPPING=1", Duration::from_secs(5))
        .await;
    match good.next(Duration::from_secs(10)).await {
        Received::Close(1001, _) => {}
        other => panic!("shutdown: {other:?}"),
    }
    assert!(gw.wait_exit(Duration::from_secs(20)).await.success());

    // A restarted gateway does not replay what was published while it was away.
    s.publish(&notification(1, "while the gateway was down"))
        .await;
    let (_gw, base, _) = s.gateway("gw", port, limits).await;
    let mut again = WsClient::connect(&base).await.expect("connect");
    again.authenticate(&s.token(1, 3600), 1).await;
    // The feed assigns itself at the end right after start; give it a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.publish(&notification(1, "after the restart")).await;
    let v = again.notification(Duration::from_secs(10)).await;
    assert_eq!(
        v["title"], "after the restart",
        "an old notification was replayed"
    );
}
