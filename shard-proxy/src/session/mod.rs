//! A client session on a data database: `tasks` (sharded) or `auth` (passthrough).
//!
//! Why this is the heart of the proxy: it glues the frontend (decoded client messages), the
//! router (what a statement needs) and the backend pools (where it runs) while keeping
//! the illusion of one PostgreSQL session in *transaction pooling* mode:
//! - settings the client `SET` are remembered and replayed on whichever pooled backend
//!   serves its next transaction (only the difference is sent);
//! - prepared statements are kept per client and materialized on a backend under a
//!   proxy-global name (a hash of the SQL) only when that backend lacks them;
//! - a transaction keeps the backends it touched (`BEGIN` is sent lazily to each), commits
//!   with two-phase commit when it wrote to more than one shard, and rolls back everywhere
//!   on any failure or when the client disappears.
//!
//! Submodules: [`exec`] (running statements on one or many backends and relaying or merging
//! their answers), [`scatter`] (scatter reads streamed through the merge, and the cursor a
//! multi-shard portal keeps between Executes), [`extended`]
//! (Parse/Bind/Describe/Execute/Close/Sync), [`txn`] (commit,
//! rollback, 2PC and in-doubt recovery), [`sqltext`] (the few statements understood
//! textually).

pub mod copy;
pub mod exec;
pub mod extended;
pub mod scatter;
mod simple;

pub mod txn;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use postgres_protocol::message::frontend;
use tokio_util::sync::CancellationToken;

use crate::backend::{PoolError, Pooled};
use crate::config::LimitsConfig;
use crate::frontend::io::{ClientConn, ClientError};
use crate::frontend::Authenticated;
use crate::proxy::{CancelSlot, CancelTarget, Proxy, Topology};
use proxy_core::router::Analysis;
use proxy_core::sqltext::{self, SetCommand};
use proxy_core::wire::frontend::{DecodeError, Frame, FrontendMessage};
use proxy_core::wire::{self, sqlstate};

/// A prepared statement as the client named it.
#[derive(Debug)]
pub struct Stmt {
    /// Proxy-global name used on backends (`tf_<hash>`).
    pub global: String,
    pub sql: String,
    pub types: Vec<u32>,
    /// Parameter types reported by a backend's ParameterDescription (for routing binary
    /// parameters when the client left types unspecified).
    pub described: Mutex<Option<Vec<u32>>>,
    /// Router analysis (sharded database only).
    pub analysis: Option<Arc<Analysis>>,
    /// Session state this statement leaves on a server connection that cannot be replayed
    /// (`sqltext::session_state`), found once at Parse rather than on every Execute.
    pub session_state: Option<&'static str>,
}

impl Stmt {
    pub fn param_types(&self) -> Vec<u32> {
        let described = self.described.lock().ok().and_then(|d| d.clone());
        match described {
            Some(d) if d.len() >= self.types.len() => d,
            _ => self.types.clone(),
        }
    }
}

/// Global statement name for (sql, types): identical text shares one backend statement.
pub fn global_name(sql: &str, types: &[u32]) -> String {
    let mut h = xxhash_rust::xxh64::Xxh64::new(0x7466_7072);
    h.update(sql.as_bytes());
    for t in types {
        h.update(&t.to_le_bytes());
    }
    format!("tf_{:016x}", h.digest())
}

