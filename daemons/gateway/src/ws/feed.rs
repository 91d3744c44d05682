//! The gateway's reader of `notify_events`: every message becomes one WebSocket message,
//! queued on every connection of its recipient that *this* gateway holds.
//!
//! Every gateway instance must see every notification (its clients could be any users),
//! so instead of a consumer group — which would split the partitions between instances —
//! each instance assigns itself all partitions, starting at the end, and never commits:
//! a restarted gateway does not replay old notifications to new connections, and no group
//! state accumulates at the broker.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use taskflow_contracts::NotifyEvent;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::hub::Hub;

/// How many recent notification ids are remembered to drop redeliveries.
const SEEN_CAPACITY: usize = 4096;

/// The WebSocket message for one notification (SPEC §3). `event_id` is the task event's
/// id, the same for every recipient, as clients see one event once per connection.
pub fn message(n: &NotifyEvent) -> Bytes {
    let at = n
        .occurred_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let v = serde_json::json!({
        "type": "notification",
        "event": n.kind.as_str(),
        "event_id": n.source_event_id,
        "task_id": n.task_id,
        "title": n.title,
        "description": n.description,
        "user_id": n.user_id,
        "occurred_at": at,
        "task": n.task,
    });
    Bytes::from(v.to_string())
}

/// Recent ids, to push a notification redelivered by Kafka only once.
#[derive(Default)]
struct Seen {
    order: VecDeque<Uuid>,
    set: HashSet<Uuid>,
}

impl Seen {
    /// `true` the first time `id` is offered.
    fn first(&mut self, id: Uuid) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > SEEN_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// A consumer assigned every partition of `topic` at its current end.
async fn assign_at_end(brokers: &str, topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Required by librdkafka, never joined: partitions are assigned, not subscribed.
        .set(
            "group.id",
            format!("taskflow-gateway-ws-{}", Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "20")
        .set("broker.address.family", "v4")
        .create()
        .context("creating the notify_events consumer")?;
    let topic_owned = topic.to_owned();
    let consumer = tokio::task::spawn_blocking(move || -> anyhow::Result<StreamConsumer> {
        let md = consumer
            .fetch_metadata(Some(&topic_owned), Duration::from_secs(5))
            .context("reading notify_events metadata")?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic_owned)
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        anyhow::ensure!(partitions > 0, "topic {topic_owned} has no partitions yet");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let p = i32::try_from(p).context("partition count")?;
            tpl.add_partition_offset(&topic_owned, p, Offset::End)?;
        }
        consumer
            .assign(&tpl)
            .context("assigning notify_events partitions")?;
        Ok(consumer)
    })
    .await
    .context("metadata task")??;
    Ok(consumer)
}

/// Feeds the hub until shutdown, re-creating the consumer when it cannot be set up.
pub async fn run(hub: Arc<Hub>, brokers: String, topic: String, shutdown: CancellationToken) {
    let consumer = loop {
        match assign_at_end(&brokers, &topic).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "WebSocket feed not ready; retrying"
                );
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    tracing::info!(topic, "WebSocket feed consuming from the end");
    let mut seen = Seen::default();
    loop {
        let m = tokio::select! {
            m = consumer.recv() => m,
            () = shutdown.cancelled() => return,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "notify_events receive failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match m.payload().map(serde_json::from_slice::<NotifyEvent>) {
            Some(Ok(n)) if seen.first(n.event_id) => {
                hub.deliver(n.user_id, &message(&n));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(offset = m.offset(), error = %e, "malformed notify_events message skipped");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn redeliveries_are_dropped_and_memory_is_bounded() {
        let mut seen = Seen::default();
        let a = Uuid::new_v4();
        assert!(seen.first(a));
        assert!(!seen.first(a));
        for _ in 0..SEEN_CAPACITY {
            seen.first(Uuid::new_v4());
        }
        assert_eq!(seen.set.len(), SEEN_CAPACITY);
        assert!(seen.first(a), "forgotten after SEEN_CAPACITY newer ids");
    }
}
