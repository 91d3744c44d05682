//! The client side of the wire: accepting connections, SSLRequest/TLS, startup, SCRAM
//! authentication and cancel requests; then handing the connection to a
//! [`crate::session::Session`] (databases `tasks` and `auth`) or the admin console.
//!
//! Why separate from sessions: everything before ReadyForQuery is about *who* the client is
//! and is the same for every database; it must survive any byte sequence (errors become a
//! FATAL ErrorResponse and a clean close, never a panic) and never log a password.

pub mod io;
pub mod scram;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proxy::{ClientInfo, Proxy};
use io::{ClientConn, ClientError};
use proxy_core::wire::frontend::{FrontendMessage, Startup};
use proxy_core::wire::{self, sqlstate};

/// How long a client may take from connect to ReadyForQuery.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts clients until `shutdown`; each runs in its own task tracked by `tracker`.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = handle_client(proxy, tcp, addr, shutdown).await {
                tracing::debug!(client = %addr, error = %e, "client connection ended with an error");
            }
        });
    }
}

/// What the handshake established.
pub struct Authenticated {
    pub conn: ClientConn,
    pub user: String,
    pub database: String,
    pub params: Vec<(String, String)>,
    pub tls: bool,
}

async fn handle_client(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let _ = tcp.set_nodelay(true);
    let conn = ClientConn::new(Box::new(tcp));
    let auth = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&proxy, conn)).await {
        Ok(Ok(Some(a))) => a,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let app = auth
        .params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let (id, pid, secret, cancel_slot) = proxy.register_client(ClientInfo {
        id: 0,
        user: auth.user.clone(),
        database: auth.database.clone(),
        addr: addr.to_string(),
        application_name: app,
        connected_at: SystemTime::now(),
        tls: auth.tls,
    });
    let result = if auth.database == "admin" {
        crate::admin::run(proxy.clone(), auth, pid, secret, shutdown).await
    } else {
        crate::session::run(proxy.clone(), auth, id, pid, secret, cancel_slot, shutdown).await
    };
    proxy.unregister_client(id, pid, secret);
    result
}

