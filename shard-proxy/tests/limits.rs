//! Limits (SPEC §6): each is configurable and each breach is an error for that client
//! alone, while everyone else keeps being served.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::Env;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::types::Type;

async fn restart_with(
    env: &mut Env,
    change: impl FnOnce(&mut taskflow_shard_proxy::config::ProxyConfig),
) {
    change(&mut env.config);
    env.stop_proxy().await;
    env.start_proxy().await;
}

/// With a pool of one connection for `db`: one client (returned first) runs `sql` in an
/// open transaction, which holds the connection; a second client (returned second) runs
/// `sql` too and must be refused. Returns the refusal's SQLSTATE and message.
async fn refused_while_one_holds(
    env: &Env,
    db: &str,
    sql: &str,
) -> (tokio_postgres::Client, tokio_postgres::Client, String) {
    let holder = env.client(db).await;
    holder.simple_query("BEGIN").await.expect("begin");
    holder
        .simple_query(sql)
        .await
        .expect("holds the pool's only connection");
    let other = env.client(db).await;
    let err = other
        .simple_query(sql)
        .await
        .expect_err("no connection free");
    let refused = code_and_message(&err);
    (holder, other, refused)
}

fn code_and_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{} {}", d.code().code(), d.message()))
        .unwrap_or_else(|| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_are_capped() {
    let mut env = Env::start(1).await;
    restart_with(&mut env, |c| c.limits.max_clients = 2).await;
    let first = env.client("tasks").await;
    let second = env.client("tasks").await;
    let third = tokio_postgres::connect(&env.conn_string("tasks"), tokio_postgres::NoTls).await;
    let err = third.map(drop).expect_err("a third client is refused");
    let refused = code_and_message(&err);
    assert!(refused.starts_with("53300"), "{refused}");
    assert!(refused.contains("limits.max_clients"), "{refused}");
    // The two admitted clients are unaffected; a freed slot admits the next one.
    first
        .simple_query("SELECT 1")
        .await
        .expect("first still served");
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio_postgres::connect(&env.conn_string("tasks"), tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                c.simple_query("SELECT 1").await.expect("admitted");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("a freed slot admits the next client: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_declare_a_huge_message_before_authenticating() {
    let env = Env::start(1).await;
    let mut tcp = tokio::net::TcpStream::connect(env.addr())
        .await
        .expect("connect");
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "taskflow"), ("database", "tasks")],
        &mut buf,
    )
    .expect("startup");
    tcp.write_all(&buf).await.expect("send startup");
    // The proxy asks for SCRAM; answer with a header declaring a 64 MiB message.
    let mut header = [0u8; 5];
    tcp.read_exact(&mut header).await.expect("auth request");
    assert_eq!(header[0], b'R');
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut rest = vec![0u8; len - 4];
    tcp.read_exact(&mut rest).await.expect("auth request body");
    let mut huge = vec![b'p'];
    huge.extend_from_slice(&(64u32 * 1024 * 1024).to_be_bytes());
    tcp.write_all(&huge).await.expect("send header");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(answer.first(), Some(&b'E'), "{text}");
    assert!(text.contains("08P01"), "{text}");
    assert!(text.contains("exceeds the limit of 8192 bytes"), "{text}");
    // Everyone else is still served.
    env.client("tasks")
        .await
        .simple_query("SELECT 1")
        .await
        .expect("others served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_before_sync_are_capped() {
    let mut env = Env::start(1).await;
    restart_with(&mut env, |c| c.limits.max_pipeline_messages = 3).await;
    let c = env.client("tasks").await;
    // Parse + Describe + Sync: within the limit.
    c.query("SELECT $1::int8", &[&1i64])
        .await
        .expect("prepared query");
    // Parse + Bind + Describe + Execute + Sync: four queued, one too many.
    let err = c
        .query_typed("SELECT $1::int8", &[(&1i64, Type::INT8)])
        .await
        .expect_err("over the limit");
    let refused = code_and_message(&err);
    assert!(
        refused.contains("limits.max_pipeline_messages"),
        "{refused}"
    );
    env.client("tasks")
        .await
        .simple_query("SELECT 1")
        .await
        .expect("others served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_proxy_fails_waiting_transactions_after_the_timeout() {
    let mut env = Env::start(1).await;
    restart_with(&mut env, |c| c.limits.pause_timeout_secs = 1).await;
    let admin = env.client("admin").await;
    let c = env.client("tasks").await;
    admin.simple_query("PAUSE").await.expect("PAUSE");
    let started = Instant::now();
    let err = c
        .simple_query("SELECT count(*) FROM tasks")
        .await
        .expect_err("paused");
    let refused = code_and_message(&err);
    assert!(refused.starts_with("57P03"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(20), "bounded wait");
    admin.simple_query("RESUME").await.expect("RESUME");
    c.simple_query("SELECT count(*) FROM tasks")
        .await
        .expect("served again after RESUME");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_pooled_connection_is_bounded() {
    let mut env = Env::start(1).await;
    restart_with(&mut env, |c| {
        c.pool.size = 1;
        c.pool.checkout_timeout_secs = 1;
    })
    .await;
    let (holder, other, refused) =
        refused_while_one_holds(&env, "tasks", "SELECT count(*) FROM tasks").await;
    assert!(refused.contains("shard-1"), "{refused}");
    holder.simple_query("ROLLBACK").await.expect("rollback");
    other
        .simple_query("SELECT count(*) FROM tasks")
        .await
        .expect("served once the connection is back");
}

/// `auth_database.pool_size` sizes the passthrough database's pool on its own; the shards
/// keep `pool.size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_database_has_a_pool_size_of_its_own() {
    let mut env = Env::start(1).await;
    restart_with(&mut env, |c| {
        c.pool.size = 3;
        c.pool.checkout_timeout_secs = 1;
        c.auth_database.pool_size = Some(1);
    })
    .await;
    let admin = env.client("admin").await;
    let pools = common::rows(&admin.simple_query("SHOW POOLS").await.expect("SHOW POOLS"));
    let size_of = |name: &str| {
        pools
            .iter()
            .find(|r| r[0] == name)
            .map(|r| r[1].clone())
            .unwrap_or_else(|| panic!("no pool {name}: {pools:?}"))
    };
    assert_eq!(size_of("auth"), "1");
    assert_eq!(size_of("shard-1"), "3");

    let (holder, other, refused) = refused_while_one_holds(&env, "auth", "SELECT 1").await;
    assert!(refused.contains("auth"), "{refused}");

    // The shard's three connections are all there while auth's one is taken.
    let mut shard_clients = Vec::new();
    for _ in 0..3 {
        shard_clients.push(env.client("tasks").await);
    }
    let mut open = Vec::new();
    for c in &mut shard_clients {
        let tx = c.transaction().await.expect("begin on the shard");
        tx.simple_query("SELECT count(*) FROM tasks")
            .await
            .expect("a shard connection of its own");
        open.push(tx);
    }
    for tx in open {
        tx.rollback().await.expect("rollback");
    }
    holder.simple_query("ROLLBACK").await.expect("rollback");
    other
        .simple_query("SELECT 1")
        .await
        .expect("served once the auth connection is back");
}