/// The `RESET`/`SET` statements that turn a server connection's `applied` settings into a
/// client's `wanted` ones; empty when they match — the usual case, decided by one ordered
/// comparison before any per-key lookup.
fn settings_sync(applied: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> String {
    let mut sync = String::new();
    if applied == wanted {
        return sync;
    }
    for k in applied.keys() {
        if !wanted.contains_key(k) {
            sync.push_str(&format!("RESET {k};"));
        }
    }
    for (k, v) in wanted {
        if applied.get(k) != Some(v) {
            sync.push_str(&format!("SET {k} = {v};"));
        }
    }
    sync
}

/// A backend checked out for the current statement or transaction, plus how many internal
/// simple queries (settings sync, lazy BEGIN) were pipelined ahead of the client's messages
/// and must be consumed first.
pub struct Work {
    pub shard: usize,
    pub conn: Pooled,
    pub skip: u32,
}

/// A transaction spanning zero or more backends.
pub struct Txn {
    /// Opened by the client (`BEGIN`); `false` for the proxy's own implicit transaction
    /// around an autocommit write that spans shards.
    pub explicit: bool,
    pub begin_sql: String,
    pub conns: BTreeMap<usize, Pooled>,
    pub writes: BTreeSet<usize>,
    pub failed: bool,
    /// SAVEPOINT/RELEASE/ROLLBACK TO statements, replayed on shards that join later.
    pub savepoints: Vec<String>,
    /// Topology the transaction started on.
    pub topo: Arc<Topology>,
    /// Counts the transaction as running under `topo` until it ends.
    pub in_flight: crate::proxy::InFlight,
}

impl Txn {
    /// A transaction the client opened with `begin_sql` (`BEGIN`, `START TRANSACTION …`).
    pub fn explicit(begin_sql: String, topo: Arc<Topology>) -> Txn {
        Txn {
            explicit: true,
            begin_sql,
            conns: BTreeMap::new(),
            writes: BTreeSet::new(),
            failed: false,
            savepoints: Vec::new(),
            in_flight: crate::proxy::InFlight::new(&topo),
            topo,
        }
    }

    /// The proxy's own transaction around an autocommit write that spans shards; it is
    /// committed (2PC) or rolled back when the statement ends.
    pub fn implicit(topo: Arc<Topology>) -> Txn {
        Txn {
            explicit: false,
            ..Txn::explicit("BEGIN".into(), topo)
        }
    }
}

/// Why a statement could not run (rendered to the client as an ErrorResponse).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("shard {shard} is unavailable: {message}")]
    Unavailable { shard: String, message: String },
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("{message}")]
    Sql { code: &'static str, message: String },
    #[error("client: {0}")]
    Client(#[from] ClientError),
}

impl ExecError {
    pub fn sql(code: &'static str, message: impl Into<String>) -> Self {
        ExecError::Sql {
            code,
            message: message.into(),
        }
    }

    /// The SQLSTATE the client receives.
    pub fn code(&self) -> &'static str {
        match self {
            ExecError::Unavailable { .. } | ExecError::Pool(_) => sqlstate::CONNECTION_FAILURE,
            ExecError::Sql { code, .. } => code,
            ExecError::Client(_) => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// Whether the session goes on after a message.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// The per-client state machine.
pub struct Session {
    pub proxy: Arc<Proxy>,
    pub topo: Arc<Topology>,
    pub client: ClientConn,
    pub passthrough: bool,
    pub user: String,
    pub client_id: u64,
    pub settings: BTreeMap<String, String>,
    pub shard_hint: Option<String>,
    pub stmts: HashMap<String, Arc<Stmt>>,
    pub sql_prepared: HashMap<String, sqltext::SqlPrepare>,
    pub portals: HashMap<String, extended::Portal>,
    /// Multi-shard portals being read: their shards' suspended portals and merge state,
    /// kept between Executes (see [`scatter`]).
    pub cursors: HashMap<String, scatter::Cursor>,
    pub txn: Option<Txn>,
    pub cancel_slot: CancelSlot,
    pub pending: Vec<proxy_core::wire::frontend::Frame>,
    /// Bytes held by `pending`.
    pub pending_bytes: usize,
    /// This client's limits (from the configuration it connected under).
    pub limits: LimitsConfig,
    /// After an error in extended mode, messages are discarded until Sync.
    pub skip_until_sync: bool,
    /// Migration guards of the statement being run, per shard (`exec::guard_sqls`), run
    /// by [`Session::run_guard`] when its backend is taken.
    pub guards: Vec<(usize, String)>,
}

/// Runs a session until the client leaves or the proxy shuts down.
pub async fn run(
    proxy: Arc<Proxy>,
    auth: Authenticated,
    client_id: u64,
    pid: i32,
    secret: i32,
    cancel_slot: CancelSlot,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let topo = proxy.topology();
    let limits = proxy.config().limits.clone();
    let passthrough = auth.database != topo.sharded_database;
    let mut settings = BTreeMap::new();
    for (k, v) in &auth.params {
        let k = k.to_ascii_lowercase();
        if matches!(k.as_str(), "user" | "database" | "replication" | "options") {
            continue;
        }
        settings.insert(k, sqltext::quote_literal(v));
    }
    let mut s = Session {
        proxy,
        topo,
        client: auth.conn,
        passthrough,
        user: auth.user,
        client_id,
        settings,
        shard_hint: None,
        stmts: HashMap::new(),
        sql_prepared: HashMap::new(),
        portals: HashMap::new(),
        cursors: HashMap::new(),
        txn: None,
        cancel_slot,
        pending: Vec::new(),
        pending_bytes: 0,
        limits,
        skip_until_sync: false,
        guards: Vec::new(),
    };
    s.send_startup_params(&auth.params, pid, secret).await;
    wire::ready_for_query(&mut s.client.out, b'I');
    s.client.flush().await?;
    let result = s.main_loop(&shutdown).await;
    s.abandon().await;
    result
}

impl Session {
    async fn send_startup_params(
        &mut self,
        client_params: &[(String, String)],
        pid: i32,
        secret: i32,
    ) {
        // Server parameters as a backend reports them; connect once if none is known yet.
        let pools: Vec<_> = if self.passthrough {
            vec![self.topo.auth.clone()]
        } else {
            self.topo.shards.clone()
        };
        let mut params = Vec::new();
        for p in &pools {
            params = p.server_params();
            if !params.is_empty() {
                break;
            }
            if let Ok(c) = p.get().await {
                c.release();
                params = p.server_params();
                if !params.is_empty() {
                    break;
                }
            }
        }
        if params.is_empty() {
            params = vec![
                ("server_version".into(), "15.0".into()),
                ("server_encoding".into(), "UTF8".into()),
                ("client_encoding".into(), "UTF8".into()),
                ("DateStyle".into(), "ISO, MDY".into()),
                ("TimeZone".into(), "UTC".into()),
                ("integer_datetimes".into(), "on".into()),
                ("standard_conforming_strings".into(), "on".into()),
                ("IntervalStyle".into(), "postgres".into()),
            ];
        }
        for (k, v) in &params {
            let client_value = client_params
                .iter()
                .find(|(ck, _)| ck.eq_ignore_ascii_case(k))
                .map(|(_, cv)| cv.as_str());
            let value = match (k.as_str(), client_value) {
                ("application_name", None) => "",
                ("session_authorization", _) => self.user.as_str(),
                (_, Some(cv))
                    if k.eq_ignore_ascii_case("client_encoding")
                        && cv.eq_ignore_ascii_case("UTF8") =>
                {
                    "UTF8"
                }
                (_, Some(cv)) => cv,
                (_, None) => v.as_str(),
            };
            wire::parameter_status(&mut self.client.out, k, value);
        }
        wire::backend_key_data(&mut self.client.out, pid, secret);
    }

    /// The ReadyForQuery status the client should see.
    pub fn status(&self) -> u8 {
        match &self.txn {
            None => b'I',
            Some(t) if t.failed => b'E',
            Some(t) if t.explicit => b'T',
            Some(_) => b'I',
        }
    }

    async fn main_loop(&mut self, shutdown: &CancellationToken) -> Result<(), ClientError> {
        // One shutdown waiter for the whole session. A fresh `cancelled()` per message
        // would join and leave the token's waiter list (a lock every session shares) for
        // every statement.
        let stopping = shutdown.cancelled();
        tokio::pin!(stopping);
        loop {
            let idle = self.txn.is_none() && self.pending.is_empty();
            // Checked first, so a client that always has a statement buffered is still told.
            if idle && shutdown.is_cancelled() {
                self.say_shutting_down().await;
                return Ok(());
            }
            let frame = tokio::select! {
                biased;
                f = self.client.read_frame() => f,
                () = &mut stopping, if idle => {
                    self.say_shutting_down().await;
                    return Ok(());
                }
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(ClientError::Decode(e)) => {
                    self.protocol_violation(&e).await;
                    return Err(ClientError::Decode(e));
                }
                Err(e) => return Err(e),
            };
            if !self.passthrough && self.txn.is_none() && !self.proxy.is_current(&self.topo) {
                // New transactions see the newest topology.
                self.topo = self.proxy.topology();
            }
            let _in_flight = self.in_flight();
            if self.handle_frame(frame).await? == Flow::Stop {
                return Ok(());
            }
        }
    }

    /// Tells an idle client the proxy is shutting down (it then closes the connection).
    async fn say_shutting_down(&mut self) {
        wire::error(
            &mut self.client.out,
            "FATAL",
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection: the shard proxy is shutting down",
        );
        let _ = self.client.flush().await;
    }

    /// Counts this message as running under the session's topology (a migration is
    /// acknowledged only when nothing runs under the topology before it). Re-reads the
    /// topology if it was replaced between being read and being counted.
    fn in_flight(&mut self) -> crate::proxy::InFlight {
        loop {
            let guard = crate::proxy::InFlight::new(&self.topo);
            if self.passthrough || self.txn.is_some() || self.proxy.is_current(&self.topo) {
                return guard;
            }
            self.topo = self.proxy.topology();
        }
    }

    /// Handles one client message.
    async fn handle_frame(&mut self, frame: Frame) -> Result<Flow, ClientError> {
        match frame.msg {
            FrontendMessage::Query(sql) => {
                self.pending.clear();
                self.pending_bytes = 0;
                self.skip_until_sync = false;
                self.proxy.stats.statements.fetch_add(1, Ordering::Relaxed);
                self.simple_query(Some(frame.raw), &sql).await?;
                self.ready_for_query().await?;
            }
            FrontendMessage::Terminate => return Ok(Flow::Stop),
            FrontendMessage::Parse { .. }
            | FrontendMessage::Bind(_)
            | FrontendMessage::Describe { .. }
            | FrontendMessage::Execute { .. }
            | FrontendMessage::Close { .. } => {
                if self.pending.len() >= self.limits.max_pipeline_messages
                    || self.pending_bytes + frame.raw.len() > self.limits.max_pipeline_bytes
                {
                    self.pipeline_too_long().await;
                    return Ok(Flow::Stop);
                }
                self.pending_bytes += frame.raw.len();
                self.pending.push(frame);
            }
            FrontendMessage::Flush => self.flush_pending().await?,
            FrontendMessage::Sync => {
                self.proxy.stats.statements.fetch_add(1, Ordering::Relaxed);
                self.sync().await?;
                self.ready_for_query().await?;
            }
            FrontendMessage::CopyData(_)
            | FrontendMessage::CopyDone
            | FrontendMessage::CopyFail(_) => {
                // Outside COPY these are ignored, as PostgreSQL does.
            }
            FrontendMessage::Password(_) => {
                self.protocol_violation(&DecodeError::Malformed(
                    "password",
                    "unexpected after authentication",
                ))
                .await;
                return Ok(Flow::Stop);
            }
            FrontendMessage::FunctionCall => {
                wire::error(
                    &mut self.client.out,
                    "ERROR",
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the fast-path function call protocol is not supported by the shard proxy",
                );
                self.ready_for_query().await?;
            }
        }
        Ok(Flow::Continue)
    }

    /// Too many messages (or bytes) queued without Sync: the client is told which limit,
    /// and disconnected (its queued work cannot be answered in order any more).
    async fn pipeline_too_long(&mut self) {
        let message = format!(
            "more than {} messages or {} bytes queued without Sync (limits.max_pipeline_messages, limits.max_pipeline_bytes)",
            self.limits.max_pipeline_messages, self.limits.max_pipeline_bytes
        );
        wire::error(
            &mut self.client.out,
            "FATAL",
            sqlstate::PROGRAM_LIMIT,
            &message,
        );
        let _ = self.client.flush().await;
    }

    /// Writes ReadyForQuery with the session's transaction status, and flushes.
    async fn ready_for_query(&mut self) -> Result<(), ClientError> {
        let st = self.status();
        wire::ready_for_query(&mut self.client.out, st);
        self.client.flush().await?;
        Ok(())
    }

    async fn protocol_violation(&mut self, e: &DecodeError) {
        tracing::info!(client = self.client_id, error = %e, "protocol violation; closing");
        wire::error(
            &mut self.client.out,
            "FATAL",
            sqlstate::PROTOCOL_VIOLATION,
            &e.to_string(),
        );
        let _ = self.client.flush().await;
    }

    /// Writes an error for `e` and marks an open transaction failed.
    pub fn report(&mut self, e: &ExecError) {
        self.proxy.stats.errors.fetch_add(1, Ordering::Relaxed);
        if let ExecError::Unavailable { shard, .. } = e {
            self.proxy.metrics.error(shard, "unavailable");
        }
        if let ExecError::Pool(PoolError::Unavailable { shard, .. }) = e {
            self.proxy.metrics.error(shard, "unavailable");
        }
        wire::error(&mut self.client.out, "ERROR", e.code(), &e.to_string());
        if let Some(t) = &mut self.txn {
            if t.explicit {
                t.failed = true;
            }
        }
    }

    /// The pool for a backend index (the auth database in passthrough).
    pub fn pool(&self, shard: usize) -> Option<Arc<crate::backend::Pool>> {
        if self.passthrough {
            return Some(self.topo.auth.clone());
        }
        let topo = self.txn.as_ref().map(|t| &t.topo).unwrap_or(&self.topo);
        topo.shards.get(shard).cloned()
    }

    pub fn shard_name(&self, shard: usize) -> String {
        self.pool(shard)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| format!("#{shard}"))
    }

    /// Takes the backend for `shard`: the transaction's own, or a pooled one brought up to
    /// date (settings; `BEGIN` and savepoints when a transaction is open).
    pub async fn acquire(&mut self, shard: usize) -> Result<Work, ExecError> {
        if let Some(t) = &mut self.txn {
            if let Some(conn) = t.conns.remove(&shard) {
                return Ok(Work {
                    shard,
                    conn,
                    skip: 0,
                });
            }
        }
        let pool = self.pool(shard).ok_or_else(|| {
            ExecError::sql(sqlstate::INTERNAL_ERROR, format!("no shard #{shard}"))
        })?;
        let starting = self.txn.as_ref().is_none_or(|t| t.conns.is_empty());
        if starting {
            let limit = std::time::Duration::from_secs(self.limits.pause_timeout_secs);
            if !self.proxy.wait_unpaused(limit).await {
                return Err(ExecError::sql(
                    sqlstate::CANNOT_CONNECT_NOW,
                    format!(
                        "the shard proxy is paused (admin PAUSE) and did not resume within {} s; retry later",
                        self.limits.pause_timeout_secs
                    ),
                ));
            }
        }
        let mut conn = pool.get().await?;
        let mut skip = 0;
        {
            let c = conn.conn();
            let sync = settings_sync(&c.settings, &self.settings);
            if !sync.is_empty() {
                frontend::query(&sync, &mut c.wbuf)
                    .map_err(|e| ExecError::sql(sqlstate::INTERNAL_ERROR, e.to_string()))?;
                c.settings.clone_from(&self.settings);
                skip += 1;
            }
            if let Some(t) = &self.txn {
                frontend::query(&t.begin_sql, &mut c.wbuf)
                    .map_err(|e| ExecError::sql(sqlstate::INTERNAL_ERROR, e.to_string()))?;
                skip += 1;
                for sp in &t.savepoints {
                    frontend::query(sp, &mut c.wbuf)
                        .map_err(|e| ExecError::sql(sqlstate::INTERNAL_ERROR, e.to_string()))?;
                    skip += 1;
                }
            }
            if let Ok(mut slot) = self.cancel_slot.lock() {
                slot.push(CancelTarget {
                    host: c.host.clone(),
                    port: c.port,
                    pid: c.pid,
                    secret: c.secret,
                });
            }
        }
        Ok(Work { shard, conn, skip })
    }

    /// Gives a backend back: to the transaction if one is open (or the backend reports
    /// one), else to its pool.
    pub fn put_back(&mut self, work: Work, wrote: bool) {
        let mut work = work;
        let status = work.conn.conn().status;
        let pid = work.conn.conn().pid;
        if let Some(t) = &mut self.txn {
            let ended = status == b'I' && t.conns.is_empty() && (self.passthrough || t.explicit);
            if !ended {
                if wrote {
                    t.writes.insert(work.shard);
                }
                if status == b'E' {
                    t.failed = true;
                }
                t.conns.insert(work.shard, work.conn);
                return;
            }
            // The client ended the transaction through the backend (passthrough COMMIT).
            self.txn = None;
        }
        if let Ok(mut slot) = self.cancel_slot.lock() {
            slot.retain(|c| c.pid != pid);
        }
        if status != b'I' {
            // The client opened a transaction (passthrough BEGIN, or inside a
            // multi-statement query).
            let mut conns = BTreeMap::new();
            conns.insert(work.shard, work.conn);
            let mut writes = BTreeSet::new();
            if wrote {
                writes.insert(work.shard);
            }
            self.txn = Some(Txn {
                conns,
                writes,
                failed: status == b'E',
                ..Txn::explicit("BEGIN".into(), self.topo.clone())
            });
            return;
        }
        work.conn.release();
    }

    /// Drops a backend whose state is unknown (I/O error).
    pub fn discard(&mut self, work: Work) {
        let pid = work.conn.conn_ref().map(|c| c.pid);
        if let Ok(mut slot) = self.cancel_slot.lock() {
            slot.retain(|c| Some(c.pid) != pid);
        }
        work.conn.discard();
        if let Some(t) = &mut self.txn {
            t.failed = true;
        }
    }

    /// Clears the cancel slot once nothing runs.
    pub fn clear_cancel_slot(&mut self) {
        if self.txn.is_none() {
            if let Ok(mut slot) = self.cancel_slot.lock() {
                slot.clear();
            }
        }
    }

    /// Handles one simple-protocol query string (without writing ReadyForQuery).
    pub async fn simple_query(&mut self, raw: Option<Bytes>, sql: &str) -> Result<(), ClientError> {
        let result = self.simple_query_inner(raw, sql).await;
        self.clear_cancel_slot();
        match result {
            Ok(()) => Ok(()),
            Err(ExecError::Client(e)) => Err(e),
            Err(e) => {
                self.report(&e);
                Ok(())
            }
        }
    }

    /// The shard for statements that do not touch sharded data.
    pub fn default_shard(&self) -> usize {
        if let Some(t) = &self.txn {
            if let Some(first) = t.conns.keys().next() {
                return *first;
            }
        }
        if let Some(i) = self
            .shard_hint
            .as_deref()
            .and_then(|h| proxy_core::placement::Locate::index_of(&self.topo.placement, h))
        {
            return i;
        }
        // The first healthy shard.
        self.topo
            .shards
            .iter()
            .position(|p| p.healthy.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn remember_set(&mut self, set: Option<SetCommand>) {
        if self.txn.as_ref().is_some_and(|t| t.failed) {
            return;
        }
        match set {
            Some(SetCommand::Set { name, value }) => {
                self.settings.insert(name, value);
            }
            Some(SetCommand::Reset { name }) => {
                self.settings.remove(&name);
            }
            Some(SetCommand::ResetAll) => self.settings.clear(),
            Some(SetCommand::Local) | None => {}
        }
        // The backend that ran the SET now has exactly the client's settings; others will
        // be synced when acquired.
        let settings = self.settings.clone();
        if let Some(t) = &mut self.txn {
            for c in t.conns.values_mut() {
                c.conn().settings.clone_from(&settings);
            }
        }
    }

    /// When the client goes away: roll back and return (or close) every held backend.
    async fn abandon(&mut self) {
        if let Some(t) = self.txn.take() {
            for (_, mut conn) in t.conns {
                let c = conn.conn();
                let ok = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    c.simple_query("ROLLBACK"),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                if ok && c.status == b'I' {
                    conn.release();
                } else {
                    conn.discard();
                }
            }
        }
        if let Ok(mut slot) = self.cancel_slot.lock() {
            slot.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::settings_sync;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn settings_sync_sends_only_the_difference() {
        let same = map(&[("application_name", "'gw'"), ("timezone", "'UTC'")]);
        assert_eq!(settings_sync(&same, &same.clone()), "");
        let applied = map(&[("application_name", "'gw'"), ("search_path", "public")]);
        let wanted = map(&[("application_name", "'psql'"), ("timezone", "'UTC'")]);
        assert_eq!(
            settings_sync(&applied, &wanted),
            "RESET search_path;SET application_name = 'psql';SET timezone = 'UTC';"
        );
        assert_eq!(
            settings_sync(&wanted, &BTreeMap::new()),
            "RESET application_name;RESET timezone;"
        );
    }
}
