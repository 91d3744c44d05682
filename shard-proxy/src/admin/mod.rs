//! The admin console: `psql -d admin` speaks to the proxy itself.
//!
//! Why a console and not only metrics: operators need to ask "which shard owns key 42?",
//! see pools and clients, and PAUSE/RESUME/RELOAD without signals. Commands are few and
//! fixed, so they are matched textually (no SQL parser); answers are ordinary
//! RowDescription/DataRow results that any PostgreSQL client can display. Only the simple
//! query protocol is served.

mod command;
mod control;
mod shards;
mod show;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use command::Command;

use crate::frontend::io::ClientError;
use crate::frontend::Authenticated;
use crate::proxy::Proxy;
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

/// Executes one admin command.
pub async fn execute(proxy: &Arc<Proxy>, stmt: &str) -> Answer {
    match Command::parse(stmt) {
        Ok(Command::ShowShards) => show::shards(proxy),
        Ok(Command::ShowRing) => show::ring(proxy),
        Ok(Command::ShowPools) => show::pools(proxy),
        Ok(Command::ShowClients) => show::clients(proxy),
        Ok(Command::ShowStats) => show::stats(proxy),
        Ok(Command::ShowProxies) => show::proxies(proxy).await,
        Ok(Command::ShowShardFor(key)) => show::shard_for(proxy, key),
        Ok(Command::Pause) => control::pause(proxy).await,
        Ok(Command::Resume) => control::resume(proxy),
        Ok(Command::Reload) => control::reload(proxy).await,
        Ok(Command::AddShard { name, url }) => shards::add(proxy, &name, &url).await,
        Ok(Command::RemoveShard(name)) => shards::remove(proxy, &name).await,
        Ok(Command::ShowMigrations) => show::migrations(proxy).await,
        Ok(Command::PauseMigration) => shards::pause_migration(proxy, true).await,
        Ok(Command::ResumeMigration) => shards::pause_migration(proxy, false).await,
        Ok(Command::SetThrottle(n)) => shards::throttle(proxy, n).await,
        Err(e) => Answer::Error(e.code(), e.to_string()),
    }
}
