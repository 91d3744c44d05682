//! Starts a real tansu broker, creates a topic, produces and consumes with rdkafka.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use taskflow_localstack::KafkaBroker;

async fn produce(broker: &KafkaBroker, topic: &str, key: &str, payload: &str) {
    let producer: FutureProducer = broker
        .client_config()
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

async fn consume_one(broker: &KafkaBroker, topic: &str, partitions: i32) -> (String, String) {
    let consumer: StreamConsumer = broker
        .client_config()
        .set("group.id", "localstack")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
        .await
        .expect("no message within 20 s")
        .unwrap();
    (
        String::from_utf8(msg.key().unwrap().to_vec()).unwrap(),
        String::from_utf8(msg.payload().unwrap().to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn create_topic_produce_consume() {
    let mut broker = KafkaBroker::temp().await.unwrap();
    assert_eq!(broker.bootstrap(), format!("127.0.0.1:{}", broker.port()));
    broker.create_topic("task_events", 1).await.unwrap();
    // Idempotent.
    broker.create_topic("task_events", 1).await.unwrap();
    assert_eq!(
        broker.topic_partitions("task_events").await.unwrap(),
        Some(1)
    );

    produce(&broker, "task_events", "42", r#"{"event":"created"}"#).await;
    let (key, payload) = consume_one(&broker, "task_events", 1).await;
    assert_eq!(key, "42");
    assert_eq!(payload, r#"{"event":"created"}"#);
}

#[tokio::test]
async fn group_subscription_works() {
    let mut broker = KafkaBroker::temp().await.unwrap();
    broker.create_topic("notify_events", 3).await.unwrap();
    assert_eq!(
        broker.topic_partitions("notify_events").await.unwrap(),
        Some(3)
    );
    let consumer: StreamConsumer = broker
        .client_config()
        .set("group.id", "notify")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&["notify_events"]).unwrap();
    produce(&broker, "notify_events", "k", "v").await;
    let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("no message for the group within 30 s")
        .unwrap();
    assert_eq!(msg.payload().unwrap(), b"v");
}

#[tokio::test]
async fn outage_recreates_topics() {
    let mut broker = KafkaBroker::temp().await.unwrap();
    broker.create_topic("task_events", 2).await.unwrap();
    let pid = broker.pid().unwrap();
    broker.stop().await.unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!broker.is_running());
    broker.start().await.unwrap();
    assert_eq!(
        broker.topic_partitions("task_events").await.unwrap(),
        Some(2)
    );
    produce(&broker, "task_events", "1", "after").await;
    let (_, payload) = consume_one(&broker, "task_events", 2).await;
    assert_eq!(payload, "after");
    let pid = broker.pid().unwrap();
    drop(broker);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
