//! Task storage in the sharded `tasks` database, written for the shard proxy.
//!
//! Rules every statement here follows, so the proxy can route it (SPEC §5, §6):
//! - a statement on one task names its `performer_id` with an equality (or in INSERT
//!   values), so it goes to exactly one shard;
//! - a read without a performer (`GET /tasks/{id}` when Redis lost the id → performer map,
//!   lists without `performer_id`) is a plain `SELECT … ORDER BY id LIMIT n` that the proxy
//!   scatters and merges;
//! - a performer change is DELETE on the old key + INSERT on the new key in one
//!   transaction, which the proxy commits atomically with two-phase commit;
//! - every write inserts its `task_events` event into `outbox` in the same transaction
//!   and on the same shard (transactional outbox, SPEC §4).
//!
//! Pointed directly at one PostgreSQL database (tests, before the proxy exists) the same
//! statements simply run there.

use taskflow_contracts::{Task, TaskEvent, TaskStatus};
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("stored task has an unknown status `{0}`")]
    BadStatus(String),
    #[error("cannot encode event: {0}")]
    Encode(#[from] serde_json::Error),
}

impl StoreError {
    /// SQLSTATE 40001: the shard proxy refused the statement because an online migration
    /// was moving its performer's rows (or serialization failed). Nothing of it was
    /// applied, so it is safe to run again.
    fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Db(e) if e.code() == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE))
    }
}

/// How often a statement refused with SQLSTATE 40001 is tried again, and the first pause
/// (doubling): a migration batch holds its keys for at most the proxy's
/// `reshard.write_pause_ms` (1 s by default), so five tries over ~1.5 s outlast one batch.
const RETRIES: u32 = 5;
const FIRST_BACKOFF_MS: u64 = 50;

/// Runs `op`, again after a short back-off while it fails with SQLSTATE 40001.
async fn retrying<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut wait = FIRST_BACKOFF_MS;
    let mut tries = 1;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && tries < RETRIES => {
                tracing::debug!(error = %e, tries, "retrying a statement refused during a shard move");
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                wait *= 2;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// The server's message and SQLSTATE when there is one (tokio-postgres prints "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The columns of a task plus its observers, aggregated on the task's own shard.
const SELECT_TASK: &str =
    "SELECT id, title, description, performer_id, creator_id, status, version, \
     created_at, updated_at, \
     ARRAY(SELECT o.user_id FROM task_observers o \
           WHERE o.task_id = tasks.id AND o.performer_id = tasks.performer_id \
           ORDER BY o.user_id) AS observer_ids \
     FROM tasks";

fn task_from(row: &Row) -> Result<Task, StoreError> {
    let status: String = row.try_get(5)?;
    Ok(Task {
        id: row.try_get(0)?,
        title: row.try_get(1)?,
        description: row.try_get(2)?,
        performer_id: row.try_get(3)?,
        creator_id: row.try_get(4)?,
        status: status
            .parse::<TaskStatus>()
            .map_err(|_| StoreError::BadStatus(status.clone()))?,
        version: row.try_get(6)?,
        created_at: row.try_get(7)?,
        updated_at: row.try_get(8)?,
        observer_ids: row.try_get(9)?,
    })
}

/// Filters of `GET /tasks`.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub performer_id: Option<i64>,
    pub creator_id: Option<i64>,
    pub observer_id: Option<i64>,
    pub status: Option<TaskStatus>,
    /// Only ids greater than this (the cursor).
    pub after_id: i64,
    /// Rows to fetch (the page size plus one, to know whether another page exists).
    pub limit: i64,
}

/// What a write does to the stored task.
pub enum Write<'a> {
    Create(&'a Task),
    /// Replace `old` by `new`; a different `performer_id` moves the task between shards.
    Update {
        old: &'a Task,
        new: &'a Task,
    },
    Delete(&'a Task),
}

#[derive(Clone)]
pub struct Store {
    pool: deadpool_postgres::Pool,
}

/// Microsecond precision, as PostgreSQL stores it: what we return equals what we store.
pub fn now_micros() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now)
}

