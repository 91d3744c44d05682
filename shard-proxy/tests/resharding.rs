//! Online migration (issue 9): shards are added and removed while clients read and write
//! through the proxy, and nothing is lost, duplicated or left on a shard that does not own
//! it.
//!
//! The workload: writers, each owning a disjoint set of performers, insert, update,
//! re-assign (performer change within their own set) and delete tasks, and after every
//! acknowledged write check that a point read of the performer returns exactly the model's
//! rows. A reader checks, over and over, that a key-less count of rows nobody touches
//! (`title = 'static'`) never changes — a scatter read during a move sees each row once. A
//! statement refused by the migration guard (SQLSTATE 40001) is retried; each one is
//! counted. At the end every row sits on its owner under the final ring and the shards'
//! union equals the model exactly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{rows, shard_url, Env};
use taskflow_shard_proxy::config::ShardConfig;
use taskflow_shard_proxy::proxy_core::ring::Ring;
use tokio_postgres::{Client, SimpleQueryMessage};

/// Rows nobody changes during the run (checked by key-less counts).
const STATIC_ROWS: i64 = 600;
/// Performers per writer.
const PERFORMERS: i64 = 40;

/// A shard-4 database with the shard schema on cluster `cluster`.
async fn spare_shard(env: &Env, cluster: usize, db: &str, name: &str) -> ShardConfig {
    env.shard(cluster)
        .await
        .simple_query(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create database");
    ShardConfig {
        name: name.into(),
        url: shard_url(env.shards.ports()[cluster]).replace("/tasks", &format!("/{db}")),
    }
}

/// Fills the shards through the proxy: static rows and each writer's starting tasks.
async fn seed(c: &Client, writers: i64) -> BTreeMap<i64, i64> {
    let mut model = BTreeMap::new();
    let mut values = Vec::new();
    for i in 0..STATIC_ROWS {
        values.push(format!("({}, {}, 1, 'static')", 1_000_000 + i, 5_000 + i));
    }
    for w in 0..writers {
        for p in 0..PERFORMERS {
            let performer = w * 1000 + p;
            for k in 0..3 {
                let id = 10_000_000 + performer * 10 + k;
                values.push(format!("({id}, {performer}, 1, 'seed')"));
                model.insert(id, performer);
            }
        }
    }
    for chunk in values.chunks(200) {
        c.simple_query(&format!(
            "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES {}",
            chunk.join(", ")
        ))
        .await
        .expect("seed");
    }
    model
}

/// Whether an error is the migration's retryable refusal.
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == "40001")
}

struct Counters {
    writes: AtomicU64,
    retries: AtomicU64,
    reads: AtomicU64,
}

/// One writer: owns performers `w*1000 ..`, keeps its model, checks its point reads.
async fn writer(
    port: u16,
    w: i64,
    mut model: BTreeMap<i64, i64>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> BTreeMap<i64, i64> {
    let c = common::client_at(port, "tasks").await;
    let mut next_id = 20_000_000 + w * 1_000_000;
    let mut step: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        step += 1;
        let performer = w * 1000 + (step * 7) % PERFORMERS;
        let other = w * 1000 + (step * 13 + 5) % PERFORMERS;
        let mine: Vec<i64> = model
            .iter()
            .filter(|(_, p)| **p == performer)
            .map(|(id, _)| *id)
            .collect();
        // Alternate: insert (simple protocol), update (extended), re-assign, delete.
        let result = match step % 4 {
            0 => {
                next_id += 1;
                c.simple_query(&format!(
                    "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ({next_id}, {performer}, 1, 'w')"
                ))
                .await
                .map(|_| Some((next_id, Some(performer))))
            }
            1 => match mine.first() {
                Some(id) => c
                    .execute(
                        "UPDATE tasks SET status = 'in_progress', version = version + 1 WHERE performer_id = $1 AND id = $2",
                        &[&performer, id],
                    )
                    .await
                    .map(|_| None),
                None => Ok(None),
            },
            2 => match mine.first() {
                // A performer change: delete + insert in one transaction (the key moves).
                Some(id) => reassign(&c, *id, performer, other).await.map(|_| Some((*id, Some(other)))),
                None => Ok(None),
            },
            _ => match mine.last() {
                Some(id) if mine.len() > 1 => c
                    .execute(
                        "DELETE FROM tasks WHERE performer_id = $1 AND id = $2",
                        &[&performer, id],
                    )
                    .await
                    .map(|_| Some((*id, None))),
                _ => Ok(None),
            },
        };
        match result {
            Ok(change) => {
                counters.writes.fetch_add(1, Ordering::Relaxed);
                match change {
                    Some((id, Some(p))) => {
                        model.insert(id, p);
                    }
                    Some((id, None)) => {
                        model.remove(&id);
                    }
                    None => {}
                }
            }
            Err(e) if retryable(&e) => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) if unavailable(&e) => {
                // A shard is down: the write may or may not have committed. Learn which
                // from the shards once they answer, so the model stays exact.
                counters.retries.fetch_add(1, Ordering::Relaxed);
                let id = match step % 4 {
                    0 => Some(next_id),
                    1 => None,
                    2 => mine.first().copied(),
                    _ => mine.last().copied(),
                };
                if let Some(id) = id {
                    match owner_of(&c, id, &[performer, other]).await {
                        Some(p) => model.insert(id, p),
                        None => model.remove(&id),
                    };
                }
                continue;
            }
            Err(e) => panic!("writer {w}: {e:?}"),
        }
        check_point_read(&c, &model, performer, &counters).await;
        check_pair_read(&c, &model, [performer, other], &counters).await;
    }
    model
}

