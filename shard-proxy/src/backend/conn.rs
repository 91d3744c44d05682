//! One raw protocol-v3 connection from the proxy to a PostgreSQL server.
//!
//! Why raw: the proxy forwards most traffic byte for byte, so it needs the socket and its
//! framing, not a client library's typed API. Startup and SCRAM-SHA-256 (via
//! `postgres-protocol`'s `authentication::sasl`) happen here; afterwards the connection
//! remembers what session state it carries (prepared statement names, applied settings) so
//! the pool can hand it to any client and make it look like that client's own session.
//!
//! Transport: plain TCP, or TLS (rustls) after an SSLRequest when the backend's `sslmode`
//! asks for it ([`BackendSecurity`]); both are a [`BackendStream`].

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{BackendSecurity, BackendTarget, SslMode};
use proxy_core::wire::{self, ErrorInfo, RawMsg};

/// Why talking to a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connect timed out")]
    Timeout,
    #[error("server closed the connection")]
    Closed,
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("server error: {0}")]
    Server(ErrorInfo),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("server does not accept TLS connections, but sslmode={0} requires TLS")]
    TlsRefused(SslMode),
    #[error("TLS handshake failed (sslmode={mode}): {message}")]
    Tls { mode: SslMode, message: String },
    #[error(
        "server asked for {0} password authentication, which the proxy refuses: it exposes \
         the password (or a replayable hash of it) on the wire; use scram-sha-256 in the \
         server's pg_hba.conf, or set backend.allow_insecure_auth = true to allow it"
    )]
    InsecureAuth(&'static str),
}

/// The socket to a backend: plain TCP or TLS over TCP.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendStream {
    /// Opens the TCP connection and, when `security` asks for it, sends SSLRequest and
    /// runs the TLS handshake (before the startup message, as libpq does).
    async fn open(
        target: &BackendTarget,
        security: &BackendSecurity,
    ) -> Result<BackendStream, BackendError> {
        let mut tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = &security.tls else {
            return Ok(BackendStream::Plain(tcp));
        };
        let mode = security.sslmode;
        let mut request = BytesMut::with_capacity(8);
        frontend::ssl_request(&mut request);
        tcp.write_all(&request).await?;
        // Exactly one byte: anything the server sent after it belongs to the handshake
        // (and a plaintext injection there fails it, CVE-2021-23222).
        match tcp.read_u8().await? {
            b'S' => {}
            b'N' if mode == SslMode::Prefer => return Ok(BackendStream::Plain(tcp)),
            b'N' => return Err(BackendError::TlsRefused(mode)),
            other => {
                return Err(BackendError::Protocol(format!(
                    "unexpected answer {:?} to SSLRequest",
                    char::from(other)
                )))
            }
        }
        let name = rustls::pki_types::ServerName::try_from(target.host.clone()).map_err(|e| {
            BackendError::Tls {
                mode,
                message: format!("host `{}`: {e}", target.host),
            }
        })?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| BackendError::Tls {
                mode,
                message: e.to_string(),
            })?;
        Ok(BackendStream::Tls(Box::new(stream)))
    }

    /// The TCP socket underneath.
    fn tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(s) => s,
            BackendStream::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Rows and tags returned by [`BackendConn::simple_query`].
#[derive(Debug, Default)]
pub struct SimpleResult {
    pub rows: Vec<Vec<Option<String>>>,
    pub tags: Vec<String>,
}

/// A connected, authenticated backend.
pub struct BackendConn {
    stream: BackendStream,
    rbuf: BytesMut,
    pub wbuf: BytesMut,
    /// Backend process id and cancel key (for forwarding CancelRequest).
    pub pid: i32,
    pub secret: i32,
    /// `host:port`, for cancel requests.
    pub host: Arc<str>,
    pub port: u16,
    /// ParameterStatus values reported at startup.
    pub params: Vec<(String, String)>,
    /// Proxy-global prepared statement names present on this connection.
    pub prepared: HashSet<String>,
    /// Session settings applied by the proxy (name → value as given by a client).
    pub settings: BTreeMap<String, String>,
    /// Last ReadyForQuery status.
    pub status: u8,
    /// Session state a client left here that cannot be replayed or reset piecemeal
    /// (`sqltext::session_state`): the connection is closed instead of going back to the
    /// pool, so the next client never inherits it.
    pub session_state: Option<&'static str>,
    pub created: Instant,
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BackendConn({}:{} pid {})",
            self.host, self.port, self.pid
        )
    }
}

