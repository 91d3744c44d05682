//! Rows land on their ring owner (checked directly on the shards), in the simple and the
//! extended protocol, for single and multi-row INSERTs, UPDATEs and DELETEs; scatter reads
//! equal a reference database holding every row; the passthrough database works.

mod common;

use common::Env;
use tokio_postgres::SimpleQueryMessage;

fn rows_of(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

fn count_of(msgs: &[SimpleQueryMessage]) -> u64 {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_on_their_ring_owner() {
    let env = Env::start(3).await;
    let ring = env.ring();
    let c = env.client("tasks").await;

    // Simple protocol, one row per statement.
    for p in 1..=30i64 {
        let sql = format!(
            "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ({}, {p}, 1, 'simple {p}')",
            1000 + p
        );
        let r = c.simple_query(&sql).await.expect("simple insert");
        assert_eq!(count_of(&r), 1);
    }
    // Extended protocol with binary parameters.
    for p in 31..=60i64 {
        let n = c
            .execute(
                "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, $3)",
                &[&(1000 + p), &p, &format!("extended {p}")],
            )
            .await
            .expect("extended insert");
        assert_eq!(n, 1);
    }
    // Multi-row INSERT split across shards: simple, then extended.
    let values: Vec<String> = (61..=80i64)
        .map(|p| format!("({}, {p}, 1, 'multi {p}')", 1000 + p))
        .collect();
    let r = c
        .simple_query(&format!(
            "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES {}",
            values.join(", ")
        ))
        .await
        .expect("multi-row simple insert");
    assert_eq!(count_of(&r), 20);
    let n = c
        .execute(
            "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, 'x'), ($3, $4, 1, 'y'), ($5, $6, 1, 'z')",
            &[&1081i64, &81i64, &1082i64, &82i64, &1083i64, &83i64],
        )
        .await
        .expect("multi-row extended insert");
    assert_eq!(n, 3);

    for p in 1..=83i64 {
        let owner = ring.shard_for(p);
        assert_eq!(
            env.holders(1000 + p).await,
            vec![owner],
            "task of performer {p}"
        );
    }
    // Reads by key, both protocols.
    let row = c
        .query_one(
            "SELECT title FROM tasks WHERE performer_id = $1 AND id = $2",
            &[&42i64, &1042i64],
        )
        .await
        .expect("read by key");
    assert_eq!(row.get::<_, String>(0), "extended 42");
    let r = c
        .simple_query("SELECT title FROM tasks WHERE performer_id = 7")
        .await
        .expect("simple read");
    assert_eq!(rows_of(&r), vec![vec![Some("simple 7".to_string())]]);
    // IN list spanning shards.
    let rows = c
        .query(
            "SELECT id FROM tasks WHERE performer_id IN (1, 2, 3, 4, 5) ORDER BY id",
            &[],
        )
        .await
        .expect("IN list");
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![1001, 1002, 1003, 1004, 1005]);

    // UPDATE and DELETE by key.
    let n = c
        .execute(
            "UPDATE tasks SET status = 'completed' WHERE performer_id = $1",
            &[&5i64],
        )
        .await
        .expect("update by key");
    assert_eq!(n, 1);
    let owner = ring.shard_for(5);
    let st: String = env
        .shard(owner)
        .await
        .query_one("SELECT status FROM tasks WHERE id = 1005", &[])
        .await
        .expect("direct")
        .get(0);
    assert_eq!(st, "completed");
    let r = c
        .simple_query("DELETE FROM tasks WHERE performer_id = 6")
        .await
        .expect("delete by key");
    assert_eq!(count_of(&r), 1);
    assert!(env.holders(1006).await.is_empty());

    // Broadcast UPDATE/DELETE without key: counts summed over shards.
    let n = c
        .execute(
            "UPDATE tasks SET description = 'bulk' WHERE creator_id = $1",
            &[&1i64],
        )
        .await
        .expect("broadcast update");
    assert_eq!(n, 82);
    let r = c
        .simple_query("DELETE FROM tasks WHERE title LIKE 'multi%'")
        .await
        .expect("broadcast delete");
    assert_eq!(count_of(&r), 20);
    for p in 61..=80i64 {
        assert!(env.holders(1000 + p).await.is_empty());
    }

    // INSERT without key is refused clearly.
    let err = c
        .simple_query("INSERT INTO tasks (id, creator_id, title) VALUES (1, 1, 'no key')")
        .await
        .expect_err("insert without key");
    assert!(
        format!("{err:?}").to_lowercase().contains("performer_id"),
        "{err}"
    );
    // The session still works afterwards.
    c.simple_query("SELECT 1").await.expect("still usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scatter_reads_equal_a_reference_database() {
    let env = Env::start(3).await;
    let reference = taskflow_localstack::PgCluster::builder()
        .database("tasks")
        .start()
        .await
        .expect("reference cluster");
    let mut rc = reference.client("tasks").await.expect("reference client");
    taskflow_migrations::apply_shard(&mut rc)
        .await
        .expect("reference schema");
    let c = env.client("tasks").await;
    for i in 0..200i64 {
        let performer = (i * 7919) % 97 + 1;
        let status = ["pending", "in_progress", "completed"][(i % 3) as usize];
        let sql = "INSERT INTO tasks (id, performer_id, creator_id, title, status, version) VALUES ($1, $2, $3, $4, $5, $6)";
        let title = format!("t{:03}", (i * 37) % 200);
        let version = (i * 13) % 50;
        let creator = i % 5;
        c.execute(sql, &[&i, &performer, &creator, &title, &status, &version])
            .await
            .expect("insert via proxy");
        rc.execute(sql, &[&i, &performer, &creator, &title, &status, &version])
            .await
            .expect("insert reference");
    }
    let queries = [
        "SELECT id, title FROM tasks ORDER BY title, id LIMIT 10",
        "SELECT id FROM tasks ORDER BY version DESC, id LIMIT 5 OFFSET 3",
        "SELECT count(*) FROM tasks",
        "SELECT count(*), sum(version), min(version), max(version), avg(version) FROM tasks",
        "SELECT status, count(*) FROM tasks GROUP BY status ORDER BY status",
        "SELECT count(*) FROM tasks WHERE creator_id = 3",
        "SELECT max(title) FROM tasks WHERE status = 'completed'",
    ];
    for q in queries {
        let via_proxy = rows_of(
            &c.simple_query(q)
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}")),
        );
        let direct = rows_of(&rc.simple_query(q).await.expect("reference"));
        assert_eq!(via_proxy, direct, "simple protocol: {q}");
        let via_proxy: Vec<String> = c
            .query(q, &[])
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .iter()
            .map(|r| {
                format!("{r:?}")
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .count()
                    .to_string()
            })
            .collect();
        assert_eq!(
            via_proxy.len(),
            direct.len(),
            "extended protocol row count: {q}"
        );
    }
    // Extended protocol values for an aggregate.
    let a = c
        .query_one(
            "SELECT count(*), sum(version), min(version), max(version) FROM tasks",
            &[],
        )
        .await
        .expect("aggregate extended");
    let b = rc
        .query_one(
            "SELECT count(*), sum(version), min(version), max(version) FROM tasks",
            &[],
        )
        .await
        .expect("aggregate reference");
    assert_eq!(a.get::<_, i64>(0), b.get::<_, i64>(0));
    assert_eq!(a.get::<_, i64>(2), b.get::<_, i64>(2));
    assert_eq!(a.get::<_, i64>(3), b.get::<_, i64>(3));
    let ids: Vec<i64> = c
        .query("SELECT id FROM tasks ORDER BY title DESC, id LIMIT 7", &[])
        .await
        .expect("ordered extended")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ref_ids: Vec<i64> = rc
        .query("SELECT id FROM tasks ORDER BY title DESC, id LIMIT 7", &[])
        .await
        .expect("ordered reference")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, ref_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_auth_database() {
    let env = Env::start(1).await;
    let c = env.client("auth").await;
    c.execute(
        "INSERT INTO users (email, name, password_hash, role) VALUES ($1, $2, 'x', 'user')",
        &[&"a@example.com", &"Ann"],
    )
    .await
    .expect("insert user");
    let r = c
        .simple_query("SELECT name FROM users WHERE email = 'a@example.com'")
        .await
        .expect("simple select");
    assert_eq!(rows_of(&r), vec![vec![Some("Ann".to_string())]]);
    let direct = env.auth.client().await.expect("direct auth");
    let n: i64 = direct
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    // Transactions pin one backend.
    c.simple_query("BEGIN").await.expect("begin");
    c.execute("UPDATE users SET name = 'Bob'", &[])
        .await
        .expect("update");
    c.simple_query("ROLLBACK").await.expect("rollback");
    let name: String = c
        .query_one("SELECT name FROM users", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(name, "Ann");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_survives_transaction_pooling() {
    let mut env = Env::start(2).await;
    env.config.pool.size = 2;
    env.stop_proxy().await;
    env.start_proxy().await;
    let a = env.client("tasks").await;
    let b = env.client("tasks").await;
    a.simple_query("SET application_name = 'client-a'")
        .await
        .expect("set a");
    b.simple_query("SET application_name = 'client-b'")
        .await
        .expect("set b");
    let stmt_a = a
        .prepare("SELECT current_setting('application_name')")
        .await
        .expect("prepare a");
    for _ in 0..20 {
        let (ra, rb) = tokio::join!(
            a.query_one(&stmt_a, &[]),
            b.simple_query("SHOW application_name")
        );
        assert_eq!(ra.expect("a").get::<_, String>(0), "client-a");
        assert_eq!(
            rows_of(&rb.expect("b")),
            vec![vec![Some("client-b".to_string())]]
        );
    }
    // SQL-level PREPARE/EXECUTE is routed by its arguments.
    a.simple_query("PREPARE ins (bigint, bigint) AS INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, 'p')")
        .await
        .expect("prepare");
    for p in 1..=10i64 {
        a.simple_query(&format!("EXECUTE ins({}, {p})", 5000 + p))
            .await
            .expect("execute");
    }
    let ring = env.ring();
    for p in 1..=10i64 {
        assert_eq!(env.holders(5000 + p).await, vec![ring.shard_for(p)]);
    }
    a.simple_query("DEALLOCATE ins").await.expect("deallocate");
}
