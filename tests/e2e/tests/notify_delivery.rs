//! The notify daemon end to end: a `task_events` message becomes one email per recipient
//! (performer, creator, observers) and one `notify_events` message each; a redelivered
//! event sends no second email; a malformed message is skipped without stopping the
//! daemon; an SMTP outage delays mail but loses none.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use taskflow_contracts::{NotifyEvent, Task, TaskEvent, TaskEventType, TaskStatus};
use taskflow_e2e::{Daemon, Scratch};
use taskflow_localstack::{KafkaBroker, PgCluster, RedisServer, SmtpSink};

struct Stack {
    _db: PgCluster,
    _redis: RedisServer,
    kafka: KafkaBroker,
    smtp: SmtpSink,
    notify: Daemon,
    _scratch: Scratch,
}

async fn start() -> Stack {
    let db = taskflow_e2e::migrated_db("auth").await;
    let c = db.client("auth").await.expect("client");
    for (email, name) in [
        ("creator@example.com", "Creator"),
        ("performer@example.com", "Performer"),
        ("observer@example.com", "Observer"),
    ] {
        c.execute(
            "INSERT INTO users (email, name, password_hash) VALUES ($1, $2, 'x')",
            &[&email, &name],
        )
        .await
        .expect("insert user");
    }
    let redis = RedisServer::temp().await.expect("redis");
    let mut kafka = KafkaBroker::temp().await.expect("broker");
    kafka.create_topic("task_events", 1).await.expect("topic");
    kafka.create_topic("notify_events", 1).await.expect("topic");
    let smtp = SmtpSink::temp().await.expect("smtp");
    let scratch = Scratch::new();
    let config = scratch.notify_config(
        db.port(),
        &kafka.bootstrap(),
        &redis.url(),
        smtp.smtp_port(),
    );
    let mut notify = Daemon::start("taskflow-notify", &config, &[]);
    notify
        .expect_notify("READY=1", Duration::from_secs(60))
        .await;
    Stack {
        _db: db,
        _redis: redis,
        kafka,
        smtp,
        notify,
        _scratch: scratch,
    }
}

fn event(task_id: i64, title: &str) -> TaskEvent {
    let now = time::OffsetDateTime::now_utc();
    TaskEvent::new(
        TaskEventType::Created,
        1,
        Task {
            id: task_id,
            title: title.into(),
            description: "Finish the backend implementation".into(),
            performer_id: 2,
            creator_id: 1,
            observer_ids: vec![3, 99], // 99 has no account: skipped, not fatal
            status: TaskStatus::Pending,
            created_at: now,
            updated_at: now,
            version: 1,
        },
        None,
    )
}

async fn produce(kafka: &KafkaBroker, key: &str, payload: &[u8]) {
    let producer: FutureProducer = kafka.client_config().create().expect("producer");
    producer
        .send(
            FutureRecord::to("task_events").key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

fn recipients_of(mails: &[taskflow_localstack::ReceivedMail], title: &str) -> BTreeSet<String> {
    mails
        .iter()
        .filter(|m| m.subject.contains(title))
        .flat_map(|m| m.to.iter().cloned())
        .collect()
}

fn expected() -> BTreeSet<String> {
    [
        "creator@example.com",
        "performer@example.com",
        "observer@example.com",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

#[tokio::test]
async fn one_mail_per_recipient_even_when_redelivered() {
    let mut s = start().await;
    let ev = event(41, "Complete project");
    let payload = serde_json::to_vec(&ev).expect("json");

    // A poison message first: skipped, the daemon goes on.
    produce(&s.kafka, "0", b"{not json").await;
    produce(&s.kafka, &ev.key(), &payload).await;
    let mails = s
        .smtp
        .wait_for_messages(3, Duration::from_secs(30))
        .await
        .expect("three mails");
    assert_eq!(recipients_of(&mails, "Complete project"), expected());

    // notify_events: one per recipient, keyed by user id, pointing back at the event.
    let consumer: StreamConsumer = s
        .kafka
        .client_config()
        .set("group.id", "e2e-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&["notify_events"]).expect("subscribe");
    let mut users = BTreeSet::new();
    while users.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("notify_events within 30 s")
            .expect("message");
        let n: NotifyEvent = serde_json::from_slice(m.payload().expect("payload")).expect("shape");
        assert_eq!(n.source_event_id, ev.event_id);
        assert_eq!(m.key(), Some(n.user_id.to_string().as_bytes()));
        users.insert(n.user_id);
    }
    assert_eq!(users, BTreeSet::from([1, 2, 3]));

    // The same event again (at-least-once delivery): no second email.
    produce(&s.kafka, &ev.key(), &payload).await;
    let marker = event(42, "Marker after redelivery");
    produce(
        &s.kafka,
        &marker.key(),
        &serde_json::to_vec(&marker).expect("json"),
    )
    .await;
    let mails = s
        .smtp
        .wait_for_messages(6, Duration::from_secs(30))
        .await
        .expect("marker mails");
    assert_eq!(recipients_of(&mails, "Marker after redelivery"), expected());
    assert_eq!(
        mails
            .iter()
            .filter(|m| m.subject.contains("Complete project"))
            .count(),
        3,
        "a redelivered event was mailed twice"
    );
    s.notify.check_systemd_contract_after_ready().await;
}

#[tokio::test]
async fn an_smtp_outage_delays_mail_but_loses_none() {
    let mut s = start().await;
    s.smtp.stop().await.expect("stop smtp");
    let ev = event(7, "Written while SMTP was down");
    produce(&s.kafka, &ev.key(), &serde_json::to_vec(&ev).expect("json")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.smtp.start().await.expect("start smtp");
    let mails = match s.smtp.wait_for_messages(3, Duration::from_secs(60)).await {
        Ok(m) => m,
        Err(e) => panic!(
            "no mail after the outage: {e}\n--- notify log ---\n{}",
            s.notify.logs()
        ),
    };
    assert_eq!(
        recipients_of(&mails, "Written while SMTP was down"),
        expected()
    );
    s.notify.check_systemd_contract_after_ready().await;
}
