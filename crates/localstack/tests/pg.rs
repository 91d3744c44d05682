//! Starts real PostgreSQL clusters and checks roles, settings, restart and teardown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use taskflow_localstack::{AuthDb, PgCluster, Shards, PG_PASSWORD, PG_USER};

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn taskflow_role_logs_in_with_scram_and_settings_apply() {
    let pg = PgCluster::builder()
        .database("tasks")
        .start()
        .await
        .unwrap();
    let client = pg.client("tasks").await.unwrap();
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, PG_USER);

    // The password is stored as a SCRAM verifier and the connection used SCRAM.
    let stored: String = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&PG_USER],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    let method: String = client
        .query_one(
            "SELECT auth_method FROM pg_hba_file_rules \
             WHERE 'taskflow' = ANY(user_name) AND address = '127.0.0.1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(method, "scram-sha-256");

    for (name, want) in [
        ("max_prepared_transactions", "64"),
        ("max_connections", "200"),
        ("listen_addresses", "127.0.0.1"),
        ("fsync", "off"),
    ] {
        let got: String = client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{name}");
    }

    // A wrong password is refused.
    let bad = format!(
        "host=127.0.0.1 port={} user={PG_USER} password=wrong dbname=tasks",
        pg.port()
    );
    assert!(tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .is_err());

    // The URL form works too, with the documented password.
    assert_eq!(
        pg.url("tasks"),
        format!(
            "postgres://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{}/tasks",
            pg.port()
        )
    );
    let (c2, conn) = tokio_postgres::connect(&pg.url("tasks"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c2.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn two_phase_commit_is_available() {
    let pg = PgCluster::temp().await.unwrap();
    let client = pg.client("postgres").await.unwrap();
    for sql in [
        "CREATE TABLE t (x int)",
        "BEGIN",
        "INSERT INTO t VALUES (1)",
        "PREPARE TRANSACTION 'tx1'",
        "COMMIT PREPARED 'tx1'",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn stop_and_start_keep_data_and_port() {
    let mut pg = PgCluster::temp().await.unwrap();
    pg.create_database("shard").await.unwrap();
    let port = pg.port();
    {
        let client = pg.client("shard").await.unwrap();
        client
            .batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('yes')")
            .await
            .unwrap();
    }
    let old_pid = pg.pid().unwrap();
    pg.stop().await.unwrap();
    assert!(!process_exists(old_pid));
    assert!(!pg.is_running());
    assert!(pg.client("shard").await.is_err(), "stopped cluster answers");

    pg.start().await.unwrap();
    assert_eq!(pg.port(), port);
    let client = pg.client("shard").await.unwrap();
    let v: String = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "yes");

    pg.stop_immediate().await.unwrap();
    pg.start().await.unwrap();
    pg.client("shard").await.unwrap();
}

#[tokio::test]
async fn drop_kills_the_postmaster() {
    let pg = PgCluster::temp().await.unwrap();
    let pid = pg.pid().unwrap();
    let data_dir = pg.data_dir().to_path_buf();
    // An open client must not hold up the shutdown.
    let _client = pg.client("postgres").await.unwrap();
    assert!(process_exists(pid));
    drop(pg);
    assert!(!process_exists(pid), "postmaster {pid} survived drop");
    assert!(!data_dir.exists(), "temporary data dir kept");
}

#[tokio::test]
async fn panicking_test_still_tears_down() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handle = tokio::spawn(async move {
        let pg = PgCluster::temp().await.unwrap();
        tx.send(pg.pid().unwrap()).unwrap();
        panic!("simulated test failure");
    });
    assert!(handle.await.unwrap_err().is_panic());
    let pid = rx.await.unwrap();
    assert!(!process_exists(pid), "postmaster {pid} survived a panic");
}

#[tokio::test]
async fn persistent_data_dir_is_not_reinitialized() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pg");
    {
        let pg = PgCluster::builder()
            .data_dir(&data)
            .database("auth")
            .start()
            .await
            .unwrap();
        let client = pg.client("auth").await.unwrap();
        client
            .batch_execute("CREATE TABLE marker (id int); INSERT INTO marker VALUES (7)")
            .await
            .unwrap();
        assert!(pg.log_path().exists());
    }
    assert!(data.join("PG_VERSION").exists(), "dir deleted");
    let pg = PgCluster::builder().data_dir(&data).start().await.unwrap();
    let client = pg.client("auth").await.unwrap();
    let id: i32 = client
        .query_one("SELECT id FROM marker", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 7);
    let fsync: String = client.query_one("SHOW fsync", &[]).await.unwrap().get(0);
    assert_eq!(fsync, "on");
}

#[tokio::test]
async fn shards_and_auth_db() {
    let (shards, auth) = tokio::join!(Shards::start(2), AuthDb::start());
    let mut shards = shards.unwrap();
    let auth = auth.unwrap();
    assert_eq!(shards.len(), 2);
    assert_ne!(shards.ports()[0], shards.ports()[1]);
    for shard in shards.iter() {
        let c = shard.client("tasks").await.unwrap();
        c.query_one("SELECT 1", &[]).await.unwrap();
    }
    let i = shards.add().await.unwrap();
    assert_eq!(i, 2);
    assert_eq!(shards.connection_strings().len(), 3);
    let c = auth.client().await.unwrap();
    let db: String = c
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "auth");
    assert!(auth.connection_string().contains("dbname=auth"));
}