impl BackendConn {
    /// Connects (over TLS when `security` says so), authenticates (SCRAM-SHA-256; MD5 or
    /// cleartext only if `security` allows them) and waits for the first ReadyForQuery.
    pub async fn connect(
        target: &BackendTarget,
        security: &BackendSecurity,
        user: &str,
        password: Option<&str>,
        timeout: Duration,
    ) -> Result<BackendConn, BackendError> {
        tokio::time::timeout(
            timeout,
            Self::connect_inner(target, security, user, password),
        )
        .await
        .map_err(|_| BackendError::Timeout)?
    }

    async fn connect_inner(
        target: &BackendTarget,
        security: &BackendSecurity,
        user: &str,
        password: Option<&str>,
    ) -> Result<BackendConn, BackendError> {
        let stream = BackendStream::open(target, security).await?;
        let mut conn = BackendConn {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            wbuf: BytesMut::with_capacity(1024),
            pid: 0,
            secret: 0,
            host: Arc::from(target.host.as_str()),
            port: target.port,
            params: Vec::new(),
            prepared: HashSet::new(),
            settings: BTreeMap::new(),
            status: b'I',
            session_state: None,
            created: Instant::now(),
        };
        let user = target.user.as_deref().unwrap_or(user);
        frontend::startup_message(
            [
                ("user", user),
                ("database", target.database.as_str()),
                ("application_name", "taskflow-shard-proxy"),
            ],
            &mut conn.wbuf,
        )?;
        conn.flush().await?;
        let mut auth = ClientAuth {
            user,
            password,
            allow_insecure: security.allow_insecure_auth,
            scram: None,
        };
        loop {
            let msg = conn.read_msg().await?;
            if conn.startup_message(&msg, &mut auth).await? {
                return Ok(conn);
            }
        }
    }

    /// Handles one message of the startup phase; true at the first ReadyForQuery.
    async fn startup_message(
        &mut self,
        msg: &RawMsg,
        auth: &mut ClientAuth<'_>,
    ) -> Result<bool, BackendError> {
        match msg.parse()? {
            Message::AuthenticationOk => {}
            Message::ParameterStatus(body) => {
                self.params
                    .push((body.name()?.to_owned(), body.value()?.to_owned()));
            }
            Message::BackendKeyData(body) => {
                self.pid = body.process_id();
                self.secret = body.secret_key();
            }
            Message::ReadyForQuery(body) => {
                self.status = body.status();
                return Ok(true);
            }
            Message::ErrorResponse(_) => {
                let info = wire::error_info(msg.body());
                return Err(if info.code.starts_with("28") {
                    BackendError::Auth(info.message)
                } else {
                    BackendError::Server(info)
                });
            }
            Message::NoticeResponse(_) => {}
            other => {
                if !auth.answer(other, &mut self.wbuf)? {
                    return Err(BackendError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        char::from(msg.tag)
                    )));
                }
                self.flush().await?;
            }
        }
        Ok(false)
    }

    /// Reads one message.
    pub async fn read_msg(&mut self) -> Result<RawMsg, BackendError> {
        loop {
            if let Some(m) = self.next_buffered()? {
                return Ok(m);
            }
            self.read_more().await?;
        }
    }

    /// The next message if it is already buffered whole (a backend FATAL as ERROR, as in
    /// [`BackendConn::read_msg`]).
    pub fn next_buffered(&mut self) -> Result<Option<RawMsg>, BackendError> {
        Ok(wire::split_backend(&mut self.rbuf)?.map(RawMsg::fatal_as_error))
    }

    /// Moves the buffered messages a relay forwards unread ([`wire::relayable_prefix`])
    /// to `out`, in one copy. Returns how many bytes moved.
    pub fn relay_buffered(&mut self, out: &mut BytesMut) -> Result<usize, BackendError> {
        let n = wire::relayable_prefix(&self.rbuf)?;
        if n > 0 {
            out.extend_from_slice(&self.rbuf[..n]);
            self.rbuf.advance(n);
        }
        Ok(n)
    }

    /// Waits for more bytes from the server (at least one).
    pub async fn read_more(&mut self) -> Result<(), BackendError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(8192);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(BackendError::Closed);
        }
        Ok(())
    }

    /// Writes everything queued in `wbuf`.
    pub async fn flush(&mut self) -> Result<(), BackendError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
            if self.stream.is_tls() {
                // rustls may hold the last record until flushed.
                self.stream.flush().await?;
            }
        }
        Ok(())
    }

    /// True if the server has closed the socket or sent something unsolicited (e.g. a FATAL
    /// "terminating connection" error) while the connection sat idle: it must not be reused.
    pub fn is_stale(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        // On TLS this reads (and loses) ciphertext: fine, any byte means "discard".
        let mut probe = [0u8; 1];
        match self.stream.tcp().try_read(&mut probe) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }

    /// Runs a simple query for the proxy's own purposes, collecting text rows and tags.
    /// A server error is returned as [`BackendError::Server`] after the connection is back
    /// at ReadyForQuery (so it stays usable).
    pub async fn simple_query(&mut self, sql: &str) -> Result<SimpleResult, BackendError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        self.collect_until_ready().await
    }

    /// Reads responses until ReadyForQuery, collecting rows, tags and the first error.
    pub async fn collect_until_ready(&mut self) -> Result<SimpleResult, BackendError> {
        let mut out = SimpleResult::default();
        let mut err = None;
        loop {
            let m = self.read_msg().await?;
            match m.tag {
                b'D' => {
                    if let Some(vals) = wire::data_row_values(&m.data) {
                        out.rows.push(
                            vals.into_iter()
                                .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                                .collect(),
                        );
                    }
                }
                b'C' => out.tags.push(wire::command_tag(&m.data)),
                b'E' => {
                    err.get_or_insert_with(|| wire::error_info(m.body()));
                }
                b'Z' => {
                    self.status = m.body().first().copied().unwrap_or(b'I');
                    return match err {
                        Some(e) => Err(BackendError::Server(e)),
                        None => Ok(out),
                    };
                }
                b'G' => {
                    // COPY FROM STDIN in an internal query: refuse it.
                    frontend::copy_fail("not supported here", &mut self.wbuf)?;
                    self.flush().await?;
                }
                _ => {}
            }
        }
    }

    /// Sends Terminate and closes (best effort).
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_millis(200), self.flush()).await;
    }
}

