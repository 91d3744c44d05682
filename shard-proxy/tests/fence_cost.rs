//! What the cross-proxy commit fence costs (not a timed test; run with
//! `cargo nextest run -p taskflow-shard-proxy --test fence_cost --run-ignored only
//! --no-capture`): scatter reads and cross-shard commits per second through one proxy with
//! `metadata.fence = "cluster"` (advisory lock on the auth cluster) and `"process"`.

mod common;

use std::time::Instant;

use common::Env;
use taskflow_shard_proxy::config::FenceScope;

const INSERT: &str =
    "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, 't')";

async fn measure(env: &Env, base: i64) -> (f64, f64) {
    let c = env.client("tasks").await;
    let ring = env.ring();
    let a = 1i64;
    let b = (2..1000)
        .find(|k| ring.shard_for(*k) != ring.shard_for(a))
        .expect("another shard");
    let reads = 300;
    let t = Instant::now();
    for _ in 0..reads {
        c.query_one("SELECT count(*) FROM tasks", &[])
            .await
            .expect("scatter count");
    }
    let read_rate = f64::from(reads) / t.elapsed().as_secs_f64();
    let commits = 100;
    let t = Instant::now();
    for i in 0..commits {
        c.simple_query("BEGIN").await.expect("begin");
        let id = base + 2 * i64::from(i);
        c.execute(INSERT, &[&id, &a]).await.expect("insert a");
        c.execute(INSERT, &[&(id + 1), &b]).await.expect("insert b");
        c.simple_query("COMMIT").await.expect("commit");
    }
    let commit_rate = f64::from(commits) / t.elapsed().as_secs_f64();
    (read_rate, commit_rate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn fence_cost() {
    let mut env = Env::start(3).await;
    let (r1, c1) = measure(&env, 1_000_000).await;
    env.stop_proxy().await;
    env.config.metadata.fence = FenceScope::Process;
    env.start_proxy().await;
    let (r2, c2) = measure(&env, 2_000_000).await;
    env.stop_proxy().await;
    env.config.metadata.fence = FenceScope::Cluster;
    env.start_proxy().await;
    let (r3, c3) = measure(&env, 3_000_000).await;
    println!("fence=cluster: {r1:.0} scatter reads/s, {c1:.0} 2PC commits/s");
    println!("fence=process: {r2:.0} scatter reads/s, {c2:.0} 2PC commits/s");
    println!("fence=cluster (again): {r3:.0} scatter reads/s, {c3:.0} 2PC commits/s");
}
