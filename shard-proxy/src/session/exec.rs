//! Running statements on backends and turning their answers into the client's answer.
//!
//! Why separate: relaying (one backend, bytes forwarded as they arrive, COPY sub-protocol
//! included), streaming (a scatter read: several backends, rows merged on the fly by
//! [`proxy_core::merge::Stream`] in [`super::scatter`]) and gathering (a broadcast write:
//! answers collected, rows merged by [`proxy_core::merge::Merger`], row counts summed) are
//! the ways every statement ends, in both protocols.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;

use super::scatter::{self, Cursor, Pumped, ScatterError};
use super::{ExecError, Session, Txn, Work};
use crate::backend::BackendError;
use crate::frontend::io::ClientError;
use crate::metrics::Route;
use proxy_core::merge::{Column, MergeSpec, Merger};
use proxy_core::router::{Analysis, Params, Plan, Target};
use proxy_core::sqltext::SetCommand;
use proxy_core::wire::frontend::FrontendMessage;
use proxy_core::wire::{self, sqlstate, RawMsg};

/// What one backend returned for a statement run as part of a broadcast write (scatter
/// reads stream instead: [`super::scatter`]).
#[derive(Debug, Default)]
pub struct ShardResult {
    pub row_description: Option<Bytes>,
    pub rows: Vec<Bytes>,
    pub tags: Vec<String>,
    pub error: Option<Bytes>,
    pub notices: Vec<Bytes>,
}

/// Why relaying stopped early.
pub enum RelayError {
    Backend(BackendError),
    Client(ClientError),
}

impl From<ClientError> for RelayError {
    fn from(e: ClientError) -> Self {
        RelayError::Client(e)
    }
}

impl From<BackendError> for RelayError {
    fn from(e: BackendError) -> Self {
        RelayError::Backend(e)
    }
}

impl From<std::io::Error> for RelayError {
    fn from(e: std::io::Error) -> Self {
        RelayError::Client(ClientError::Io(e))
    }
}

/// Records on `conn` any session state `sql` may leave that cannot be replayed elsewhere,
/// so the connection is closed rather than pooled once this client is done with it.
pub(super) fn mark_session_state(conn: &mut crate::backend::BackendConn, sql: &str) {
    mark_known_session_state(conn, proxy_core::sqltext::session_state(sql));
}

/// [`mark_session_state`] for a statement whose state was found already (a prepared
/// statement's, at Parse).
pub(super) fn mark_known_session_state(
    conn: &mut crate::backend::BackendConn,
    what: Option<&'static str>,
) {
    if let Some(what) = what {
        conn.session_state.get_or_insert(what);
    }
}

/// Why a COPY that is not `FROM STDIN` cannot span shards.
const COPY_NEEDS_A_SHARD: &str =
    "COPY on the sharded database needs a shard: add /* shard=<name> */ or SET taskflow.shard";

/// The statement each target runs: a split INSERT's own SQL per shard, else the scatter
/// rewrite (LIMIT push-down, hidden columns) or the statement itself on every target.
fn per_shard_statements(plan: &Plan, targets: &[usize], sql: &str) -> Vec<(usize, String)> {
    match &plan.per_shard_sql {
        Some(per) => per.iter().map(|(s, q, _)| (*s, q.clone())).collect(),
        None => {
            let q = plan
                .merge
                .as_ref()
                .and_then(|m| m.shard_sql.clone())
                .unwrap_or_else(|| sql.to_owned());
            targets.iter().map(|&t| (t, q.clone())).collect()
        }
    }
}

impl Session {
    fn relay_error(&mut self, work: Work, e: RelayError) -> ExecError {
        match e {
            RelayError::Client(c) => {
                // The client is gone mid-statement: the backend's state is unknown.
                self.discard(work);
                ExecError::Client(c)
            }
            RelayError::Backend(b) => {
                let shard = self.shard_name(work.shard);
                self.proxy.metrics.error(&shard, "backend");
                self.discard(work);
                ExecError::Unavailable {
                    shard,
                    message: b.to_string(),
                }
            }
        }
    }