impl Store {
    pub fn new(pool: deadpool_postgres::Pool) -> Self {
        Store { pool }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let c = self.pool.get().await?;
        c.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// The largest task id on any shard (the proxy merges `max`), 0 when there is none.
    pub async fn max_id(&self) -> Result<i64, StoreError> {
        let c = self.pool.get().await?;
        let row = c.query_one("SELECT max(id) FROM tasks", &[]).await?;
        Ok(row.try_get::<_, Option<i64>>(0)?.unwrap_or(0))
    }

    /// One task by id; with a known performer it reads one shard, else it scatters.
    pub async fn get(
        &self,
        id: i64,
        performer_id: Option<i64>,
    ) -> Result<Option<Task>, StoreError> {
        retrying(|| self.get_once(id, performer_id)).await
    }

    async fn get_once(
        &self,
        id: i64,
        performer_id: Option<i64>,
    ) -> Result<Option<Task>, StoreError> {
        let c = self.pool.get().await?;
        let row = match performer_id {
            Some(p) => {
                let stmt = c
                    .prepare_cached(&format!(
                        "{SELECT_TASK} WHERE id = $1 AND performer_id = $2"
                    ))
                    .await?;
                c.query_opt(&stmt, &[&id, &p]).await?
            }
            None => {
                let stmt = c
                    .prepare_cached(&format!("{SELECT_TASK} WHERE id = $1"))
                    .await?;
                // Mid-move a task can be visible on two shards: the newest version wins.
                let rows = c.query(&stmt, &[&id]).await?;
                let mut best: Option<Task> = None;
                for row in &rows {
                    let t = task_from(row)?;
                    if best.as_ref().is_none_or(|b| t.version > b.version) {
                        best = Some(t);
                    }
                }
                return Ok(best);
            }
        };
        row.as_ref().map(task_from).transpose()
    }

    /// A page of tasks in id order.
    pub async fn list(&self, f: &ListFilter) -> Result<Vec<Task>, StoreError> {
        retrying(|| self.list_once(f)).await
    }

    async fn list_once(&self, f: &ListFilter) -> Result<Vec<Task>, StoreError> {
        let mut conds = vec!["id > $1".to_owned()];
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(f.after_id)];
        let mut push = |cond: &str, v: Box<dyn ToSql + Sync + Send>| {
            params.push(v);
            conds.push(cond.replace('?', &format!("${}", params.len())));
        };
        if let Some(p) = f.performer_id {
            push("performer_id = ?", Box::new(p));
        }
        if let Some(c) = f.creator_id {
            push("creator_id = ?", Box::new(c));
        }
        if let Some(s) = f.status {
            push("status = ?", Box::new(s.as_str().to_owned()));
        }
        if let Some(o) = f.observer_id {
            push(
                "EXISTS (SELECT 1 FROM task_observers x WHERE x.task_id = tasks.id \
                 AND x.performer_id = tasks.performer_id AND x.user_id = ?)",
                Box::new(o),
            );
        }
        // LIMIT is a literal (a validated integer) so the proxy's merge sees it.
        let sql = format!(
            "{SELECT_TASK} WHERE {} ORDER BY id LIMIT {}",
            conds.join(" AND "),
            f.limit.clamp(1, 1000)
        );
        let c = self.pool.get().await?;
        let stmt = c.prepare_cached(&sql).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = c.query(&stmt, &refs).await?;
        let mut tasks: Vec<Task> = rows.iter().map(task_from).collect::<Result<_, _>>()?;
        // The proxy merges by id already; sorting again is cheap insurance. A task caught
        // mid-move (its two shards' commits are not visible at the same instant) can show
        // up on both shards: keep the newest version only.
        tasks.sort_by(|a, b| a.id.cmp(&b.id).then(b.version.cmp(&a.version)));
        tasks.dedup_by_key(|t| t.id);
        Ok(tasks)
    }

    /// Runs `decide` on the current row (locked `FOR UPDATE` on its shard) and applies the
    /// write it returns, together with its outbox event, in one transaction.
    ///
    /// `decide` returns `Err(E)` to abort (404/403/412 …); `Ok(None)` when the task is not
    /// on `performer_id`'s shard (it moved or never existed).
    pub async fn write_locked<E, F>(
        &self,
        id: i64,
        performer_id: i64,
        topic: &str,
        decide: F,
    ) -> Result<Result<Option<(Task, TaskEvent)>, E>, StoreError>
    where
        F: FnOnce(Task) -> Result<(Option<Task>, TaskEvent), E>,
    {
        let mut c = self.pool.get().await?;
        // A refusal during a shard move comes at the transaction's first statement on the
        // shard (later ones find the move's lock already held), before `decide` runs.
        let mut wait = FIRST_BACKOFF_MS;
        let mut tries = 1;
        let (tx, found) = loop {
            let tx = c.transaction().await?;
            let stmt = tx
                .prepare_cached(&format!(
                    "{SELECT_TASK} WHERE id = $1 AND performer_id = $2 FOR UPDATE"
                ))
                .await?;
            match tx
                .query_opt(&stmt, &[&id, &performer_id])
                .await
                .map_err(StoreError::from)
            {
                Err(e) if e.is_retryable() && tries < RETRIES => {
                    drop(tx);
                    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                    wait *= 2;
                    tries += 1;
                }
                found => break (tx, found?),
            }
        };
        let Some(row) = found else {
            tx.rollback().await?;
            return Ok(Ok(None));
        };
        let old = task_from(&row)?;
        let (new, event) = match decide(old.clone()) {
            Ok(x) => x,
            Err(e) => {
                tx.rollback().await?;
                return Ok(Err(e));
            }
        };
        match &new {
            Some(new) => apply(&tx, Write::Update { old: &old, new }).await?,
            None => apply(&tx, Write::Delete(&old)).await?,
        }
        insert_outbox(&tx, &event, topic).await?;
        tx.commit().await?;
        Ok(Ok(Some((new.unwrap_or(old), event))))
    }

