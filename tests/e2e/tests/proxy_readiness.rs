//! The shard proxy claims READY only once every backend answers (SPEC §7): with a shard
//! still down it says which one it waits for, and becomes ready when the shard comes up.

use std::time::Duration;

use taskflow_e2e::{Daemon, Scratch};
use taskflow_localstack::{free_port, PgCluster, PG_PASSWORD};

#[tokio::test]
async fn the_proxy_waits_for_every_shard_before_ready() {
    let auth = PgCluster::builder()
        .database("auth")
        .start()
        .await
        .expect("auth db");
    let up = PgCluster::builder()
        .database("tasks")
        .start()
        .await
        .expect("shard-1");
    let late_port = free_port().expect("port");
    let scratch = Scratch::new();
    let pw = scratch.write("backend-password", PG_PASSWORD);
    let config = scratch.write(
        "proxy.toml",
        &format!(
            r#"listen = "127.0.0.1:{listen}"
metrics_listen = "127.0.0.1:{metrics}"
state_dir = "{state}"
users = [{{ name = "taskflow", password = "secret" }}]
[backend]
user = "taskflow"
password_file = "{pw}"
[auth_database]
url = "postgres://taskflow@127.0.0.1:{auth}/auth"
[[shards]]
name = "shard-1"
url = "postgres://taskflow@127.0.0.1:{up}/tasks"
[[shards]]
name = "shard-2"
url = "postgres://taskflow@127.0.0.1:{late_port}/tasks"
"#,
            listen = free_port().expect("port"),
            metrics = free_port().expect("port"),
            state = scratch.path("proxy-state").display(),
            pw = pw.display(),
            auth = auth.port(),
            up = up.port(),
        ),
    );
    let mut proxy = Daemon::start("taskflow-shard-proxy", &config, &[]);
    proxy
        .expect_waiting_for("shard-2", Duration::from_secs(3), Duration::from_secs(10))
        .await;

    let _late = PgCluster::builder()
        .port(late_port)
        .database("tasks")
        .start()
        .await
        .expect("shard-2");
    proxy
        .expect_notify("READY=1", Duration::from_secs(60))
        .await;
    proxy.check_systemd_contract_after_ready().await;
}
