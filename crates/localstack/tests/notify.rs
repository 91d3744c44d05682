//! Checks the fake NOTIFY_SOCKET receives and parses sd_notify datagrams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskflow_localstack::NotifySocket;

#[tokio::test]
async fn receives_and_waits_for_assignments() {
    let sock = NotifySocket::bind().unwrap();
    let sender = tokio::net::UnixDatagram::unbound().unwrap();

    sender
        .send_to(b"STATUS=starting", sock.path())
        .await
        .unwrap();
    assert_eq!(sock.recv().await.unwrap(), "STATUS=starting");

    sender
        .send_to(
            b"READY=1\nSTATUS=listening on 127.0.0.1:3000\n",
            sock.path(),
        )
        .await
        .unwrap();
    sender.send_to(b"WATCHDOG=1", sock.path()).await.unwrap();

    let t = Duration::from_secs(5);
    sock.wait_for_assignment("READY=1", t).await.unwrap();
    let status = sock
        .wait_for(|a| a.starts_with("STATUS="), t)
        .await
        .unwrap();
    assert_eq!(status, "STATUS=listening on 127.0.0.1:3000");
    sock.wait_for_assignment("WATCHDOG=1", t).await.unwrap();

    // Nothing more arrives: a timeout, naming what was seen.
    let err = sock
        .wait_for_assignment("STOPPING=1", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("WATCHDOG=1"), "{err}");

    assert_eq!(
        sock.history(),
        vec![
            "STATUS=starting",
            "READY=1",
            "STATUS=listening on 127.0.0.1:3000",
            "WATCHDOG=1"
        ]
    );
}

#[tokio::test]
async fn works_with_a_child_process_notifying() {
    // A real separate process sends the datagram (as a daemon would via sd_notify).
    let sock = NotifySocket::bind().unwrap();
    let status = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import os,socket; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
             s.sendto(b'READY=1\\nSTATUS=ok', os.environ['NOTIFY_SOCKET'])",
        )
        .env("NOTIFY_SOCKET", sock.path())
        .status()
        .await;
    match status {
        Ok(s) => assert!(s.success()),
        Err(_) => return, // no python3: covered by the test above
    }
    sock.wait_for_assignment("READY=1", Duration::from_secs(5))
        .await
        .unwrap();
}
