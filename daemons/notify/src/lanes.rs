//! Per-partition processing of `task_events`: one worker ("lane") per partition, so a
//! partition whose event keeps failing (SMTP down for one recipient's server, Redis
//! hiccup) retries on its own while the other partitions carry on.
//!
//! One dispatcher reads the consumer and hands each message to its partition's lane. A
//! lane handles its messages in order — events of one task share a partition and must
//! not overtake each other — and commits each offset once the message is fully handled.
//! When a lane has `partition_queue` messages waiting, the dispatcher pauses that
//! partition at the broker and resumes it once the lane has caught up, so memory stays
//! bounded however long a lane is stuck.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use taskflow_contracts::TaskEvent;
use taskflow_kit::Lifecycle;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::pipeline::Pipeline;

/// Retry pacing of a lane.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

struct Lane {
    tx: mpsc::UnboundedSender<OwnedMessage>,
    queued: Arc<AtomicUsize>,
    paused: bool,
}

/// Everything the dispatcher and its lanes share.
pub struct Dispatcher {
    pub consumer: Arc<StreamConsumer>,
    pub pipeline: Pipeline,
    pub metrics: Metrics,
    pub lifecycle: Lifecycle,
    pub backoff: Backoff,
    pub partition_queue: usize,
}

fn one_partition(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

impl Dispatcher {
    /// Runs until shutdown, then lets every lane finish the message it is on.
    pub async fn run(self) {
        let mut lanes: HashMap<(String, i32), Lane> = HashMap::new();
        let mut workers = JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let message = tokio::select! {
                m = self.consumer.recv() => m,
                _ = tick.tick() => {
                    self.resume_caught_up(&mut lanes);
                    continue;
                }
                () = self.lifecycle.shutdown.cancelled() => break,
            };
            let message = match message {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka receive failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let key = (message.topic().to_owned(), message.partition());
            let lane = lanes
                .entry(key.clone())
                .or_insert_with(|| self.spawn_lane(&mut workers));
            lane.queued.fetch_add(1, Ordering::SeqCst);
            if lane.tx.send(message).is_err() {
                tracing::error!(
                    partition = key.1,
                    "partition worker ended; message left for redelivery"
                );
            }
            if !lane.paused && lane.queued.load(Ordering::SeqCst) >= self.partition_queue {
                match self.consumer.pause(&one_partition(&key.0, key.1)) {
                    Ok(()) => {
                        lane.paused = true;
                        tracing::info!(
                            partition = key.1,
                            "partition paused until its worker catches up"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot pause partition"),
                }
            }
        }
        drop(lanes);
        while workers.join_next().await.is_some() {}
    }

    fn resume_caught_up(&self, lanes: &mut HashMap<(String, i32), Lane>) {
        for ((topic, partition), lane) in lanes.iter_mut() {
            if lane.paused && lane.queued.load(Ordering::SeqCst) <= self.partition_queue / 2 {
                match self.consumer.resume(&one_partition(topic, *partition)) {
                    Ok(()) => lane.paused = false,
                    Err(e) => tracing::warn!(error = %e, "cannot resume partition"),
                }
            }
        }
    }

    fn spawn_lane(&self, workers: &mut JoinSet<()>) -> Lane {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            consumer: self.consumer.clone(),
            pipeline: self.pipeline.fork(),
            metrics: self.metrics.clone(),
            lifecycle: self.lifecycle.clone(),
            backoff: self.backoff,
            queued: queued.clone(),
        };
        workers.spawn(worker.run(rx));
        Lane {
            tx,
            queued,
            paused: false,
        }
    }
}

/// One partition's worker.
struct Worker {
    consumer: Arc<StreamConsumer>,
    pipeline: Pipeline,
    metrics: Metrics,
    lifecycle: Lifecycle,
    backoff: Backoff,
    queued: Arc<AtomicUsize>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<OwnedMessage>) {
        while let Some(message) = rx.recv().await {
            if self.lifecycle.shutdown.is_cancelled() {
                return; // not committed: redelivered after the restart
            }
            if let Some(event) = self.parse(&message) {
                if !self.handle_until_done(&event).await {
                    return;
                }
            }
            self.commit(&message);
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Handles `event`, retrying transient failures with back-off; `false` on shutdown.
    async fn handle_until_done(&mut self, event: &TaskEvent) -> bool {
        let mut backoff = self.backoff.initial;
        loop {
            match self.pipeline.handle(event).await {
                Ok(()) => {
                    self.metrics.events.inc();
                    tracing::info!(event_id = %event.event_id, kind = %event.kind, task_id = event.task.id, "event handled");
                    return true;
                }
                Err(e) => {
                    self.metrics.retries.inc();
                    tracing::warn!(event_id = %event.event_id, error = %e, retry_in_ms = backoff.as_millis() as u64, "event not fully handled; will retry");
                    self.lifecycle
                        .status(&format!("retrying event {}: {e}", event.event_id));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.lifecycle.shutdown.cancelled() => return false,
                    }
                    backoff = (backoff * 2).min(self.backoff.max);
                }
            }
        }
    }

    fn parse(&self, message: &OwnedMessage) -> Option<TaskEvent> {
        match message.payload().map(serde_json::from_slice::<TaskEvent>) {
            Some(Ok(event)) => Some(event),
            Some(Err(e)) => {
                self.metrics.malformed.inc();
                tracing::error!(partition = message.partition(), offset = message.offset(), error = %e, "malformed task_events message skipped");
                None
            }
            None => {
                self.metrics.malformed.inc();
                tracing::error!(
                    partition = message.partition(),
                    offset = message.offset(),
                    "empty task_events message skipped"
                );
                None
            }
        }
    }

    /// Commits "everything up to and including `message`" for its partition.
    fn commit(&self, message: &OwnedMessage) {
        let mut tpl = TopicPartitionList::new();
        let next = Offset::Offset(message.offset() + 1);
        if let Err(e) = tpl.add_partition_offset(message.topic(), message.partition(), next) {
            tracing::warn!(error = %e, "cannot build the offset commit");
            return;
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "offset commit failed; the message may be redelivered");
        }
    }
}