    /// Consumes the answers to internal queries pipelined by [`Session::acquire`].
    pub async fn drain_skips(work: &mut Work) -> Result<(), BackendError> {
        while work.skip > 0 {
            work.skip -= 1;
            match work.conn.conn().collect_until_ready().await {
                Ok(_) => {}
                Err(BackendError::Server(info)) => {
                    tracing::warn!(error = %info, "session state replay failed on a backend");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Runs one simple query on one backend and relays everything up to ReadyForQuery.
    /// `state` is the session state `sql` leaves (`sqltext::session_state`, or its
    /// analysis' copy). Returns whether it succeeded (no ErrorResponse).
    pub async fn run_single(
        &mut self,
        shard: usize,
        raw: Option<Bytes>,
        (sql, state): (&str, Option<&'static str>),
        wrote: bool,
        set: Option<SetCommand>,
    ) -> Result<bool, ExecError> {
        self.check_not_failed()?;
        let mut work = self.acquire(shard).await?;
        // Checked here, not only inside: an `.await` on `run_guard` costs a state machine
        // poll per statement, and statements with a guard are the rare ones (mid-move).
        if !self.guards.is_empty() {
            if let Err(e) = self.run_guard(&mut work).await {
                self.put_back(work, false);
                return Err(e);
            }
        }
        {
            let c = work.conn.conn();
            mark_known_session_state(c, state);
            match raw {
                Some(r) => c.wbuf.extend_from_slice(&r),
                None => frontend::query(sql, &mut c.wbuf)
                    .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?,
            }
        }
        let started = Instant::now();
        let result = async {
            work.conn.conn().flush().await?;
            if work.skip > 0 {
                Self::drain_skips(&mut work).await?;
            }
            self.relay_to_ready(&mut work, false).await
        }
        .await;
        let ok = match result {
            Ok(ok) => ok,
            Err(e) => return Err(self.relay_error(work, e)),
        };
        work.conn.pool().observe_query(&self.proxy.metrics, started);
        if ok && set.is_some() {
            self.remember_set(set);
            work.conn.conn().settings.clone_from(&self.settings);
        }
        if !ok {
            self.proxy.metrics.error(&work.conn.pool().name, "sql");
        }
        self.put_back(work, wrote);
        Ok(ok)
    }

    /// A statement on keys of moving arcs: guarded on its shard, inside a transaction
    /// (the proxy's own around an autocommit statement, so the guard's lock lasts until
    /// the statement's commit).
    async fn run_single_guarded(
        &mut self,
        shard: usize,
        raw: Option<Bytes>,
        (sql, state): (&str, Option<&'static str>),
        wrote: bool,
        guards: &[(usize, u32)],
    ) -> Result<(), ExecError> {
        let topo = self
            .txn
            .as_ref()
            .map_or_else(|| self.topo.clone(), |t| t.topo.clone());
        let implicit = self.txn.is_none();
        if implicit {
            self.txn = Some(Txn::implicit(topo.clone()));
        }
        let wait = self.proxy.config().reshard.write_pause_ms;
        self.guards = guard_sqls(&topo, guards, &[shard], false, wait);
        let result = self.run_single(shard, raw, (sql, state), wrote, None).await;
        self.guards.clear();
        if !implicit {
            return result.map(|_| ());
        }
        match result {
            Ok(true) => match self.txn.take() {
                Some(t) => self.finish_commit(t).await,
                None => Ok(()),
            },
            Ok(false) => {
                self.abort_txn().await;
                Ok(())
            }
            Err(e) => {
                self.abort_txn().await;
                Err(e)
            }
        }
    }

    /// Runs this statement's migration guard for `work`'s shard, if any, before the
    /// statement is sent: a failed guard (the arc moved, or is moving for longer than
    /// `reshard.write_pause_ms`) fails the statement with a retryable SQLSTATE 40001.
    pub async fn run_guard(&mut self, work: &mut Work) -> Result<(), ExecError> {
        let Some(pos) = self.guards.iter().position(|(s, _)| *s == work.shard) else {
            return Ok(());
        };
        let (_, sql) = self.guards.swap_remove(pos);
        let name = work.conn.pool().name.clone();
        let result = async {
            work.conn.conn().flush().await?;
            Self::drain_skips(work).await?;
            work.conn.conn().simple_query(&sql).await
        }
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(BackendError::Server(info)) => {
                self.proxy.metrics.reshard_guard_failures.inc();
                if let Some(t) = &mut self.txn {
                    t.failed = t.explicit;
                }
                Err(ExecError::sql(
                    sqlstate::SERIALIZATION_FAILURE,
                    format!("shard {name}: {}", info.message),
                ))
            }
            Err(e) => Err(ExecError::Unavailable {
                shard: name,
                message: e.to_string(),
            }),
        }
    }

    pub fn check_not_failed(&self) -> Result<(), ExecError> {
        if self.txn.as_ref().is_some_and(|t| t.failed) {
            return Err(ExecError::sql(
                sqlstate::IN_FAILED_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        Ok(())
    }

    /// Forwards backend messages to the client until ReadyForQuery (not forwarded: the
    /// session writes its own). Handles COPY IN/OUT. Returns false if an error was relayed.
    pub async fn relay_to_ready(
        &mut self,
        work: &mut Work,
        extended: bool,
    ) -> Result<bool, RelayError> {
        let mut ok = true;
        loop {
            let c = work.conn.conn();
            if c.relay_buffered(&mut self.client.out)? > 0 {
                self.client.maybe_flush().await?;
            }
            let Some(m) = work.conn.conn().next_buffered()? else {
                work.conn.conn().read_more().await?;
                continue;
            };
            match m.tag {
                b'Z' => {
                    work.conn.conn().status = m.body().first().copied().unwrap_or(b'I');
                    return Ok(ok);
                }
                b'E' => {
                    ok = false;
                    self.client.out.extend_from_slice(&m.data);
                }
                b'G' => {
                    self.client.out.extend_from_slice(&m.data);
                    self.copy_in(work, extended).await?;
                }
                // Every other kind went out with `relay_buffered`; kept so that a message
                // is never dropped should the two ever disagree.
                _ => {
                    self.client.out.extend_from_slice(&m.data);
                    self.client.maybe_flush().await?;
                }
            }
        }
    }

    /// COPY FROM STDIN: streams the client's CopyData to the backend until CopyDone/CopyFail
    /// (and, in the extended protocol, the Sync that follows).
    pub async fn copy_in(&mut self, work: &mut Work, extended: bool) -> Result<(), RelayError> {
        self.client.flush().await?;
        let mut done = false;
        loop {
            let frame = match self.client.read_frame().await? {
                Some(f) => f,
                None => return Err(RelayError::Client(ClientError::Truncated)),
            };
            let c = work.conn.conn();
            match frame.msg {
                FrontendMessage::CopyData(_) if !done => {
                    c.wbuf.extend_from_slice(&frame.raw);
                    if c.wbuf.len() >= 64 * 1024 {
                        c.flush().await?;
                    }
                }
                FrontendMessage::CopyDone | FrontendMessage::CopyFail(_) if !done => {
                    c.wbuf.extend_from_slice(&frame.raw);
                    c.flush().await?;
                    if !extended {
                        return Ok(());
                    }
                    done = true;
                }
                FrontendMessage::Sync if done => {
                    c.wbuf.extend_from_slice(&frame.raw);
                    c.flush().await?;
                    return Ok(());
                }
                FrontendMessage::Flush | FrontendMessage::Sync => {}
                _ => {
                    if !done {
                        frontend::copy_fail("unexpected message during COPY", &mut c.wbuf)
                            .map_err(BackendError::Io)?;
                        c.flush().await?;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Collects a backend's full answer to one simple query (broadcast write).
    pub async fn collect(work: &mut Work) -> Result<ShardResult, BackendError> {
        let mut r = ShardResult::default();
        loop {
            let m = work.conn.conn().read_msg().await?;
            match m.tag {
                b'Z' => {
                    work.conn.conn().status = m.body().first().copied().unwrap_or(b'I');
                    return Ok(r);
                }
                b'T' => {
                    r.row_description.get_or_insert(m.data);
                }
                b'D' => r.rows.push(m.data),
                b'C' => r.tags.push(wire::command_tag(&m.data)),
                b'E' => {
                    r.error.get_or_insert(m.data);
                }
                b'N' => r.notices.push(m.data),
                b'G' => {
                    let c = work.conn.conn();
                    frontend::copy_fail("COPY cannot be scattered across shards", &mut c.wbuf)?;
                    c.flush().await?;
                }
                _ => {}
            }
        }
    }

    /// Routes and runs one parsed statement in the simple protocol.
    pub async fn run_routed_simple(
        &mut self,
        raw: Option<Bytes>,
        sql: &str,
        analysis: &Analysis,
    ) -> Result<(), ExecError> {
        self.check_not_failed()?;
        let empty = Params {
            values: &[],
            formats: &[],
            types: &[],
        };
        let topo = self
            .txn
            .as_ref()
            .map(|t| t.topo.clone())
            .unwrap_or_else(|| self.topo.clone());
        let plan = analysis
            .plan(&topo.placement, &empty, self.shard_hint.as_deref())
            .map_err(|e| ExecError::sql(sqlstate::FEATURE_NOT_SUPPORTED, e.to_string()))?;
        let mut targets = targets_of(&plan.target, topo.shards.len());
        if !analysis.touches_sharded
            && !analysis.is_write
            && plan.merge.is_none()
            && matches!(plan.target, Target::One(_))
        {
            // Catalog and other unsharded reads: any healthy shard (or the one the
            // transaction already holds) answers the same.
            targets = vec![self.default_shard()];
        }
        if let proxy_core::router::StatementKind::Copy { from_stdin } = analysis.kind {
            if from_stdin && targets.len() > 1 && analysis.statement_count == 1 {
                self.proxy.metrics.route(Route::CopySplit);
                return self.copy_split(sql).await;
            }
            if targets.len() != 1 {
                return Err(ExecError::sql(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    COPY_NEEDS_A_SHARD,
                ));
            }
        }
        if targets.len() == 1 && plan.per_shard_sql.is_none() && plan.merge.is_none() {
            self.proxy.metrics.route(Route::One);
            let (stmt, wrote) = ((sql, analysis.session_state), analysis.is_write);
            if !plan.guards.is_empty() {
                let guards = &plan.guards;
                return self
                    .run_single_guarded(targets[0], raw, stmt, wrote, guards)
                    .await;
            }
            return self
                .run_single(targets[0], raw, stmt, wrote, None)
                .await
                .map(drop);
        }

        if analysis.statement_count > 1 {
            return Err(ExecError::sql(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "a multi-statement query must stay on one shard; send the statements separately",
            ));
        }
        let sqls = per_shard_statements(&plan, &targets, sql);
        self.count_multi(analysis.is_write);
        if !analysis.is_write {
            return self.run_scatter_simple(sqls, plan.merge.as_ref()).await;
        }
        let wait = self.proxy.config().reshard.write_pause_ms;
        self.guards = guard_sqls(&topo, &plan.guards, &targets, true, wait);
        let result = self
            .run_multi_simple(sqls, plan.merge.as_ref(), analysis.is_write)
            .await;
        self.guards.clear();
        result
    }

    /// A scatter read in the simple protocol: every shard runs its SQL and the rows are
    /// streamed to the client as the merge allows ([`super::scatter`]); the backends are
    /// then read to ReadyForQuery and go back to their pools (or the transaction).
    async fn run_scatter_simple(
        &mut self,
        sqls: Vec<(usize, String)>,
        merge: Option<&MergeSpec>,
    ) -> Result<(), ExecError> {
        // A scatter read must not interleave with a cross-shard COMMIT PREPARED fan-out.
        let proxy = self.proxy.clone();
        let _fence = proxy.commit_fence.read().await;
        let works = match self.queue_on_all(&sqls).await {
            Ok(w) => w,
            Err(e) => {
                self.fail_txn(false).await;
                return Err(e);
            }
        };
        let shards: Vec<usize> = sqls.iter().map(|(s, _)| *s).collect();
        let mut works: BTreeMap<usize, Work> = works.into_iter().map(|w| (w.shard, w)).collect();
        let mut cursor = Cursor::new(&shards, merge.cloned());
        cursor.open(None);
        let started = Instant::now();
        let result = self.stream_simple(&mut works, &mut cursor).await;
        let failed = self
            .end_scatter_simple(works, &cursor, result, started)
            .await?;
        if failed {
            self.fail_txn(false).await;
        }
        Ok(())
    }

    /// Sends the queued queries and streams the merged rows, ending with CommandComplete
    /// or an ErrorResponse. Returns whether the statement failed.
    async fn stream_simple(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        cursor: &mut Cursor,
    ) -> Result<bool, ScatterError> {
        for w in works.values_mut() {
            w.conn
                .conn()
                .flush()
                .await
                .map_err(|e| ScatterError::Backend(w.shard, e))?;
        }
        for w in works.values_mut() {
            Self::drain_skips(w)
                .await
                .map_err(|e| ScatterError::Backend(w.shard, e))?;
        }
        let error = match self.pump(works, cursor, 0, true).await? {
            Pumped::Complete(n) => match self.settle(works, cursor, false).await? {
                None => {
                    wire::command_complete(&mut self.client.out, &format!("SELECT {n}"));
                    return Ok(false);
                }
                Some(e) => e,
            },
            Pumped::NoRows(tag) => {
                wire::command_complete(&mut self.client.out, &tag);
                return Ok(false);
            }
            // No row limit in the simple protocol: the shards never suspend.
            Pumped::Suspended => {
                wire::command_complete(&mut self.client.out, "SELECT 0");
                return Ok(false);
            }
            Pumped::ShardError(e) => e,
            Pumped::Merge(e) => {
                let mut b = BytesMut::new();
                wire::error(&mut b, "ERROR", sqlstate::INTERNAL_ERROR, &e.to_string());
                b.freeze()
            }
        };
        self.client.out.extend_from_slice(&error);
        Ok(true)
    }

    /// Returns every backend of a streamed scatter read: read to ReadyForQuery and put
    /// back, or — when its answer was left unread (an error stopped the stream) or its
    /// connection failed — closed. Returns whether the statement failed.
    async fn end_scatter_simple(
        &mut self,
        mut works: BTreeMap<usize, Work>,
        cursor: &Cursor,
        result: Result<bool, ScatterError>,
        started: Instant,
    ) -> Result<bool, ExecError> {
        let (failed, mut error) = match result {
            Ok(failed) => (failed, None),
            Err(ScatterError::Client(e)) => {
                for (_, w) in std::mem::take(&mut works) {
                    self.discard_quietly(w);
                }
                return Err(ExecError::Client(e));
            }
            Err(ScatterError::Backend(shard, e)) => (true, Some((shard, e))),
        };
        let unread = cursor.open_shards();
        for (shard, mut w) in works {
            let broken = error.as_ref().is_some_and(|(s, _)| *s == shard);
            if broken || unread.contains(&shard) {
                self.discard_quietly(w);
                continue;
            }
            match scatter::read_to_ready(&mut w).await {
                Ok(()) => {
                    w.conn.pool().observe_query(&self.proxy.metrics, started);
                    self.put_back(w, false);
                }
                Err(e) => {
                    self.discard_quietly(w);
                    error.get_or_insert((shard, e));
                }
            }
        }
        if let Some((shard, e)) = error {
            let shard = self.shard_name(shard);
            self.proxy.metrics.error(&shard, "backend");
            return Err(ExecError::Unavailable {
                shard,
                message: e.to_string(),
            });
        }
        Ok(failed)
    }

    /// Counts a statement that runs on several shards, in `SHOW STATS` and the metrics.
    fn count_multi(&self, is_write: bool) {
        let (counter, route) = if is_write {
            (&self.proxy.stats.broadcasts, Route::Broadcast)
        } else {
            (&self.proxy.stats.scatter_reads, Route::Scatter)
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.proxy.metrics.route(route);
    }

    /// Runs a write's per-shard SQL on several backends (broadcast, split INSERT) and
    /// writes one merged answer; its RETURNING rows are gathered, not streamed.
    pub async fn run_multi_simple(
        &mut self,
        sqls: Vec<(usize, String)>,
        merge: Option<&MergeSpec>,
        is_write: bool,
    ) -> Result<(), ExecError> {
        let implicit = self.txn.is_none() && is_write && sqls.len() > 1;
        // A scatter read must not interleave with a cross-shard COMMIT PREPARED fan-out.
        let proxy = self.proxy.clone();
        let _fence = if is_write {
            None
        } else {
            Some(proxy.commit_fence.read().await)
        };
        if implicit {
            self.txn = Some(Txn::implicit(self.topo.clone()));
        }
        let works = match self.queue_on_all(&sqls).await {
            Ok(w) => w,
            Err(e) => {
                self.fail_txn(implicit).await;
                return Err(e);
            }
        };
        let (results, unavailable) = self.collect_all(works, is_write).await;
        if let Some(e) = unavailable {
            self.fail_txn(implicit).await;
            return Err(e);
        }
        if let Some(err) = results.iter().find_map(|r| r.error.clone()) {
            self.fail_txn(implicit).await;
            self.client.out.extend_from_slice(&err);
            return Ok(());
        }
        let mut out = BytesMut::new();
        for n in results.iter().flat_map(|r| &r.notices) {
            out.extend_from_slice(n);
        }
        emit_merged(&mut out, &results, merge)?;
        if implicit {
            if let Some(t) = self.txn.take() {
                self.finish_commit(t).await?;
            }
        }
        self.client.out.extend_from_slice(&out);
        Ok(())
    }

    /// After a failed statement: the proxy's implicit transaction is rolled back; a
    /// client's transaction is marked failed (it must ROLLBACK).
    pub(super) async fn fail_txn(&mut self, implicit: bool) {
        if implicit {
            self.abort_txn().await;
        } else if let Some(t) = &mut self.txn {
            t.failed = true;
        }
    }

    /// Acquires a backend per shard and queues its query (nothing is sent yet). On failure
    /// every backend taken so far is discarded.
    async fn queue_on_all(&mut self, sqls: &[(usize, String)]) -> Result<Vec<Work>, ExecError> {
        let mut works = Vec::with_capacity(sqls.len());
        let mut failure = None;
        for (shard, q) in sqls {
            let acquired = match self.acquire(*shard).await {
                Ok(mut w) => match self.run_guard(&mut w).await {
                    Ok(()) => Ok(w),
                    Err(e) => {
                        self.put_back(w, false);
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            match acquired {
                Ok(mut w) => {
                    mark_session_state(w.conn.conn(), q);
                    if let Err(e) = frontend::query(q, &mut w.conn.conn().wbuf) {
                        failure = Some(ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()));
                    }
                    works.push(w);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        match failure {
            None => Ok(works),
            Some(e) => {
                for w in works {
                    // Nothing was sent yet: internal queries are still queued; drop them.
                    self.discard_quietly(w);
                }
                Err(e)
            }
        }
    }

    /// Sends every queued query, then reads each shard's whole result. Backends that
    /// answered go back to their pools; the first that failed is returned as the error.
    async fn collect_all(
        &mut self,
        mut works: Vec<Work>,
        is_write: bool,
    ) -> (Vec<ShardResult>, Option<ExecError>) {
        let started = Instant::now();
        for w in works.iter_mut() {
            let _ = w.conn.conn().flush().await;
        }
        let mut results = Vec::with_capacity(works.len());
        let mut unavailable = None;
        for mut w in works {
            let r = async {
                Self::drain_skips(&mut w).await?;
                Self::collect(&mut w).await
            }
            .await;
            match r {
                Ok(r) => {
                    w.conn.pool().observe_query(&self.proxy.metrics, started);
                    results.push(r);
                    self.put_back(w, is_write);
                }
                Err(e) => {
                    let shard = self.shard_name(w.shard);
                    self.proxy.metrics.error(&shard, "backend");
                    w.conn.discard();
                    unavailable.get_or_insert(ExecError::Unavailable {
                        shard,
                        message: e.to_string(),
                    });
                }
            }
        }
        (results, unavailable)
    }

    /// Drops a backend that has unsent or unread work.
    pub fn discard_quietly(&mut self, w: Work) {
        let pid = w.conn.conn_ref().map(|c| c.pid);
        if let Ok(mut slot) = self.cancel_slot.lock() {
            slot.retain(|c| Some(c.pid) != pid);
        }
        w.conn.discard();
    }
}

/// The shard indexes a plan targets.
/// The guard statement per shard: the moving arcs of `guards` on it, and for a write to
/// several shards during a migration a lock on every arc (key-less writes must not run
/// between a batch's commits on its two shards).
pub fn guard_sqls(
    topo: &crate::proxy::Topology,
    guards: &[(usize, u32)],
    targets: &[usize],
    lock_all: bool,
    wait: u64,
) -> Vec<(usize, String)> {
    let Some(m) = topo.placement.migration() else {
        return Vec::new();
    };
    let mut shards: Vec<usize> = guards.iter().map(|(s, _)| *s).collect();
    if lock_all {
        shards.extend_from_slice(targets);
    }
    shards.sort_unstable();
    shards.dedup();
    shards
        .into_iter()
        .map(|s| {
            let arcs: Vec<String> = guards
                .iter()
                .filter(|(g, _)| *g == s)
                .map(|(_, a)| a.to_string())
                .collect();
            let sql = format!(
                "SELECT taskflow_guard({}, ARRAY[{}]::integer[], {lock_all}, {wait})",
                m.epoch,
                arcs.join(",")
            );
            (s, sql)
        })
        .collect()
}

pub fn targets_of(t: &Target, n: usize) -> Vec<usize> {
    match t {
        Target::One(i) => vec![*i],
        Target::Many(v) => v.clone(),
        Target::All => (0..n).collect(),
    }
}

/// Writes RowDescription, rows and one CommandComplete for a scatter/broadcast.
pub fn emit_merged(
    out: &mut BytesMut,
    results: &[ShardResult],
    merge: Option<&MergeSpec>,
) -> Result<(), ExecError> {
    let row_description = results.iter().find_map(|r| r.row_description.clone());
    if let (Some(spec), Some(rd)) = (merge, &row_description) {
        let cols: Vec<Column> = wire::row_description_columns(rd)
            .ok_or_else(|| {
                ExecError::sql(
                    sqlstate::INTERNAL_ERROR,
                    "malformed RowDescription from a shard",
                )
            })?
            .into_iter()
            .map(|(type_oid, format)| Column { type_oid, format })
            .collect();
        let mut merger = Merger::new(spec, cols);
        let visible = merger.visible_columns();
        for r in results {
            for row in &r.rows {
                let values = wire::data_row_values(row).ok_or_else(|| {
                    ExecError::sql(sqlstate::INTERNAL_ERROR, "malformed DataRow from a shard")
                })?;
                merger
                    .push(values)
                    .map_err(|e| ExecError::sql(sqlstate::INTERNAL_ERROR, e.to_string()))?;
            }
        }
        let rows = merger
            .finish()
            .map_err(|e| ExecError::sql(sqlstate::INTERNAL_ERROR, e.to_string()))?;
        let rd = wire::truncate_row_description(rd, visible).ok_or_else(|| {
            ExecError::sql(
                sqlstate::INTERNAL_ERROR,
                "malformed RowDescription from a shard",
            )
        })?;
        out.extend_from_slice(&rd);
        for row in &rows {
            wire::data_row(out, row.iter().take(visible).map(|v| v.as_deref()));
        }
        wire::command_complete(out, &format!("SELECT {}", rows.len()));
        return Ok(());
    }
    if let Some(rd) = &row_description {
        out.extend_from_slice(rd);
    }
    for r in results {
        for row in &r.rows {
            out.extend_from_slice(row);
        }
    }
    let tags: Vec<String> = results
        .iter()
        .filter_map(|r| r.tags.last().cloned())
        .collect();
    let tag = wire::sum_tags(&tags).unwrap_or_else(|| "SELECT 0".into());
    wire::command_complete(out, &tag);
    Ok(())
}

/// The raw message type used by the extended-protocol reader.
pub type Msg = RawMsg;
