//! Helpers shared by the gateway's integration tests.
#![allow(clippy::unwrap_used, dead_code)]

pub mod stack;

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::Message as _;
use serde_json::Value;

/// All `task_events` currently in the broker, from the beginning.
pub async fn task_events(bootstrap: &str) -> Vec<Value> {
    let bootstrap = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset("task_events", p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let mut idle = 0;
        while idle < 4 {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    idle = 0;
                    if let Some(p) = m.payload() {
                        out.push(serde_json::from_slice(p).unwrap());
                    }
                }
                Some(Err(_)) | None => idle += 1,
            }
        }
        out
    })
    .await
    .unwrap()
}
