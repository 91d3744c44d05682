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
//! that change transaction state (BEGIN/COMMIT/...) split the batch at that point.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;

use super::exec::{emit_merged, targets_of, RelayError, ShardResult};
use super::{global_name, ExecError, Session, Stmt, Txn, Work};
use crate::backend::BackendError;
use proxy_core::merge::MergeSpec;
use proxy_core::router::{Params, StatementKind, Target};
use proxy_core::wire::frontend::{Bind, Frame, FrontendMessage};
use proxy_core::wire::{self, sqlstate};

/// Where a bound portal runs.
#[derive(Debug, Clone)]
pub enum PortalRoute {
    One(usize),
    Multi {
        targets: Vec<usize>,
        merge: Option<MergeSpec>,
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
    /// Execute of a multi-shard portal: rows merged.
    ExecuteMulti {
        shards: Vec<usize>,
        merge: Option<MergeSpec>,
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

/// Re-encodes a Bind with another statement name.
fn rename_bind(b: &Bind, raw: &[u8], global: &str) -> BytesMut {
    let tail = raw.get(b.tail_offset..).unwrap_or_default();
    let mut out = BytesMut::with_capacity(raw.len() + global.len());
    out.put_u8(b'B');
    out.put_i32((4 + b.portal.len() + 1 + global.len() + 1 + tail.len()) as i32);
    out.extend_from_slice(b.portal.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(global.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(tail);
    out
}

/// Encodes a Bind carrying only some of the original parameters (multi-row INSERT split).
fn subset_bind(b: &Bind, statement: &str, keep: &[usize]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(b'B');
    let start = out.len();
    out.put_i32(0);
    out.extend_from_slice(b.portal.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(statement.as_bytes());
    out.put_u8(0);
    if b.param_formats.len() <= 1 {
        out.put_i16(b.param_formats.len() as i16);
        for f in &b.param_formats {
            out.put_i16(*f);
        }
    } else {
        out.put_i16(keep.len() as i16);
        for &i in keep {
            out.put_i16(b.param_formats.get(i).copied().unwrap_or(0));
        }
    }
    out.put_i16(keep.len() as i16);
    for &i in keep {
        match b.params.get(i).cloned().flatten() {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.extend_from_slice(&v);
            }
        }
    }
    out.put_i16(b.result_formats.len() as i16);
    for f in &b.result_formats {
        out.put_i16(*f);
    }
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out
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
            self.run_batch_reporting(batch).await?;
        }
        self.client.flush().await?;
        Ok(())
    }

    /// Sync: run the pending batch (ReadyForQuery is written by the caller).
    pub async fn sync(&mut self) -> Result<(), crate::frontend::io::ClientError> {
        let batch = std::mem::take(&mut self.pending);
        self.run_batch_reporting(batch).await?;
        self.skip_until_sync = false;
        if self.txn.as_ref().is_none_or(|t| !t.explicit) {
            self.portals.clear();
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
            // Close first (a no-op if absent): our belief about the backend may be stale
            // after an error skipped part of an earlier batch.
            frontend::close(b'S', &stmt.global, &mut c.wbuf)
                .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
            frontend::parse(
                &stmt.global,
                &stmt.sql,
                stmt.types.iter().copied(),
                &mut c.wbuf,
            )
            .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
            c.prepared.insert(stmt.global.clone());
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

    /// Routes a Bind; `Err` carries a ready-made error slot.
    fn route_bind(&self, stmt: &Stmt, b: &Bind) -> Result<PortalRoute, Box<Slot>> {
        if self.passthrough {
            return Ok(PortalRoute::One(0));
        }
        let Some(analysis) = &stmt.analysis else {
            return Ok(PortalRoute::One(self.default_shard()));
        };
        if is_special(&analysis.kind) {
            return Ok(PortalRoute::Special);
        }
        match &analysis.kind {
            StatementKind::Set | StatementKind::Show => {
                return Ok(PortalRoute::One(self.default_shard()))
            }
            StatementKind::Unparsed(reason) => {
                if let Some(h) = analysis.hint.as_deref().or(self.shard_hint.as_deref()) {
                    return self
                        .topo
                        .ring
                        .index_of(h)
                        .map(PortalRoute::One)
                        .ok_or_else(|| {
                            boxed_error(
                                sqlstate::INVALID_CATALOG_NAME,
                                &format!("unknown shard \"{h}\""),
                            )
                        });
                }
                let lower = stmt.sql.to_ascii_lowercase();
                if !lower.contains("pg_catalog")
                    && self
                        .topo
                        .sharded_tables
                        .iter()
                        .any(|t| lower.contains(&t.to_ascii_lowercase()))
                {
                    return Err(boxed_error(
                        sqlstate::SYNTAX_ERROR,
                        &format!("the shard proxy cannot route this statement ({reason}); add /* shard=<name> */ or SET taskflow.shard"),
                    ));
                }
                return Ok(PortalRoute::One(self.default_shard()));
            }
            _ => {}
        }
        let values: Vec<Option<&[u8]>> = b.params.iter().map(|p| p.as_deref()).collect();
        let types = stmt.param_types();
        let params = Params {
            values: &values,
            formats: &b.param_formats,
            types: &types,
        };
        let topo = self.txn.as_ref().map(|t| &t.topo).unwrap_or(&self.topo);
        let plan = analysis
            .plan(&topo.ring, &params, self.shard_hint.as_deref())
            .map_err(|e| boxed_error(sqlstate::FEATURE_NOT_SUPPORTED, &e.to_string()))?;
        if !analysis.touches_sharded
            && !analysis.is_write
            && plan.merge.is_none()
            && matches!(plan.target, Target::One(_))
        {
            return Ok(PortalRoute::One(self.default_shard()));
        }
        let targets = targets_of(&plan.target, topo.shards.len());
        if targets.len() == 1 && plan.per_shard_sql.is_none() && plan.merge.is_none() {
            return Ok(PortalRoute::One(targets[0]));
        }
        if let StatementKind::Copy { .. } = analysis.kind {
            return Err(boxed_error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "a COPY that spans shards needs the simple query protocol (or a /* shard=<name> */ hint)",
            ));
        }
        // Multi-shard: remember the plan's SQL rewrites by stashing them in the merge spec
        // and per-shard list of the portal.
        Ok(PortalRoute::Multi {
            targets: match &plan.per_shard_sql {
                Some(per) => per.iter().map(|(s, _, _)| *s).collect(),
                None => targets,
            },
            merge: plan.merge.clone(),
            is_write: analysis.is_write,
        })
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
                if !name.is_empty() && self.stmts.contains_key(name) {
                    plan.slots.push(local_error(
                        sqlstate::DUPLICATE_PREPARED_STATEMENT,
                        &format!("prepared statement \"{name}\" already exists"),
                    ));
                    return Ok(true);
                }
                let analysis = (!self.passthrough).then(|| self.topo.router.analyze(query));
                let stmt = Arc::new(Stmt {
                    global: global_name(query, param_types),
                    sql: query.clone(),
                    types: param_types.clone(),
                    described: std::sync::Mutex::new(None),
                    analysis,
                });
                self.stmts.insert(name.clone(), stmt.clone());
                if stmt.analysis.as_ref().is_some_and(|a| is_special(&a.kind)) {
                    let mut b = BytesMut::new();
                    wire::parse_complete(&mut b);
                    plan.slots.push(Slot::Local(b));
                    return Ok(false);
                }
                // Parse where the following Bind of this statement will run, if it's known.
                let mut shard = self.plan_default_shard(plan);
                if let Some(FrontendMessage::Bind(b)) = batch.get(i + 1).map(|f| &f.msg) {
                    if &b.statement == name {
                        if let Ok(PortalRoute::One(s)) = self.route_bind(&stmt, b) {
                            shard = s;
                        }
                    }
                }
                let w = self.work(plan, shard).await?;
                let c = w.conn.conn();
                if c.prepared.contains(&stmt.global) {
                    let mut b = BytesMut::new();
                    wire::parse_complete(&mut b);
                    plan.slots.push(Slot::Local(b));
                } else {
                    frontend::close(b'S', &stmt.global, &mut c.wbuf)
                        .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
                    frontend::parse(
                        &stmt.global,
                        query,
                        param_types.iter().copied(),
                        &mut c.wbuf,
                    )
                    .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
                    c.prepared.insert(stmt.global.clone());
                    plan.slots.push(Slot::Suppress {
                        shard,
                        expect: Expect::Close,
                    });
                    plan.slots.push(Slot::Forward {
                        shard,
                        expect: Expect::Parse {
                            global: Some(stmt.global.clone()),
                        },
                    });
                }
            }
            FrontendMessage::Bind(b) => {
                let Some(stmt) = self.stmts.get(&b.statement).cloned() else {
                    plan.slots.push(local_error(
                        sqlstate::UNDEFINED_PREPARED_STATEMENT,
                        &format!("prepared statement \"{}\" does not exist", b.statement),
                    ));
                    return Ok(true);
                };
                if let Err(e) = self.check_not_failed() {
                    plan.slots
                        .push(local_error(sqlstate::IN_FAILED_TRANSACTION, &e.to_string()));
                    return Ok(true);
                }
                let route = match self.route_bind(&stmt, b) {
                    Ok(r) => r,
                    Err(slot) => {
                        plan.slots.push(*slot);
                        return Ok(true);
                    }
                };
                match &route {
                    PortalRoute::Special => {
                        let mut out = BytesMut::new();
                        wire::bind_complete(&mut out);
                        plan.slots.push(Slot::Local(out));
                    }
                    PortalRoute::One(shard) => {
                        self.ensure_prepared(plan, *shard, &stmt).await?;
                        let w = self.work(plan, *shard).await?;
                        let bytes = rename_bind(b, &frame.raw, &stmt.global);
                        w.conn.conn().wbuf.extend_from_slice(&bytes);
                        plan.slots.push(Slot::Forward {
                            shard: *shard,
                            expect: Expect::Bind,
                        });
                    }
                    PortalRoute::Multi {
                        targets,
                        merge,
                        is_write,
                    } => {
                        if *is_write && self.txn.is_none() && targets.len() > 1 {
                            // Autocommit write over several shards: an implicit transaction
                            // committed (2PC) after the batch.
                            self.txn = Some(Txn {
                                explicit: false,
                                begin_sql: "BEGIN".into(),
                                conns: Default::default(),
                                writes: Default::default(),
                                failed: false,
                                savepoints: Vec::new(),
                                topo: self.topo.clone(),
                            });
                            self.client.hold_output = true;
                        }
                        // Per-shard SQL for a split INSERT, or the merge rewrite.
                        let values: Vec<Option<&[u8]>> =
                            b.params.iter().map(|p| p.as_deref()).collect();
                        let types = stmt.param_types();
                        let per_shard = match &stmt.analysis {
                            Some(a) => {
                                let topo = self
                                    .txn
                                    .as_ref()
                                    .map(|t| t.topo.clone())
                                    .unwrap_or_else(|| self.topo.clone());
                                a.plan(
                                    &topo.ring,
                                    &Params {
                                        values: &values,
                                        formats: &b.param_formats,
                                        types: &types,
                                    },
                                    self.shard_hint.as_deref(),
                                )
                                .ok()
                                .and_then(|p| p.per_shard_sql)
                            }
                            None => None,
                        };
                        let mut reads = Vec::new();
                        for &t in targets {
                            if let Some((_, sql, keep)) = per_shard
                                .as_ref()
                                .and_then(|v| v.iter().find(|(s, _, _)| *s == t))
                            {
                                let sub_types: Vec<u32> = keep
                                    .iter()
                                    .map(|&k| types.get(k).copied().unwrap_or(0))
                                    .collect();
                                let w = self.work(plan, t).await?;
                                let c = w.conn.conn();
                                frontend::parse("", sql, sub_types, &mut c.wbuf).map_err(|e| {
                                    ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string())
                                })?;
                                c.wbuf.extend_from_slice(&subset_bind(b, "", keep));
                                plan.slots.push(Slot::Suppress {
                                    shard: t,
                                    expect: Expect::Parse { global: None },
                                });
                            } else if let Some(sql) =
                                merge.as_ref().and_then(|m| m.shard_sql.clone())
                            {
                                let w = self.work(plan, t).await?;
                                let c = w.conn.conn();
                                frontend::parse("", &sql, stmt.types.iter().copied(), &mut c.wbuf)
                                    .map_err(|e| {
                                        ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string())
                                    })?;
                                c.wbuf.extend_from_slice(&rename_bind(b, &frame.raw, ""));
                                plan.slots.push(Slot::Suppress {
                                    shard: t,
                                    expect: Expect::Parse { global: None },
                                });
                            } else {
                                self.ensure_prepared(plan, t, &stmt).await?;
                                let w = self.work(plan, t).await?;
                                w.conn.conn().wbuf.extend_from_slice(&rename_bind(
                                    b,
                                    &frame.raw,
                                    &stmt.global,
                                ));
                            }
                            reads.push((t, Expect::Bind));
                        }
                        let mut ok = BytesMut::new();
                        wire::bind_complete(&mut ok);
                        plan.slots.push(Slot::AllOk { reads, ok });
                    }
                }
                self.portals
                    .insert(b.portal.clone(), Portal { stmt, route });
            }
            FrontendMessage::Describe { kind: b'S', name } => {
                let Some(stmt) = self.stmts.get(name).cloned() else {
                    plan.slots.push(local_error(
                        sqlstate::UNDEFINED_PREPARED_STATEMENT,
                        &format!("prepared statement \"{name}\" does not exist"),
                    ));
                    return Ok(true);
                };
                if stmt.analysis.as_ref().is_some_and(|a| is_special(&a.kind)) {
                    let mut b = BytesMut::new();
                    b.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0]);
                    wire::no_data(&mut b);
                    plan.slots.push(Slot::Local(b));
                    return Ok(false);
                }
                let shard = self.plan_default_shard(plan);
                self.ensure_prepared(plan, shard, &stmt).await?;
                let w = self.work(plan, shard).await?;
                frontend::describe(b'S', &stmt.global, &mut w.conn.conn().wbuf)
                    .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
                plan.slots.push(Slot::Forward {
                    shard,
                    expect: Expect::DescribeStmt { stmt },
                });
            }
            FrontendMessage::Describe { name, .. } => {
                let Some(portal) = self.portals.get(name).cloned() else {
                    plan.slots.push(local_error(
                        sqlstate::UNDEFINED_CURSOR,
                        &format!("portal \"{name}\" does not exist"),
                    ));
                    return Ok(true);
                };
                match &portal.route {
                    PortalRoute::Special => {
                        let mut b = BytesMut::new();
                        wire::no_data(&mut b);
                        plan.slots.push(Slot::Local(b));
                    }
                    PortalRoute::One(shard) => {
                        let w = self.work(plan, *shard).await?;
                        w.conn.conn().wbuf.extend_from_slice(&frame.raw);
                        plan.slots.push(Slot::Forward {
                            shard: *shard,
                            expect: Expect::DescribePortal,
                        });
                    }
                    PortalRoute::Multi { targets, merge, .. } => {
                        let Some(&first) = targets.first() else {
                            let mut b = BytesMut::new();
                            wire::no_data(&mut b);
                            plan.slots.push(Slot::Local(b));
                            return Ok(false);
                        };
                        let w = self.work(plan, first).await?;
                        w.conn.conn().wbuf.extend_from_slice(&frame.raw);
                        plan.slots.push(Slot::DescribeMulti {
                            shard: first,
                            visible_cut: merge.as_ref().map(|m| m.hidden_columns).unwrap_or(0),
                        });
                    }
                }
            }
            FrontendMessage::Execute { portal, .. } => {
                let Some(p) = self.portals.get(portal).cloned() else {
                    plan.slots.push(local_error(
                        sqlstate::UNDEFINED_CURSOR,
                        &format!("portal \"{portal}\" does not exist"),
                    ));
                    return Ok(true);
                };
                let is_write = p.stmt.analysis.as_ref().is_some_and(|a| a.is_write);
                match &p.route {
                    PortalRoute::Special => {}
                    PortalRoute::One(shard) => {
                        let w = self.work(plan, *shard).await?;
                        w.conn.conn().wbuf.extend_from_slice(&frame.raw);
                        if is_write {
                            plan.wrote.insert(*shard);
                        }
                        plan.slots.push(Slot::Forward {
                            shard: *shard,
                            expect: Expect::Execute,
                        });
                        self.proxy.metrics.route("one");
                    }
                    PortalRoute::Multi {
                        targets,
                        merge,
                        is_write,
                    } => {
                        for &t in targets {
                            let w = self.work(plan, t).await?;
                            let c = w.conn.conn();
                            frontend::describe(b'P', portal, &mut c.wbuf).map_err(|e| {
                                ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string())
                            })?;
                            frontend::execute(portal, 0, &mut c.wbuf).map_err(|e| {
                                ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string())
                            })?;
                            if *is_write {
                                plan.wrote.insert(t);
                            }
                        }
                        self.proxy
                            .metrics
                            .route(if *is_write { "broadcast" } else { "scatter" });
                        plan.slots.push(Slot::ExecuteMulti {
                            shards: targets.clone(),
                            merge: merge.clone(),
                        });
                    }
                }
            }
            FrontendMessage::Close { kind, name } => {
                if *kind == b'S' {
                    self.stmts.remove(name);
                } else {
                    self.portals.remove(name);
                }
                let mut b = BytesMut::new();
                wire::close_complete(&mut b);
                plan.slots.push(Slot::Local(b));
            }
            _ => {}
        }
        Ok(false)
    }

    /// Sends every backend its messages plus Sync, reads the slots in order, drains to
    /// ReadyForQuery, and returns the backends. Returns false if an error was relayed.
    async fn execute_plan(&mut self, plan: Plan) -> Result<bool, ExecError> {
        let Plan {
            mut works,
            slots,
            wrote,
        } = plan;
        let implicit = self.txn.as_ref().is_some_and(|t| !t.explicit);
        // Statements prepared by this batch; if the batch fails, some may have been skipped
        // by the backend, so they are forgotten (and re-prepared, Close first, on next use).
        let parsed: Vec<(usize, String)> = slots
            .iter()
            .filter_map(|s| match s {
                Slot::Forward {
                    shard,
                    expect: Expect::Parse { global: Some(g) },
                }
                | Slot::Suppress {
                    shard,
                    expect: Expect::Parse { global: Some(g) },
                } => Some((*shard, g.clone())),
                _ => None,
            })
            .collect();
        let mark = self.client.out.len();
        let started = Instant::now();
        // A scatter read must not interleave with a cross-shard COMMIT PREPARED fan-out.
        let scatter_read =
            wrote.is_empty() && slots.iter().any(|s| matches!(s, Slot::ExecuteMulti { .. }));
        let proxy = self.proxy.clone();
        let fence = if scatter_read {
            Some(proxy.commit_fence.read().await)
        } else {
            None
        };
        let mut unavailable: Option<(usize, BackendError)> = None;
        for (shard, w) in works.iter_mut() {
            frontend::sync(&mut w.conn.conn().wbuf);
            if let Err(e) = w.conn.conn().flush().await {
                unavailable.get_or_insert((*shard, e));
            }
        }
        let mut ok = unavailable.is_none();
        if ok {
            for (shard, w) in works.iter_mut() {
                if let Err(e) = Self::drain_skips(w).await {
                    unavailable.get_or_insert((*shard, e));
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            for slot in slots {
                match self.read_slot(&mut works, slot).await {
                    Ok(true) => {}
                    Ok(false) => {
                        ok = false;
                        break;
                    }
                    Err((shard, RelayError::Backend(e))) => {
                        unavailable = Some((shard, e));
                        ok = false;
                        break;
                    }
                    Err((_, RelayError::Client(e))) => {
                        for (_, w) in works {
                            self.discard_quietly(w);
                        }
                        return Err(ExecError::Client(e));
                    }
                }
            }
        }
        // Drain every backend to ReadyForQuery.
        let mut kept = Vec::new();
        for (shard, mut w) in works {
            if unavailable.as_ref().is_some_and(|(s, _)| *s == shard) {
                self.discard_quietly(w);
                continue;
            }
            let r = async {
                loop {
                    let m = w.conn.conn().read_msg().await?;
                    if m.tag == b'Z' {
                        w.conn.conn().status = m.body().first().copied().unwrap_or(b'I');
                        return Ok::<(), BackendError>(());
                    }
                }
            }
            .await;
            match r {
                Ok(()) => {
                    let name = w.conn.pool().name.clone();
                    self.proxy
                        .metrics
                        .query(&name, started.elapsed().as_secs_f64());
                    kept.push((shard, w));
                }
                Err(e) => {
                    unavailable.get_or_insert((shard, e));
                    self.discard_quietly(w);
                }
            }
        }
        drop(fence);
        for (shard, mut w) in kept {
            if !ok || unavailable.is_some() {
                let c = w.conn.conn();
                for (s, g) in &parsed {
                    if *s == shard {
                        c.prepared.remove(g);
                    }
                }
            }
            self.put_back(w, wrote.contains(&shard));
        }
        if let Some((shard, e)) = unavailable {
            let name = self.shard_name(shard);
            self.proxy.metrics.error(&name, "backend");
            if implicit {
                self.client.out.truncate(mark);
                self.abort_txn().await;
            } else if let Some(t) = &mut self.txn {
                t.failed = true;
            }
            self.client.hold_output = false;
            return Err(ExecError::Unavailable {
                shard: name,
                message: e.to_string(),
            });
        }
        if implicit {
            self.client.hold_output = false;
            if !ok {
                self.abort_txn().await;
            } else if let Some(t) = self.txn.take() {
                if let Err(e) = self.finish_commit(t).await {
                    self.client.out.truncate(mark);
                    return Err(e);
                }
            }
        } else if !ok {
            if let Some(t) = &mut self.txn {
                if t.explicit {
                    t.failed = true;
                }
            }
        }
        Ok(ok)
    }

    /// Reads one slot. `Ok(false)`: an error was relayed and the batch stops.
    async fn read_slot(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        slot: Slot,
    ) -> Result<bool, (usize, RelayError)> {
        match slot {
            Slot::Local(b) => {
                self.client.out.extend_from_slice(&b);
                Ok(true)
            }
            Slot::LocalError(b) => {
                self.client.out.extend_from_slice(&b);
                Ok(false)
            }
            Slot::Forward { shard, expect } => self.read_expect(works, shard, &expect, true).await,
            Slot::Suppress { shard, expect } => {
                self.read_expect(works, shard, &expect, false).await
            }
            Slot::AllOk { reads, ok } => {
                let mut good = true;
                for (shard, expect) in reads {
                    if !self.read_expect(works, shard, &expect, false).await? {
                        good = false;
                        break;
                    }
                }
                if good {
                    self.client.out.extend_from_slice(&ok);
                }
                Ok(good)
            }
            Slot::DescribeMulti { shard, visible_cut } => {
                let w = works
                    .get_mut(&shard)
                    .ok_or((shard, RelayError::Backend(BackendError::Closed)))?;
                loop {
                    let m = w
                        .conn
                        .conn()
                        .read_msg()
                        .await
                        .map_err(|e| (shard, e.into()))?;
                    match m.tag {
                        b'T' => {
                            let n = wire::row_description_columns(&m.data)
                                .map(|c| c.len())
                                .unwrap_or(0);
                            match wire::truncate_row_description(
                                &m.data,
                                n.saturating_sub(visible_cut),
                            ) {
                                Some(t) => self.client.out.extend_from_slice(&t),
                                None => self.client.out.extend_from_slice(&m.data),
                            }
                            return Ok(true);
                        }
                        b'n' => {
                            self.client.out.extend_from_slice(&m.data);
                            return Ok(true);
                        }
                        b'E' => {
                            self.client.out.extend_from_slice(&m.data);
                            return Ok(false);
                        }
                        _ => {}
                    }
                }
            }
            Slot::ExecuteMulti { shards, merge } => {
                let mut results = Vec::with_capacity(shards.len());
                for shard in shards {
                    let w = works
                        .get_mut(&shard)
                        .ok_or((shard, RelayError::Backend(BackendError::Closed)))?;
                    let mut r = ShardResult::default();
                    loop {
                        let m = w
                            .conn
                            .conn()
                            .read_msg()
                            .await
                            .map_err(|e| (shard, e.into()))?;
                        match m.tag {
                            b'T' => r.row_description = Some(m.data),
                            b'n' => {}
                            b'D' => r.rows.push(m.data),
                            b'C' => {
                                r.tags.push(wire::command_tag(&m.data));
                                break;
                            }
                            b'I' | b's' => break,
                            b'E' => {
                                self.client.out.extend_from_slice(&m.data);
                                return Ok(false);
                            }
                            b'N' => r.notices.push(m.data),
                            _ => {}
                        }
                    }
                    results.push(r);
                }
                let mut out = BytesMut::new();
                if let Err(e) = emit_merged(&mut out, &results, merge.as_ref()) {
                    wire::error(
                        &mut self.client.out,
                        "ERROR",
                        sqlstate::INTERNAL_ERROR,
                        &e.to_string(),
                    );
                    return Ok(false);
                }
                // RowDescription is only sent in answer to Describe: drop it here.
                let body = strip_row_description(out);
                self.client.out.extend_from_slice(&body);
                Ok(true)
            }
        }
    }

    /// Reads one expected answer from a backend, forwarding it (or not).
    async fn read_expect(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        shard: usize,
        expect: &Expect,
        forward: bool,
    ) -> Result<bool, (usize, RelayError)> {
        let Some(w) = works.get_mut(&shard) else {
            return Err((shard, RelayError::Backend(BackendError::Closed)));
        };
        loop {
            let m = w
                .conn
                .conn()
                .read_msg()
                .await
                .map_err(|e| (shard, e.into()))?;
            let terminal = match (expect, m.tag) {
                (_, b'E') => {
                    if let Expect::Parse { global: Some(g) } = expect {
                        w.conn.conn().prepared.remove(g);
                    }
                    self.client.out.extend_from_slice(&m.data);
                    return Ok(false);
                }
                (_, b'N' | b'S' | b'A') => {
                    self.client.out.extend_from_slice(&m.data);
                    continue;
                }
                (Expect::Parse { .. }, b'1') => true,
                (Expect::Close, b'3') => true,
                (Expect::Bind, b'2') => true,
                (Expect::DescribeStmt { stmt }, b't') => {
                    if let Ok(postgres_protocol::message::backend::Message::ParameterDescription(
                        pd,
                    )) = m.parse()
                    {
                        let mut types = Vec::new();
                        let mut it = pd.parameters();
                        while let Ok(Some(t)) = fallible_iterator::FallibleIterator::next(&mut it) {
                            types.push(t);
                        }
                        if let Ok(mut d) = stmt.described.lock() {
                            *d = Some(types);
                        }
                    }
                    false
                }
                (Expect::DescribeStmt { .. } | Expect::DescribePortal, b'T' | b'n') => true,
                (Expect::Execute, b'C' | b'I' | b's') => true,
                (Expect::Execute, b'G') => {
                    self.client.out.extend_from_slice(&m.data);
                    self.copy_in(w, true).await.map_err(|e| (shard, e))?;
                    continue;
                }
                (Expect::Execute, b'D' | b'H' | b'd' | b'c') => false,
                (_, b'Z') => {
                    return Err((
                        shard,
                        RelayError::Backend(BackendError::Protocol(
                            "unexpected ReadyForQuery".into(),
                        )),
                    ));
                }
                _ => false,
            };
            if forward {
                self.client.out.extend_from_slice(&m.data);
                if !self.client.hold_output {
                    self.client
                        .maybe_flush()
                        .await
                        .map_err(|e| (shard, RelayError::from(e)))?;
                }
            }
            if terminal {
                return Ok(true);
            }
        }
    }
}

/// Removes the RowDescription (first message) from an [`emit_merged`] output.
fn strip_row_description(out: BytesMut) -> Bytes {
    let out = out.freeze();
    if out.first() == Some(&b'T') && out.len() >= 5 {
        let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize + 1;
        if len <= out.len() {
            return out.slice(len..);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_core::wire::frontend::decode_message;

    #[test]
    fn renames_and_subsets_binds() {
        let mut buf = BytesMut::new();
        frontend::bind(
            "p",
            "s1",
            [0i16],
            ["1", "2", "3"],
            |v, out| {
                out.extend_from_slice(v.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            [1i16],
            &mut buf,
        )
        .map_err(|_| "bind")
        .expect("encode");
        let f = decode_message(&mut buf).expect("ok").expect("complete");
        let FrontendMessage::Bind(b) = &f.msg else {
            panic!("not a bind")
        };
        let mut renamed = rename_bind(b, &f.raw, "tf_abc");
        let f2 = decode_message(&mut renamed).expect("ok").expect("complete");
        let FrontendMessage::Bind(b2) = &f2.msg else {
            panic!("not a bind")
        };
        assert_eq!(b2.statement, "tf_abc");
        assert_eq!(b2.params, b.params);
        let mut sub = subset_bind(b, "", &[2, 0]);
        let f3 = decode_message(&mut sub).expect("ok").expect("complete");
        let FrontendMessage::Bind(b3) = &f3.msg else {
            panic!("not a bind")
        };
        assert_eq!(
            b3.params,
            vec![
                Some(Bytes::from_static(b"3")),
                Some(Bytes::from_static(b"1"))
            ]
        );
        assert_eq!(b3.result_formats, vec![1]);
    }
}
