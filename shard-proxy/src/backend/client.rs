//! tokio-postgres clients to a backend, secured exactly like the pools' raw connections
//! (the same [`BackendSecurity`]: `sslmode`, CA, rustls), for the proxy's own typed work —
//! `taskflow-shard-proxy migrate` and `ADD SHARD`'s schema step.
//!
//! Why not `NoTls` there: a URL that says `sslmode=verify-full` must not be used in
//! plaintext by any code path. Why a probe first: tokio-postgres answers a server's
//! cleartext or MD5 password request by itself, so unless `backend.allow_insecure_auth` is
//! set, the proxy's own [`BackendConn`] (which refuses them) logs in once before the typed
//! client does, and the password is never sent to a server that would take it weakly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};
use tokio_postgres::{Client, NoTls};

use super::{BackendConn, BackendError};
use crate::config::{BackendSecurity, BackendTarget, SslMode};

/// Why a client could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {host}:{port}: {source}")]
    Io {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Refused(#[from] BackendError),
}

/// How long the insecure-authentication probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a client to `target` as `user` (or the URL's user), over TLS when `security` says
/// so; its connection task runs on the current runtime.
pub async fn connect(
    target: &BackendTarget,
    security: &BackendSecurity,
    user: &str,
    password: Option<&str>,
) -> Result<Client, ClientError> {
    if password.is_some() && !security.allow_insecure_auth {
        BackendConn::connect(target, security, user, password, PROBE_TIMEOUT)
            .await?
            .terminate()
            .await;
    }
    let mut pg = tokio_postgres::Config::new();
    pg.host(&target.host)
        .port(target.port)
        .dbname(&target.database)
        .user(target.user.as_deref().unwrap_or(user))
        .application_name("taskflow-shard-proxy");
    if let Some(pw) = password {
        pg.password(pw);
    }
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| ClientError::Io {
            host: target.host.clone(),
            port: target.port,
            source,
        })?;
    let Some(tls) = &security.tls else {
        let (client, conn) = pg.connect_raw(tcp, NoTls).await?;
        tokio::spawn(drive(conn));
        return Ok(client);
    };
    pg.ssl_mode(if security.sslmode == SslMode::Prefer {
        tokio_postgres::config::SslMode::Prefer
    } else {
        tokio_postgres::config::SslMode::Require
    });
    let connector = RustlsConnect {
        config: tls.clone(),
        host: target.host.clone(),
    };
    let (client, conn) = pg.connect_raw(tcp, connector).await?;
    tokio::spawn(drive(conn));
    Ok(client)
}

async fn drive(conn: impl Future<Output = Result<(), tokio_postgres::Error>>) {
    if let Err(e) = conn.await {
        tracing::warn!(error = %e, "backend client connection ended");
    }
}

/// tokio-postgres' TLS hook, backed by the backend's rustls client configuration.
struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    host: String,
}

type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<RustlsStream>> + Send>>;

impl TlsConnect<TcpStream> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn connect(self, stream: TcpStream) -> ConnectFuture {
        Box::pin(async move {
            let name = rustls::pki_types::ServerName::try_from(self.host)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let s = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(RustlsStream(s))
        })
    }
}

/// A TLS stream tokio-postgres can drive.
struct RustlsStream(tokio_rustls::client::TlsStream<TcpStream>);

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
