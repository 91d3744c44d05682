//! Buffered client connection: reads decoded frames, batches writes.
//!
//! Why: a client's socket may be plain TCP or TLS; the rest of the proxy only wants "next
//! message" and "queue these bytes, flush at ReadyForQuery". Reads are bounded by the
//! decoder's limits, and idle clients keep their buffers small so 1,000 idle clients
//! cost little memory.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use proxy_core::wire::frontend::{self, DecodeError, Frame, Startup};

/// Any bidirectional byte stream (TCP or TLS over TCP).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// Why reading from a client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Decode(#[from] DecodeError),
    #[error("client closed the connection mid-message")]
    Truncated,
}

/// Buffer size kept while a client is idle.
const IDLE_CAPACITY: usize = 1024;

pub struct ClientConn {
    pub stream: Box<dyn ClientStream>,
    rbuf: BytesMut,
    pub out: BytesMut,
    /// While set, output is only written at ReadyForQuery (so it can still be retracted,
    /// e.g. when an implicit cross-shard commit fails).
    pub hold_output: bool,
    /// Largest message accepted now: small until the client has authenticated, so nobody
    /// without a password can make the proxy reserve megabytes.
    pub max_message: usize,
}

impl ClientConn {
    /// A connection accepting messages of at most `max_message` bytes.
    pub fn new(stream: Box<dyn ClientStream>, max_message: usize) -> Self {
        ClientConn {
            stream,
            rbuf: BytesMut::new(),
            out: BytesMut::new(),
            hold_output: false,
            max_message,
        }
    }

    /// Replaces the stream (after a TLS handshake). Pending unread bytes would be a
    /// protocol violation (data sent before the handshake) and are refused by the caller.
    pub fn has_buffered_input(&self) -> bool {
        !self.rbuf.is_empty()
    }

    async fn fill(&mut self) -> Result<bool, ClientError> {
        if self.rbuf.capacity() - self.rbuf.len() < 512 {
            let want = frontend::pending_len(&self.rbuf)
                .map(|l| l.saturating_sub(self.rbuf.len()))
                .unwrap_or(0)
                .clamp(
                    4096,
                    self.max_message.clamp(4096, frontend::MAX_MESSAGE_LEN),
                );
            self.rbuf.reserve(want);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        Ok(n > 0)
    }

    /// Reads the startup packet. `Ok(None)` on a clean EOF before any byte.
    pub async fn read_startup(&mut self) -> Result<Option<Startup>, ClientError> {
        loop {
            if let Some(s) = frontend::decode_startup(&mut self.rbuf)? {
                return Ok(Some(s));
            }
            if !self.fill().await? {
                return if self.rbuf.is_empty() {
                    Ok(None)
                } else {
                    Err(ClientError::Truncated)
                };
            }
        }
    }

    /// Reads the next message. `Ok(None)` on a clean EOF between messages.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            if let Some(f) = frontend::decode_message_within(&mut self.rbuf, self.max_message)? {
                if self.rbuf.is_empty() && self.rbuf.capacity() > 64 * 1024 {
                    self.rbuf = BytesMut::new();
                }
                return Ok(Some(f));
            }
            if !self.fill().await? {
                return if self.rbuf.is_empty() {
                    Ok(None)
                } else {
                    Err(ClientError::Truncated)
                };
            }
        }
    }

    /// True if a complete message is already buffered (pipelined input).
    pub fn has_complete_frame(&self) -> bool {
        frontend::pending_len(&self.rbuf).is_some_and(|l| self.rbuf.len() >= l)
    }

    /// Writes all queued output.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
            if self.out.capacity() > 64 * 1024 {
                self.out = BytesMut::with_capacity(IDLE_CAPACITY);
            }
        }
        self.stream.flush().await
    }

    /// Flushes if the queue grew large (while relaying big results).
    pub async fn maybe_flush(&mut self) -> std::io::Result<()> {
        if !self.hold_output && self.out.len() >= 64 * 1024 {
            self.flush().await?;
        }
        Ok(())
    }
}
