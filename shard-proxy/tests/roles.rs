//! Users and roles (SPEC §6): each user opens only its databases; only admin users open
//! the `admin` console. Refusals come after authentication, as PostgreSQL's do.

mod common;

use common::{Env, ADMIN_USER, PASSWORD};
use taskflow_shard_proxy::config::UserConfig;

async fn open(env: &Env, user: &str, password: &str, db: &str) -> Result<(), String> {
    let dsn = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
        env.addr().port()
    );
    match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            let probe = if db == "admin" {
                "SHOW STATS"
            } else {
                "SELECT 1"
            };
            client
                .simple_query(probe)
                .await
                .map(drop)
                .map_err(|e| format!("{e:?}"))
        }
        Err(e) => Err(e
            .as_db_error()
            .map(|d| format!("{} {}", d.code().code(), d.message()))
            .unwrap_or_else(|| e.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_opens_only_its_databases() {
    let mut env = Env::start(1).await;
    env.config.users.push(UserConfig {
        name: "reporting".into(),
        password: Some("r3port".into()),
        password_file: None,
        databases: Some(vec!["auth".into()]),
        admin: false,
    });
    env.stop_proxy().await;
    env.start_proxy().await;

    // The daemons' login: tasks and auth, never the console (no PAUSE, no RELOAD).
    open(&env, "taskflow", PASSWORD, "tasks")
        .await
        .expect("tasks");
    open(&env, "taskflow", PASSWORD, "auth")
        .await
        .expect("auth");
    let refused = open(&env, "taskflow", PASSWORD, "admin")
        .await
        .expect_err("admin");
    assert!(refused.starts_with("42501"), "{refused}");
    assert!(
        refused.contains("permission denied for database \"admin\""),
        "{refused}"
    );

    // The operator's login opens the console, and PAUSE/RESUME work there.
    let admin = env.client("admin").await;
    admin.simple_query("PAUSE").await.expect("PAUSE");
    admin.simple_query("RESUME").await.expect("RESUME");
    open(&env, ADMIN_USER, PASSWORD, "admin")
        .await
        .expect("admin");

    // A user limited to `auth`.
    open(&env, "reporting", "r3port", "auth")
        .await
        .expect("auth");
    let refused = open(&env, "reporting", "r3port", "tasks")
        .await
        .expect_err("tasks");
    assert!(refused.starts_with("42501"), "{refused}");

    // A wrong password is refused as a wrong password, whatever the database.
    let refused = open(&env, "taskflow", "wrong", "admin")
        .await
        .expect_err("password");
    assert!(refused.starts_with("28P01"), "{refused}");
}

#[test]
fn admin_database_needs_an_admin_user() {
    use taskflow_kit::config::DaemonConfig;
    let mut c = taskflow_shard_proxy::config::ProxyConfig::default();
    c.users[0].databases = Some(vec!["tasks".into(), "admin".into()]);
    let e = c.validate().expect_err("admin without admin = true");
    assert!(e.to_string().contains("users[0].databases"), "{e}");
    c.users[0].admin = true;
    c.validate().expect("admin user may list admin");
    c.users[0].databases = Some(vec!["nope".into()]);
    let e = c.validate().expect_err("unknown database");
    assert!(e.to_string().contains("unknown database `nope`"), "{e}");
}