/// The proxy's side of a backend's authentication request: SCRAM-SHA-256 (through
/// `postgres-protocol`), or MD5 and cleartext when the server asks for them and
/// `backend.allow_insecure_auth` allows them (PostgreSQL's `pg_hba.conf` decides which;
/// the proxy sends nothing a server did not ask for).
struct ClientAuth<'a> {
    user: &'a str,
    password: Option<&'a str>,
    /// Answer cleartext and MD5 requests (else refuse them).
    allow_insecure: bool,
    scram: Option<ScramSha256>,
}

impl ClientAuth<'_> {
    /// Refuses a cleartext or MD5 request unless allowed.
    fn insecure(&self, mechanism: &'static str) -> Result<(), BackendError> {
        if self.allow_insecure {
            Ok(())
        } else {
            Err(BackendError::InsecureAuth(mechanism))
        }
    }

    fn password(&self) -> Result<&str, BackendError> {
        self.password.ok_or_else(|| {
            BackendError::Auth("server asked for a password; none configured".into())
        })
    }

    /// Writes the answer to an authentication message into `out`. `Ok(false)`: not an
    /// authentication message.
    fn answer(&mut self, msg: Message, out: &mut BytesMut) -> Result<bool, BackendError> {
        match msg {
            Message::AuthenticationCleartextPassword => {
                self.insecure("cleartext")?;
                frontend::password_message(self.password()?.as_bytes(), out)?;
            }
            Message::AuthenticationMd5Password(body) => {
                self.insecure("MD5")?;
                let hashed = postgres_protocol::authentication::md5_hash(
                    self.user.as_bytes(),
                    self.password()?.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hashed.as_bytes(), out)?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechs = body.mechanisms();
                let mut offered = false;
                while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechs)? {
                    offered |= m == "SCRAM-SHA-256";
                }
                if !offered {
                    return Err(BackendError::Auth("server offers no SCRAM-SHA-256".into()));
                }
                let s =
                    ScramSha256::new(self.password()?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), out)?;
                self.scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| BackendError::Protocol("unexpected SASL continue".into()))?;
                s.update(body.data())
                    .map_err(|e| BackendError::Auth(e.to_string()))?;
                frontend::sasl_response(s.message(), out)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| BackendError::Protocol("unexpected SASL final".into()))?;
                s.finish(body.data())
                    .map_err(|e| BackendError::Auth(e.to_string()))?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}
