//! Starts a throwaway stack for `bench/wrk.sh`: PostgreSQL (auth + 3 shards behind the
//! shard proxy, or one shard directly with `--direct`), Redis, the tansu broker, the auth
//! daemon and a gateway with rate limits raised out of the way, all on free loopback
//! ports (taskflow-localstack). It registers two users, logs in, creates one task, and
//! writes `KEY=value` lines (BASE, TOKEN, TASK_ID, PERFORMER_ID) to the file named by its
//! first argument. It then runs until SIGINT or SIGTERM, and tears
//! everything down.
//!
//! With `--notify` it also starts MailDev and the notify daemon (for `bench/ws.sh`), adds
//! `[websocket] max_connections_per_ip = 20000` to the gateway, and writes GATEWAY_PID
//! and JWT_PRIVATE_KEY to the env file.
//!
//! Binaries come from `$TASKFLOW_BIN_DIR` (the script points it at `target/release`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use taskflow_localstack::{
    binary_path, free_port, AuthDb, KafkaBroker, RedisServer, Shards, SmtpSink,
};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_http(base: &str) {
    let c = reqwest::Client::new();
    for _ in 0..600 {
        // `/healthz` on the API port: the daemons bind it once their dependencies answer
        // (`/readyz` is on the ops listener).
        if let Ok(r) = c.get(format!("{base}/healthz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{base} did not become ready");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).cloned().unwrap_or_else(|| "bench.env".into());
    let direct = args.iter().any(|a| a == "--direct");
    let with_notify = args.iter().any(|a| a == "--notify");
    let (shards, auth_db, redis, kafka) = tokio::join!(
        Shards::start(if direct { 1 } else { 3 }),
        AuthDb::start(),
        RedisServer::temp(),
        KafkaBroker::temp()
    );
    let (shards, auth_db, redis, mut kafka) = (shards?, auth_db?, redis?, kafka?);
    taskflow_migrations::apply_auth(&mut auth_db.client().await?).await?;
    for s in shards.iter() {
        taskflow_migrations::apply_shard(&mut s.client("tasks").await?).await?;
    }
    kafka.create_topic("task_events", 3).await?;
    kafka.create_topic("notify_events", 3).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut procs = Vec::new();

    let (tasks_url, auth_db_url, outbox_shards) = if direct {
        (shards[0].url("tasks"), auth_db.url(), String::new())
    } else {
        std::fs::write(d.join("backend-password"), "taskflow\n")?;
        let port = free_port()?;
        let mut cfg = format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n\
             users = [{{ name = \"taskflow\", password = \"taskflow\" }}]\n\
             [backend]\nuser = \"taskflow\"\npassword_file = \"{}\"\n\
             [auth_database]\nurl = \"postgres://taskflow@127.0.0.1:{}/auth\"\n[log]\nlevel = \"warn\"\n",
            free_port()?,
            d.join("proxy-state").display(),
            d.join("backend-password").display(),
            auth_db.port(),
        );
        for (i, p) in shards.ports().iter().enumerate() {
            cfg.push_str(&format!(
                "[[shards]]\nname = \"shard-{}\"\nurl = \"postgres://taskflow@127.0.0.1:{p}/tasks\"\n",
                i + 1
            ));
        }
        std::fs::write(d.join("proxy.toml"), cfg)?;
        procs.push(Proc(
            Command::new(binary_path("taskflow-shard-proxy")?)
                .arg("--config")
                .arg(d.join("proxy.toml"))
                .stdin(Stdio::null())
                .spawn()?,
        ));
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (
            format!("postgres://taskflow:taskflow@127.0.0.1:{port}/tasks"),
            format!("postgres://taskflow:taskflow@127.0.0.1:{port}/auth"),
            "outbox_shards = [\"shard-1\", \"shard-2\", \"shard-3\"]\n".to_owned(),
        )
    };

    let auth_bin = binary_path("taskflow-auth")?;
    Command::new(&auth_bin)
        .arg("--generate-keys")
        .arg(d)
        .status()?;
    let auth_port = free_port()?;
    std::fs::write(
        d.join("auth.toml"),
        format!(
            "listen = \"127.0.0.1:{auth_port}\"\nops_listen = \"127.0.0.1:0\"\ndatabase_url = \"{auth_db_url}\"\njwt_private_key_file = \"{}\"\nbcrypt_cost = 4\n[log]\nlevel = \"warn\"\n",
            d.join("jwt-private.pem").display()
        ),
    )?;
    procs.push(Proc(
        Command::new(&auth_bin)
            .arg("--config")
            .arg(d.join("auth.toml"))
            .stdin(Stdio::null())
            .spawn()?,
    ));
    let auth_url = format!("http://127.0.0.1:{auth_port}");
    wait_http(&auth_url).await;

    let gw_port = free_port()?;
    // BENCH_RATE_LIMIT=off measures the gateway without its per-request Redis script.
    let rl_enabled = std::env::var("BENCH_RATE_LIMIT").map_or(true, |v| v != "off");
    std::fs::write(
        d.join("gw.toml"),
        format!(
            "listen = \"127.0.0.1:{gw_port}\"\nops_listen = \"127.0.0.1:0\"\nauth_url = \"{auth_url}\"\njwt_public_key_file = \"{}\"\n\
             database_url = \"{tasks_url}\"\nredis_url = \"{}\"\nkafka_brokers = \"{}\"\n{outbox_shards}\
             database_pool_size = 32\n{ws}[rate_limit]\nenabled = {rl_enabled}\nper_second = 1000000\nburst = 1000000\nlogin_per_minute = 1000000\n[log]\nlevel = \"warn\"\n",
            d.join("jwt-public.pem").display(),
            redis.url(),
            kafka.bootstrap(),
            ws = if with_notify {
                "[websocket]\nmax_connections_per_ip = 20000\n"
            } else {
                ""
            },
        ),
    )?;
    let gateway = Command::new(binary_path("taskflow-gateway")?)
        .arg("--config")
        .arg(d.join("gw.toml"))
        .stdin(Stdio::null())
        .spawn()?;
    let gateway_pid = gateway.id();
    procs.push(Proc(gateway));
    let smtp = if with_notify {
        let smtp = SmtpSink::temp().await?;
        std::fs::write(d.join("notify-db-password"), "taskflow\n")?;
        let notify_db = auth_db_url.replace("taskflow:taskflow@", "taskflow@");
        std::fs::write(
            d.join("notify.toml"),
            format!(
                "metrics_listen = \"127.0.0.1:{}\"\ndatabase_url = \"{notify_db}\"\n\
                 database_password_file = \"{}\"\nkafka_brokers = \"{}\"\nredis_url = \"{}\"\n\
                 [smtp]\nhost = \"127.0.0.1\"\nport = {}\n[log]\nlevel = \"warn\"\n",
                free_port()?,
                d.join("notify-db-password").display(),
                kafka.bootstrap(),
                redis.url(),
                smtp.smtp_port()
            ),
        )?;
        procs.push(Proc(
            Command::new(binary_path("taskflow-notify")?)
                .arg("--config")
                .arg(d.join("notify.toml"))
                .stdin(Stdio::null())
                .spawn()?,
        ));
        Some(smtp)
    } else {
        None
    };
    let base = format!("http://127.0.0.1:{gw_port}");
    wait_http(&base).await;

    let c = reqwest::Client::new();
    for (email, name) in [
        ("bench1@example.com", "Bench One"),
        ("bench2@example.com", "Bench Two"),
    ] {
        c.post(format!("{base}/auth/register"))
            .json(&json!({"email": email, "name": name, "password": "benchpassword"}))
            .send()
            .await?;
    }
    let login: Value = c
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": "bench1@example.com", "password": "benchpassword"}))
        .send()
        .await?
        .json()
        .await?;
    let token = login["token"].as_str().expect("token").to_owned();
    let task: Value = c
        .post(format!("{base}/tasks"))
        .bearer_auth(&token)
        .json(&json!({"title": "bench", "performer_id": 2}))
        .send()
        .await?
        .json()
        .await?;
    let task_id = task["id"].as_i64().expect("task id");
    // A few more tasks so the list has something to page through.
    for i in 0..50 {
        c.post(format!("{base}/tasks"))
            .bearer_auth(&token)
            .json(&json!({"title": format!("bench {i}"), "performer_id": 2}))
            .send()
            .await?;
    }
    std::fs::write(
        &out,
        format!(
            "BASE={base}\nTOKEN={token}\nTASK_ID={task_id}\nPERFORMER_ID=2\nMODE={}\n\
             GATEWAY_PID={gateway_pid}\nJWT_PRIVATE_KEY={}\n",
            if direct { "direct" } else { "proxy" },
            d.join("jwt-private.pem").display()
        ),
    )?;
    println!("bench stack ready: {base} (env in {out})");

    // Run until SIGINT or SIGTERM.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(procs);
    drop((shards, auth_db, redis, kafka, smtp));
    Ok(())
}
