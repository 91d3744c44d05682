//! The admin console: `psql -d admin` speaks to the proxy itself.
//!
//! Why a console and not only metrics: operators need to ask "which shard owns key 42?",
//! see pools and clients, and PAUSE/RESUME/RELOAD without signals. Commands are few and
//! fixed, so they are matched textually (no SQL parser); answers are ordinary
//! RowDescription/DataRow results that any PostgreSQL client can display. Only the simple
//! query protocol is served.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::frontend::io::ClientError;
use crate::frontend::Authenticated;
use crate::proxy::Proxy;
use proxy_core::ring::Ring;
use proxy_core::wire::frontend::FrontendMessage;
use proxy_core::wire::{self, sqlstate, ColumnDesc};

/// A result set: column names and text rows.
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

/// What a command produced.
pub enum Answer {
    Rows(Table, String),
    Tag(String),
    Error(&'static str, String),
}

pub async fn run(
    proxy: Arc<Proxy>,
    auth: Authenticated,
    pid: i32,
    secret: i32,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let mut conn = auth.conn;
    for (k, v) in [
        ("server_version", "15.0 (taskflow-shard-proxy admin)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("IntervalStyle", "postgres"),
        ("is_superuser", "off"),
    ] {
        wire::parameter_status(&mut conn.out, k, v);
    }
    wire::backend_key_data(&mut conn.out, pid, secret);
    wire::ready_for_query(&mut conn.out, b'I');
    conn.flush().await?;
    let mut extended_error = false;
    loop {
        let frame = tokio::select! {
            f = conn.read_frame() => f,
            () = shutdown.cancelled() => return Ok(()),
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(ClientError::Decode(e)) => {
                crate::frontend::fatal(&mut conn, sqlstate::PROTOCOL_VIOLATION, &e.to_string())
                    .await;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match frame.msg {
            FrontendMessage::Query(sql) => {
                for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    let answer = execute(&proxy, stmt).await;
                    write_answer(&mut conn.out, answer);
                }
                if sql.split(';').all(|s| s.trim().is_empty()) {
                    wire::empty_query(&mut conn.out);
                }
                wire::ready_for_query(&mut conn.out, b'I');
                conn.flush().await?;
            }
            FrontendMessage::Terminate => return Ok(()),
            FrontendMessage::Sync => {
                if extended_error {
                    wire::error(
                        &mut conn.out,
                        "ERROR",
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console supports only the simple query protocol",
                    );
                    extended_error = false;
                }
                wire::ready_for_query(&mut conn.out, b'I');
                conn.flush().await?;
            }
            FrontendMessage::Flush => conn.flush().await?,
            _ => extended_error = true,
        }
    }
}

fn write_answer(out: &mut bytes::BytesMut, answer: Answer) {
    match answer {
        Answer::Rows(table, tag) => {
            let cols: Vec<ColumnDesc> = table.columns.iter().map(|c| ColumnDesc::text(c)).collect();
            wire::row_description(out, &cols);
            for r in &table.rows {
                wire::data_row(out, r.iter().map(|v| Some(v.as_bytes())));
            }
            wire::command_complete(out, &tag);
        }
        Answer::Tag(t) => wire::command_complete(out, &t),
        Answer::Error(code, msg) => wire::error(out, "ERROR", code, &msg),
    }
}

fn rows(columns: Vec<&'static str>, rows: Vec<Vec<String>>) -> Answer {
    let tag = format!("SHOW {}", rows.len());
    Answer::Rows(Table { columns, rows }, tag)
}

/// Executes one admin command.
pub async fn execute(proxy: &Arc<Proxy>, stmt: &str) -> Answer {
    let words: Vec<String> = stmt
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let topo = proxy.topology();
    match w.as_slice() {
        ["SHOW", "SHARDS"] => {
            let own = topo.ring.ownership();
            rows(
                vec!["name", "url", "healthy", "ring_share", "pool_size"],
                topo.shards
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        vec![
                            p.name.clone(),
                            p.url.clone(),
                            p.healthy.load(Ordering::Relaxed).to_string(),
                            format!("{:.4}", own.get(i).copied().unwrap_or(0.0)),
                            p.size.to_string(),
                        ]
                    })
                    .collect(),
            )
        }
        ["SHOW", "RING"] => {
            let own = topo.ring.ownership();
            let points = topo.ring.points();
            rows(
                vec!["shard", "virtual_nodes", "points", "ownership", "hash"],
                topo.ring
                    .shards()
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        vec![
                            name.clone(),
                            topo.ring.virtual_nodes().to_string(),
                            points.iter().filter(|(_, s)| *s == i).count().to_string(),
                            format!("{:.4}", own.get(i).copied().unwrap_or(0.0)),
                            "xxh64(\"performer:{key}\") on a ring of named virtual nodes".into(),
                        ]
                    })
                    .collect(),
            )
        }
        ["SHOW", "POOLS"] => rows(
            vec!["name", "size", "in_use", "idle", "waiting", "checkouts", "connects", "connect_errors", "discarded", "healthy"],
            topo.all_pools()
                .map(|p| {
                    let s = &p.stats;
                    vec![
                        p.name.clone(),
                        p.size.to_string(),
                        s.in_use.load(Ordering::Relaxed).to_string(),
                        p.idle_count().to_string(),
                        s.waiting.load(Ordering::Relaxed).to_string(),
                        s.checkouts.load(Ordering::Relaxed).to_string(),
                        s.connects.load(Ordering::Relaxed).to_string(),
                        s.connect_errors.load(Ordering::Relaxed).to_string(),
                        s.discarded.load(Ordering::Relaxed).to_string(),
                        p.healthy.load(Ordering::Relaxed).to_string(),
                    ]
                })
                .collect(),
        ),
        ["SHOW", "CLIENTS"] => {
            let clients: Vec<_> = proxy
                .clients
                .lock()
                .map(|c| {
                    let mut v: Vec<_> = c.values().cloned().collect();
                    v.sort_by_key(|c| c.id);
                    v
                })
                .unwrap_or_default();
            rows(
                vec!["id", "user", "database", "addr", "application_name", "tls", "connected_secs"],
                clients
                    .into_iter()
                    .map(|c| {
                        vec![
                            c.id.to_string(),
                            c.user,
                            c.database,
                            c.addr,
                            c.application_name,
                            c.tls.to_string(),
                            SystemTime::now()
                                .duration_since(c.connected_at)
                                .map(|d| d.as_secs())
                                .unwrap_or(0)
                                .to_string(),
                        ]
                    })
                    .collect(),
            )
        }
        ["SHOW", "STATS"] => {
            let s = &proxy.stats;
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed).to_string();
            let clients = proxy.clients.lock().map(|c| c.len()).unwrap_or(0);
            rows(
                vec!["metric", "value"],
                vec![
                    vec!["statements".into(), n(&s.statements)],
                    vec!["transactions".into(), n(&s.transactions)],
                    vec!["scatter_reads".into(), n(&s.scatter_reads)],
                    vec!["broadcasts".into(), n(&s.broadcasts)],
                    vec!["two_phase_commits".into(), n(&s.two_phase)],
                    vec!["errors".into(), n(&s.errors)],
                    vec!["clients".into(), clients.to_string()],
                    vec!["uptime_secs".into(), proxy.started.elapsed().as_secs().to_string()],
                    vec!["paused".into(), proxy.paused.borrow().to_string()],
                ],
            )
        }
        ["SHOW", "SHARD", "FOR", key] => match key.trim_matches('\'').parse::<i64>() {
            Ok(k) => rows(
                vec!["key", "hash", "shard"],
                vec![vec![k.to_string(), Ring::key_hash(k).to_string(), topo.ring.shard_name_for(k).to_owned()]],
            ),
            Err(_) => Answer::Error(sqlstate::SYNTAX_ERROR, format!("invalid key {key}: expected a bigint")),
        },
        ["PAUSE"] => {
            proxy.paused.send_replace(true);
            // Wait (bounded) for transactions in flight to finish.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let busy: usize = topo.all_pools().map(|p| p.stats.in_use.load(Ordering::Relaxed)).sum();
                if busy == 0 || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::info!("paused by admin console");
            Answer::Tag("PAUSE".into())
        }
        ["RESUME"] => {
            proxy.paused.send_replace(false);
            tracing::info!("resumed by admin console");
            Answer::Tag("RESUME".into())
        }
        ["RELOAD"] => match proxy.reload_from_disk().await {
            Ok(summary) => {
                tracing::info!(%summary, "configuration reloaded by admin console");
                Answer::Tag("RELOAD".into())
            }
            Err(e) => Answer::Error(sqlstate::FEATURE_NOT_SUPPORTED, format!("reload failed: {e}")),
        },
        ["SHOW", "MIGRATIONS"] | ["ADD", "SHARD", ..] => Answer::Error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "online migration is not available in this version".into(),
        ),
        _ => Answer::Error(
            sqlstate::SYNTAX_ERROR,
            format!(
                "unknown admin command \"{stmt}\"; try SHOW SHARDS | RING | POOLS | CLIENTS | STATS, SHOW SHARD FOR <key>, PAUSE, RESUME, RELOAD"
            ),
        ),
    }
}
