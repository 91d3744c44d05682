//! Statements the router cannot parse run unrouted only when none of their words names a
//! sharded table — whatever else their text holds.

mod common;

use common::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_catalog_in_a_comment_does_not_bypass_routing() {
    let env = Env::start(2).await;
    let c = env.client("tasks").await;
    for sql in [
        "/* pg_catalog */ FROBNICATE tasks",
        "FROBNICATE tasks -- pg_catalog",
        "FROBNICATE pg_catalog.pg_class, tasks",
    ] {
        let err = c.simple_query(sql).await.expect_err(sql);
        let message = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(
            message.contains("cannot route this statement"),
            "{sql}: refused by the proxy, not run on one shard: {message}"
        );
    }
    // A table name inside a string literal is data, not a table: catalog lookups run.
    let unparsed_catalog = "FROBNICATE 'tasks'";
    let err = c
        .simple_query(unparsed_catalog)
        .await
        .expect_err("the shard's syntax error");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(
        message.contains("syntax error"),
        "ran on a shard: {message}"
    );
    // With a hint the statement goes where it says.
    let err = c
        .simple_query("/* shard=shard-2 */ FROBNICATE tasks")
        .await
        .expect_err("the shard's syntax error");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("syntax error"), "hinted: {message}");
}
