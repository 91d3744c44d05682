//! The ring is durable shared state (`taskflow_meta.ring_epochs`): a proxy started with a
//! shard list that disagrees with the stored ring never silently re-routes keys away from
//! their rows (issue 9). While every shard is empty, a new shard list is recorded as the
//! next epoch; once a shard holds rows, it starts the online migration it implies; while a
//! migration is unfinished, a list that is neither its source nor its target is refused.

mod common;

use common::{rows, shard_url, Env};
use taskflow_shard_proxy::config::ShardConfig;
use taskflow_shard_proxy::server;
use tokio_util::sync::CancellationToken;

async fn start_err(env: &Env) -> String {
    match server::start(env.config.clone(), None, CancellationToken::new()).await {
        Ok(_) => panic!("the proxy started with a ring that disagrees with the stored one"),
        Err(e) => e.to_string(),
    }
}

async fn epochs(env: &Env) -> Vec<(i64, String, String)> {
    let auth = env.auth.client().await.expect("auth client");
    auth.query(
        "SELECT epoch, array_to_string(shards, ','), state FROM taskflow_meta.ring_epochs ORDER BY epoch",
        &[],
    )
    .await
    .expect("epochs")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_never_silently_reroutes() {
    let mut env = Env::start(3).await;
    let stored = env.config.shards.clone();
    assert_eq!(
        epochs(&env).await,
        vec![(1, "shard-1,shard-2,shard-3".into(), "active".into())],
        "the first proxy records the ring"
    );

    // A fourth shard: a second database with the shard schema on shard-3's cluster.
    env.shard(2)
        .await
        .simple_query("CREATE DATABASE tasks4")
        .await
        .expect("create database");
    let mut c4 = env.shards[2].client("tasks4").await.expect("client");
    taskflow_migrations::apply_shard(&mut c4)
        .await
        .expect("migrate shard-4");
    let spare = env.shards.ports()[2];
    let fourth = ShardConfig {
        name: "shard-4".into(),
        url: shard_url(spare).replace("/tasks", "/tasks4"),
    };

    // While every shard is empty, a RELOAD with a fourth shard on one proxy records
    // epoch 2, and a second proxy over the same shards follows it.
    let mut other = env.config.clone();
    other.metadata.instance_id = Some("proxy-b".into());
    other.state_dir = env.dir.path().join("state-b");
    let (b, _) = server::start(other, None, CancellationToken::new())
        .await
        .expect("second proxy");
    let mut four = env.config.clone();
    four.shards.push(fourth.clone());
    let a = env.proxy.as_ref().expect("running").proxy.clone();
    a.reload(four)
        .await
        .expect("reload with shard-4 while empty");
    let e = epochs(&env).await;
    assert_eq!(e.len(), 2);
    assert_eq!(
        e[1],
        (2, "shard-1,shard-2,shard-3,shard-4".into(), "active".into())
    );
    assert_eq!(e[0].2, "retired");
    let mut followed = false;
    for _ in 0..100 {
        if b.proxy.topology().shards.len() == 4 {
            followed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(followed, "the second proxy follows the stored epoch");
    b.stop(std::time::Duration::from_secs(1)).await;
    env.stop_proxy().await;
    env.config.shards = stored.clone();
    env.start_proxy().await;
    assert_eq!(epochs(&env).await.len(), 3, "back to three shards: epoch 3");

    // Once a shard holds rows, a restart with a fourth shard starts an online migration
    // instead of re-routing: the row moves (or stays) with its key.
    let c = env.client("tasks").await;
    c.simple_query("INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (1, 7, 1, 't')")
        .await
        .expect("insert");
    env.stop_proxy().await;
    env.config.shards.push(fourth.clone());
    env.start_proxy().await;
    wait_for_epoch(&env, 4).await;
    assert_eq!(
        epochs(&env).await[3],
        (4, "shard-1,shard-2,shard-3,shard-4".into(), "active".into())
    );
    assert_eq!(
        read_row(&env, 7).await,
        1,
        "the row is where its key routes"
    );

    // The three-shard list is now a stale file: a restart with it is refused (it would
    // move the rows back), naming the migration that replaced it.
    env.stop_proxy().await;
    env.config.shards = stored.clone();
    let err = start_err(&env).await;
    assert!(err.contains("finished migration replaced"), "{err}");
    env.config.shards.push(fourth.clone());
    env.start_proxy().await;

    // While a migration is unfinished (held in `waiting` by a live proxy that has not
    // acknowledged it), a shard list that is neither its source nor its target is refused,
    // naming the migration.
    let auth = env.auth.client().await.expect("auth client");
    auth.simple_query(
        "INSERT INTO taskflow_meta.proxies (instance_id, addr, pid, version, ring_view) \
         VALUES ('silent', '127.0.0.1:1', 1, 'test', 0)",
    )
    .await
    .expect("a live proxy that never acknowledges");
    env.client("admin")
        .await
        .simple_query("REMOVE SHARD shard-4")
        .await
        .expect("REMOVE SHARD on purpose moves the rows back");
    env.stop_proxy().await;
    env.config.ring.virtual_nodes = 64;
    let err = start_err(&env).await;
    assert!(err.contains("is unfinished"), "{err}");
    // Its source ring joins it; once the silent proxy is gone it finishes.
    env.config.ring.virtual_nodes = 256;
    env.start_proxy().await;
    auth.simple_query("DELETE FROM taskflow_meta.proxies WHERE instance_id = 'silent'")
        .await
        .expect("forget the silent proxy");
    wait_for_epoch(&env, 5).await;
    assert_eq!(epochs(&env).await[4].1, "shard-1,shard-2,shard-3");
    assert_eq!(read_row(&env, 7).await, 1);
    env.config.shards = stored.clone();

    // SHOW PROXIES lists the registry; this proxy routes by epoch 3.
    let admin = env.client("admin").await;
    let listed = rows(
        &admin
            .simple_query("SHOW PROXIES")
            .await
            .expect("SHOW PROXIES"),
    );
    let this: Vec<&Vec<String>> = listed.iter().filter(|r| r[6] == "true").collect();
    assert_eq!(this.len(), 1, "{listed:?}");
    assert_eq!(this[0][5], "true", "alive");
    assert_eq!(this[0][7], "5", "ring epoch");
}

/// Waits until ring epoch `epoch` is the active one (a migration finished).
async fn wait_for_epoch(env: &Env, epoch: i64) {
    for _ in 0..600 {
        let e = epochs(env).await;
        if e.iter()
            .any(|(n, _, state)| *n == epoch && state == "active")
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "ring epoch {epoch} never became active: {:?}",
        epochs(env).await
    );
}

/// How many tasks of `performer` a read through the proxy returns.
async fn read_row(env: &Env, performer: i64) -> usize {
    env.client("tasks")
        .await
        .simple_query(&format!(
            "SELECT id FROM tasks WHERE performer_id = {performer}"
        ))
        .await
        .expect("read")
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count()
}

fn row_count(messages: &[tokio_postgres::SimpleQueryMessage]) -> usize {
    messages
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count()
}

/// `ADD SHARD` applies the shard schema, then changes the ring through the same rule as a
/// RELOAD: recorded at once while every shard is empty, moved online once one holds rows;
/// `REMOVE SHARD` likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_shard_from_the_console() {
    let mut env = Env::start(2).await;
    // A slow follower (it would switch the ring up to 6 s after the move): the proxy that
    // finished the move must route by the new ring without it (SHOW SHARDS below).
    env.stop_proxy().await;
    env.config.reshard.poll_ms = 6000;
    env.start_proxy().await;
    env.shard(1)
        .await
        .simple_query("CREATE DATABASE tasks3")
        .await
        .expect("create database");
    let url = shard_url(env.shards.ports()[1]).replace("/tasks", "/tasks3");
    let admin = env.client("admin").await;
    admin
        .simple_query(&format!("ADD SHARD shard-3 '{url}'"))
        .await
        .expect("ADD SHARD while every shard is empty");
    let c3 = env.shards[1].client("tasks3").await.expect("client");
    c3.query_one("SELECT count(*) FROM task_observers", &[])
        .await
        .expect("the new shard has the schema");
    let shards = admin
        .simple_query("SHOW SHARDS")
        .await
        .expect("SHOW SHARDS");
    assert_eq!(row_count(&shards), 3);
    assert_eq!(epochs(&env).await.len(), 2);

    let c = env.client("tasks").await;
    c.simple_query("INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (1, 7, 1, 't')")
        .await
        .expect("insert");
    admin
        .simple_query("REMOVE SHARD shard-3")
        .await
        .expect("REMOVE SHARD with rows starts an online migration");
    wait_for_epoch(&env, 3).await;
    assert_eq!(read_row(&env, 7).await, 1, "the row survived the move");
    // The owner reloads right after recording the epoch active: allow it that moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let listed = loop {
        let shards = admin
            .simple_query("SHOW SHARDS")
            .await
            .expect("SHOW SHARDS");
        if row_count(&shards) == 2 || std::time::Instant::now() > deadline {
            break row_count(&shards);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(listed, 2, "the finished move's ring, without its follower");
    assert_eq!(epochs(&env).await.len(), 3);
}

/// Proxies started at the same moment over empty metadata all see no stored ring and all
/// record epoch 1; one wins. The others used to fail to start ("another proxy recorded
/// ring epoch 1 at the same time") — seen when the benchmark started its two proxies
/// together. Now they compare again with the ring that won and adopt it. The test makes
/// the race certain: it holds a lock that lets both proxies read the (empty) ring table
/// but not write it until both have tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_started_together_over_empty_metadata_all_start() {
    let mut env = Env::start(2).await;
    env.stop_proxy().await;
    let mut auth = env.auth.client().await.expect("auth client");
    auth.batch_execute("DELETE FROM taskflow_meta.ring_epochs")
        .await
        .expect("no stored ring");
    let gate = auth.transaction().await.expect("begin");
    gate.batch_execute("LOCK TABLE taskflow_meta.ring_epochs IN SHARE MODE")
        .await
        .expect("reads pass, writes wait");
    let starts: Vec<_> = (0..2)
        .map(|i| {
            let mut config = env.config.clone();
            config.state_dir = env.dir.path().join(format!("state-{i}"));
            tokio::spawn(async move { server::start(config, None, CancellationToken::new()).await })
        })
        .collect();
    let watcher = env.auth.client().await.expect("auth client");
    let mut waiting = 0;
    for _ in 0..300 {
        waiting = watcher
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = 'ring_epochs' AND NOT l.granted",
                &[],
            )
            .await
            .expect("lock waits")
            .get::<_, i64>(0);
        if waiting == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(waiting, 2, "both proxies try to record a ring");
    gate.commit().await.expect("let them write");
    let mut running = Vec::new();
    for (i, start) in starts.into_iter().enumerate() {
        match start.await.expect("start task") {
            Ok((r, _)) => running.push(r),
            Err(e) => panic!("proxy {i} did not start: {e}"),
        }
    }
    let adopted: Vec<i64> = running
        .iter()
        .map(|r| {
            r.proxy
                .ring_epoch
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .collect();
    assert_eq!(
        adopted,
        vec![1, 1],
        "both proxies route by the one recorded epoch"
    );
    assert_eq!(epochs(&env).await.len(), 1, "one epoch recorded");
    for r in running {
        r.stop(std::time::Duration::from_secs(2)).await;
    }
}