/// A read of two performers (often on two shards: a multi-shard read) returns exactly the
/// model's rows of both.
async fn check_pair_read(
    c: &Client,
    model: &BTreeMap<i64, i64>,
    pair: [i64; 2],
    counters: &Counters,
) {
    let want: BTreeSet<i64> = model
        .iter()
        .filter(|(_, p)| pair.contains(p))
        .map(|(id, _)| *id)
        .collect();
    for _ in 0..600 {
        match c
            .query(
                "SELECT id FROM tasks WHERE performer_id IN ($1, $2)",
                &[&pair[0], &pair[1]],
            )
            .await
        {
            Ok(rows) => {
                let got: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                let set: BTreeSet<i64> = got.iter().copied().collect();
                assert_eq!(
                    got.len(),
                    set.len(),
                    "performers {pair:?}: a row read twice"
                );
                assert_eq!(
                    set, want,
                    "performers {pair:?}: read differs from the model"
                );
                counters.reads.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) if retryable(&e) || unavailable(&e) => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("pair read: {e:?}"),
        }
    }
    panic!("performers {pair:?}: read kept failing");
}

/// A shard is down or going down: the connection to it failed (08…), it was shut down
/// under the statement (57P01, 57P02 — relayed as ERROR: the client's session survives),
/// or it is still starting (57P03).
fn unavailable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        c.code().starts_with("08") || matches!(c.code(), "57P01" | "57P02" | "57P03")
    })
}

/// Which of `performers` holds task `id` now (retried until the shards answer).
async fn owner_of(c: &Client, id: i64, performers: &[i64]) -> Option<i64> {
    for _ in 0..600 {
        match c
            .query(
                "SELECT performer_id FROM tasks WHERE performer_id = ANY($1) AND id = $2",
                &[&performers, &id],
            )
            .await
        {
            Ok(rows) => return rows.first().map(|r| r.get(0)),
            Err(e) if retryable(&e) || unavailable(&e) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("owner of {id}: {e:?}"),
        }
    }
    panic!("task {id}: the shards did not answer for a minute");
}

/// Moves task `id` from `from` to `to` in one client transaction.
async fn reassign(c: &Client, id: i64, from: i64, to: i64) -> Result<(), tokio_postgres::Error> {
    // Two single-key statements in one explicit transaction (they may sit on two shards).
    c.batch_execute("BEGIN").await?;
    let r = async {
        let row = c
            .query_one(
                "SELECT title FROM tasks WHERE performer_id = $1 AND id = $2",
                &[&from, &id],
            )
            .await?;
        let title: String = row.get(0);
        c.execute(
            "DELETE FROM tasks WHERE performer_id = $1 AND id = $2",
            &[&from, &id],
        )
        .await?;
        c.execute(
            "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, $3)",
            &[&id, &to, &title],
        )
        .await?;
        c.batch_execute("COMMIT").await
    }
    .await;
    if r.is_err() {
        let _ = c.batch_execute("ROLLBACK").await;
    }
    r
}

