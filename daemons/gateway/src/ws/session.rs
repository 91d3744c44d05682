//! One WebSocket connection (SPEC §3): authenticate within the deadline, then receive
//! pushes until the client leaves, falls behind, its token expires or the gateway stops.
//!
//! Two tasks per connection, because fastwebsockets' `read_frame` is not cancel-safe
//! and so cannot sit in a `select!` with writes: the *reader* (this task) parses client
//! frames; the *writer* owns the socket's write half and sends whatever is queued —
//! notifications from the hub, pongs, error frames, the final close — plus pings on a
//! timer. The reader talks to the writer only through the same bounded queue.
//!
//! | client does | server answers |
//! |---|---|
//! | nothing for `auth_timeout_secs` | close 1008 `authentication timeout` |
//! | `{"type":"authenticate","token":"[Bearer ]<jwt>"}` | `{"type":"authenticated","user_id":N}` |
//! | a bad or expired token | error frame, close 1008 |
//! | authenticates twice | error frame `already authenticated` (stays open) |
//! | non-JSON, unknown `type` | error frame (stays open) |
//! | binary or fragmented frame | close 1003 |
//! | frame over `max_message_bytes` | close 1009 |
//! | stops reading (queue full) | close 1008 `too slow`, dropped |
//! | silent for two ping intervals | dropped |
//! | token expires | close 1008 `token expired` |
//! | gateway shuts down | close 1001 |

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::WriteHalf;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::hub::{Hub, IpSlot, Out, Registration};
use crate::config::WebSocketConfig;
use crate::jwt::{TokenError, Verifier};

type Io = TokioIo<Upgraded>;

/// What a session needs besides its socket.
pub struct Context {
    pub hub: Arc<Hub>,
    pub verifier: Arc<Verifier>,
    pub cfg: WebSocketConfig,
    pub shutdown: CancellationToken,
}

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    token: Option<String>,
}

fn json_frame(value: &serde_json::Value) -> Out {
    Out::Text(Bytes::from(value.to_string()))
}

fn error_frame(message: &str) -> Out {
    json_frame(&serde_json::json!({"type": "error", "error": message}))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// State of the reader between frames.
struct Reader {
    ctx: Arc<Context>,
    tx: mpsc::Sender<Out>,
    kill: CancellationToken,
    registration: Option<Registration>,
    /// When the token expires, sent to the writer once authenticated.
    expiry: mpsc::Sender<Instant>,
}

/// What to do after one client frame.
enum Next {
    Continue,
    Stop,
}

/// Runs a connection to the end. `slot` holds the client IP's quota until then.
pub async fn run(ctx: Arc<Context>, ws: WebSocket<Io>, slot: IpSlot) {
    let (mut read, write) = ws.split(tokio::io::split);
    read.set_auto_close(false);
    read.set_auto_pong(false);
    read.set_max_message_size(ctx.cfg.max_message_bytes);
    let (tx, rx) = mpsc::channel(ctx.cfg.send_queue);
    let (expiry_tx, expiry_rx) = mpsc::channel(1);
    let kill = CancellationToken::new();
    let done = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        ctx.clone(),
        write,
        rx,
        expiry_rx,
        kill.clone(),
        done.clone(),
    ));
    let mut reader = Reader {
        ctx: ctx.clone(),
        tx,
        kill,
        registration: None,
        expiry: expiry_tx,
    };
    let auth_deadline = Instant::now() + Duration::from_secs(ctx.cfg.auth_timeout_secs);
    let idle = Duration::from_secs(ctx.cfg.ping_interval_secs * 2 + 5);
    let mut noop = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
    loop {
        let deadline = if reader.registration.is_some() {
            Instant::now() + idle
        } else {
            auth_deadline
        };
        let frame = tokio::select! {
            f = read.read_frame(&mut noop) => f,
            () = tokio::time::sleep_until(deadline) => {
                if reader.registration.is_none() {
                    reader.close(1008, "authentication timeout").await;
                }
                break; // an authenticated client silent for two pings is gone
            }
            () = done.cancelled() => break,
        };
        let next = match frame {
            Ok(frame) => reader.on_frame(frame).await,
            Err(WebSocketError::FrameTooLarge) => {
                reader.close(1009, "message too big").await;
                Next::Stop
            }
            Err(e) => {
                tracing::debug!(error = %e, "websocket read ended");
                Next::Stop
            }
        };
        if matches!(next, Next::Stop) {
            break;
        }
    }
    drop(reader);
    // The writer finishes its close frame (bounded by the write timeout), then the socket
    // halves are dropped together.
    let _ = writer.await;
    drop(slot);
}

