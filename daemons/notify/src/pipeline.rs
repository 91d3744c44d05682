//! One `task_events` message → one `notify_events` message and one email per recipient.
//!
//! Delivery is at-least-once end to end: a partition's worker commits a message's offset
//! only after every recipient was handled, so a crash or an SMTP outage means the message
//! comes again. Redelivery must not mean a second email, so each step is recorded in Redis
//! per `(event_id, recipient)` and skipped when already done. The window left is a crash
//! between handing a mail to SMTP and recording it (a duplicate, never a loss).
//!
//! Pushes and mails are two [`Stage`]s run by two consumer groups over the same
//! `task_events`, so WebSocket pushes never wait for a slow or absent SMTP server.
//!
//! "Handled" includes "can never be mailed": a permanent failure (unusable address, 5xx)
//! sends that recipient's mail to the dead-letter topic with the reason, marks it done and
//! carries on with the others. Only transient failures make the event fail and retry
//! (issue 10: one bad address used to block every later email, for good).

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::aio::ConnectionManager;
use taskflow_contracts::{DeadLetter, NotifyEvent, TaskEvent, EVENT_VERSION};

use crate::directory::{Directory, Recipient};
use crate::mailer::{Mailer, SendError};
use crate::metrics::Metrics;

/// How long "already done" marks live: far longer than any redelivery.
const MARK_TTL_SECS: u64 = 7 * 24 * 3600;

/// A failure worth retrying: the same message will be handled again later.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("looking up recipients: {0}")]
    Directory(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("sending mail to user {user}: {source}")]
    Smtp { user: i64, source: SendError },
    #[error("publishing to {topic}: {message}")]
    Publish { topic: String, message: String },
}

/// Which half of the work a pipeline does. Each half is its own consumer group, so the
/// two progress independently: pushes never wait for SMTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Publish one `notify_events` message per recipient.
    Push,
    /// Mail each recipient (or dead-letter the mail).
    Mail,
}

/// Everything a partition worker needs; cloned once per partition (each clone opens its
/// own directory connection, the rest are shared handles).
pub struct Pipeline {
    pub directory: Directory,
    pub mailer: Mailer,
    pub redis: ConnectionManager,
    pub producer: FutureProducer,
    pub notify_topic: String,
    pub dead_letter_topic: String,
    pub metrics: Metrics,
    pub stage: Stage,
    /// Events older than this are not pushed (a live notification that late is noise; it
    /// also keeps a new push consumer group from replaying history).
    pub push_max_age: Duration,
}

impl Pipeline {
    /// A pipeline sharing this one's handles, with a directory connection of its own.
    pub fn fork(&self) -> Pipeline {
        self.fork_for(self.stage)
    }

    /// [`Self::fork`] doing `stage`.
    pub fn fork_for(&self, stage: Stage) -> Pipeline {
        Pipeline {
            directory: self.directory.fork(),
            mailer: self.mailer.clone(),
            redis: self.redis.clone(),
            producer: self.producer.clone(),
            notify_topic: self.notify_topic.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            metrics: self.metrics.clone(),
            stage,
            push_max_age: self.push_max_age,
        }
    }