/// A point read of `performer` must return exactly the model's ids (retried on 40001).
async fn check_point_read(
    c: &Client,
    model: &BTreeMap<i64, i64>,
    performer: i64,
    counters: &Counters,
) {
    let want: BTreeSet<i64> = model
        .iter()
        .filter(|(_, p)| **p == performer)
        .map(|(id, _)| *id)
        .collect();
    for _ in 0..50 {
        match c
            .query(
                "SELECT id FROM tasks WHERE performer_id = $1",
                &[&performer],
            )
            .await
        {
            Ok(rows) => {
                let got: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                let set: BTreeSet<i64> = got.iter().copied().collect();
                assert_eq!(
                    got.len(),
                    set.len(),
                    "performer {performer}: a row read twice"
                );
                assert_eq!(
                    set, want,
                    "performer {performer}: point read differs from the model"
                );
                counters.reads.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) if retryable(&e) || unavailable(&e) => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("point read: {e:?}"),
        }
    }
    panic!("performer {performer}: point read kept failing");
}

/// Key-less counts of the static rows, until `stop`: never more or fewer.
async fn static_reader(port: u16, stop: Arc<AtomicBool>, counters: Arc<Counters>) {
    let c = common::client_at(port, "tasks").await;
    while !stop.load(Ordering::Relaxed) {
        match c
            .simple_query("SELECT count(*) FROM tasks WHERE title = 'static'")
            .await
        {
            Ok(m) => {
                let n: i64 = rows(&m)[0][0].parse().expect("count");
                assert_eq!(
                    n, STATIC_ROWS,
                    "a scatter read saw a moved row twice or not at all"
                );
                counters.reads.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if retryable(&e) || unavailable(&e) => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("scatter count: {e:?}"),
        }
    }
}

/// The newest migration's row of `SHOW MIGRATIONS`, by column name.
async fn newest_migration(admin: &Client) -> Option<BTreeMap<String, String>> {
    let m = admin
        .simple_query("SHOW MIGRATIONS")
        .await
        .expect("SHOW MIGRATIONS");
    let SimpleQueryMessage::Row(r) = m.iter().find(|m| matches!(m, SimpleQueryMessage::Row(_)))?
    else {
        return None;
    };
    Some(
        r.columns()
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or_default().to_owned()))
            .collect(),
    )
}

