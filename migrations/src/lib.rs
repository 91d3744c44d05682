//! taskflow-migrations: TaskFlow's SQL schema and the code that applies it.
//!
//! Two schemas live in `sql/`: `auth` (the users table, in the auth database) and `shard`
//! (tasks, observers, outbox — identical on every shard). Both are embedded at build time
//! with refinery, so a binary always carries the schema it was built for, and applying them
//! is idempotent: refinery records applied versions in `refinery_schema_history`.
//!
//! A session-level advisory lock serialises concurrent runs against one database (two
//! proxies starting at once, or `migrate` racing a proxy adding a shard).

mod embedded {
    pub mod auth {
        refinery::embed_migrations!("sql/auth");
    }
    pub mod shard {
        refinery::embed_migrations!("sql/shard");
    }
}

/// Advisory-lock key shared by every TaskFlow migration run (`"taskflow"` in ASCII).
const LOCK_KEY: i64 = 0x7461_736b_666c_6f77;

/// Which schema a database gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    Auth,
    Shard,
}

impl std::fmt::Display for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schema::Auth => "auth",
            Schema::Shard => "shard",
        })
    }
}

/// What one run changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// `V<version>__<name>` of each migration applied by this run, in order.
    pub applied: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("{schema} schema: cannot take the migration lock: {source}")]
    Lock {
        schema: Schema,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{schema} schema: {source}")]
    Apply {
        schema: Schema,
        #[source]
        source: refinery::Error,
    },
}

/// Applies the auth schema (users).
pub async fn apply_auth(client: &mut tokio_postgres::Client) -> Result<Report, MigrationError> {
    apply(client, Schema::Auth).await
}

/// Applies the shard schema (tasks, task_observers, outbox).
pub async fn apply_shard(client: &mut tokio_postgres::Client) -> Result<Report, MigrationError> {
    apply(client, Schema::Shard).await
}

/// Applies `schema`, holding the advisory lock for the duration.
pub async fn apply(
    client: &mut tokio_postgres::Client,
    schema: Schema,
) -> Result<Report, MigrationError> {
    let lock = |source| MigrationError::Lock { schema, source };
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(lock)?;
    let runner = match schema {
        Schema::Auth => embedded::auth::migrations::runner(),
        Schema::Shard => embedded::shard::migrations::runner(),
    };
    let result = runner.set_abort_divergent(true).run_async(client).await;
    // Release even when the run failed; the lock is session-scoped, so a lost connection
    // releases it too.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    let report = result.map_err(|source| MigrationError::Apply { schema, source })?;
    unlock.map_err(lock)?;
    Ok(Report {
        applied: report
            .applied_migrations()
            .iter()
            .map(|m| format!("V{}__{}", m.version(), m.name()))
            .collect(),
    })
}

/// Every migration of `schema`, for `--check-config`-style listings and tests.
pub fn versions(schema: Schema) -> Vec<String> {
    let runner = match schema {
        Schema::Auth => embedded::auth::migrations::runner(),
        Schema::Shard => embedded::shard::migrations::runner(),
    };
    // The embedded list follows the directory's order, not the versions'.
    let mut migrations: Vec<_> = runner.get_migrations().iter().collect();
    migrations.sort_by_key(|m| m.version());
    migrations
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect()
}
