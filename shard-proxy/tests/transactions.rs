//! Transactions through the proxy: they stick to the shards they touch, commit with 2PC
//! across shards, roll back everywhere, and are all-or-nothing when a shard or the proxy
//! fails between PREPARE and COMMIT.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{prepared_count, Env};

/// Two performers owned by different shards.
fn two_on_different_shards(env: &Env) -> (i64, i64) {
    let ring = env.ring();
    let a = 1i64;
    let b = (2..1000)
        .find(|k| ring.shard_for(*k) != ring.shard_for(a))
        .expect("another shard");
    (a, b)
}

const INSERT: &str =
    "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, 't')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_commit_and_rollback() {
    let env = Env::start(3).await;
    let (a, b) = two_on_different_shards(&env);
    let mut c = env.client("tasks").await;

    // Commit: both rows, each on its owner.
    let tx = c.transaction().await.expect("begin");
    tx.execute(INSERT, &[&1i64, &a]).await.expect("insert a");
    tx.execute(INSERT, &[&2i64, &b]).await.expect("insert b");
    tx.commit().await.expect("commit");
    let ring = env.ring();
    assert_eq!(env.holders(1).await, vec![ring.shard_for(a)]);
    assert_eq!(env.holders(2).await, vec![ring.shard_for(b)]);

    // Rollback: neither.
    let tx = c.transaction().await.expect("begin");
    tx.execute(INSERT, &[&3i64, &a]).await.expect("insert a");
    tx.execute(INSERT, &[&4i64, &b]).await.expect("insert b");
    tx.rollback().await.expect("rollback");
    assert!(env.holders(3).await.is_empty());
    assert!(env.holders(4).await.is_empty());

    // An error on one shard aborts the whole transaction.
    c.simple_query("BEGIN").await.expect("begin");
    c.execute(INSERT, &[&5i64, &a]).await.expect("insert a");
    let err = c
        .execute(
            "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, '')",
            &[&6i64, &b],
        )
        .await
        .expect_err("empty title violates a CHECK on b's shard");
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("23514"),
        "the shard's real SQLSTATE"
    );
    let err = c
        .execute(INSERT, &[&8i64, &a])
        .await
        .expect_err("aborted transaction");
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"));
    c.simple_query("COMMIT")
        .await
        .expect("commit of failed txn = rollback");
    assert!(env.holders(5).await.is_empty());

    // Simple-protocol multi-statement transaction on one shard.
    c.simple_query(&format!(
        "BEGIN; INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (7, {a}, 1, 'x'); COMMIT"
    ))
    .await
    .expect("multi-statement");
    assert_eq!(env.holders(7).await, vec![ring.shard_for(a)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_transaction_rolls_back() {
    let env = Env::start(2).await;
    let (a, _) = two_on_different_shards(&env);
    {
        let c = env.client("tasks").await;
        c.simple_query("BEGIN").await.expect("begin");
        c.execute(INSERT, &[&10i64, &a]).await.expect("insert");
        // Dropped without COMMIT.
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(env.holders(10).await.is_empty());
    // Backends went back clean: a new client is not inside a transaction.
    let c = env.client("tasks").await;
    c.execute(INSERT, &[&11i64, &a]).await.expect("insert");
    assert_eq!(env.holders(11).await.len(), 1);
}

fn write_config(env: &Env, path: &std::path::Path) {
    let mut text = format!(
        "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:0\"\nstate_dir = \"{state}\"\n\
         [[users]]\nname = \"taskflow\"\npassword = \"taskflow\"\n\
         [backend]\nuser = \"taskflow\"\npassword_file = \"{pw}\"\n\
         [auth_database]\nurl = \"{auth}\"\n",
        port = env.config.listen.port(),
        state = env.state_dir().display(),
        pw = env.config.backend.password_file.clone().unwrap_or_default(),
        auth = env.config.auth_database.url,
    );
    for s in &env.config.shards {
        text.push_str(&format!(
            "[[shards]]\nname = \"{}\"\nurl = \"{}\"\n",
            s.name, s.url
        ));
    }
    std::fs::write(path, text).expect("write config");
}

/// Runs the proxy binary with a 2PC test hook; returns the child.
async fn spawn_proxy(
    env: &Env,
    cfg: &std::path::Path,
    hook: Option<&str>,
) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskflow-shard-proxy"));
    cmd.arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd.env("TASKFLOW_LOG__FORMAT", "text");
    match hook {
        Some(h) => cmd.env("TFSP_TEST_2PC_HOOK", h),
        None => cmd.env_remove("TFSP_TEST_2PC_HOOK"),
    };
    let child = cmd.spawn().expect("spawn proxy");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", env.config.listen.port()))
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("proxy did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_commit_survives_crashes_and_shard_failure() {
    let mut env = Env::start(3).await;
    env.stop_proxy().await;
    let port = taskflow_localstack::free_port().expect("free port");
    env.config.listen = format!("127.0.0.1:{port}").parse().expect("addr");
    let cfg = env.dir.path().join("proxy.toml");
    write_config(&env, &cfg);
    let (a, b) = two_on_different_shards(&env);

    // 1. Proxy dies after every shard prepared but before the decision: all roll back.
    let mut child = spawn_proxy(&env, &cfg, Some("abort-before-decision")).await;
    let c = common::client_at(env.config.listen.port(), "tasks").await;
    c.simple_query("BEGIN").await.expect("begin");
    c.execute(INSERT, &[&100i64, &a]).await.expect("insert a");
    c.execute(INSERT, &[&101i64, &b]).await.expect("insert b");
    assert!(
        c.simple_query("COMMIT").await.is_err(),
        "proxy aborted during commit"
    );
    let _ = child.wait().await;
    assert_eq!(
        prepared_count(&env).await,
        2,
        "both shards hold a prepared transaction"
    );
    let mut child = spawn_proxy(&env, &cfg, None).await;
    assert_eq!(prepared_count(&env).await, 0, "recovery resolved them");
    assert!(
        env.holders(100).await.is_empty() && env.holders(101).await.is_empty(),
        "nothing committed"
    );
    child.kill().await.expect("kill");

    // 2. Proxy dies after logging the decision: recovery commits everywhere.
    let mut child = spawn_proxy(&env, &cfg, Some("abort-after-decision")).await;
    let c = common::client_at(env.config.listen.port(), "tasks").await;
    c.simple_query("BEGIN").await.expect("begin");
    c.execute(INSERT, &[&200i64, &a]).await.expect("insert a");
    c.execute(INSERT, &[&201i64, &b]).await.expect("insert b");
    assert!(c.simple_query("COMMIT").await.is_err());
    let _ = child.wait().await;
    let mut child = spawn_proxy(&env, &cfg, None).await;
    assert_eq!(prepared_count(&env).await, 0);
    assert_eq!(env.holders(200).await.len(), 1);
    assert_eq!(env.holders(201).await.len(), 1);
    child.kill().await.expect("kill");

    // 3. A shard stops between PREPARE and COMMIT PREPARED: the decision stands; once the
    //    shard is back, recovery commits its half too.
    let ring = env.ring();
    let b_shard = ring.shard_for(b);
    let mut child = spawn_proxy(&env, &cfg, Some("sleep-after-decision=3000")).await;
    let c = common::client_at(env.config.listen.port(), "tasks").await;
    c.simple_query("BEGIN").await.expect("begin");
    c.execute(INSERT, &[&300i64, &a]).await.expect("insert a");
    c.execute(INSERT, &[&301i64, &b]).await.expect("insert b");
    let commit = tokio::spawn(async move { c.simple_query("COMMIT").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    env.shards[b_shard]
        .stop_immediate()
        .await
        .expect("stop shard");
    commit
        .await
        .expect("join")
        .expect("commit acknowledged: the decision is durable");
    let a_rows: i64 = env
        .shard(ring.shard_for(a))
        .await
        .query_one("SELECT count(*) FROM tasks WHERE id = 300", &[])
        .await
        .expect("direct")
        .get(0);
    assert_eq!(a_rows, 1, "a's half committed");
    env.shards[b_shard].start().await.expect("restart shard");
    child.kill().await.expect("kill");
    let _ = child.wait().await;
    let mut child = spawn_proxy(&env, &cfg, None).await;
    assert_eq!(
        env.holders(301).await,
        vec![b_shard],
        "b's half committed by recovery"
    );
    assert_eq!(prepared_count(&env).await, 0);

    // 4. A shard down before PREPARE: nothing commits anywhere.
    let c = common::client_at(env.config.listen.port(), "tasks").await;
    c.simple_query("BEGIN").await.expect("begin");
    c.execute(INSERT, &[&400i64, &a]).await.expect("insert a");
    c.execute(INSERT, &[&401i64, &b]).await.expect("insert b");
    env.shards[b_shard]
        .stop_immediate()
        .await
        .expect("stop shard");
    let err = c
        .simple_query("COMMIT")
        .await
        .expect_err("commit must fail");
    assert!(format!("{err:?}").contains("rolled back"), "{err}");
    env.shards[b_shard].start().await.expect("restart shard");
    assert!(env.holders(400).await.is_empty() && env.holders(401).await.is_empty());
    child.kill().await.expect("kill");
}

/// SPEC §2/§6: a row moved between shards by a cross-shard transaction is never seen
/// missing or twice by a concurrent scatter read, even while the `COMMIT PREPARED`s are
/// applied one shard after the other (the test hook stretches that window to 1.5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moving_row_is_seen_exactly_once_by_scatter_reads() {
    let mut env = Env::start(3).await;
    env.stop_proxy().await;
    let port = taskflow_localstack::free_port().expect("free port");
    env.config.listen = format!("127.0.0.1:{port}").parse().expect("addr");
    let cfg = env.dir.path().join("proxy.toml");
    write_config(&env, &cfg);
    let (a, b) = two_on_different_shards(&env);
    let _child = spawn_proxy(&env, &cfg, Some("sleep-between-commits=1500")).await;

    let writer = common::client_at(env.config.listen.port(), "tasks").await;
    writer
        .execute(INSERT, &[&500i64, &a])
        .await
        .expect("insert");
    let reader = common::client_at(env.config.listen.port(), "tasks").await;

    writer.simple_query("BEGIN").await.expect("begin");
    writer
        .execute(
            "DELETE FROM tasks WHERE performer_id = $1 AND id = 500",
            &[&a],
        )
        .await
        .expect("delete from the old owner");
    writer
        .execute(INSERT, &[&500i64, &b])
        .await
        .expect("insert on the new owner");
    let mover = tokio::spawn(async move { writer.simple_query("COMMIT").await.map(drop) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut reads = 0;
    while !mover.is_finished() {
        let simple = reader
            .simple_query("SELECT count(*) FROM tasks WHERE id = 500")
            .await
            .expect("scatter read (simple)");
        let n = simple
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .expect("a count");
        assert_eq!(
            n, "1",
            "simple-protocol scatter read saw the moving row {n} times"
        );
        let extended: i64 = reader
            .query_one("SELECT count(*) FROM tasks WHERE id = $1", &[&500i64])
            .await
            .expect("scatter read (extended)")
            .get(0);
        assert_eq!(
            extended, 1,
            "extended-protocol scatter read saw it {extended} times"
        );
        reads += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mover.await.expect("join").expect("move committed");
    // The first read started 100 ms into the 1.5 s window between the two COMMIT PREPAREDs
    // (the loop only starts reads while the commit is unfinished).
    assert!(reads >= 1, "no read overlapped the move");
    let ring = env.ring();
    assert_eq!(env.holders(500).await, vec![ring.shard_for(b)]);
}
