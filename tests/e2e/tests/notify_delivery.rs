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

/// An address registration now refuses but older databases may hold: its local part is
/// 65 characters, one more than lettre (and RFC 5321) accept.
fn unusable_address() -> String {
    format!("{}@example.com", "u".repeat(65))
}

async fn start() -> Stack {
    start_with(SmtpSink::builder()).await
}

/// Users 1–3 have good addresses, user 4 an unusable one.
async fn start_with(smtp: taskflow_localstack::SmtpSinkBuilder) -> Stack {
    let db = taskflow_e2e::migrated_db("auth").await;
    let c = db.client("auth").await.expect("client");
    let bad = unusable_address();
    for (email, name) in [
        ("creator@example.com", "Creator"),
        ("performer@example.com", "Performer"),
        ("observer@example.com", "Observer"),
        (bad.as_str(), "Unreachable"),
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
    let smtp = smtp.start().await.expect("smtp");
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
    event_with(task_id, title, vec![3, 99]) // 99 has no account: skipped, not fatal
}

fn event_with(task_id: i64, title: &str, observer_ids: Vec<i64>) -> TaskEvent {
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
            observer_ids,
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

/// Every message of `topic` from the beginning until none arrives for 3 s (after the
/// first) or `within` passes.
async fn read_topic(kafka: &KafkaBroker, topic: &str, within: Duration) -> Vec<serde_json::Value> {
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", format!("e2e-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    loop {
        let wait = if out.is_empty() {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::from_secs(3)
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                out.push(serde_json::from_slice(m.payload().expect("payload")).expect("json"))
            }
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => return out,
        }
    }
}

/// Issue 10's defect: one recipient whose address lettre cannot parse made notify retry
/// that event forever, so no later email went to anyone. Now that recipient's mail goes
/// to the dead-letter topic with the reason, the others get theirs, later events flow,
/// and the unreachable user still gets the `notify_events` message (WebSocket push).
#[tokio::test]
async fn an_unusable_address_is_dead_lettered_and_later_events_flow() {
    let mut s = start().await;
    let first = event_with(51, "With one unreachable observer", vec![3, 4]);
    produce(
        &s.kafka,
        &first.key(),
        &serde_json::to_vec(&first).expect("json"),
    )
    .await;
    let later = event_with(52, "A later event", vec![3, 4]);
    produce(
        &s.kafka,
        &later.key(),
        &serde_json::to_vec(&later).expect("json"),
    )
    .await;
    let mails = match s.smtp.wait_for_messages(6, Duration::from_secs(30)).await {
        Ok(m) => m,
        Err(e) => panic!(
            "good recipients starved: {e}\n--- notify log ---\n{}",
            s.notify.logs()
        ),
    };
    assert_eq!(
        recipients_of(&mails, "With one unreachable observer"),
        expected()
    );
    assert_eq!(recipients_of(&mails, "A later event"), expected());

    let letters = read_topic(&s.kafka, "notify_dead_letters", Duration::from_secs(30)).await;
    let mut by_event: Vec<(String, i64)> = letters
        .iter()
        .map(|l| {
            (
                l["source_event_id"].as_str().unwrap_or_default().to_owned(),
                l["user_id"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    by_event.sort();
    let mut want = vec![
        (first.event_id.to_string(), 4),
        (later.event_id.to_string(), 4),
    ];
    want.sort();
    assert_eq!(by_event, want, "{letters:?}");
    let reason = letters[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&unusable_address()),
        "reason names the address: {reason}"
    );
    assert!(letters[0]["smtp_code"].is_null());
    assert_eq!(
        letters[0]["event"]["task"]["id"]
            .as_i64()
            .map(|id| id == 51 || id == 52),
        Some(true)
    );

    let pushed = read_topic(&s.kafka, "notify_events", Duration::from_secs(30)).await;
    assert!(
        pushed
            .iter()
            .any(|n| n["user_id"] == 4 && n["source_event_id"] == first.event_id.to_string()),
        "the unreachable user still gets the WebSocket notification"
    );
    s.notify.check_systemd_contract_after_ready().await;
}

/// A 5xx reply is permanent: those mails are dead-lettered with the code instead of being
/// retried forever, and the next event is mailed.
#[tokio::test]
async fn a_permanent_smtp_refusal_is_dead_lettered() {
    let mut s = start_with(SmtpSink::builder().max_message_size(6_000)).await;
    let mut huge = event(61, "Too big to mail");
    huge.task.description = "z".repeat(20_000);
    produce(
        &s.kafka,
        &huge.key(),
        &serde_json::to_vec(&huge).expect("json"),
    )
    .await;
    let small = event(62, "Small enough");
    produce(
        &s.kafka,
        &small.key(),
        &serde_json::to_vec(&small).expect("json"),
    )
    .await;
    let mails = match s.smtp.wait_for_messages(3, Duration::from_secs(30)).await {
        Ok(m) => m,
        Err(e) => panic!(
            "later event not mailed: {e}\n--- notify log ---\n{}",
            s.notify.logs()
        ),
    };
    assert_eq!(recipients_of(&mails, "Small enough"), expected());
    assert!(recipients_of(&mails, "Too big to mail").is_empty());
    let letters = read_topic(&s.kafka, "notify_dead_letters", Duration::from_secs(30)).await;
    let users: BTreeSet<i64> = letters
        .iter()
        .filter_map(|l| l["user_id"].as_i64())
        .collect();
    assert_eq!(users, BTreeSet::from([1, 2, 3]), "{letters:?}");
    assert!(
        letters.iter().all(|l| l["smtp_code"]
            .as_u64()
            .is_some_and(|c| (500..600).contains(&c))),
        "{letters:?}"
    );
    s.notify.check_systemd_contract_after_ready().await;
}

/// notify killed (SIGKILL) in the middle of a batch and started again: every recipient
/// of every event still gets its mail (at-least-once; at most one duplicate per
/// recipient of the message in flight).
#[tokio::test]
async fn notify_killed_mid_batch_loses_no_mail() {
    let mut s = start().await;
    let events: Vec<TaskEvent> = (0..20)
        .map(|i| event_with(100 + i, &format!("Batch item {i:02}"), vec![3]))
        .collect();
    for ev in &events {
        produce(&s.kafka, &ev.key(), &serde_json::to_vec(ev).expect("json")).await;
    }
    s.smtp
        .wait_for_messages(1, Duration::from_secs(30))
        .await
        .expect("the batch started");
    s.notify.child.start_kill().expect("kill notify");
    let _ = s.notify.child.wait().await;
    let sent_before = s.smtp.messages().await.expect("mails").len();
    assert!(
        sent_before < 60,
        "the batch finished before the kill; nothing was tested"
    );

    let mut again = Daemon::start("taskflow-notify", &s.notify.config, &[]);
    again
        .expect_notify("READY=1", Duration::from_secs(60))
        .await;
    // Wait for every (event, recipient) pair, not for a count: a mail re-sent after the
    // restart (the one in flight at the kill) would make a count reach 60 early.
    let wanted: BTreeSet<(String, String)> = events
        .iter()
        .flat_map(|ev| {
            let subject = format!("[TaskFlow] Task #{} created: {}", ev.task.id, ev.task.title);
            expected().into_iter().map(move |to| (subject.clone(), to))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mails = loop {
        let mails = s.smtp.messages().await.expect("mails");
        let got: BTreeSet<(String, String)> = mails
            .iter()
            .flat_map(|m| m.to.iter().map(|to| (m.subject.clone(), to.clone())))
            .collect();
        let missing: Vec<_> = wanted.difference(&got).collect();
        if missing.is_empty() {
            break mails;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "mail lost after the restart: {missing:?}\n--- log ---\n{}",
            again.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        mails.len() <= 63,
        "{} mails for 60 (duplicates beyond the in-flight message)",
        mails.len()
    );
    again.check_systemd_contract_after_ready().await;
}
