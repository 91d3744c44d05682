//! A write that spans shards commits everywhere or nowhere, in every protocol path — here
//! the one psycopg 3 takes in autocommit mode: Parse (unnamed) + Bind + Describe + Execute
//! + Sync in one batch, which tokio-postgres' `query_typed` sends too.

mod common;

use common::Env;
use tokio_postgres::types::Type;

/// One task per shard (performer ids chosen so every shard owns one), ids 1..=n.
async fn one_task_per_shard(env: &Env) -> usize {
    let ring = env.ring();
    let n = env.shards.len();
    let mut owners = std::collections::BTreeMap::new();
    for k in 1i64..1000 {
        owners.entry(ring.shard_for(k)).or_insert(k);
        if owners.len() == n {
            break;
        }
    }
    let c = env.client("tasks").await;
    for (i, performer) in owners.values().enumerate() {
        c.execute(
            "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, 't')",
            &[&(i as i64 + 1), performer],
        )
        .await
        .expect("insert");
    }
    n
}

async fn rows_per_shard(env: &Env, sql: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for i in 0..env.shards.len() {
        out.push(
            env.shard(i)
                .await
                .query_one(sql, &[])
                .await
                .expect("count")
                .get(0),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_delete_in_one_unnamed_batch_is_atomic() {
    let env = Env::start(3).await;
    let n = one_task_per_shard(&env).await;
    let c = env.client("tasks").await;
    let deleted = c
        .query_typed("DELETE FROM tasks WHERE id >= $1", &[(&0i64, Type::INT8)])
        .await;
    assert!(deleted.is_ok(), "the key-less DELETE succeeds: {deleted:?}");
    assert_eq!(
        rows_per_shard(&env, "SELECT count(*) FROM tasks").await,
        vec![0; n],
        "every shard's rows are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_update_in_one_unnamed_batch_is_atomic() {
    let env = Env::start(3).await;
    let n = one_task_per_shard(&env).await;
    let c = env.client("tasks").await;
    c.query_typed(
        "UPDATE tasks SET title = $1 WHERE id >= 0",
        &[(&"renamed", Type::TEXT)],
    )
    .await
    .expect("the key-less UPDATE succeeds");
    assert_eq!(
        rows_per_shard(&env, "SELECT count(*) FROM tasks WHERE title = 'renamed'").await,
        vec![1; n],
        "every shard's row is updated"
    );
    // A failing one changes nothing anywhere: the title is NOT NULL on every shard.
    let err = c
        .query_typed(
            "UPDATE tasks SET title = $1 WHERE id >= 0",
            &[(&None::<String>, Type::TEXT)],
        )
        .await
        .expect_err("NOT NULL violated");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("null"), "{err:?}");
    assert_eq!(
        rows_per_shard(&env, "SELECT count(*) FROM tasks WHERE title = 'renamed'").await,
        vec![1; n],
        "no shard applied the failed UPDATE"
    );
}