async fn wait_done(admin: &Client, timeout: Duration) -> BTreeMap<String, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(m) = newest_migration(admin).await {
            if m["state"] == "done" {
                return m;
            }
            assert_ne!(m["state"], "failed", "{m:?}");
            if tokio::time::Instant::now() > deadline {
                panic!("migration not done in {timeout:?}: {m:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every row of every shard: (shard name, id, performer).
async fn all_rows(env: &Env, shards: &[(String, usize, String)]) -> Vec<(String, i64, i64)> {
    let mut out = Vec::new();
    for (name, cluster, db) in shards {
        let c = env.shards[*cluster]
            .client(db)
            .await
            .expect("direct client");
        for r in c
            .query("SELECT id, performer_id FROM tasks", &[])
            .await
            .expect("rows")
        {
            out.push((name.clone(), r.get(0), r.get(1)));
        }
    }
    out
}

/// Every row on its owner under `ring`, each id once, and exactly the model's rows.
fn check_placement(rows: &[(String, i64, i64)], ring: &Ring, model: &BTreeMap<i64, i64>) {
    let mut seen = BTreeMap::new();
    for (shard, id, performer) in rows {
        assert_eq!(
            ring.shard_name_for(*performer),
            shard,
            "task {id} of performer {performer} is on {shard}, not its owner"
        );
        assert!(
            seen.insert(*id, *performer).is_none(),
            "task {id} is on two shards"
        );
    }
    let only_model: BTreeMap<i64, i64> = seen
        .into_iter()
        .filter(|(id, _)| *id < 1_000_000 || *id >= 2_000_000)
        .collect();
    assert_eq!(
        &only_model, model,
        "the shards' rows differ from the acknowledged writes"
    );
}

/// Runs the workload while `change` runs; returns the final model.
async fn under_workload<F, Fut>(port: u16, change: F) -> BTreeMap<i64, i64>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let writers = 3;
    let c = common::client_at(port, "tasks").await;
    let model = seed(&c, writers).await;
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters {
        writes: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        reads: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    for w in 0..writers {
        let m: BTreeMap<i64, i64> = model
            .iter()
            .filter(|(_, p)| **p / 1000 == w)
            .map(|(a, b)| (*a, *b))
            .collect();
        tasks.push(tokio::spawn(writer(
            port,
            w,
            m,
            stop.clone(),
            counters.clone(),
        )));
    }
    let reader = tokio::spawn(static_reader(port, stop.clone(), counters.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    change().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut model = BTreeMap::new();
    for t in tasks {
        model.extend(t.await.expect("writer"));
    }
    reader.await.expect("reader");
    eprintln!(
        "workload: {} writes, {} reads, {} retried (40001)",
        counters.writes.load(Ordering::Relaxed),
        counters.reads.load(Ordering::Relaxed),
        counters.retries.load(Ordering::Relaxed)
    );
    assert!(
        counters.writes.load(Ordering::Relaxed) > 20,
        "the workload ran"
    );
    model
}

/// ADD SHARD under traffic moves exactly the keys the new ring gives shard-4; REMOVE SHARD
/// moves them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_and_remove_a_shard_online_under_traffic() {
    let mut env = Env::start(3).await;
    let fourth = spare_shard(&env, 0, "tasks4", "shard-4").await;
    let admin = env.client("admin").await;
    let url = fourth.url.clone();
    let model = under_workload(env.addr().port(), || async {
        admin
            .simple_query(&format!("ADD SHARD shard-4 '{url}'"))
            .await
            .expect("ADD SHARD with rows starts a migration");
        let m = wait_done(&admin, Duration::from_secs(120)).await;
        eprintln!("ADD SHARD: {m:?}");
        assert_eq!(m["change"], "adds shard-4");
        assert_eq!(m["arcs_done"], m["arcs_total"]);
    })
    .await;
    let four = vec![
        ("shard-1".to_string(), 0, "tasks".to_string()),
        ("shard-2".to_string(), 1, "tasks".to_string()),
        ("shard-3".to_string(), 2, "tasks".to_string()),
        ("shard-4".to_string(), 0, "tasks4".to_string()),
    ];
    let ring4 = Ring::new(["shard-1", "shard-2", "shard-3", "shard-4"], 256).expect("ring");
    let rows4 = all_rows(&env, &four).await;
    assert!(
        rows4.iter().any(|r| r.0 == "shard-4"),
        "shard-4 received rows"
    );
    check_placement(&rows4, &ring4, &model);
    assert_eq!(
        common::prepared_count(&env).await,
        0,
        "no prepared transaction left"
    );
    env.config.shards.push(fourth);
    env.client("tasks")
        .await
        .simple_query("DELETE FROM tasks")
        .await
        .expect("key-less DELETE on four shards");

    let model = under_workload(env.addr().port(), || async {
        admin
            .simple_query("REMOVE SHARD shard-4")
            .await
            .expect("REMOVE SHARD with rows starts a migration");
        let m = wait_done(&admin, Duration::from_secs(120)).await;
        assert_eq!(m["change"], "removes shard-4");
    })
    .await;
    let ring3 = Ring::new(["shard-1", "shard-2", "shard-3"], 256).expect("ring");
    let rows3 = all_rows(&env, &four).await;
    assert!(rows3.iter().all(|r| r.0 != "shard-4"), "shard-4 drained");
    check_placement(&rows3, &ring3, &model);
    env.config.shards.pop();
    let shards = admin
        .simple_query("SHOW SHARDS")
        .await
        .expect("SHOW SHARDS");
    assert_eq!(rows(&shards).len(), 3);
}

/// Two proxies over the same shards; the one driving the move is SIGKILLed in the middle
/// of it: the other takes the migration over (after `metadata.dead_after_secs`), recovery
/// finishes or rolls back what the dead one left prepared, the workload on the survivor
/// never sees a row missing or twice, and the restarted proxy routes by the new ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_killed_mid_move_is_replaced_and_nothing_is_lost() {
    let mut env = Env::start(3).await;
    let fourth = spare_shard(&env, 1, "tasks4", "shard-4").await;
    let c = env.client("tasks").await;
    let model = seed(&c, 3).await;
    drop(c);
    env.stop_proxy().await;
    let small_batches = "[reshard]\nbatch_rows = 10\npoll_ms = 100\n";
    let a = common::ProxyProc::with(&env, "proxy-a", small_batches);
    let b = common::ProxyProc::with(&env, "proxy-b", small_batches);
    let mut a_child = a.spawn(None).await;
    let admin_a = common::client_at(a.port, "admin").await;
    admin_a
        .simple_query(&format!("ADD SHARD shard-4 '{}'", fourth.url))
        .await
        .expect("ADD SHARD");
    // A drives the move (it is the only proxy); slow it down so the kill lands mid-move.
    for _ in 0..100 {
        if newest_migration(&admin_a)
            .await
            .is_some_and(|m| m["owner"] == "proxy-a")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin_a
        .simple_query("SET MIGRATION THROTTLE 100")
        .await
        .expect("throttle");
    let mut b_child = b.spawn(None).await;
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters {
        writes: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        reads: AtomicU64::new(0),
    });
    let mut writers = Vec::new();
    for w in 0..3 {
        let m: BTreeMap<i64, i64> = model
            .iter()
            .filter(|(_, p)| **p / 1000 == w)
            .map(|(a, b)| (*a, *b))
            .collect();
        writers.push(tokio::spawn(writer(
            b.port,
            w,
            m,
            stop.clone(),
            counters.clone(),
        )));
    }
    let reader = tokio::spawn(static_reader(b.port, stop.clone(), counters.clone()));
    // Kill A once some batches moved and some remain.
    let admin_b = common::client_at(b.port, "admin").await;
    let mut killed_at = None;
    for _ in 0..400 {
        let m = newest_migration(&admin_b).await.expect("migration");
        let done: u32 = m["arcs_done"].parse().unwrap_or(0);
        let total: u32 = m["arcs_total"].parse().unwrap_or(0);
        if done >= 3 && done < total {
            killed_at = Some((done, total));
            break;
        }
        assert_ne!(
            m["state"], "done",
            "the move finished before the kill: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let killed_at = killed_at.expect("the move made progress");
    a_child.kill().await.expect("SIGKILL the owner mid-move");
    eprintln!("owner killed at {killed_at:?} arcs");
    admin_b
        .simple_query("SET MIGRATION THROTTLE 0")
        .await
        .expect("unthrottle");
    let m = wait_done(&admin_b, Duration::from_secs(120)).await;
    assert_eq!(
        m["owner"], "proxy-b",
        "the survivor took the migration over: {m:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let mut model = BTreeMap::new();
    for t in writers {
        model.extend(t.await.expect("writer"));
    }
    reader.await.expect("reader");
    eprintln!(
        "workload: {} writes, {} reads, {} retried (40001)",
        counters.writes.load(Ordering::Relaxed),
        counters.reads.load(Ordering::Relaxed),
        counters.retries.load(Ordering::Relaxed)
    );
    // Recovery on B resolved whatever A left prepared.
    for _ in 0..100 {
        if common::prepared_count(&env).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        common::prepared_count(&env).await,
        0,
        "prepared transactions left"
    );
    let four = vec![
        ("shard-1".to_string(), 0, "tasks".to_string()),
        ("shard-2".to_string(), 1, "tasks".to_string()),
        ("shard-3".to_string(), 2, "tasks".to_string()),
        ("shard-4".to_string(), 1, "tasks4".to_string()),
    ];
    let ring4 = Ring::new(["shard-1", "shard-2", "shard-3", "shard-4"], 256).expect("ring");
    check_placement(&all_rows(&env, &four).await, &ring4, &model);
    // A restarted with its old (three-shard) file refuses, naming the migration that
    // replaced that ring (it would otherwise move the rows back); with the new list it
    // starts and routes by the new ring.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_taskflow-shard-proxy"))
            .arg("--config")
            .arg(&a.cfg)
            .env("TASKFLOW_LOG__FORMAT", "text")
            .output(),
    )
    .await
    .expect("the stale proxy exits")
    .expect("run proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a stale shard list");
    assert!(stderr.contains("finished migration replaced"), "{stderr}");
    env.config.shards.push(fourth.clone());
    let a = common::ProxyProc::with(&env, "proxy-a", small_batches);
    let mut a_child = a.spawn(None).await;
    let admin_a = common::client_at(a.port, "admin").await;
    let shards = admin_a
        .simple_query("SHOW SHARDS")
        .await
        .expect("SHOW SHARDS");
    assert_eq!(
        rows(&shards).len(),
        4,
        "the restarted proxy routes by the new ring"
    );
    a_child.kill().await.expect("stop A");
    b_child.kill().await.expect("stop B");
}

/// A source shard stopped for a few seconds in the middle of the move: the move pauses
/// (its error visible in SHOW MIGRATIONS), resumes when the shard is back, and the
/// workload's acknowledged writes are all there, once, on their owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_shard_down_mid_move_pauses_the_move() {
    let mut env = Env::start(3).await;
    let fourth = spare_shard(&env, 0, "tasks4", "shard-4").await;
    let admin = env.client("admin").await;
    let url = fourth.url.clone();
    let port = env.addr().port();
    let shards = &mut env.shards;
    let model = under_workload(port, || async move {
        admin
            .simple_query(&format!("ADD SHARD shard-4 '{url}'"))
            .await
            .expect("ADD SHARD");
        admin
            .simple_query("SET MIGRATION THROTTLE 100")
            .await
            .expect("throttle");
        for _ in 0..400 {
            let m = newest_migration(&admin).await.expect("migration");
            if m["arcs_done"].parse::<u32>().unwrap_or(0) >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        shards[1].stop().await.expect("stop shard-2");
        let mut saw_error = false;
        for _ in 0..40 {
            let m = newest_migration(&admin).await.expect("migration");
            if !m["error"].is_empty() {
                saw_error = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        shards[1].start().await.expect("restart shard-2");
        assert!(saw_error, "the move recorded why it waits");
        admin
            .simple_query("SET MIGRATION THROTTLE 0")
            .await
            .expect("unthrottle");
        let m = wait_done(&admin, Duration::from_secs(120)).await;
        assert!(m["error"].is_empty(), "{m:?}");
    })
    .await;
    let four = vec![
        ("shard-1".to_string(), 0, "tasks".to_string()),
        ("shard-2".to_string(), 1, "tasks".to_string()),
        ("shard-3".to_string(), 2, "tasks".to_string()),
        ("shard-4".to_string(), 0, "tasks4".to_string()),
    ];
    let ring4 = Ring::new(["shard-1", "shard-2", "shard-3", "shard-4"], 256).expect("ring");
    check_placement(&all_rows(&env, &four).await, &ring4, &model);
    env.stop_proxy().await;
}

/// The console's migration commands: clear errors without a migration and on bad input;
/// PAUSE MIGRATION holds the move (no arc moves while paused), RESUME MIGRATION finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_throttle_from_the_console() {
    let env = Env::start(2).await;
    let admin = env.client("admin").await;
    let err = admin
        .simple_query("PAUSE MIGRATION")
        .await
        .expect_err("nothing to pause");
    assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err:?}");
    assert!(format!("{err:?}").contains("no migration is unfinished"));
    let err = admin
        .simple_query("SET MIGRATION THROTTLE fast")
        .await
        .expect_err("not a number");
    assert!(
        format!("{err:?}").contains("usage: SET MIGRATION THROTTLE"),
        "{err:?}"
    );
    assert!(newest_migration(&admin).await.is_none(), "no migration yet");

    let c = env.client("tasks").await;
    let listed = rows(
        &c.simple_query("SHOW taskflow.shards")
            .await
            .expect("SHOW taskflow.shards"),
    );
    assert_eq!(
        listed,
        vec![vec!["shard-1".to_string()], vec!["shard-2".to_string()]]
    );
    seed(&c, 2).await;
    let third = spare_shard(&env, 1, "tasks3", "shard-3").await;
    // A live proxy that never acknowledges holds the migration in `waiting` until the
    // pause is in place.
    let auth = env.auth.client().await.expect("auth client");
    auth.simple_query(
        "INSERT INTO taskflow_meta.proxies (instance_id, addr, pid, version, ring_view) \
         VALUES ('silent', '127.0.0.1:1', 1, 'test', 0)",
    )
    .await
    .expect("silent proxy");
    admin
        .simple_query(&format!("ADD SHARD shard-3 '{}'", third.url))
        .await
        .expect("ADD SHARD");
    admin.simple_query("PAUSE MIGRATION").await.expect("pause");
    auth.simple_query("DELETE FROM taskflow_meta.proxies WHERE instance_id = 'silent'")
        .await
        .expect("forget the silent proxy");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = newest_migration(&admin).await.expect("migration");
    assert_eq!(held["state"], "paused", "{held:?}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let later = newest_migration(&admin).await.expect("migration");
    assert_eq!(
        held["arcs_done"], later["arcs_done"],
        "no arc moves while paused"
    );
    assert_eq!(later["arcs_done"], "0", "{later:?}");
    // Clients that visit every shard see the one being added as soon as it may hold rows.
    let listed = rows(&c.simple_query("show TASKFLOW.SHARDS;").await.expect("SHOW"));
    assert_eq!(listed.len(), 3, "{listed:?}");
    let err = admin
        .simple_query("PAUSE MIGRATION")
        .await
        .expect_err("already paused");
    assert!(format!("{err:?}").contains("is paused"), "{err:?}");
    admin
        .simple_query("SET MIGRATION THROTTLE 0")
        .await
        .expect("throttle");
    admin
        .simple_query("RESUME MIGRATION")
        .await
        .expect("resume");
    let done = wait_done(&admin, Duration::from_secs(60)).await;
    assert_eq!(done["arcs_done"], done["arcs_total"]);
    assert!(
        done["rows_moved"].parse::<u64>().unwrap_or(0) > 0,
        "{done:?}"
    );
}

/// Direct clients of shard-1, shard-2 and the shard-3 that `spare_shard(env, 1, "tasks3",
/// …)` made, in ring order.
async fn three_shards(env: &Env) -> [Client; 3] {
    [
        env.shard(0).await,
        env.shard(1).await,
        env.shards[1].client("tasks3").await.expect("shard-3"),
    ]
}

/// The performer of every row of `table` on the three shards, each checked to sit on its
/// owner by the three-shard ring.
async fn rows_on_their_owners(env: &Env, table: &str) -> Vec<i64> {
    let ring = Ring::new(["shard-1", "shard-2", "shard-3"], 256).expect("ring");
    let mut performers = Vec::new();
    for (i, s) in three_shards(env).await.iter().enumerate() {
        for r in s
            .query(&format!("SELECT performer_id FROM {table}"), &[])
            .await
            .expect("rows")
        {
            let p: i64 = r.get(0);
            assert_eq!(
                ring.shard_for(p),
                i,
                "{table} row of performer {p} left on shard #{i}"
            );
            performers.push(p);
        }
    }
    performers
}

/// Every sharded table of a performer moves with it, value for value: tasks (NULL-free
/// defaults, Unicode, quotes, timestamps), task_observers, and outbox rows (jsonb, NULL
/// `sent_at`, the serial id renumbered by the destination, relative order kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_of_a_performer_moves_value_for_value() {
    let env = Env::start(2).await;
    let c = env.client("tasks").await;
    let performers: Vec<i64> = (1..=60).collect();
    for &p in &performers {
        let title = format!("t{p} «ünïcødé» 'quoted' \\ back\tslash");
        c.execute(
            "INSERT INTO tasks (id, performer_id, creator_id, title, description, status, created_at) \
             VALUES ($1, $2, 3, $3, repeat('x', ($2::bigint * 37)::int), 'in_progress', \
                     '2026-01-02 03:04:05.678901+00'::timestamptz + $2::bigint * interval '1 hour')",
            &[&(p * 10), &p, &title],
        )
        .await
        .expect("task");
        c.execute(
            "INSERT INTO task_observers (task_id, performer_id, user_id) VALUES ($1, $2, 1), ($1, $2, 2)",
            &[&(p * 10), &p],
        )
        .await
        .expect("observers");
        for n in 0..2i64 {
            c.execute(
                "INSERT INTO outbox (performer_id, event_id, topic, key, payload, sent_at) \
                 VALUES ($1, gen_random_uuid(), 'task_events', $2, \
                         jsonb_build_object('n', $3::bigint, 'nested', jsonb_build_array(1, 'a', NULL)), \
                         CASE WHEN $3::bigint = 0 THEN now() END)",
                &[&p, &format!("{}", p * 10), &n],
            )
            .await
            .expect("outbox");
        }
    }
    // One line per row, serial ids left out (they are renumbered), the outbox's relative
    // order per performer kept as an ordinal.
    let snapshot = |shards: Vec<Client>| async move {
        let mut lines = Vec::new();
        for s in shards {
            for q in [
                "SELECT format('task %s %s %s %s %s %s %s %s', id, performer_id, creator_id, title, \
                 md5(description), status, version, created_at) FROM tasks",
                "SELECT format('observer %s %s %s', task_id, performer_id, user_id) FROM task_observers",
                "SELECT format('outbox %s %s %s %s %s %s', performer_id, \
                 row_number() OVER (PARTITION BY performer_id ORDER BY id), topic, key, payload, \
                 sent_at IS NULL) FROM outbox",
            ] {
                for r in s.query(q, &[]).await.expect("snapshot") {
                    lines.push(r.get::<_, String>(0));
                }
            }
        }
        lines.sort();
        lines
    };
    let before = snapshot(vec![env.shard(0).await, env.shard(1).await]).await;
    assert_eq!(before.len(), 60 * 5);

    let third = spare_shard(&env, 1, "tasks3", "shard-3").await;
    let admin = env.client("admin").await;
    admin
        .simple_query(&format!("ADD SHARD shard-3 '{}'", third.url))
        .await
        .expect("ADD SHARD");
    let done = wait_done(&admin, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "done", "{done:?}");
    let [one, two, three] = three_shards(&env).await;
    let moved: i64 = three
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .expect("count")
        .get(0);
    assert!(moved > 0, "shard-3 took outbox rows");
    let after = snapshot(vec![one, two, three]).await;
    assert_eq!(after, before, "every row arrived unchanged, once");

    // Every table's rows sit with their performer's owner.
    for table in ["tasks", "task_observers", "outbox"] {
        rows_on_their_owners(&env, table).await;
    }
}

/// A batch starts from the keys the mover's survey saw, plus the keys of rows written
/// since the survey began: performers whose first row is written mid-move, in arcs not
/// moved yet, move too (none is left behind on the source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_first_written_mid_move_move_too() {
    let mut env = Env::start(2).await;
    let third = spare_shard(&env, 1, "tasks3", "shard-3").await;
    let c = env.client("tasks").await;
    let insert = "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, 't')";
    for p in 1..=200i64 {
        c.execute(insert, &[&p, &p]).await.expect("seed");
    }
    drop(c);
    env.stop_proxy().await;
    let proxy =
        common::ProxyProc::with(&env, "slow", "[reshard]\nbatch_rows = 10\npoll_ms = 100\n");
    let _child = proxy.spawn(None).await;
    let admin = common::client_at(proxy.port, "admin").await;
    admin
        .simple_query(&format!("ADD SHARD shard-3 '{}'", third.url))
        .await
        .expect("ADD SHARD");
    admin
        .simple_query("SET MIGRATION THROTTLE 20")
        .await
        .expect("throttle");
    // The survey precedes the first batch.
    let mut surveyed = false;
    for _ in 0..300 {
        let m = newest_migration(&admin).await.expect("migration");
        let done: u32 = m["arcs_done"].parse().unwrap_or(0);
        let total: u32 = m["arcs_total"].parse().unwrap_or(0);
        assert_ne!(m["state"], "done", "the move finished too early: {m:?}");
        if done >= 1 && done * 2 < total {
            surveyed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(surveyed, "the move never started");
    let c = proxy.client().await;
    for p in 100_001..=100_300i64 {
        loop {
            match c.execute(insert, &[&p, &p]).await {
                Ok(_) => break,
                Err(e) if retryable(&e) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("insert {p}: {e:?}"),
            }
        }
    }
    let still_moving = newest_migration(&admin).await.expect("migration");
    assert_ne!(
        still_moving["state"], "done",
        "new keys written after the move"
    );
    admin
        .simple_query("SET MIGRATION THROTTLE 0")
        .await
        .expect("unthrottle");
    let done = wait_done(&admin, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "done");

    let mut all = BTreeSet::new();
    for p in rows_on_their_owners(&env, "tasks").await {
        assert!(all.insert(p), "performer {p} twice");
    }
    assert_eq!(all.len(), 500);
}