    /// Inserts a new task and its `task.created` event.
    pub async fn create(
        &self,
        task: &Task,
        event: &TaskEvent,
        topic: &str,
    ) -> Result<(), StoreError> {
        retrying(|| async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            apply(&tx, Write::Create(task)).await?;
            insert_outbox(&tx, event, topic).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}

async fn insert_task(tx: &deadpool_postgres::Transaction<'_>, t: &Task) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO tasks (id, performer_id, creator_id, title, description, status, version, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &t.id,
            &t.performer_id,
            &t.creator_id,
            &t.title,
            &t.description,
            &t.status.as_str(),
            &t.version,
            &t.created_at,
            &t.updated_at,
        ],
    )
    .await?;
    insert_observers(tx, t).await
}

async fn insert_observers(
    tx: &deadpool_postgres::Transaction<'_>,
    t: &Task,
) -> Result<(), StoreError> {
    if t.observer_ids.is_empty() {
        return Ok(());
    }
    // One multi-row INSERT; every row carries the same shard key.
    let mut values = Vec::with_capacity(t.observer_ids.len());
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(t.observer_ids.len() * 3);
    for (i, user) in t.observer_ids.iter().enumerate() {
        values.push(format!("(${}, ${}, ${})", i * 3 + 1, i * 3 + 2, i * 3 + 3));
        params.push(&t.id);
        params.push(&t.performer_id);
        params.push(user);
    }
    let sql = format!(
        "INSERT INTO task_observers (task_id, performer_id, user_id) VALUES {}",
        values.join(", ")
    );
    let stmt = tx.prepare_cached(&sql).await?;
    tx.execute(&stmt, &params).await?;
    Ok(())
}

async fn delete_task(tx: &deadpool_postgres::Transaction<'_>, t: &Task) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached("DELETE FROM task_observers WHERE task_id = $1 AND performer_id = $2")
        .await?;
    tx.execute(&stmt, &[&t.id, &t.performer_id]).await?;
    let stmt = tx
        .prepare_cached("DELETE FROM tasks WHERE id = $1 AND performer_id = $2")
        .await?;
    tx.execute(&stmt, &[&t.id, &t.performer_id]).await?;
    Ok(())
}

async fn apply(tx: &deadpool_postgres::Transaction<'_>, w: Write<'_>) -> Result<(), StoreError> {
    match w {
        Write::Create(t) => insert_task(tx, t).await,
        Write::Delete(t) => delete_task(tx, t).await,
        Write::Update { old, new } if old.performer_id != new.performer_id => {
            // A move: the row leaves the old key's shard and enters the new one's in the
            // same (two-phase, through the proxy) transaction.
            // Delete first: both performers may hash to the same shard (same primary key).
            delete_task(tx, old).await?;
            insert_task(tx, new).await
        }
        Write::Update { old: _, new } => {
            let stmt = tx
                .prepare_cached(
                    "UPDATE tasks SET title = $3, description = $4, status = $5, version = $6, updated_at = $7 \
                     WHERE id = $1 AND performer_id = $2",
                )
                .await?;
            tx.execute(
                &stmt,
                &[
                    &new.id,
                    &new.performer_id,
                    &new.title,
                    &new.description,
                    &new.status.as_str(),
                    &new.version,
                    &new.updated_at,
                ],
            )
            .await?;
            let stmt = tx
                .prepare_cached(
                    "DELETE FROM task_observers WHERE task_id = $1 AND performer_id = $2",
                )
                .await?;
            tx.execute(&stmt, &[&new.id, &new.performer_id]).await?;
            insert_observers(tx, new).await
        }
    }
}

/// The event row, on the shard of the task's (new) performer.
async fn insert_outbox(
    tx: &deadpool_postgres::Transaction<'_>,
    event: &TaskEvent,
    topic: &str,
) -> Result<(), StoreError> {
    let payload = serde_json::to_string(event)?;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO outbox (performer_id, event_id, topic, key, payload) \
             VALUES ($1, $2::text::uuid, $3, $4, $5::text::jsonb)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &event.task.performer_id,
            &event.event_id.to_string(),
            &topic,
            &event.key(),
            &payload,
        ],
    )
    .await?;
    Ok(())
}
