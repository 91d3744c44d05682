//! Several proxies over the same shards (issue 8, "Several proxies"): 2PC decisions live
//! in `taskflow_meta.decisions` on the auth cluster, every gid names its owner, and any
//! proxy's recovery finishes what a dead proxy decided and rolls back what it left
//! undecided — but never touches a live proxy's transaction. The scatter/commit fence
//! spans proxies: a reader on one proxy never sees a row moved by another proxy's
//! cross-shard commit missing or twice.

mod common;

use std::time::Duration;

use common::{prepared_count, Env, ProxyProc};

const INSERT: &str =
    "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, 't')";

/// Two performers owned by different shards.
fn two_on_different_shards(env: &Env) -> (i64, i64) {
    let ring = env.ring();
    let a = 1i64;
    let b = (2..1000)
        .find(|k| ring.shard_for(*k) != ring.shard_for(a))
        .expect("another shard");
    (a, b)
}

/// Waits until no shard holds a prepared transaction (another proxy's recovery).
async fn until_resolved(env: &Env, what: &str) {
    for _ in 0..300 {
        if prepared_count(env).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: prepared transactions left after 30 s");
}

/// Moves task `id` from performer `from` to `to` in one transaction through `c`; the
/// COMMIT runs in the background.
async fn start_move(
    c: tokio_postgres::Client,
    id: i64,
    from: i64,
    to: i64,
) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
    c.simple_query("BEGIN").await.expect("begin");
    c.execute(
        "DELETE FROM tasks WHERE performer_id = $1 AND id = $2",
        &[&from, &id],
    )
    .await
    .expect("delete from the old owner");
    c.execute(INSERT, &[&id, &to]).await.expect("insert");
    tokio::spawn(async move { c.simple_query("COMMIT").await.map(drop) })
}

/// Scatter-counts task `id` through `reader` until `until` finishes; every read must see
/// it exactly once. Returns how many reads ran.
async fn count_while<T>(
    reader: &tokio_postgres::Client,
    id: i64,
    until: &tokio::task::JoinHandle<T>,
) -> usize {
    let mut reads = 0;
    while !until.is_finished() {
        let n: i64 = reader
            .query_one("SELECT count(*) FROM tasks WHERE id = $1", &[&id])
            .await
            .expect("scatter count")
            .get(0);
        assert_eq!(n, 1, "a reader on the other proxy saw task {id} {n} times");
        reads += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_finish_each_others_transactions() {
    let mut env = Env::start(3).await;
    env.stop_proxy().await;
    let (a, b) = two_on_different_shards(&env);
    let ring = env.ring();
    let (pa, pb) = (
        ProxyProc::new(&env, "proxy-a"),
        ProxyProc::new(&env, "proxy-b"),
    );
    let _b_child = pb.spawn(None).await;
    let reader = pb.client().await;
    let seed = pb.client().await;
    for id in [100i64, 200] {
        seed.execute(INSERT, &[&id, &a]).await.expect("seed");
    }

    // 1. A live proxy's undecided transaction is left alone by the other's recovery
    //    (which runs every 5 s; A waits 7 s between PREPARE and its decision).
    let mut child = pa.spawn(Some("sleep-before-decision=7000")).await;
    let mover = start_move(pa.client().await, 100, a, b).await;
    let reads = count_while(&reader, 100, &mover).await;
    mover.await.expect("join").expect("A's commit stands");
    assert!(reads > 0);
    assert_eq!(env.holders(100).await, vec![ring.shard_for(b)]);
    child.kill().await.expect("kill A");

    // 2. The fence spans proxies: while A's COMMIT PREPAREDs are 3 s apart, B's scatter
    //    reads wait rather than see the row on neither or both shards. Then A is
    //    SIGKILLed between its COMMIT PREPAREDs: B's recovery finishes the commit.
    let mut child = pa.spawn(Some("sleep-between-commits=3000")).await;
    let mover = start_move(pa.client().await, 200, a, b).await;
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        child.kill().await.expect("SIGKILL A mid-commit");
    });
    count_while(&reader, 200, &killer).await;
    assert!(
        mover.await.expect("join").is_err(),
        "A died before answering"
    );
    until_resolved(&env, "a decided commit of a dead proxy").await;
    assert_eq!(env.holders(200).await, vec![ring.shard_for(b)]);

    // 3. A proxy dies after PREPARE, before deciding: B rolls its transaction back.
    let mut child = pa.spawn(Some("abort-before-decision")).await;
    let c = pa.client().await;
    c.simple_query("BEGIN").await.expect("begin");
    c.execute(INSERT, &[&300i64, &a]).await.expect("insert a");
    c.execute(INSERT, &[&301i64, &b]).await.expect("insert b");
    assert!(c.simple_query("COMMIT").await.is_err(), "A aborted");
    let _ = child.wait().await;
    assert!(prepared_count(&env).await > 0, "A left them prepared");
    until_resolved(&env, "an undecided transaction of a dead proxy").await;
    assert!(env.holders(300).await.is_empty() && env.holders(301).await.is_empty());

    // Every row exactly once, on its owner; every decision finished and forgotten.
    let n: i64 = reader
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2);
    let auth = env.auth.client().await.expect("auth client");
    let mut left = i64::MAX;
    for _ in 0..100 {
        left = auth
            .query_one(
                "SELECT count(*) FROM taskflow_meta.decisions WHERE outcome = 'commit'",
                &[],
            )
            .await
            .expect("decisions")
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "finished commit decisions are forgotten");
}

