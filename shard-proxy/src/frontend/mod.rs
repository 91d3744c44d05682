//! The client side of the wire up to authentication: SSLRequest/TLS, the startup packet,
//! SCRAM-SHA-256 and cancel requests. [`handshake`] returns an [`Authenticated`] client;
//! what happens next (a session or the admin console) is `server`'s decision, not ours.
//!
//! Why separate from sessions: everything before ReadyForQuery is about *who* the client is
//! and is the same for every database; it must survive any byte sequence (errors become a
//! FATAL ErrorResponse and a clean close, never a panic) and never log a password.
//!
//! The handshake reads one configuration [`Snapshot`]: TLS, the database check and the
//! user's verifier all come from the same configuration, even while a reload runs.

pub mod io;

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::proxy::{Proxy, Snapshot};
use crate::scram;
use io::{ClientConn, ClientError};
use proxy_core::wire::frontend::{FrontendMessage, Startup};
use proxy_core::wire::{self, sqlstate};

/// How long a client may take from connect to ReadyForQuery.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the handshake established.
pub struct Authenticated {
    pub conn: ClientConn,
    pub user: String,
    pub database: String,
    pub params: Vec<(String, String)>,
    pub tls: bool,
}

/// Runs the handshake on a new TCP connection within [`HANDSHAKE_TIMEOUT`]. `Ok(None)`: the
/// connection was a cancel request, closed early, failed authentication (the client was
/// told why), or took too long.
pub async fn accept(proxy: &Proxy, tcp: TcpStream) -> Result<Option<Authenticated>, ClientError> {
    let _ = tcp.set_nodelay(true);
    let limit = proxy.config().limits.pre_auth_message_bytes;
    let conn = ClientConn::new(Box::new(tcp), limit);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(proxy, conn)).await {
        Ok(result) => result,
        Err(_) => Ok(None),
    }
}

impl Authenticated {
    /// The `application_name` startup parameter, or empty.
    pub fn application_name(&self) -> String {
        self.params
            .iter()
            .find(|(k, _)| k == "application_name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

/// Runs SSL negotiation, startup and authentication. `Ok(None)`: the connection was a
/// cancel request or closed early; nothing more to do.
async fn handshake(
    proxy: &Proxy,
    mut conn: ClientConn,
) -> Result<Option<Authenticated>, ClientError> {
    let snapshot = proxy.snapshot();
    let Some((params, tls)) = negotiate(proxy, &snapshot, &mut conn).await? else {
        return Ok(None);
    };
    let Some((user, database)) = check_startup(&snapshot, &mut conn, &params).await else {
        return Ok(None);
    };
    let (verifier, known) = proxy.verifier(&snapshot, &user);
    if !authenticate(&mut conn, &user, verifier, known).await? {
        return Ok(None);
    }
    // Authorisation after authentication, as PostgreSQL does: a refusal tells nothing to
    // someone without the password.
    let allowed = snapshot
        .users
        .get(&user)
        .is_some_and(|u| u.databases.contains(&database));
    if !allowed {
        tracing::info!(user = %user, database = %database, "database not allowed for user");
        fatal(
            &mut conn,
            sqlstate::INSUFFICIENT_PRIVILEGE,
            &format!(
                "permission denied for database \"{database}\": user \"{user}\" may not open it"
            ),
        )
        .await;
        return Ok(None);
    }
    conn.max_message = proxy_core::wire::frontend::MAX_MESSAGE_LEN;
    Ok(Some(Authenticated {
        conn,
        user,
        database,
        params,
        tls,
    }))
}

/// Refuses a connection over `limits.max_clients` the way PostgreSQL does: the client's
/// SSLRequest is declined, its startup packet answered with FATAL 53300.
pub async fn refuse_too_many(tcp: TcpStream, max: usize) {
    let mut conn = ClientConn::new(Box::new(tcp), 1024);
    let refuse = async {
        loop {
            match conn.read_startup().await {
                Ok(Some(Startup::SslRequest | Startup::GssEncRequest)) => {
                    if conn.stream.write_all(b"N").await.is_err() {
                        return;
                    }
                }
                Ok(Some(Startup::Startup { .. })) => {
                    let message =
                        format!("sorry, too many clients already ({max}; limits.max_clients)");
                    fatal(&mut conn, sqlstate::TOO_MANY_CONNECTIONS, &message).await;
                    return;
                }
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), refuse).await;
}

/// Startup parameters of a client.
type StartupParams = Vec<(String, String)>;

/// Reads packets until the StartupMessage, answering SSLRequest (TLS if configured) and
/// GSSENCRequest (refused), and forwarding a CancelRequest. Returns the startup parameters
/// and whether TLS is on; `None` when there is nothing more to do.
async fn negotiate(
    proxy: &Proxy,
    snapshot: &Snapshot,
    conn: &mut ClientConn,
) -> Result<Option<(StartupParams, bool)>, ClientError> {
    let mut tls = false;
    loop {
        let startup = match conn.read_startup().await {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(None),
            Err(ClientError::Decode(e)) => {
                fatal(conn, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
                return Err(ClientError::Decode(e));
            }
            Err(e) => return Err(e),
        };
        match startup {
            Startup::SslRequest if !tls => match snapshot.tls.clone() {
                Some(cfg) => {
                    if conn.has_buffered_input() {
                        // Bytes after SSLRequest before the handshake: refuse (CVE-2021-23214 class).
                        return Ok(None);
                    }
                    start_tls(conn, cfg).await?;
                    tls = true;
                }
                None => conn.stream.write_all(b"N").await?,
            },
            Startup::GssEncRequest => conn.stream.write_all(b"N").await?,
            Startup::SslRequest => {
                fatal(conn, sqlstate::PROTOCOL_VIOLATION, "duplicate SSLRequest").await;
                return Ok(None);
            }
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                forward_cancel(proxy, process_id, secret_key).await;
                return Ok(None);
            }
            Startup::Startup { params } => return Ok(Some((params, tls))),
        }
    }
}

/// Answers `S` and runs the TLS handshake on the client's stream.
async fn start_tls(
    conn: &mut ClientConn,
    cfg: std::sync::Arc<rustls::ServerConfig>,
) -> Result<(), ClientError> {
    conn.stream.write_all(b"S").await?;
    let stream = std::mem::replace(
        &mut conn.stream,
        Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    conn.stream = Box::new(acceptor.accept(stream).await?);
    Ok(())
}

/// The user and database of a StartupMessage, if the proxy serves them (else the client
/// is told why, and `None`).
async fn check_startup(
    snapshot: &Snapshot,
    conn: &mut ClientConn,
    params: &StartupParams,
) -> Option<(String, String)> {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        fatal(
            conn,
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return None;
    };
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        fatal(
            conn,
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by the shard proxy",
        )
        .await;
        return None;
    }
    if database != "admin" && database != "auth" && database != snapshot.topology.sharded_database {
        fatal(
            conn,
            sqlstate::INVALID_CATALOG_NAME,
            &format!("database \"{database}\" does not exist"),
        )
        .await;
        return None;
    }
    Some((user, database))
}

/// SCRAM-SHA-256. Returns false (after telling the client) when authentication fails.
async fn authenticate(
    conn: &mut ClientConn,
    user: &str,
    verifier: scram::Verifier,
    known: bool,
) -> Result<bool, ClientError> {
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
        Ok(server_final) if known => {
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
            let mut s = TcpStream::connect((&*t.host, t.port)).await?;
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