/// Runs SSL negotiation, startup and authentication. `Ok(None)`: the connection was a
/// cancel request or closed early; nothing more to do.
async fn handshake(
    proxy: &Arc<Proxy>,
    mut conn: ClientConn,
) -> Result<Option<Authenticated>, ClientError> {
    let mut tls = false;
    let params = loop {
        let startup = match conn.read_startup().await {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(None),
            Err(ClientError::Decode(e)) => {
                fatal(&mut conn, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
                return Err(ClientError::Decode(e));
            }
            Err(e) => return Err(e),
        };
        match startup {
            Startup::SslRequest if !tls => {
                let cfg = proxy.tls_config();
                match cfg {
                    Some(cfg) => {
                        if conn.has_buffered_input() {
                            // Bytes after SSLRequest before the handshake: refuse (CVE-2021-23214 class).
                            return Ok(None);
                        }
                        conn.stream.write_all(b"S").await?;
                        let stream = std::mem::replace(
                            &mut conn.stream,
                            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
                        );
                        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                        let tls_stream = acceptor.accept(stream).await?;
                        conn.stream = Box::new(tls_stream);
                        tls = true;
                    }
                    None => conn.stream.write_all(b"N").await?,
                }
            }
            Startup::GssEncRequest => conn.stream.write_all(b"N").await?,
            Startup::SslRequest => {
                fatal(
                    &mut conn,
                    sqlstate::PROTOCOL_VIOLATION,
                    "duplicate SSLRequest",
                )
                .await;
                return Ok(None);
            }
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                forward_cancel(proxy, process_id, secret_key).await;
                return Ok(None);
            }
            Startup::Startup { params } => break params,
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        fatal(
            &mut conn,
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return Ok(None);
    };
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        fatal(
            &mut conn,
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by the shard proxy",
        )
        .await;
        return Ok(None);
    }
    let topo = proxy.topology();
    if database != "admin" && database != "auth" && database != topo.sharded_database {
        fatal(
            &mut conn,
            sqlstate::INVALID_CATALOG_NAME,
            &format!("database \"{database}\" does not exist"),
        )
        .await;
        return Ok(None);
    }
    if !authenticate(proxy, &mut conn, &user).await? {
        return Ok(None);
    }
    Ok(Some(Authenticated {
        conn,
        user,
        database,
        params,
        tls,
    }))
}

/// SCRAM-SHA-256. Returns false (after telling the client) when authentication fails.
async fn authenticate(
    proxy: &Arc<Proxy>,
    conn: &mut ClientConn,
    user: &str,
) -> Result<bool, ClientError> {
    let known = proxy.verifier(user);
    let verifier = known.clone().unwrap_or_else(scram::Verifier::impossible);
    let failed = format!("password authentication failed for user \"{user}\"");
    wire::auth_sasl(&mut conn.out, &["SCRAM-SHA-256"]);
    conn.flush().await?;
    let Some(first) = read_password(conn).await? else {
        return Ok(false);
    };
    let (mech, data) = match proxy_core::wire::frontend::parse_sasl_initial(first) {
        Ok(x) => x,
        Err(e) => {
            fatal(conn, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
            return Ok(false);
        }
    };
    if mech != "SCRAM-SHA-256" {
        fatal(
            conn,
            sqlstate::PROTOCOL_VIOLATION,
            "unsupported SASL mechanism",
        )
        .await;
        return Ok(false);
    }
    let (exchange, server_first) = match scram::ServerExchange::start(verifier, &data) {
        Ok(x) => x,
        Err(e) => {
            fatal(conn, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
            return Ok(false);
        }
    };
    wire::auth_sasl_continue(&mut conn.out, server_first.as_bytes());
    conn.flush().await?;
    let Some(fin) = read_password(conn).await? else {
        return Ok(false);
    };
    match exchange.finish(&fin) {
        Ok(server_final) if known.is_some() => {
            wire::auth_sasl_final(&mut conn.out, server_final.as_bytes());
            wire::auth_ok(&mut conn.out);
            Ok(true)
        }
        Ok(_) | Err(scram::ScramError::BadProof) => {
            tracing::info!(user = %user, "client authentication failed");
            fatal(conn, sqlstate::INVALID_PASSWORD, &failed).await;
            Ok(false)
        }
        Err(e) => {
            fatal(conn, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
            Ok(false)
        }
    }
}

async fn read_password(conn: &mut ClientConn) -> Result<Option<bytes::Bytes>, ClientError> {
    match conn.read_frame().await {
        Ok(Some(f)) => match f.msg {
            FrontendMessage::Password(b) => Ok(Some(b)),
            FrontendMessage::Terminate => Ok(None),
            _ => {
                fatal(conn, sqlstate::PROTOCOL_VIOLATION, "expected SASL response").await;
                Ok(None)
            }
        },
        Ok(None) => Ok(None),
        Err(ClientError::Decode(e)) => {
            fatal(conn, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Sends a FATAL ErrorResponse (best effort).
pub async fn fatal(conn: &mut ClientConn, code: &str, message: &str) {
    wire::error(&mut conn.out, "FATAL", code, message);
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.flush()).await;
}

/// Forwards a CancelRequest to every backend the client is using.
async fn forward_cancel(proxy: &Proxy, pid: i32, secret: i32) {
    for t in proxy.cancel_targets(pid, secret) {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(t.pid, t.secret, &mut buf);
        let fut = async {
            let mut s = TcpStream::connect((t.host.as_str(), t.port)).await?;
            s.write_all(&buf).await?;
            s.shutdown().await
        };
        match tokio::time::timeout(Duration::from_secs(5), fut).await {
            Ok(Ok(())) => tracing::debug!(backend_pid = t.pid, "cancel forwarded"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cancel forward failed"),
            Err(_) => tracing::warn!("cancel forward timed out"),
        }
    }
}
