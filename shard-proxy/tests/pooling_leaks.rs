//! Pooling never leaks session state between clients (SPEC §6): with one server
//! connection per shard, two clients take turns on the same backend, and whatever the
//! first leaves behind that cannot be replayed is gone for the second — the connection is
//! closed instead of pooled (`sqltext::session_state` lists what counts).

mod common;

use common::Env;
use tokio_postgres::SimpleQueryMessage;

fn first_value(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    first_value(
        &c.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_left_by_one_client_never_reaches_the_next() {
    let mut env = Env::start(1).await;
    env.config.pool.size = 1;
    env.stop_proxy().await;
    env.start_proxy().await;
    for db in ["tasks", "auth"] {
        let fresh = env.client(db).await;
        let default_path = one(&fresh, "SHOW search_path").await;
        drop(fresh);
        let cases = [
            (
                "SELECT set_config('search_path', 'nope', false)",
                "SHOW search_path",
                default_path.clone(),
            ),
            (
                "CREATE TEMP TABLE leak (x int)",
                "SELECT coalesce(to_regclass('pg_temp.leak')::text, 'none')",
                "none".to_owned(),
            ),
            (
                "SELECT pg_advisory_lock(42)",
                "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
                "0".to_owned(),
            ),
            (
                "LISTEN leak",
                "SELECT count(*)::text FROM pg_listening_channels()",
                "0".to_owned(),
            ),
        ];
        for (leaky, probe, clean) in cases {
            let first = env.client(db).await;
            first
                .simple_query(leaky)
                .await
                .unwrap_or_else(|e| panic!("{leaky}: {e:?}"));
            drop(first);
            let second = env.client(db).await;
            assert_eq!(
                one(&second, probe).await,
                clean,
                "{db}: after `{leaky}`, `{probe}`"
            );
        }
        // Ordinary statements keep the pooled connection (no reconnect for everyone).
        let a = env.client(db).await;
        let pid = one(&a, "SELECT pg_backend_pid()::text").await;
        drop(a);
        let b = env.client(db).await;
        assert_eq!(
            one(&b, "SELECT pg_backend_pid()::text").await,
            pid,
            "{db}: pooled"
        );
    }
}
