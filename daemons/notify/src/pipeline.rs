//! One `task_events` message → one email and one `notify_events` message per recipient.
//!
//! Delivery is at-least-once end to end: the consumer commits a message's offset only after
//! every recipient was handled, so a crash or an SMTP outage means the message comes again.
//! Redelivery must not mean a second email, so each step is recorded in Redis per
//! `(event_id, recipient)` and skipped when already done. The window left is a crash between
//! handing a mail to SMTP and recording it (a duplicate, never a loss).

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::aio::ConnectionManager;
use taskflow_contracts::{NotifyEvent, TaskEvent};

use crate::directory::{Directory, Recipient};
use crate::mailer::Mailer;
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
    #[error("sending mail to user {user}: {message}")]
    Smtp { user: i64, message: String },
    #[error("publishing notify_events: {0}")]
    Publish(String),
}

pub struct Pipeline {
    pub directory: Directory,
    pub mailer: Mailer,
    pub redis: ConnectionManager,
    pub producer: FutureProducer,
    pub notify_topic: String,
    pub metrics: Metrics,
}

impl Pipeline {
    /// Handles every recipient of `event`; `Err` means "retry this message".
    pub async fn handle(&mut self, event: &TaskEvent) -> Result<(), StepError> {
        let ids = event.task.recipients();
        let recipients = self
            .directory
            .lookup(&ids)
            .await
            .map_err(StepError::Directory)?;
        for id in &ids {
            if !recipients.iter().any(|r| r.id == *id) {
                tracing::warn!(user_id = id, event_id = %event.event_id, "recipient has no account; skipped");
            }
        }
        for r in &recipients {
            self.mail_once(event, r).await?;
            self.publish_once(event, r).await?;
        }
        Ok(())
    }

    async fn mail_once(&mut self, event: &TaskEvent, r: &Recipient) -> Result<(), StepError> {
        let mark = format!("notify:mail:{}:{}", event.event_id, r.id);
        if self.is_marked(&mark).await? {
            self.metrics.duplicates.inc();
            return Ok(());
        }
        if let Err(message) = self.mailer.send(event, r).await {
            self.metrics.mail_failures.inc();
            return Err(StepError::Smtp {
                user: r.id,
                message,
            });
        }
        self.metrics.mails_sent.inc();
        self.mark(&mark).await
    }

    async fn publish_once(&mut self, event: &TaskEvent, r: &Recipient) -> Result<(), StepError> {
        let mark = format!("notify:pub:{}:{}", event.event_id, r.id);
        if self.is_marked(&mark).await? {
            return Ok(());
        }
        let notification = NotifyEvent::for_recipient(event, r.id, r.email.clone());
        let payload = serde_json::to_vec(&notification)
            .map_err(|e| StepError::Publish(format!("encoding: {e}")))?;
        let key = notification.key();
        self.producer
            .send(
                FutureRecord::to(&self.notify_topic)
                    .key(&key)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| StepError::Publish(e.to_string()))?;
        self.metrics.published.inc();
        self.mark(&mark).await
    }

    async fn is_marked(&mut self, key: &str) -> Result<bool, StepError> {
        Ok(redis::cmd("EXISTS")
            .arg(key)
            .query_async::<bool>(&mut self.redis)
            .await?)
    }

    async fn mark(&mut self, key: &str) -> Result<(), StepError> {
        redis::cmd("SET")
            .arg(key)
            .arg(1)
            .arg("EX")
            .arg(MARK_TTL_SECS)
            .query_async::<()>(&mut self.redis)
            .await?;
        Ok(())
    }
}