impl Reader {
    /// Asks the writer to close; waits for room in the queue at most a second.
    async fn close(&self, code: u16, reason: &'static str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.tx.send(Out::Close(code, reason)),
        )
        .await;
    }

    async fn reply(&self, out: Out) -> Next {
        match tokio::time::timeout(Duration::from_secs(1), self.tx.send(out)).await {
            Ok(Ok(())) => Next::Continue,
            _ => Next::Stop,
        }
    }

    async fn on_frame(&mut self, frame: Frame<'_>) -> Next {
        match frame.opcode {
            OpCode::Text if frame.fin => self.on_text(&frame.payload).await,
            OpCode::Text | OpCode::Continuation => {
                self.close(1003, "fragmented messages are not supported")
                    .await;
                Next::Stop
            }
            OpCode::Binary => {
                self.close(1003, "binary frames are not supported").await;
                Next::Stop
            }
            OpCode::Ping => self.reply(Out::Pong(frame.payload.to_vec())).await,
            OpCode::Pong => Next::Continue,
            OpCode::Close => {
                self.close(1000, "").await;
                Next::Stop
            }
        }
    }

    async fn on_text(&mut self, payload: &Payload<'_>) -> Next {
        let msg: ClientMessage = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                let why = format!("invalid message: {e} (expected JSON like {{\"type\":\"authenticate\",\"token\":\"…\"}})");
                return self.reply(error_frame(&why)).await;
            }
        };
        match msg.kind.as_str() {
            "authenticate" if self.registration.is_some() => {
                self.reply(error_frame("already authenticated")).await
            }
            "authenticate" => self.authenticate(msg.token.as_deref()).await,
            "ping" => {
                self.reply(json_frame(&serde_json::json!({"type": "pong"})))
                    .await
            }
            other => {
                let why = format!("unknown message type {other:?} (expected \"authenticate\")");
                self.reply(error_frame(&why)).await
            }
        }
    }

    async fn authenticate(&mut self, token: Option<&str>) -> Next {
        let token = token
            .map(str::trim)
            .map(|t| t.strip_prefix("Bearer ").unwrap_or(t).trim())
            .unwrap_or_default();
        let verified = if token.is_empty() {
            Err("missing token".to_owned())
        } else {
            self.ctx.verifier.verify_until(token).map_err(|e| match e {
                TokenError::Expired => "token expired".to_owned(),
                _ => "invalid token".to_owned(),
            })
        };
        let (user, exp) = match verified {
            Ok(v) => v,
            Err(why) => {
                let _ = self.reply(error_frame(&why)).await;
                self.close(1008, "authentication failed").await;
                return Next::Stop;
            }
        };
        self.registration = Some(
            self.ctx
                .hub
                .register(user, self.tx.clone(), self.kill.clone()),
        );
        let left = u64::try_from(exp.saturating_sub(now_secs())).unwrap_or(0);
        let _ = self
            .expiry
            .try_send(Instant::now() + Duration::from_secs(left));
        self.reply(json_frame(
            &serde_json::json!({"type": "authenticated", "user_id": user}),
        ))
        .await
    }
}

/// The writer: queued frames, pings, and the one close frame that ends the connection.
async fn write_loop(
    ctx: Arc<Context>,
    mut ws: WebSocketWrite<WriteHalf<Io>>,
    mut rx: mpsc::Receiver<Out>,
    mut expiry: mpsc::Receiver<Instant>,
    kill: CancellationToken,
    done: CancellationToken,
) {
    let write_timeout = Duration::from_secs(ctx.cfg.write_timeout_secs);
    let mut ping = tokio::time::interval(Duration::from_secs(ctx.cfg.ping_interval_secs));
    ping.tick().await;
    // Far future until the reader reports the token's expiry.
    let mut expires_at = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
    let close = loop {
        let frame = tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Text(b)) => Frame::text(Payload::Owned(b.to_vec())),
                Some(Out::Pong(p)) => Frame::pong(Payload::Owned(p)),
                Some(Out::Close(code, reason)) => break Some((code, reason)),
                None => break None,
            },
            _ = ping.tick() => Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[])),
            Some(at) = expiry.recv() => {
                expires_at = at;
                continue;
            }
            () = tokio::time::sleep_until(expires_at) => break Some((1008, "token expired")),
            () = kill.cancelled() => break Some((1008, "too slow: notifications not read")),
            () = ctx.shutdown.cancelled() => break Some((1001, "server shutting down")),
        };
        match tokio::time::timeout(write_timeout, ws.write_frame(frame)).await {
            Ok(Ok(())) => {}
            _ => break None,
        }
    };
    if let Some((code, reason)) = close {
        // A client that stopped reading may never take this frame; do not wait long.
        let wait = write_timeout.min(Duration::from_secs(1));
        let _ =
            tokio::time::timeout(wait, ws.write_frame(Frame::close(code, reason.as_bytes()))).await;
    }
    done.cancel();
}
