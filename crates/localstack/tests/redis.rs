//! Starts a real redis-server and checks set/get, flushall, restart and teardown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use redis::AsyncCommands;
use taskflow_localstack::RedisServer;

#[tokio::test]
async fn set_get_flush_restart() {
    let mut server = RedisServer::temp().await.unwrap();
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );
    let mut conn = server.connection().await.unwrap();
    let _: () = conn.set("k", "v").await.unwrap();
    let v: String = conn.get("k").await.unwrap();
    assert_eq!(v, "v");

    server.flushall().await.unwrap();
    let v: Option<String> = conn.get("k").await.unwrap();
    assert_eq!(v, None);

    let pid = server.pid().unwrap();
    server.stop().await.unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(server.connection().await.is_err());
    server.start().await.unwrap();
    let mut conn = server.connection().await.unwrap();
    let _: () = conn.set("k", "again").await.unwrap();

    drop(server);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test]
async fn appendonly_persists_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = RedisServer::builder()
        .data_dir(dir.path())
        .appendonly(true)
        .start()
        .await
        .unwrap();
    let mut conn = server.connection().await.unwrap();
    let _: () = conn.set("durable", "1").await.unwrap();
    server.stop().await.unwrap();
    server.start().await.unwrap();
    let mut conn = server.connection().await.unwrap();
    let v: Option<String> = conn.get("durable").await.unwrap();
    assert_eq!(v.as_deref(), Some("1"));
}
