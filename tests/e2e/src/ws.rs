//! A minimal WebSocket client for the notification tests (fastwebsockets' client
//! handshake over a plain TCP stream).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;

struct Spawner;

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// What the server sent next.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Json(Value),
    /// A close frame: code and reason.
    Close(u16, String),
    /// The connection ended without a close frame.
    Gone,
    /// Nothing within the wait.
    Nothing,
}

pub struct WsClient {
    ws: WebSocket<TokioIo<Upgraded>>,
}

/// Why a connection attempt failed: the HTTP status when the server refused the upgrade.
#[derive(Debug)]
pub struct Refused(pub Option<u16>, pub String);

impl WsClient {
    /// Opens `ws://<host:port>/tasks/notifications` (`base` is the gateway's http URL).
    pub async fn connect(base: &str) -> Result<WsClient, Refused> {
        let host = base.trim_start_matches("http://").trim_end_matches('/');
        let stream = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| Refused(None, e.to_string()))?;
        let req = hyper::Request::builder()
            .method("GET")
            .uri(format!("http://{host}/tasks/notifications"))
            .header("Host", host)
            .header(hyper::header::UPGRADE, "websocket")
            .header(hyper::header::CONNECTION, "upgrade")
            .header(
                "Sec-WebSocket-Key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("Sec-WebSocket-Version", "13")
            .body(Empty::<Bytes>::new())
            .map_err(|e| Refused(None, e.to_string()))?;
        let executor = Spawner;
        match fastwebsockets::handshake::client(&executor, req, stream).await {
            Ok((ws, _)) => Ok(WsClient { ws }),
            Err(WebSocketError::InvalidStatusCode(code)) => {
                Err(Refused(Some(code), format!("status {code}")))
            }
            Err(e) => Err(Refused(None, e.to_string())),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .write_frame(Frame::text(Payload::Owned(text.as_bytes().to_vec())))
            .await
            .expect("send text frame");
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.ws
            .write_frame(Frame::binary(Payload::Owned(bytes.to_vec())))
            .await
            .expect("send binary frame");
    }

    /// Sends `authenticate` and expects `authenticated` with `user_id`.
    pub async fn authenticate(&mut self, token: &str, user_id: i64) {
        self.send_text(&serde_json::json!({"type": "authenticate", "token": token}).to_string())
            .await;
        match self.next(Duration::from_secs(5)).await {
            Received::Json(v) => assert_eq!(
                v,
                serde_json::json!({"type": "authenticated", "user_id": user_id}),
                "authentication reply"
            ),
            other => panic!("expected `authenticated`, got {other:?}"),
        }
    }

    /// The next message, skipping pings (answered automatically).
    pub async fn next(&mut self, wait: Duration) -> Received {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.ws.read_frame()).await {
                Err(_) => return Received::Nothing,
                Ok(Err(_)) => return Received::Gone,
                Ok(Ok(f)) => f,
            };
            match frame.opcode {
                OpCode::Text => {
                    let v = serde_json::from_slice(&frame.payload).expect("server sent JSON");
                    return Received::Json(v);
                }
                OpCode::Close => {
                    let p = frame.payload.to_vec();
                    let code = if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    };
                    let reason =
                        String::from_utf8_lossy(p.get(2..).unwrap_or_default()).into_owned();
                    return Received::Close(code, reason);
                }
                _ => continue,
            }
        }
    }

    /// The next `notification` message (fails on anything else).
    pub async fn notification(&mut self, wait: Duration) -> Value {
        match self.next(wait).await {
            Received::Json(v) if v["type"] == "notification" => v,
            other => panic!("expected a notification within {wait:?}, got {other:?}"),
        }
    }
}
