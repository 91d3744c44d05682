//! The serve loop's limits over real TCP connections: slow headers and slow bodies are
//! cut off while other clients keep being served, and the per-IP and overall connection
//! caps refuse the connection beyond them (503) without affecting anyone else.
//!
//! Distinct client addresses come from binding the client socket to other loopback
//! addresses (127.0.0.2, …), which Linux routes without configuration.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use taskflow_kit::web::{self, ServerLimits};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// Upper bound on any single wait in these tests, only so a regression fails instead of
/// hanging; the behaviour under test happens within a few hundred milliseconds.
const GUARD: Duration = Duration::from_secs(8);

async fn server(limits: ServerLimits) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let handler = Arc::new(
        |req: hyper::Request<hyper::body::Incoming>, _peer: SocketAddr| async move {
            match web::read_body(req.into_body()).await {
                Ok(b) => web::json(
                    hyper::StatusCode::OK,
                    &serde_json::json!({"received": b.len()}),
                ),
                Err(r) => r,
            }
        },
    );
    tokio::spawn(web::serve(listener, shutdown.clone(), limits, handler));
    (addr, shutdown)
}

async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// Reads until the peer closes or `GUARD` passes; the text received.
async fn read_all(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(GUARD, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// One complete request on a fresh connection from `from`; the status line.
async fn get(from: &str, to: SocketAddr) -> String {
    let mut s = connect_from(from, to).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    read_all(&mut s)
        .await
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn slow_body_is_cut_off_while_others_are_served() {
    let (addr, _stop) = server(ServerLimits {
        body_read_timeout_ms: 300,
        ..ServerLimits::default()
    })
    .await;
    let mut slow = connect_from("127.0.0.1", addr).await;
    slow.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    // While the slow client holds its request open, another one is served in full.
    assert!(get("127.0.0.1", addr).await.starts_with("HTTP/1.1 200"));
    let answer = tokio::time::timeout(GUARD, async {
        let mut buf = vec![0u8; 4096];
        let n = slow.read(&mut buf).await.unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .expect("the slow body was never cut off");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // And the connection is closed after the 408.
    let rest = read_all(&mut slow).await;
    assert!(!rest.contains("HTTP/1.1"), "{rest}");
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let (addr, _stop) = server(ServerLimits {
        header_read_timeout_ms: 300,
        ..ServerLimits::default()
    })
    .await;
    let mut slow = connect_from("127.0.0.1", addr).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    assert!(get("127.0.0.1", addr).await.starts_with("HTTP/1.1 200"));
    let closed = tokio::time::timeout(GUARD, async {
        let mut buf = vec![0u8; 4096];
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a client sending headers slowly was never cut off"
    );
}

#[tokio::test]
async fn connection_cap_per_ip() {
    let (addr, _stop) = server(ServerLimits {
        max_connections_per_ip: 2,
        max_connections: 100,
        ..ServerLimits::default()
    })
    .await;
    let held1 = connect_from("127.0.0.1", addr).await;
    let _held2 = connect_from("127.0.0.1", addr).await;
    // Give the accept loop the two connections before the third arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = get("127.0.0.1", addr).await;
    assert!(
        status.starts_with("HTTP/1.1 503"),
        "third connection: {status}"
    );
    // Another address is not affected.
    assert!(get("127.0.0.2", addr).await.starts_with("HTTP/1.1 200"));
    // Closing one held connection gives its slot back.
    drop(held1);
    let mut freed = false;
    for _ in 0..50 {
        if get("127.0.0.1", addr).await.starts_with("HTTP/1.1 200") {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "a closed connection's slot was never given back");
}

#[tokio::test]
async fn connection_cap_overall() {
    let (addr, _stop) = server(ServerLimits {
        max_connections_per_ip: 3,
        max_connections: 3,
        ..ServerLimits::default()
    })
    .await;
    let mut held = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        held.push(connect_from(from, addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = get("127.0.0.5", addr).await;
    assert!(
        status.starts_with("HTTP/1.1 503"),
        "fourth connection: {status}"
    );
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        if get("127.0.0.5", addr).await.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served);
}
