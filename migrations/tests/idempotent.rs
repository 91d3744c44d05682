//! Migrations against real PostgreSQL: the first run creates the schema, a second run
//! changes nothing (no migration applied, catalog identical).

use taskflow_localstack::PgCluster;
use taskflow_migrations::{apply_auth, apply_shard, versions, Schema};

/// Every column, index and constraint of the public schema, as text, for comparison.
async fn schema_fingerprint(client: &tokio_postgres::Client) -> Vec<String> {
    let rows = client
        .query(
            "SELECT 'col ' || table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '') \
               FROM information_schema.columns WHERE table_schema = 'public' \
             UNION ALL SELECT 'idx ' || indexdef FROM pg_indexes WHERE schemaname = 'public' \
             UNION ALL SELECT 'con ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
               WHERE connamespace = 'public'::regnamespace \
             UNION ALL SELECT 'hist ' || version || ' ' || name || ' ' || checksum FROM refinery_schema_history \
             ORDER BY 1",
            &[],
        )
        .await
        .expect("fingerprint query");
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

#[tokio::test]
async fn shard_schema_applies_once_then_changes_nothing() {
    let pg = PgCluster::builder()
        .database("tasks")
        .start()
        .await
        .expect("pg");
    let mut client = pg.client("tasks").await.expect("client");

    let first = apply_shard(&mut client).await.expect("first run");
    assert_eq!(first.applied, versions(Schema::Shard));
    assert!(!first.applied.is_empty());
    let before = schema_fingerprint(&client).await;
    for table in ["tasks", "task_observers", "outbox"] {
        assert!(
            before
                .iter()
                .any(|l| l.starts_with(&format!("col {table}.performer_id "))),
            "{table} must carry the shard key performer_id"
        );
    }

    let second = apply_shard(&mut client).await.expect("second run");
    assert!(
        second.applied.is_empty(),
        "second run applied {:?}",
        second.applied
    );
    assert_eq!(schema_fingerprint(&client).await, before);
}

#[tokio::test]
async fn auth_schema_applies_once_then_changes_nothing() {
    let pg = PgCluster::builder()
        .database("auth")
        .start()
        .await
        .expect("pg");
    let mut client = pg.client("auth").await.expect("client");

    let first = apply_auth(&mut client).await.expect("first run");
    assert_eq!(first.applied, versions(Schema::Auth));
    let before = schema_fingerprint(&client).await;

    let second = apply_auth(&mut client).await.expect("second run");
    assert!(second.applied.is_empty());
    assert_eq!(schema_fingerprint(&client).await, before);

    // Email uniqueness is case-insensitive.
    client
        .execute(
            "INSERT INTO users (email, name, password_hash) VALUES ('Ann@Example.com', 'Ann', 'x')",
            &[],
        )
        .await
        .expect("insert");
    let dup = client
        .execute(
            "INSERT INTO users (email, name, password_hash) VALUES ('ann@example.com', 'Ann', 'x')",
            &[],
        )
        .await
        .expect_err("duplicate email");
    assert_eq!(
        dup.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
}

#[tokio::test]
async fn concurrent_runs_serialise_on_the_lock() {
    let pg = PgCluster::builder()
        .database("tasks")
        .start()
        .await
        .expect("pg");
    let mut a = pg.client("tasks").await.expect("client a");
    let mut b = pg.client("tasks").await.expect("client b");
    let (ra, rb) = tokio::join!(apply_shard(&mut a), apply_shard(&mut b));
    let (ra, rb) = (ra.expect("run a"), rb.expect("run b"));
    // Exactly one of the two applied the schema; the other found it done.
    assert_eq!(
        ra.applied.len() + rb.applied.len(),
        versions(Schema::Shard).len()
    );
}
