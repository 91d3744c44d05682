//! The extended query protocol (Parse/Bind/Describe/Execute/Close/Flush/Sync) on pooled,
//! sharded backends.
//!
//! Why it is planned per Sync: routing needs Bind parameters, backends are borrowed per
//! transaction, and prepared statements may be missing on the backend that gets the Bind.
//! So messages are buffered until Sync, then *planned*: each client message becomes a
//! "slot" that is answered locally (ParseComplete for a statement the backend already
//! has, CloseComplete, ...) or by reads from one or several backends; missing statements
//! are injected as `Parse` under their proxy-global name and their answers suppressed.
//! All backends get their messages and a Sync in one write, then slots are read in client
//! order, so the client sees exactly the sequence one PostgreSQL would send. Statements
//! that change transaction state (BEGIN/COMMIT/...) split the batch at that point. An
//! Execute of a portal that reads several shards is streamed through the portal's cursor
//! (`session::scatter`), which outlives the batch so that Execute's row limit can suspend
//! the portal and the next Execute resume it.

mod bind;
mod describe;
mod encode;
mod execute;
mod parse;
mod route;
mod run;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::message::frontend;

use super::{ExecError, Session, Stmt, Work};
use crate::backend::BackendConn;
use proxy_core::merge::MergeSpec;
use proxy_core::router::StatementKind;
use proxy_core::wire::frontend::{Frame, FrontendMessage};
use proxy_core::wire::{self, sqlstate};

/// Where a bound portal runs.
#[derive(Debug, Clone)]
pub enum PortalRoute {
    One(usize),
    Multi {
        targets: Vec<usize>,
        merge: Option<MergeSpec>,
        /// A multi-row INSERT split by shard: (shard, SQL, kept parameter indexes).
        per_shard_sql: Option<Vec<(usize, String, Vec<usize>)>>,
        is_write: bool,
    },
    /// A transaction-control or session statement the proxy executes itself.
    Special,
}

#[derive(Debug, Clone)]
pub struct Portal {
    pub stmt: Arc<Stmt>,
    pub route: PortalRoute,
}

/// What a backend read should end with.
#[derive(Debug, Clone)]
enum Expect {
    Parse {
        global: Option<String>,
    },
    Bind,
    DescribeStmt {
        stmt: Arc<Stmt>,
    },
    DescribePortal,
    Execute,
    /// CloseComplete of a `Close` the proxy injected before re-preparing a statement.
    Close,
}

#[derive(Debug)]
enum Slot {
    /// Bytes the proxy answers itself.
    Local(BytesMut),
    /// An error the proxy raises; the rest of the batch is skipped.
    LocalError(BytesMut),
    /// One read relayed to the client.
    Forward { shard: usize, expect: Expect },
    /// One read whose answer is dropped (injected Parse).
    Suppress { shard: usize, expect: Expect },
    /// Several reads (one per shard); on success emit `ok`.
    AllOk {
        reads: Vec<(usize, Expect)>,
        ok: BytesMut,
    },
    /// Describe of a multi-shard portal: first shard's answer, hidden columns cut.
    DescribeMulti { shard: usize, visible_cut: usize },
    /// Execute of a multi-shard write portal (broadcast, split INSERT): answers gathered.
    ExecuteMulti {
        shards: Vec<usize>,
        merge: Option<MergeSpec>,
    },
    /// Execute of a multi-shard read portal: rows streamed through the portal's cursor,
    /// at most `max_rows` (0 = all), then PortalSuspended.
    ScatterRead {
        portal: String,
        fetches: Vec<super::scatter::Fetch>,
        max_rows: u32,
    },
}

/// State of one batch segment being planned.
struct Plan {
    works: BTreeMap<usize, Work>,
    slots: Vec<Slot>,
    wrote: std::collections::BTreeSet<usize>,
}

impl Plan {
    fn new() -> Self {
        Plan {
            works: BTreeMap::new(),
            slots: Vec::new(),
            wrote: Default::default(),
        }
    }
}

fn is_special(kind: &StatementKind) -> bool {
    matches!(
        kind,
        StatementKind::Begin
            | StatementKind::Commit
            | StatementKind::Rollback
            | StatementKind::Savepoint
            | StatementKind::SetShard(_)
            | StatementKind::Empty
    )
}

/// A slot the proxy answers itself with what `build` writes.
fn local(build: impl FnOnce(&mut BytesMut)) -> Slot {
    let mut b = BytesMut::new();
    build(&mut b);
    Slot::Local(b)
}

/// Queues `Close` (a no-op if absent: our belief about the backend may be stale after an
/// error skipped part of an earlier batch) and `Parse` of `stmt` under its global name, and
/// records it as prepared there.
fn write_prepare(c: &mut BackendConn, stmt: &Stmt) -> Result<(), ExecError> {
    frontend::close(b'S', &stmt.global, &mut c.wbuf)
        .and_then(|()| {
            frontend::parse(
                &stmt.global,
                &stmt.sql,
                stmt.types.iter().copied(),
                &mut c.wbuf,
            )
        })
        .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
    c.prepared.insert(stmt.global.clone());
    Ok(())
}

fn local_error(code: &str, message: &str) -> Slot {
    let mut b = BytesMut::new();
    wire::error(&mut b, "ERROR", code, message);
    Slot::LocalError(b)
}

fn boxed_error(code: &str, message: &str) -> Box<Slot> {
    Box::new(local_error(code, message))
}