/// Moves the tasks `ids` between performers on different shards, one transaction per
/// move, until `stop` or an error (its proxy died). Returns the moves committed.
async fn mover(
    c: tokio_postgres::Client,
    ids: Vec<i64>,
    performers: Vec<i64>,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    let mut at: Vec<usize> = ids
        .iter()
        .map(|id| (*id as usize) % performers.len())
        .collect();
    let mut moves = 0;
    while !stop.is_cancelled() {
        for (i, id) in ids.iter().enumerate() {
            let (from, to) = (
                performers[at[i]],
                performers[(at[i] + 1) % performers.len()],
            );
            let step = async {
                c.simple_query("BEGIN").await?;
                c.execute(
                    "DELETE FROM tasks WHERE performer_id = $1 AND id = $2",
                    &[&from, id],
                )
                .await?;
                c.execute(INSERT, &[id, &to]).await?;
                c.simple_query("COMMIT").await.map(drop)
            };
            if step.await.is_err() {
                return moves;
            }
            at[i] = (at[i] + 1) % performers.len();
            moves += 1;
        }
    }
    moves
}

/// Scatter-counts all tasks through `c` until `stop` or an error; every read must see
/// exactly `n`. Returns the reads done and the error that ended them, if any.
async fn counter(
    c: tokio_postgres::Client,
    n: i64,
    stop: tokio_util::sync::CancellationToken,
) -> (usize, Option<String>) {
    let mut reads = 0;
    while !stop.is_cancelled() {
        let seen: i64 = match c.query_one("SELECT count(*) FROM tasks", &[]).await {
            Ok(row) => row.get(0),
            Err(e) => return (reads, Some(e.to_string())),
        };
        assert_eq!(seen, n, "a scatter count saw {seen} tasks, not {n}");
        reads += 1;
    }
    (reads, None)
}

/// Issue 8: two proxies, concurrent cross-shard moves and scatter counts on both, one
/// proxy SIGKILLed while its commits are in flight: the count invariant holds on every
/// read, and afterwards every task exists exactly once, on its ring owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_moves_and_counts_across_proxies_survive_a_kill() {
    let mut env = Env::start(3).await;
    env.stop_proxy().await;
    let ring = env.ring();
    let mut performers = Vec::new();
    for shard in 0..3 {
        performers.push(
            (1..1000i64)
                .find(|k| ring.shard_for(*k) == shard)
                .expect("key"),
        );
    }
    let (pa, pb) = (
        ProxyProc::new(&env, "proxy-a"),
        ProxyProc::new(&env, "proxy-b"),
    );
    let _b_child = pb.spawn(None).await;
    let mut a_child = pa.spawn(Some("sleep-between-commits=200")).await;
    let seed = pb.client().await;
    let n = 12i64;
    for id in 1..=n {
        let p = performers[(id as usize) % performers.len()];
        seed.execute(INSERT, &[&id, &p]).await.expect("seed");
    }
    let (stop_a, stop_b) = (
        tokio_util::sync::CancellationToken::new(),
        tokio_util::sync::CancellationToken::new(),
    );
    let mut movers = Vec::new();
    for (k, ids) in [
        vec![1i64, 2, 3],
        vec![4, 5, 6],
        vec![7, 8, 9],
        vec![10, 11, 12],
    ]
    .into_iter()
    .enumerate()
    {
        let (proc_, stop) = if k < 2 {
            (&pa, &stop_a)
        } else {
            (&pb, &stop_b)
        };
        movers.push(tokio::spawn(mover(
            proc_.client().await,
            ids,
            performers.clone(),
            stop.clone(),
        )));
    }
    let count_a = tokio::spawn(counter(pa.client().await, n, stop_a.clone()));
    let count_b = tokio::spawn(counter(pb.client().await, n, stop_b.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    a_child.kill().await.expect("SIGKILL proxy A mid-traffic");
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop_a.cancel();
    stop_b.cancel();
    let mut moved = 0;
    for m in movers {
        moved += m.await.expect("mover");
    }
    let (reads_a, _) = count_a.await.expect("counter on A");
    let (reads_b, b_error) = count_b.await.expect("counter on B");
    assert_eq!(b_error, None, "the surviving proxy keeps serving reads");
    until_resolved(&env, "after the kill").await;
    assert!(
        moved > 0 && reads_a > 0 && reads_b > 0,
        "{moved} {reads_a} {reads_b}"
    );
    for id in 1..=n {
        let holders = env.holders(id).await;
        assert_eq!(holders.len(), 1, "task {id} on shards {holders:?}");
        let p: i64 = env
            .shard(holders[0])
            .await
            .query_one("SELECT performer_id FROM tasks WHERE id = $1", &[&id])
            .await
            .expect("performer")
            .get(0);
        assert_eq!(ring.shard_for(p), holders[0], "task {id} on its owner");
    }
    eprintln!("{moved} moves committed; {reads_a} + {reads_b} scatter counts, all equal to {n}");
}
