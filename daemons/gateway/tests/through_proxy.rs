//! The gateway and the auth daemon through the real shard proxy over three shards
//! (issue 4's "real stack"): tasks spread over shards, pagination across shards returns
//! each task once in id order, a performer change moves the row between shards while
//! concurrent readers never see it missing or twice, every shard's outbox drains to
//! Kafka, and a flushed Redis re-seeds ids from the maximum over all shards.
//!
//! Needs the proxy and auth binaries: `cargo build -p taskflow-shard-proxy -p taskflow-auth`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod common;
use common::stack::wait_ready;
use common::task_events;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use taskflow_localstack::{binary_path, free_port, AuthDb, KafkaBroker, RedisServer, Shards};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_tcp(port: u16) {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("port {port} never opened");
}

async fn call(
    c: &reqwest::Client,
    m: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = c.request(m, url).bearer_auth(token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let s = r.status().as_u16();
    let t = r.text().await.unwrap();
    (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_through_the_shard_proxy() {
    run(false).await;
}

/// SPEC §2: "no reader ever sees it missing or twice". The gateway keeps the newest version
/// of a task seen on two shards and looks again on a 404 by id during a move; the proxy's
/// commit fence makes a cross-shard commit atomic to scatter lists (proven deterministically
/// in shard-proxy/tests/transactions.rs with a stretched commit window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn performer_move_is_invisible_to_scatter_lists() {
    run(true).await;
}

async fn run(strict: bool) {
    let (shards, auth_db, redis, kafka) = tokio::join!(
        Shards::start(3),
        AuthDb::start(),
        RedisServer::temp(),
        KafkaBroker::temp()
    );
    let (shards, auth_db, redis, mut kafka) = (
        shards.unwrap(),
        auth_db.unwrap(),
        redis.unwrap(),
        kafka.unwrap(),
    );
    taskflow_migrations::apply_auth(&mut auth_db.client().await.unwrap())
        .await
        .unwrap();
    for s in shards.iter() {
        taskflow_migrations::apply_shard(&mut s.client("tasks").await.unwrap())
            .await
            .unwrap();
    }
    kafka.create_topic("task_events", 3).await.unwrap();
    kafka.create_topic("notify_events", 3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The proxy.
    std::fs::write(d.join("backend-password"), "taskflow\n").unwrap();
    let proxy_port = free_port().unwrap();
    let mut proxy_cfg = format!(
        "listen = \"127.0.0.1:{proxy_port}\"\nmetrics_listen = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n\
         users = [{{ name = \"taskflow\", password = \"taskflow\" }}]\n\
         [backend]\nuser = \"taskflow\"\npassword_file = \"{}\"\n\
         [auth_database]\nurl = \"postgres://taskflow@127.0.0.1:{}/auth\"\n[log]\nlevel = \"warn\"\n",
        free_port().unwrap(),
        d.join("proxy-state").display(),
        d.join("backend-password").display(),
        auth_db.port(),
    );
    for (i, port) in shards.ports().iter().enumerate() {
        proxy_cfg.push_str(&format!("[[shards]]\nname = \"shard-{}\"\nurl = \"postgres://taskflow@127.0.0.1:{port}/tasks\"\n", i + 1));
    }
    std::fs::write(d.join("proxy.toml"), proxy_cfg).unwrap();
    let proxy_bin =
        binary_path("taskflow-shard-proxy").expect("cargo build -p taskflow-shard-proxy first");
    let _proxy = Proc(
        Command::new(proxy_bin)
            .arg("--config")
            .arg(d.join("proxy.toml"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_tcp(proxy_port).await;

    // The auth daemon, through the proxy's passthrough `auth` database.
    let auth_bin = binary_path("taskflow-auth").expect("cargo build -p taskflow-auth first");
    assert!(Command::new(&auth_bin)
        .arg("--generate-keys")
        .arg(d)
        .status()
        .unwrap()
        .success());
    let auth_port = free_port().unwrap();
    std::fs::write(
        d.join("auth.toml"),
        format!(
            "listen = \"127.0.0.1:{auth_port}\"\nops_listen = \"127.0.0.1:0\"\ndatabase_url = \"postgres://taskflow:taskflow@127.0.0.1:{proxy_port}/auth\"\n\
             jwt_private_key_file = \"{}\"\nbcrypt_cost = 4\n[log]\nlevel = \"warn\"\n",
            d.join("jwt-private.pem").display()
        ),
    )
    .unwrap();
    let mut auth_proc = Proc(
        Command::new(&auth_bin)
            .arg("--config")
            .arg(d.join("auth.toml"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let auth_url = format!("http://127.0.0.1:{auth_port}");
    wait_ready(&auth_url, "auth", &mut auth_proc.0).await;

    // The gateway, through the proxy's sharded `tasks` database.
    let gw_port = free_port().unwrap();
    std::fs::write(
        d.join("gw.toml"),
        format!(
            "listen = \"127.0.0.1:{gw_port}\"\nops_listen = \"127.0.0.1:0\"\nauth_url = \"{auth_url}\"\njwt_public_key_file = \"{}\"\n\
             database_url = \"postgres://taskflow:taskflow@127.0.0.1:{proxy_port}/tasks\"\nredis_url = \"{}\"\n\
             kafka_brokers = \"{}\"\noutbox_shards = [\"shard-1\", \"shard-2\", \"shard-3\"]\noutbox_poll_ms = 100\n\
             [rate_limit]\nenabled = false\n[log]\nlevel = \"warn\"\n",
            d.join("jwt-public.pem").display(),
            redis.url(),
            kafka.bootstrap()
        ),
    )
    .unwrap();
    let mut gw_proc = Proc(
        Command::new(env!("CARGO_BIN_EXE_taskflow-gateway"))
            .arg("--config")
            .arg(d.join("gw.toml"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{gw_port}");
    wait_ready(&base, "gateway", &mut gw_proc.0).await;
    // A second instance without `outbox_shards`: its relay polls the shards the proxy
    // lists (`SHOW taskflow.shards`), racing the first one's polls for the same rows.
    let gw2_port = free_port().unwrap();
    let gw2_cfg = std::fs::read_to_string(d.join("gw.toml"))
        .unwrap()
        .replace(
            &format!("127.0.0.1:{gw_port}"),
            &format!("127.0.0.1:{gw2_port}"),
        )
        .replace(
            "outbox_shards = [\"shard-1\", \"shard-2\", \"shard-3\"]\n",
            "",
        );
    std::fs::write(d.join("gw2.toml"), gw2_cfg).unwrap();
    let mut gw2_proc = Proc(
        Command::new(env!("CARGO_BIN_EXE_taskflow-gateway"))
            .arg("--config")
            .arg(d.join("gw2.toml"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(
        &format!("http://127.0.0.1:{gw2_port}"),
        "second gateway",
        &mut gw2_proc.0,
    )
    .await;

    let c = reqwest::Client::new();
    // Users 1..=6.
    let mut tokens = vec![String::new()];
    for i in 1..=6 {
        let email = format!("p{i}@example.com");
        let r = c
            .post(format!("{base}/auth/register"))
            .json(&json!({"email": email, "name": format!("P{i}"), "password": "securepassword"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = c
            .post(format!("{base}/auth/login"))
            .json(&json!({"email": email, "password": "securepassword"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["id"], i.to_string());
        tokens.push(v["token"].as_str().unwrap().to_owned());
    }
    let t1 = tokens[1].clone();

    // 30 tasks over performers 1..=6: they land on more than one shard.
    let mut ids = Vec::new();
    for i in 0..30 {
        let (s, v) = call(
            &c,
            reqwest::Method::POST,
            format!("{base}/tasks"),
            &t1,
            Some(
                json!({"title": format!("t{i}"), "performer_id": 1 + (i % 6), "observer_ids": [1]}),
            ),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        ids.push(v["id"].as_i64().unwrap());
    }
    let mut per_shard = Vec::new();
    for s in shards.iter() {
        let n: i64 = s
            .client("tasks")
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM tasks", &[])
            .await
            .unwrap()
            .get(0);
        per_shard.push(n);
    }
    assert_eq!(per_shard.iter().sum::<i64>(), 30);
    assert!(
        per_shard.iter().filter(|n| **n > 0).count() >= 2,
        "tasks not spread: {per_shard:?}"
    );

    // Pagination across shards: each task once, in id order.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let (s, v) = call(
            &c,
            reqwest::Method::GET,
            format!("{base}/tasks?limit=7&cursor={cursor}"),
            &t1,
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        seen.extend(
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_i64().unwrap()),
        );
        match v["next_cursor"].as_str() {
            Some(n) => cursor = n.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, ids, "pagination across shards");
    let (_, v) = call(
        &c,
        reqwest::Method::GET,
        format!("{base}/tasks?performer_id=3&limit=500"),
        &t1,
        None,
    )
    .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 5);
    for (q, want) in [
        ("observer_id=1&limit=500", 30),
        ("creator_id=1&status=pending&limit=500", 30),
        ("observer_id=2&limit=500", 0),
    ] {
        let (s, v) = call(
            &c,
            reqwest::Method::GET,
            format!("{base}/tasks?{q}"),
            &t1,
            None,
        )
        .await;
        assert_eq!(s, 200, "{q}: {v}");
        assert_eq!(
            v["data"].as_array().unwrap().len(),
            want,
            "{q} across shards"
        );
    }
    let (_, v) = call(
        &c,
        reqwest::Method::GET,
        format!("{base}/tasks/{}", ids[0]),
        &t1,
        None,
    )
    .await;
    assert_eq!(v["observer_ids"], json!([1]));

    // Performer changes move the row between shards; readers never see it missing or twice.
    let moving = ids[0];
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let c = c.clone();
        let base = base.clone();
        let t1 = t1.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut reads = 0;
            let mut missed = 0;
            while !stop.load(Ordering::Relaxed) {
                let (s, v) = call(
                    &c,
                    reqwest::Method::GET,
                    format!("{base}/tasks?creator_id=1&limit=500"),
                    &t1,
                    None,
                )
                .await;
                assert_eq!(s, 200, "{v}");
                let n = v["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|t| t["id"] == moving)
                    .count();
                assert!(n <= 1, "task {moving} seen {n} times in a scatter read");
                if n == 0 {
                    assert!(
                        !strict,
                        "task {moving} missing from a scatter read during a move"
                    );
                    missed += 1;
                }
                let (s, _) = call(
                    &c,
                    reqwest::Method::GET,
                    format!("{base}/tasks/{moving}"),
                    &t1,
                    None,
                )
                .await;
                assert_eq!(s, 200, "task {moving} missing during a move");
                reads += 1;
            }
            (reads, missed)
        })
    };
    for round in 0..10 {
        let performer = 1 + (round % 6);
        let (s, v) = call(
            &c,
            reqwest::Method::PATCH,
            format!("{base}/tasks/{moving}"),
            &t1,
            Some(json!({"performer_id": performer})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let mut holders = 0;
        for sh in shards.iter() {
            let n: i64 = sh
                .client("tasks")
                .await
                .unwrap()
                .query_one("SELECT count(*) FROM tasks WHERE id = $1", &[&moving])
                .await
                .unwrap()
                .get(0);
            holders += n;
        }
        assert_eq!(holders, 1, "after move {round}");
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, missed) = reader.await.unwrap();
    assert!(reads > 0);
    if missed > 0 {
        eprintln!("WARNING: {missed} of {reads} scatter lists missed the task while it moved (proxy 2PC visibility gap)");
    }

    // Redis loses everything: the next id is above the max over all shards.
    let max = *ids.iter().max().unwrap();
    redis.flushall().await.unwrap();
    let (s, v) = call(
        &c,
        reqwest::Method::GET,
        format!("{base}/tasks/{}", ids[5]),
        &t1,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(
        &c,
        reqwest::Method::POST,
        format!("{base}/tasks"),
        &t1,
        Some(json!({"title": "after flush", "performer_id": 2})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert!(v["id"].as_i64().unwrap() > max);

    // Every shard's outbox drains.
    let mut unsent = i64::MAX;
    for _ in 0..100 {
        unsent = 0;
        for sh in shards.iter() {
            let n: i64 = sh
                .client("tasks")
                .await
                .unwrap()
                .query_one("SELECT count(*) FROM outbox WHERE sent_at IS NULL", &[])
                .await
                .unwrap()
                .get(0);
            unsent += n;
        }
        if unsent == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(unsent, 0, "outbox rows left unsent through the proxy");
    // Every write's event is in Kafka (none was stamped sent without being published).
    let bootstrap = kafka.bootstrap();
    let events: Vec<Value> = task_events(&bootstrap).await;
    for id in &ids {
        assert!(
            events
                .iter()
                .any(|e| e["type"] == "task.created" && e["task"]["id"] == *id),
            "no task.created event for task {id} ({} events in Kafka)",
            events.len()
        );
    }
    let moves = events
        .iter()
        .filter(|e| e["type"] == "task.updated" && e["task"]["id"] == moving)
        .count();
    assert!(moves >= 10, "{moves} update events for the moved task");
    let _ = &kafka;
}