impl Session {
    /// Flush: run what is pending now; the eventual Sync only adds ReadyForQuery.
    pub async fn flush_pending(&mut self) -> Result<(), crate::frontend::io::ClientError> {
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            self.pending_bytes = 0;
            self.run_batch_reporting(batch).await?;
        }
        self.client.flush().await?;
        Ok(())
    }

    /// Sync: run the pending batch (ReadyForQuery is written by the caller).
    pub async fn sync(&mut self) -> Result<(), crate::frontend::io::ClientError> {
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        self.run_batch_reporting(batch).await?;
        self.skip_until_sync = false;
        if self.txn.as_ref().is_none_or(|t| !t.explicit) {
            self.portals.clear();
            self.cursors.clear();
        }
        self.clear_cancel_slot();
        Ok(())
    }

    async fn run_batch_reporting(
        &mut self,
        batch: Vec<Frame>,
    ) -> Result<(), crate::frontend::io::ClientError> {
        if self.skip_until_sync {
            return Ok(());
        }
        match self.run_batch(batch).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.skip_until_sync = true;
                Ok(())
            }
            Err(ExecError::Client(e)) => Err(e),
            Err(e) => {
                self.report(&e);
                self.skip_until_sync = true;
                Ok(())
            }
        }
    }

    /// Runs a batch of extended messages; returns false if an error was sent.
    async fn run_batch(&mut self, batch: Vec<Frame>) -> Result<bool, ExecError> {
        let mut plan = Plan::new();
        let mut i = 0;
        while i < batch.len() {
            let frame = &batch[i];
            // A special statement (BEGIN/COMMIT/...) splits the batch.
            if let FrontendMessage::Execute { portal, .. } = &frame.msg {
                if let Some(p) = self.portals.get(portal) {
                    if matches!(p.route, PortalRoute::Special) {
                        let stmt = p.stmt.clone();
                        let ok = self
                            .execute_plan(std::mem::replace(&mut plan, Plan::new()))
                            .await?;
                        if !ok {
                            return Ok(false);
                        }
                        let before = self.client.out.len();
                        let r = self.simple_query(None, &stmt.sql).await;
                        r.map_err(ExecError::Client)?;
                        // An ErrorResponse among the new bytes means the batch failed.
                        if self.client.out[before..].first() == Some(&b'E') {
                            return Ok(false);
                        }
                        i += 1;
                        continue;
                    }
                }
            }
            let stop = self.plan_message(&mut plan, &batch, i).await?;
            if stop {
                break;
            }
            i += 1;
        }
        self.execute_plan(plan).await
    }

    /// Takes (or reuses within this plan) the backend for `shard`.
    async fn work<'p>(
        &mut self,
        plan: &'p mut Plan,
        shard: usize,
    ) -> Result<&'p mut Work, ExecError> {
        if let std::collections::btree_map::Entry::Vacant(e) = plan.works.entry(shard) {
            let w = self.acquire(shard).await?;
            e.insert(w);
        }
        plan.works
            .get_mut(&shard)
            .ok_or_else(|| ExecError::sql(sqlstate::INTERNAL_ERROR, "backend vanished from plan"))
    }

    /// Makes sure `stmt` exists on the backend for `shard` (injecting a Parse if not).
    async fn ensure_prepared(
        &mut self,
        plan: &mut Plan,
        shard: usize,
        stmt: &Stmt,
    ) -> Result<(), ExecError> {
        let w = self.work(plan, shard).await?;
        let c = w.conn.conn();
        if !c.prepared.contains(&stmt.global) {
            write_prepare(c, stmt)?;
            plan.slots.push(Slot::Suppress {
                shard,
                expect: Expect::Close,
            });
            plan.slots.push(Slot::Suppress {
                shard,
                expect: Expect::Parse {
                    global: Some(stmt.global.clone()),
                },
            });
        }
        Ok(())
    }

    /// A shard for statements not yet bound: one already in the plan, else the default.
    fn plan_default_shard(&self, plan: &Plan) -> usize {
        if self.passthrough {
            return 0;
        }
        plan.works
            .keys()
            .next()
            .copied()
            .unwrap_or_else(|| self.default_shard())
    }

    /// Plans message `i` of `batch`. Returns true when planning must stop (error).
    async fn plan_message(
        &mut self,
        plan: &mut Plan,
        batch: &[Frame],
        i: usize,
    ) -> Result<bool, ExecError> {
        let frame = &batch[i];
        match &frame.msg {
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            } => {
                self.plan_parse(plan, batch, i, name, query, param_types)
                    .await
            }
            FrontendMessage::Bind(b) => self.plan_bind(plan, b, &frame.raw).await,
            FrontendMessage::Describe { kind: b'S', name } => {
                self.plan_describe_statement(plan, name).await
            }
            FrontendMessage::Describe { name, .. } => {
                self.plan_describe_portal(plan, name, &frame.raw).await
            }
            FrontendMessage::Execute { portal, max_rows } => {
                self.plan_execute(plan, portal, *max_rows, &frame.raw).await
            }
            FrontendMessage::Close { kind, name } => {
                if *kind == b'S' {
                    self.stmts.remove(name);
                } else {
                    self.portals.remove(name);
                    self.cursors.remove(name);
                }
                plan.slots.push(local(wire::close_complete));
                Ok(false)
            }
            _ => Ok(false),
        }
    }
}
