//! Starts a real SMTP sink (MailDev here: scripts/install-deps.sh installs it; Mailpit where
//! only that is installed, e.g. under Nix), sends mail over SMTP with lettre and reads it back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use taskflow_localstack::{maildev_binary, SinkKind, SmtpSink};

async fn send(sink: &SmtpSink, to: &[&str], subject: &str, body: &str) {
    let mut builder = Message::builder()
        .from(
            "TaskFlow <noreply@taskflow.test>"
                .parse::<Mailbox>()
                .unwrap(),
        )
        .subject(subject);
    for t in to {
        builder = builder.to(t.parse::<Mailbox>().unwrap());
    }
    let message = builder.body(body.to_owned()).unwrap();
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.smtp_port())
        .build();
    transport.send(message).await.unwrap();
}

#[tokio::test]
async fn delivers_and_reads_back_mail() {
    let sink = SmtpSink::temp().await.unwrap();
    // Where MailDev is installed (here: scripts/install-deps.sh) it is the one exercised.
    if std::env::var_os("TASKFLOW_SMTP_SINK").is_none() && maildev_binary().is_ok() {
        assert_eq!(sink.kind(), SinkKind::MailDev);
    }
    assert!(sink.messages().await.unwrap().is_empty());

    send(
        &sink,
        &["alice@example.test", "bob@example.test"],
        "Task assigned",
        "You have a new task.",
    )
    .await;
    let mails = sink
        .wait_for_messages(1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(mails.len(), 1);
    let m = &mails[0];
    assert_eq!(m.from, "noreply@taskflow.test");
    assert_eq!(m.to, vec!["alice@example.test", "bob@example.test"]);
    assert_eq!(m.subject, "Task assigned");
    assert_eq!(m.text.trim(), "You have a new task.");

    sink.clear().await.unwrap();
    assert!(sink.messages().await.unwrap().is_empty());

    let err = sink
        .wait_for_messages(1, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("have 0"), "{err}");
}

#[tokio::test]
async fn outage_and_recovery() {
    let mut sink = SmtpSink::temp().await.unwrap();
    let pid = sink.pid().unwrap();
    sink.stop().await.unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(sink.messages().await.is_err());
    sink.start().await.unwrap();
    send(&sink, &["carol@example.test"], "after restart", "hi").await;
    let mails = sink
        .wait_for_messages(1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(mails[0].to, vec!["carol@example.test"]);
    let pid = sink.pid().unwrap();
    drop(sink);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