    /// Handles every recipient of `event`; `Err` means "retry this message".
    pub async fn handle(&mut self, event: &TaskEvent) -> Result<(), StepError> {
        if self.stage == Stage::Push && self.too_old_to_push(event) {
            tracing::debug!(event_id = %event.event_id, "event too old to push; skipped");
            return Ok(());
        }
        let ids = event.task.recipients();
        let mut wanted = ids.clone();
        wanted.push(event.actor_id);
        let mut found = self
            .directory
            .lookup(&wanted)
            .await
            .map_err(StepError::Directory)?;
        let actor = found
            .iter()
            .find(|r| r.id == event.actor_id)
            .map(|r| r.name.clone());
        found.retain(|r| ids.contains(&r.id));
        let recipients = found;
        for id in &ids {
            if !recipients.iter().any(|r| r.id == *id) {
                tracing::warn!(user_id = id, event_id = %event.event_id, "recipient has no account; skipped");
            }
        }
        if self.stage == Stage::Push {
            for r in &recipients {
                self.publish_once(event, r).await?;
            }
            return Ok(());
        }
        // Every recipient is attempted even when one fails transiently, so one slow
        // address does not hold back mail the server would take now; the first transient
        // error is returned so the event is retried (done recipients are skipped then).
        let mut first_error = None;
        for r in &recipients {
            if let Err(e) = self.mail_once(event, r, actor.as_deref()).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn too_old_to_push(&self, event: &TaskEvent) -> bool {
        let age = time::OffsetDateTime::now_utc() - event.occurred_at;
        age > self.push_max_age
    }

    async fn mail_once(
        &mut self,
        event: &TaskEvent,
        r: &Recipient,
        actor: Option<&str>,
    ) -> Result<(), StepError> {
        let mark = format!("notify:mail:{}:{}", event.event_id, r.id);
        if self.is_marked(&mark).await? {
            self.metrics.duplicates.inc();
            return Ok(());
        }
        match self.mailer.send(event, r, actor).await {
            Ok(()) => {
                self.metrics.mails_sent.inc();
                self.mark(&mark, "sent").await
            }
            Err(e) if e.is_permanent() => {
                self.dead_letter(event, r, &e).await?;
                self.mark(&mark, "dead").await
            }
            Err(e) => {
                self.metrics.mail_failures.inc();
                Err(StepError::Smtp {
                    user: r.id,
                    source: e,
                })
            }
        }
    }

    /// Sends one recipient's unmailable message to the dead-letter topic.
    async fn dead_letter(
        &mut self,
        event: &TaskEvent,
        r: &Recipient,
        e: &SendError,
    ) -> Result<(), StepError> {
        tracing::warn!(event_id = %event.event_id, user_id = r.id, error = %e, "mail can never be sent; dead-lettered");
        let letter = DeadLetter {
            v: EVENT_VERSION,
            source_event_id: event.event_id,
            user_id: r.id,
            email: r.email.clone(),
            reason: e.to_string(),
            smtp_code: e.smtp_code(),
            failed_at: time::OffsetDateTime::now_utc(),
            event: event.clone(),
        };
        let topic = self.dead_letter_topic.clone();
        self.produce(&topic, &r.id.to_string(), &letter).await?;
        self.metrics.dead_letters.inc();
        Ok(())
    }

    async fn publish_once(&mut self, event: &TaskEvent, r: &Recipient) -> Result<(), StepError> {
        let mark = format!("notify:pub:{}:{}", event.event_id, r.id);
        if self.is_marked(&mark).await? {
            return Ok(());
        }
        let notification = NotifyEvent::for_recipient(event, r.id, r.email.clone());
        let topic = self.notify_topic.clone();
        self.produce(&topic, &notification.key(), &notification)
            .await?;
        self.metrics.published.inc();
        self.mark(&mark, "1").await
    }

    async fn produce<T: serde::Serialize>(
        &self,
        topic: &str,
        key: &str,
        value: &T,
    ) -> Result<(), StepError> {
        let failed = |message: String| StepError::Publish {
            topic: topic.to_owned(),
            message,
        };
        let payload = serde_json::to_vec(value).map_err(|e| failed(format!("encoding: {e}")))?;
        self.producer
            .send(
                FutureRecord::to(topic).key(key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map(drop)
            .map_err(|(e, _)| failed(e.to_string()))
    }

    async fn is_marked(&mut self, key: &str) -> Result<bool, StepError> {
        Ok(redis::cmd("EXISTS")
            .arg(key)
            .query_async::<bool>(&mut self.redis)
            .await?)
    }

    async fn mark(&mut self, key: &str, value: &str) -> Result<(), StepError> {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("EX")
            .arg(MARK_TTL_SECS)
            .query_async::<()>(&mut self.redis)
            .await?;
        Ok(())
    }
}
