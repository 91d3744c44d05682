//! Every daemon honours the systemd contract (SPEC §7) against real dependencies:
//! `READY=1` once listening and its dependencies answer, `WATCHDOG=1` at half of
//! `WATCHDOG_USEC`, `RELOADING=1`/`READY=1` around SIGHUP, `STOPPING=1` and a clean exit
//! on SIGTERM.

use std::time::Duration;

use nix::sys::signal::Signal;
use taskflow_e2e::{Daemon, Scratch};
use taskflow_localstack::{
    free_port, KafkaBroker, PgCluster, RedisServer, Shards, SmtpSink, PG_PASSWORD,
};

#[tokio::test]
async fn shard_proxy_follows_the_systemd_contract() {
    let shards = Shards::start(3).await.expect("shards");
    let auth = PgCluster::builder()
        .database("auth")
        .start()
        .await
        .expect("auth db");
    let scratch = Scratch::new();
    let pw = scratch.write("backend-password", PG_PASSWORD);
    let client_pw = scratch.write("proxy-password", "proxy-secret");
    let mut shard_entries = String::new();
    for (i, url) in shards.urls().iter().enumerate() {
        // localstack's URLs carry the password; the proxy takes it from backend.password_file.
        let port = shards.ports()[i];
        let _ = url;
        shard_entries.push_str(&format!(
            "\n[[shards]]\nname = \"shard-{}\"\nurl = \"postgres://taskflow@127.0.0.1:{port}/tasks\"\n",
            i + 1
        ));
    }
    let config = scratch.write(
        "proxy.toml",
        &format!(
            r#"listen = "127.0.0.1:{listen}"
metrics_listen = "127.0.0.1:{metrics}"
state_dir = "{state}"
users = [{{ name = "taskflow", password_file = "{client_pw}" }}]
[backend]
user = "taskflow"
password_file = "{pw}"
[auth_database]
url = "postgres://taskflow@127.0.0.1:{auth}/auth"
{shard_entries}"#,
            listen = free_port().expect("port"),
            metrics = free_port().expect("port"),
            state = scratch.path("proxy-state").display(),
            client_pw = client_pw.display(),
            pw = pw.display(),
            auth = auth.port(),
        ),
    );

    // `migrate` applies both schemas and is idempotent.
    for _ in 0..2 {
        let (code, out) = taskflow_e2e::run_to_exit(
            "taskflow-shard-proxy",
            &["--config", config.to_str().expect("utf-8 path"), "migrate"],
        );
        assert_eq!(code, Some(0), "migrate failed: {out}");
    }

    let mut proxy = Daemon::start("taskflow-shard-proxy", &config, &[]);
    proxy
        .expect_notify("READY=1", Duration::from_secs(60))
        .await;
    // SIGHUP reloads (shards are re-read this way) and says so.
    proxy.signal(Signal::SIGHUP);
    proxy
        .expect_notify("RELOADING=1", Duration::from_secs(10))
        .await;
    proxy
        .expect_notify("READY=1", Duration::from_secs(30))
        .await;
    proxy.check_systemd_contract_after_ready().await;
}

#[tokio::test]
async fn auth_daemon_follows_the_systemd_contract() {
    let db = taskflow_e2e::migrated_db("auth").await;
    let scratch = Scratch::new();
    let (private, _public) = scratch.jwt_keys();
    let pw = scratch.write("database-password", PG_PASSWORD);
    let config = scratch.write(
        "auth.toml",
        &format!(
            r#"listen = "127.0.0.1:{listen}"
ops_listen = "127.0.0.1:0"
database_url = "postgres://taskflow@127.0.0.1:{db}/auth"
database_password_file = "{pw}"
jwt_private_key_file = "{key}"
bcrypt_cost = 4
"#,
            listen = free_port().expect("port"),
            db = db.port(),
            pw = pw.display(),
            key = private.display(),
        ),
    );
    Daemon::start("taskflow-auth", &config, &[])
        .check_systemd_contract()
        .await;
}

#[tokio::test]
async fn gateway_follows_the_systemd_contract() {
    let db = taskflow_e2e::migrated_db("tasks").await;
    let redis = RedisServer::temp().await.expect("redis");
    let kafka = KafkaBroker::temp().await.expect("broker");
    let scratch = Scratch::new();
    let (_private, public) = scratch.jwt_keys();
    let pw = scratch.write("database-password", PG_PASSWORD);
    let config = scratch.write(
        "gateway.toml",
        &format!(
            r#"listen = "127.0.0.1:{listen}"
ops_listen = "127.0.0.1:0"
auth_url = "http://127.0.0.1:{auth}"
jwt_public_key_file = "{key}"
database_url = "postgres://taskflow@127.0.0.1:{db}/tasks"
database_password_file = "{pw}"
redis_url = "{redis}"
kafka_brokers = "{kafka}"
"#,
            listen = free_port().expect("port"),
            auth = free_port().expect("port"),
            key = public.display(),
            db = db.port(),
            pw = pw.display(),
            redis = redis.url(),
            kafka = kafka.bootstrap(),
        ),
    );
    Daemon::start("taskflow-gateway", &config, &[])
        .check_systemd_contract()
        .await;
}

#[tokio::test]
async fn notify_daemon_follows_the_systemd_contract() {
    let db = taskflow_e2e::migrated_db("auth").await;
    let redis = RedisServer::temp().await.expect("redis");
    let kafka = KafkaBroker::temp().await.expect("broker");
    let smtp = SmtpSink::temp().await.expect("smtp");
    let scratch = Scratch::new();
    let config = scratch.notify_config(
        db.port(),
        &kafka.bootstrap(),
        &redis.url(),
        smtp.smtp_port(),
    );
    let mut notify = Daemon::start("taskflow-notify", &config, &[]);
    notify
        .expect_notify("READY=1", Duration::from_secs(60))
        .await;
    notify.signal(Signal::SIGHUP);
    notify
        .expect_notify("RELOADING=1", Duration::from_secs(10))
        .await;
    notify
        .expect_notify("READY=1", Duration::from_secs(10))
        .await;
    notify.check_systemd_contract_after_ready().await;
}

#[tokio::test]
async fn a_daemon_waits_for_its_dependencies_before_ready() {
    // Redis is not there yet: the notify daemon must not claim READY until it is.
    let db = taskflow_e2e::migrated_db("auth").await;
    let kafka = KafkaBroker::temp().await.expect("broker");
    let smtp = SmtpSink::temp().await.expect("smtp");
    let redis_port = free_port().expect("port");
    let scratch = Scratch::new();
    let config = scratch.notify_config(
        db.port(),
        &kafka.bootstrap(),
        &format!("redis://127.0.0.1:{redis_port}"),
        smtp.smtp_port(),
    );
    let mut notify = Daemon::start("taskflow-notify", &config, &[]);
    notify
        .expect_waiting_for("redis", Duration::from_secs(3), Duration::from_secs(5))
        .await;

    let _redis = RedisServer::builder()
        .port(redis_port)
        .start()
        .await
        .expect("redis");
    notify
        .expect_notify("READY=1", Duration::from_secs(30))
        .await;
    notify.check_systemd_contract_after_ready().await;
}
