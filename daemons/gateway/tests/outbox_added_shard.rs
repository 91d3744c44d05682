//! The outbox relay publishes the rows of a shard added while the gateway runs (`ADD
//! SHARD` in the proxy's admin console, as `make add-shard` does), although the gateway's
//! `outbox_shards` names only the shards the proxy started with: it asks the proxy for
//! its shards, or — a proxy that does not list them — sweeps every shard regularly.
//!
//! Needs the proxy and auth binaries: `cargo build -p taskflow-shard-proxy -p taskflow-auth`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod common;
use common::stack::wait_ready;
use common::task_events;

use std::path::Path;
use std::process::{Child, Command, Stdio};
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

fn spawn(binary: &Path, config: &Path) -> Proc {
    Proc(
        Command::new(binary)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    )
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

/// A simple-protocol statement on the proxy's admin console; its rows as text.
async fn admin(proxy_port: u16, sql: &str) -> Vec<Vec<String>> {
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={proxy_port} user=taskflow_admin password=taskflow dbname=admin"
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    taskflow_localstack::text_rows(
        &client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_on_a_shard_added_at_run_time_are_published() {
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
    // The third cluster gets its schema from ADD SHARD, as a new shard does.
    for s in shards.iter().take(2) {
        taskflow_migrations::apply_shard(&mut s.client("tasks").await.unwrap())
            .await
            .unwrap();
    }
    kafka.create_topic("task_events", 3).await.unwrap();
    kafka.create_topic("notify_events", 3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The proxy over shard-1 and shard-2 only.
    std::fs::write(d.join("backend-password"), "taskflow\n").unwrap();
    let proxy_port = free_port().unwrap();
    let ports = shards.ports();
    std::fs::write(
        d.join("proxy.toml"),
        format!(
            "listen = \"127.0.0.1:{proxy_port}\"\nmetrics_listen = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n\
             users = [{{ name = \"taskflow\", password = \"taskflow\" }},\n\
             {{ name = \"taskflow_admin\", password = \"taskflow\", admin = true, databases = [\"admin\"] }}]\n\
             [backend]\nuser = \"taskflow\"\npassword_file = \"{}\"\n\
             [auth_database]\nurl = \"postgres://taskflow@127.0.0.1:{}/auth\"\n[log]\nlevel = \"warn\"\n\
             [[shards]]\nname = \"shard-1\"\nurl = \"postgres://taskflow@127.0.0.1:{}/tasks\"\n\
             [[shards]]\nname = \"shard-2\"\nurl = \"postgres://taskflow@127.0.0.1:{}/tasks\"\n",
            free_port().unwrap(),
            d.join("proxy-state").display(),
            d.join("backend-password").display(),
            auth_db.port(),
            ports[0],
            ports[1],
        ),
    )
    .unwrap();
    let proxy_bin =
        binary_path("taskflow-shard-proxy").expect("cargo build -p taskflow-shard-proxy first");
    let _proxy = spawn(&proxy_bin, &d.join("proxy.toml"));
    wait_tcp(proxy_port).await;

    // The auth daemon (straight to its database) and the gateway, whose outbox_shards
    // lists the two shards the proxy started with.
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
            "listen = \"127.0.0.1:{auth_port}\"\nops_listen = \"127.0.0.1:0\"\ndatabase_url = \"{}\"\n\
             jwt_private_key_file = \"{}\"\nbcrypt_cost = 4\n[log]\nlevel = \"warn\"\n",
            auth_db.url(),
            d.join("jwt-private.pem").display()
        ),
    )
    .unwrap();
    let mut auth_proc = spawn(&auth_bin, &d.join("auth.toml"));
    let auth_url = format!("http://127.0.0.1:{auth_port}");
    wait_ready(&auth_url, "auth", &mut auth_proc.0).await;
    let gw_port = free_port().unwrap();
    std::fs::write(
        d.join("gw.toml"),
        format!(
            "listen = \"127.0.0.1:{gw_port}\"\nops_listen = \"127.0.0.1:0\"\nauth_url = \"{auth_url}\"\n\
             jwt_public_key_file = \"{}\"\n\
             database_url = \"postgres://taskflow:taskflow@127.0.0.1:{proxy_port}/tasks\"\n\
             redis_url = \"{}\"\nkafka_brokers = \"{}\"\n\
             outbox_shards = [\"shard-1\", \"shard-2\"]\noutbox_poll_ms = 100\n\
             [rate_limit]\nenabled = false\n[log]\nlevel = \"warn\"\n",
            d.join("jwt-public.pem").display(),
            redis.url(),
            kafka.bootstrap()
        ),
    )
    .unwrap();
    let mut gw_proc = spawn(
        Path::new(env!("CARGO_BIN_EXE_taskflow-gateway")),
        &d.join("gw.toml"),
    );
    let base = format!("http://127.0.0.1:{gw_port}");
    wait_ready(&base, "gateway", &mut gw_proc.0).await;

    // shard-3 joins while the gateway runs (no shard holds rows yet, so the ring changes
    // at once, with or without online migration).
    admin(
        proxy_port,
        &format!(
            "ADD SHARD shard-3 'postgres://taskflow@127.0.0.1:{}/tasks'",
            ports[2]
        ),
    )
    .await;

    // Users 1..=12; the performers the ring now puts on shard-3.
    let c = reqwest::Client::new();
    let mut token = String::new();
    for i in 1..=12 {
        let email = format!("p{i}@example.com");
        let r = c
            .post(format!("{base}/auth/register"))
            .json(&json!({"email": email, "name": format!("P{i}"), "password": "securepassword"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        if i == 1 {
            let v: Value = c
                .post(format!("{base}/auth/login"))
                .json(&json!({"email": email, "password": "securepassword"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            token = v["token"].as_str().unwrap().to_owned();
        }
    }
    let mut on_new_shard = Vec::new();
    for key in 1..=12 {
        let rows = admin(proxy_port, &format!("SHOW SHARD FOR {key}")).await;
        if rows[0].last().map(String::as_str) == Some("shard-3") {
            on_new_shard.push(key);
        }
    }
    assert!(
        !on_new_shard.is_empty(),
        "no performer of 1..=12 on shard-3"
    );

    // Two tasks per performer: their outbox rows land on all three shards.
    let mut ids = Vec::new();
    for i in 0..24 {
        let r = c
            .post(format!("{base}/tasks"))
            .bearer_auth(&token)
            .json(&json!({"title": format!("t{i}"), "performer_id": 1 + (i % 12)}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        ids.push(v["id"].as_i64().unwrap());
    }
    let on_shard3: i64 = shards[2]
        .client("tasks")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        on_shard3,
        2 * i64::try_from(on_new_shard.len()).unwrap(),
        "outbox rows on shard-3 (performers {on_new_shard:?})"
    );

    // Every shard's outbox drains, shard-3's included.
    let mut unsent = Vec::new();
    for _ in 0..150 {
        unsent.clear();
        for sh in shards.iter() {
            let n: i64 = sh
                .client("tasks")
                .await
                .unwrap()
                .query_one("SELECT count(*) FROM outbox WHERE sent_at IS NULL", &[])
                .await
                .unwrap()
                .get(0);
            unsent.push(n);
        }
        if unsent.iter().all(|n| *n == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(unsent, [0, 0, 0], "unsent outbox rows per shard");
    let events = task_events(&kafka.bootstrap()).await;
    for id in &ids {
        assert!(
            events
                .iter()
                .any(|e| e["type"] == "task.created" && e["task"]["id"] == *id),
            "no task.created event for task {id}"
        );
    }
}
