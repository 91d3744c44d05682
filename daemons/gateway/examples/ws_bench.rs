//! WebSocket load client for `bench/ws.sh` (issue 10): opens `CONNS` authenticated
//! connections to one gateway, reports the gateway's memory per idle connection, then
//! writes tasks at `RATE`/s for `SECS` seconds and reports event → WebSocket latency.
//!
//! Env (from the bench stack's env file): BASE, GATEWAY_PID, JWT_PRIVATE_KEY, TOKEN;
//! plus CONNS (10000), RATE (200), SECS (30).
//!
//! Idle connections belong to users 1000… (tokens minted with the stack's key: the
//! gateway checks signatures, not the users table); the measured connection is user 1's,
//! the creator of every task written, so it gets one push per write. Latency is from the
//! event's `occurred_at` (stamped by the gateway in the write transaction) to the push
//! arriving here — the whole outbox → task_events → notify → notify_events → gateway path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

struct Spawner;
impl<F> hyper::rt::Executor<F> for Spawner
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

fn env(name: &str, default: Option<&str>) -> String {
    std::env::var(name)
        .ok()
        .or(default.map(str::to_owned))
        .unwrap_or_else(|| panic!("{name} is not set"))
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("gateway status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn token(key: &jsonwebtoken::EncodingKey, user: i64) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = serde_json::json!({"sub": user.to_string(), "email": "b@example.com",
                                    "name": "B", "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &claims,
        key,
    )
    .expect("sign")
}

async fn connect(host: &str, token: &str) -> WebSocket<TokioIo<Upgraded>> {
    let stream = tokio::net::TcpStream::connect(host)
        .await
        .expect("tcp connect");
    let req = hyper::Request::builder()
        .uri(format!("http://{host}/tasks/notifications"))
        .header("Host", host)
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let (mut ws, _) = fastwebsockets::handshake::client(&Spawner, req, stream)
        .await
        .expect("upgrade");
    let msg = serde_json::json!({"type": "authenticate", "token": token}).to_string();
    ws.write_frame(Frame::text(Payload::Owned(msg.into_bytes())))
        .await
        .expect("send authenticate");
    let reply = ws.read_frame().await.expect("authenticated");
    assert_eq!(reply.opcode, OpCode::Text);
    assert!(
        std::str::from_utf8(&reply.payload)
            .unwrap_or("")
            .contains("authenticated"),
        "not authenticated"
    );
    ws
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn open_idle(host: &str, key: &jsonwebtoken::EncodingKey, conns: usize) -> Arc<AtomicUsize> {
    let open = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    let mut handles = Vec::with_capacity(conns);
    for i in 0..conns {
        let token = token(key, 1000 + i as i64);
        let host = host.to_owned();
        let open = open.clone();
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        handles.push(tokio::spawn(async move {
            let mut ws = connect(&host, &token).await;
            drop(permit);
            open.fetch_add(1, Ordering::SeqCst);
            // Stay idle; read to answer pings and notice a close.
            while let Ok(f) = ws.read_frame().await {
                if f.opcode == OpCode::Close {
                    break;
                }
            }
            open.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    while open.load(Ordering::SeqCst) < conns {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    open
}

#[tokio::main]
async fn main() {
    let base = env("BASE", None);
    let host = base.trim_start_matches("http://").to_owned();
    let pid = env("GATEWAY_PID", None);
    let conns: usize = env("CONNS", Some("10000")).parse().expect("CONNS");
    let rate: u64 = env("RATE", Some("200")).parse().expect("RATE");
    let secs: u64 = env("SECS", Some("30")).parse().expect("SECS");
    let pem = std::fs::read(env("JWT_PRIVATE_KEY", None)).expect("private key");
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).expect("ed25519 key");

    let before = rss_kib(&pid);
    let started = Instant::now();
    let open = open_idle(&host, &key, conns).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(&pid);
    let per_conn = (after.saturating_sub(before)) as f64 / conns as f64;
    println!(
        "connections: {conns} authenticated in {:.1} s; gateway RSS {before} KiB → {after} KiB; {per_conn:.1} KiB per idle connection",
        started.elapsed().as_secs_f64()
    );

    let latencies = measure(&base, &host, rate, secs).await;
    let mut sorted = latencies.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    println!(
        "event → WebSocket at {rate} writes/s for {secs} s: {} pushes of {} writes; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} idle connections still open",
        sorted.len(),
        rate * secs,
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN),
        open.load(Ordering::SeqCst)
    );
    println!("gateway RSS after the run: {} KiB", rss_kib(&pid));
}

/// Writes `rate` tasks/s for `secs` s as user 1 and collects the latency of each push.
async fn measure(base: &str, host: &str, rate: u64, secs: u64) -> Vec<f64> {
    let token = std::env::var("TOKEN").expect("TOKEN (user 1's real token)");
    let mut ws = connect(host, &token).await;
    let total = (rate * secs) as usize;
    let reader = tokio::spawn(async move {
        let mut out = Vec::with_capacity(total);
        let deadline = Instant::now() + Duration::from_secs(secs + 10);
        while out.len() < total {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Ok(f)) = tokio::time::timeout(left, ws.read_frame()).await else {
                break;
            };
            if f.opcode != OpCode::Text {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("json");
            if v["type"] != "notification" {
                continue;
            }
            let at = time::OffsetDateTime::parse(
                v["occurred_at"].as_str().unwrap_or_default(),
                &time::format_description::well_known::Rfc3339,
            )
            .expect("occurred_at");
            let ms = (time::OffsetDateTime::now_utc() - at).as_seconds_f64() * 1000.0;
            out.push(ms.max(0.0));
        }
        out
    });
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        tick.tick().await;
        let http = http.clone();
        let url = format!("{base}/tasks");
        let token = token.clone();
        tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&serde_json::json!({"title": format!("ws bench {i}"), "performer_id": 2}))
                .send()
                .await;
            if let Ok(r) = r {
                if r.status() != 201 {
                    eprintln!("write {i}: {}", r.status());
                }
            }
        });
    }
    reader.await.expect("reader")
}
