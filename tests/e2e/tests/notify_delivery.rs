//! The notify daemon end to end: a `task_events` message becomes one email per recipient
//! (performer, creator, observers) and one `notify_events` message each; a redelivered
//! event sends no second email; a malformed message is skipped without stopping the
//! daemon; an SMTP outage delays mail but loses none; a partition retrying a recipient whose
//! server answers 4xx does not hold up the other partitions.

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
    let smtp = smtp.start().await.expect("smtp");
    let b = boot(smtp.smtp_port(), 1, "", &[]).await;
    Stack {
        _db: b.db,
        _redis: b.redis,
        kafka: b.kafka,
        smtp,
        notify: b.notify,
        _scratch: b.scratch,
    }
}

/// What [`boot`] starts.
struct Booted {
    db: PgCluster,
    redis: RedisServer,
    kafka: KafkaBroker,
    notify: Daemon,
    scratch: Scratch,
}

/// The auth database (users 1–3 good, 4 unusable, then `extra_users`), Redis, a broker
/// whose topics have `partitions` partitions, and notify mailing through `smtp_port` with
/// `settings` (top-level keys) added to its configuration.
async fn boot(
    smtp_port: u16,
    partitions: i32,
    settings: &str,
    extra_users: &[(&str, &str)],
) -> Booted {
    let db = taskflow_e2e::migrated_db("auth").await;
    let c = db.client("auth").await.expect("client");
    let bad = unusable_address();
    let users = [
        ("creator@example.com", "Creator"),
        ("performer@example.com", "Performer"),
        ("observer@example.com", "Observer"),
        (bad.as_str(), "Unreachable"),
    ];
    for (email, name) in users.iter().chain(extra_users) {
        c.execute(
            "INSERT INTO users (email, name, password_hash) VALUES ($1, $2, 'x')",
            &[email, name],
        )
        .await
        .expect("insert user");
    }
    let redis = RedisServer::temp().await.expect("redis");
    let mut kafka = KafkaBroker::temp().await.expect("broker");
    kafka
        .create_topic("task_events", partitions)
        .await
        .expect("topic");
    kafka
        .create_topic("notify_events", partitions)
        .await
        .expect("topic");
    let scratch = Scratch::new();
    let config = scratch.notify_config(db.port(), &kafka.bootstrap(), &redis.url(), smtp_port);
    let text = std::fs::read_to_string(&config).expect("notify config");
    std::fs::write(&config, format!("{settings}{text}")).expect("notify config");
    let mut notify = Daemon::start("taskflow-notify", &config, &[]);
    notify
        .expect_notify("READY=1", Duration::from_secs(60))
        .await;
    Booted {
        db,
        redis,
        kafka,
        notify,
        scratch,
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

/// A minimal SMTP server that answers `451` (try again later: transient) to `RCPT TO` for
/// one address while `refusing` is set, accepts everything else, and keeps each accepted
/// message's data. MailDev cannot fail one recipient transiently.
struct FlakySmtp {
    port: u16,
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepted: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FlakySmtp {
    async fn start(stuck: &'static str) -> FlakySmtp {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let refusing = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (r, a) = (refusing.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(Self::session(socket, stuck, r.clone(), a.clone()));
            }
        });
        FlakySmtp {
            port,
            refusing,
            accepted,
        }
    }

    async fn session(
        socket: tokio::net::TcpStream,
        stuck: &'static str,
        refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
        accepted: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        if write.write_all(b"220 flaky ESMTP\r\n").await.is_err() {
            return;
        }
        while let Ok(Some(line)) = lines.next_line().await {
            let upper = line.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                b"250 flaky\r\n"
            } else if upper.starts_with("RCPT TO:") {
                if line.contains(stuck) && refusing.load(Ordering::SeqCst) {
                    b"451 4.3.0 mailbox busy, try again later\r\n"
                } else {
                    b"250 ok\r\n"
                }
            } else if upper.starts_with("DATA") {
                if write.write_all(b"354 end with .\r\n").await.is_err() {
                    return;
                }
                let mut data = String::new();
                while let Ok(Some(l)) = lines.next_line().await {
                    if l == "." {
                        break;
                    }
                    data.push_str(&l);
                    data.push('\n');
                }
                accepted.lock().expect("lock").push(data);
                b"250 queued\r\n"
            } else if upper.starts_with("QUIT") {
                let _ = write.write_all(b"221 bye\r\n").await;
                return;
            } else if upper.starts_with("MAIL FROM:")
                || upper.starts_with("RSET")
                || upper.starts_with("NOOP")
            {
                b"250 ok\r\n"
            } else {
                b"502 not implemented\r\n"
            };
            if write.write_all(reply).await.is_err() {
                return;
            }
        }
    }

    /// Accepted messages whose data mentions `text`.
    fn mails_with(&self, text: &str) -> Vec<String> {
        self.accepted
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.contains(text))
            .cloned()
            .collect()
    }
}

async fn produce_to(kafka: &KafkaBroker, partition: i32, event: &TaskEvent) {
    let producer: FutureProducer = kafka.client_config().create().expect("producer");
    let payload = serde_json::to_vec(event).expect("json");
    producer
        .send(
            FutureRecord::to("task_events")
                .key(&event.key())
                .partition(partition)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

/// A recipient whose server keeps answering 4xx holds up only its own partition: an event
/// on another partition is mailed meanwhile, and the held-up mail goes out once the server
/// takes it.
#[tokio::test]
async fn a_partition_retrying_a_transient_failure_does_not_hold_up_the_others() {
    let smtp = FlakySmtp::start("stuck@example.com").await;
    let b = boot(
        smtp.port,
        2,
        "retry_initial_ms = 100\nretry_max_secs = 1\n",
        &[("stuck@example.com", "Stuck")],
    )
    .await;
    let mut notify = b.notify;
    // User 5 observes the first task: its partition retries that event.
    produce_to(&b.kafka, 0, &event_with(71, "Held up", vec![5])).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce_to(&b.kafka, 1, &event(72, "On the other partition")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while smtp.mails_with("On the other partition").len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other partition's mail did not go out while one partition retried\n\
             --- notify log ---\n{}",
            notify.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        smtp.mails_with("Held up")
            .iter()
            .all(|m| !m.contains("stuck@example.com")),
        "the stuck recipient was refused all along"
    );
    assert!(
        notify.logs().contains("will retry"),
        "the held-up event was being retried\n{}",
        notify.logs()
    );
    // The server takes the mail now: the retried event completes, once per recipient.
    smtp.refusing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !smtp
        .mails_with("Held up")
        .iter()
        .any(|m| m.contains("stuck@example.com"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held-up mail never went out\n--- notify log ---\n{}",
            notify.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // performer, creator, the stuck observer: one mail each, none sent twice by the retries
    assert_eq!(
        smtp.mails_with("Held up").len(),
        3,
        "{:?}",
        smtp.mails_with("Held up")
    );
    notify.check_systemd_contract_after_ready().await;
    drop(b.db);
    drop(b.redis);
    drop(b.scratch);
}
