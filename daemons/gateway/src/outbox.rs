//! The outbox relay: publishes `outbox` rows to Kafka and stamps `sent_at`.
//!
//! Task writes insert their event into `outbox` in the same transaction as the task
//! (see `store`), so an acknowledged write always has its event stored even if Kafka is
//! down or the gateway dies right after the commit. This relay then delivers them:
//!
//! - each poll locks a batch of unsent rows with `FOR UPDATE SKIP LOCKED`, so several
//!   gateway instances share the work without publishing the same row concurrently;
//! - rows are published with an idempotent producer (`enable.idempotence=true`,
//!   `acks=all`) and only rows whose delivery Kafka acknowledged are stamped; a crash
//!   between publish and stamp republishes (at-least-once; consumers de-duplicate by
//!   `event_id`);
//! - through the shard proxy every shard is polled on its own with a `/* shard=<name> */`
//!   hint, since the lock and the stamp must hit the shard holding the row. Which shards
//!   those are is asked of the proxy as the relay goes, so a shard added at run time is
//!   polled too; without an answer, `outbox_shards` plus a regular pass over every shard
//!   at once (see [`targets`]).
//!
//! Writes kick the relay right after commit; otherwise it polls every `outbox_poll_ms`.

mod targets;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::StoreError;
use targets::Targets;

pub struct Relay {
    pub pool: deadpool_postgres::Pool,
    pub producer: FutureProducer,
    /// `outbox_shards`: polled by hint while the proxy does not list its shards itself
    /// (empty: the database as one).
    pub configured: Vec<String>,
    pub batch: i64,
    pub poll: Duration,
    pub kick: Arc<Notify>,
    pub published: Counter,
    pub failures: Counter,
    pub pending: Gauge,
}

/// Creates the producer the relay publishes with.
pub fn producer(brokers: &str) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "10000")
        .set("linger.ms", "2")
        .set("client.id", "taskflow-gateway")
        .create()
}

/// How draining one target ended.
enum Drained {
    /// No full batch left, everything locked was delivered.
    Clean,
    /// A batch failed or left rows undelivered: back off.
    Failed,
    Shutdown,
}

impl Relay {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut targets = Targets::new(self.configured.clone());
        let mut backoff = self.poll;
        loop {
            self.refresh(&mut targets).await;
            let mut failed = false;
            for target in targets.plan(Instant::now()) {
                match self.drain(target.as_deref(), &shutdown).await {
                    Drained::Clean => {}
                    Drained::Failed => {
                        failed = true;
                        if target.is_some() {
                            targets.stale();
                        }
                    }
                    Drained::Shutdown => return,
                }
            }
            // Back off while Kafka or a shard is failing; otherwise wait for a kick.
            backoff = if failed {
                (backoff * 2).min(Duration::from_secs(5))
            } else {
                self.poll
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.kick.notified(), if !failed => {}
                () = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// Asks the proxy for its shards when it is time to.
    async fn refresh(&self, targets: &mut Targets) {
        let now = Instant::now();
        if !targets.due(now) {
            return;
        }
        let answer = match self.pool.get().await {
            Ok(client) => targets::ask(&client).await.map_err(StoreError::from),
            Err(e) => Err(e.into()),
        };
        match answer {
            Ok(answer) => {
                if let Some(note) = targets.record(now, answer) {
                    tracing::info!("outbox relay: {note}");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot ask for the shard list"),
        }
    }

    /// Publishes batches from `shard` (`None`: the database as one) until one is not full.
    async fn drain(&self, shard: Option<&str>, shutdown: &CancellationToken) -> Drained {
        loop {
            match self.relay_batch(shard).await {
                Ok((_, false)) => return Drained::Failed,
                Ok((n, true)) if usize::try_from(self.batch).map_or(true, |b| n < b) => {
                    return Drained::Clean
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, shard = shard.unwrap_or("-"), "outbox poll failed");
                    return Drained::Failed;
                }
            }
            if shutdown.is_cancelled() {
                return Drained::Shutdown;
            }
        }
    }

    /// Publishes one batch; returns (rows locked, whether all of them were delivered).
    async fn relay_batch(&self, shard: Option<&str>) -> Result<(usize, bool), StoreError> {
        let hint = shard
            .map(|s| format!("/* shard={s} */ "))
            .unwrap_or_default();
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        let rows = tx
            .query(
                &format!(
                    "{hint}SELECT id, topic, key, payload::text, event_id::text FROM outbox \
                     WHERE sent_at IS NULL ORDER BY id LIMIT {} FOR UPDATE SKIP LOCKED",
                    self.batch
                ),
                &[],
            )
            .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok((0, true));
        }
        let mut sends = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get(0)?;
            let topic: String = row.try_get(1)?;
            let key: String = row.try_get(2)?;
            let payload: String = row.try_get(3)?;
            let event_id: String = row.try_get(4)?;
            let producer = self.producer.clone();
            sends.push(async move {
                let rec = FutureRecord::to(&topic).key(&key).payload(&payload);
                let r = producer.send(rec, Duration::from_secs(10)).await;
                (id, event_id, r.map(|_| ()).map_err(|(e, _)| e))
            });
        }
        let results = futures_util::future::join_all(sends).await;
        let mut sent = Vec::with_capacity(results.len());
        for (id, event_id, r) in results {
            match r {
                Ok(()) => sent.push(event_id),
                Err(e) => {
                    self.failures.inc();
                    tracing::warn!(outbox_id = id, error = %e, "outbox publish failed; will retry");
                }
            }
        }
        if !sent.is_empty() {
            tx.execute(
                // By event_id, not id: outbox ids are per-shard sequences, so without a
                // shard hint (one database, or a proxy broadcast) only the globally unique
                // event id names exactly the rows this batch published.
                &format!(
                    "{hint}UPDATE outbox SET sent_at = now() \
                     WHERE event_id = ANY($1::text[]::uuid[]) AND sent_at IS NULL"
                ),
                &[&sent],
            )
            .await?;
        }
        tx.commit().await?;
        self.published
            .inc_by(u64::try_from(sent.len()).unwrap_or(0));
        let all = sent.len() == rows.len();
        if !all {
            self.pending
                .set(i64::try_from(rows.len() - sent.len()).unwrap_or(i64::MAX));
        } else {
            self.pending.set(0);
        }
        Ok((rows.len(), all))
    }
}
