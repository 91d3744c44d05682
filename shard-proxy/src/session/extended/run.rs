//! Running a planned batch: every backend gets its messages and a Sync in one write, the
//! slots are read in client order, every backend is drained to ReadyForQuery, and the
//! batch ends — returning the backends, and committing or rolling back the proxy's own
//! implicit transaction.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use proxy_core::merge::MergeSpec;
use proxy_core::wire::{self, sqlstate};

use super::encode::strip_row_description;
use super::{Expect, Plan, Slot};
use crate::backend::BackendError;
use crate::session::exec::{emit_merged, RelayError, ShardResult};
use crate::session::scatter::{self, Cursor, Fetch, Pumped, ScatterError};
use crate::session::{ExecError, Session, Work};

/// The first backend that failed, and why.
type Unavailable = Option<(usize, BackendError)>;

/// How reading the slots ended.
enum SlotsRead {
    /// Every slot read; `false` when an error was relayed and the batch stopped.
    Done(bool),
    /// A backend failed mid-read.
    Backend(usize, BackendError),
}

impl Session {
    /// Sends every backend its messages plus Sync, reads the slots in order, drains to
    /// ReadyForQuery, and returns the backends. Returns false if an error was relayed.
    pub(super) async fn execute_plan(&mut self, plan: Plan) -> Result<bool, ExecError> {
        let Plan {
            mut works,
            slots,
            wrote,
        } = plan;
        let parsed = prepared_by(&slots);
        let mark = self.client.out.len();
        let started = Instant::now();
        // A scatter read must not interleave with a cross-shard COMMIT PREPARED fan-out.
        let scatter_read =
            wrote.is_empty() && slots.iter().any(|s| matches!(s, Slot::ScatterRead { .. }));
        let proxy = self.proxy.clone();
        let fence = if scatter_read {
            Some(proxy.commit_fence.read().await)
        } else {
            None
        };
        let mut unavailable = send_all(&mut works).await;
        let mut ok = unavailable.is_none();
        if ok {
            match self.read_slots(&mut works, slots).await {
                Ok(SlotsRead::Done(all)) => ok = all,
                Ok(SlotsRead::Backend(shard, e)) => {
                    unavailable = Some((shard, e));
                    ok = false;
                }
                Err(e) => {
                    for (_, w) in works {
                        self.discard_quietly(w);
                    }
                    return Err(ExecError::Client(e));
                }
            }
        }
        let kept = self.drain_to_ready(works, &mut unavailable, started).await;
        drop(fence);
        let clean = ok && unavailable.is_none();
        for (shard, mut w) in kept {
            if !clean {
                // Some of this batch's Parses may have been skipped by the backend: forget
                // them, so the next use re-prepares (Close first).
                let c = w.conn.conn();
                for (s, g) in &parsed {
                    if *s == shard {
                        c.prepared.remove(g);
                    }
                }
            }
            self.put_back(w, wrote.contains(&shard));
        }
        self.end_batch(ok, unavailable, mark).await
    }

    /// Reads the slots in client order until one fails.
    async fn read_slots(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        slots: Vec<Slot>,
    ) -> Result<SlotsRead, crate::frontend::io::ClientError> {
        for slot in slots {
            match self.read_slot(works, slot).await {
                Ok(true) => {}
                Ok(false) => return Ok(SlotsRead::Done(false)),
                Err((shard, RelayError::Backend(e))) => return Ok(SlotsRead::Backend(shard, e)),
                Err((_, RelayError::Client(e))) => return Err(e),
            }
        }
        Ok(SlotsRead::Done(true))
    }

    /// Reads every backend up to its ReadyForQuery; returns those that got there (a failed
    /// one is discarded and recorded in `unavailable`).
    async fn drain_to_ready(
        &mut self,
        works: BTreeMap<usize, Work>,
        unavailable: &mut Unavailable,
        started: Instant,
    ) -> Vec<(usize, Work)> {
        let mut kept = Vec::new();
        for (shard, mut w) in works {
            if unavailable.as_ref().is_some_and(|(s, _)| *s == shard) {
                self.discard_quietly(w);
                continue;
            }
            match read_to_ready(&mut w).await {
                Ok(()) => {
                    w.conn.pool().observe_query(&self.proxy.metrics, started);
                    kept.push((shard, w));
                }
                Err(e) => {
                    unavailable.get_or_insert((shard, e));
                    self.discard_quietly(w);
                }
            }
        }
        kept
    }

    /// Ends the batch: an unavailable shard fails it (rolling back the implicit
    /// transaction, or marking an explicit one failed); otherwise the implicit transaction
    /// commits, or rolls back when an error was relayed.
    async fn end_batch(
        &mut self,
        ok: bool,
        unavailable: Unavailable,
        mark: usize,
    ) -> Result<bool, ExecError> {
        let implicit = self.txn.as_ref().is_some_and(|t| !t.explicit);
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
            if let Some(t) = self.txn.as_mut().filter(|t| t.explicit) {
                t.failed = true;
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
                for (shard, expect) in reads {
                    if !self.read_expect(works, shard, &expect, false).await? {
                        return Ok(false);
                    }
                }
                self.client.out.extend_from_slice(&ok);
                Ok(true)
            }
            Slot::DescribeMulti { shard, visible_cut } => {
                let w = work_for(works, shard)?;
                self.read_describe_multi(w, shard, visible_cut).await
            }
            Slot::ExecuteMulti { shards, merge } => {
                self.read_execute_multi(works, shards, merge.as_ref()).await
            }
            Slot::ScatterRead {
                portal,
                fetches,
                max_rows,
            } => self.read_scatter(works, &portal, &fetches, max_rows).await,
        }
    }

    /// A multi-shard read portal's Execute: rows streamed through the portal's cursor,
    /// which stays for the next Execute unless this one failed.
    async fn read_scatter(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        portal: &str,
        fetches: &[Fetch],
        max_rows: u32,
    ) -> Result<bool, (usize, RelayError)> {
        let Some(mut cursor) = self.cursors.remove(portal) else {
            wire::error(
                &mut self.client.out,
                "ERROR",
                sqlstate::INTERNAL_ERROR,
                "the state of a multi-shard portal was lost",
            );
            return Ok(false);
        };
        cursor.open(Some(fetches));
        match self.stream_portal(works, &mut cursor, max_rows).await {
            Ok(true) => {
                self.cursors.insert(portal.to_owned(), cursor);
                Ok(true)
            }
            Ok(false) => {
                // The statement failed mid-stream: the shards still sending rows are closed
                // rather than read to their end (a whole table, perhaps) or pooled.
                for shard in cursor.open_shards() {
                    if let Some(w) = works.remove(&shard) {
                        self.discard_quietly(w);
                    }
                }
                Ok(false)
            }
            Err(ScatterError::Backend(shard, e)) => Err((shard, RelayError::Backend(e))),
            Err(ScatterError::Client(e)) => Err((0, RelayError::Client(e))),
        }
    }

    /// Streams up to `max_rows` rows (0 = all), reads the rest of the shards' answers
    /// (kept when the portal is suspended), and ends with PortalSuspended, CommandComplete
    /// or the first error. Returns false when an error was relayed (the shards' answers
    /// are then left unread).
    async fn stream_portal(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        cursor: &mut Cursor,
        max_rows: u32,
    ) -> Result<bool, ScatterError> {
        let pumped = self.pump(works, cursor, u64::from(max_rows), false).await?;
        let end = match pumped {
            Pumped::Suspended => None,
            Pumped::Complete(n) => Some(format!("SELECT {n}")),
            Pumped::NoRows(tag) => Some(tag),
            Pumped::ShardError(e) => {
                self.client.out.extend_from_slice(&e);
                return Ok(false);
            }
            Pumped::Merge(e) => {
                let message = e.to_string();
                wire::error(
                    &mut self.client.out,
                    "ERROR",
                    sqlstate::INTERNAL_ERROR,
                    &message,
                );
                return Ok(false);
            }
        };
        let late = self.settle(works, cursor, end.is_none()).await?;
        if let Some(e) = late {
            self.client.out.extend_from_slice(&e);
            return Ok(false);
        }
        match end {
            None => scatter::portal_suspended(&mut self.client.out),
            Some(tag) => wire::command_complete(&mut self.client.out, &tag),
        }
        Ok(true)
    }

    /// The first shard's description of a multi-shard portal, without the columns the
    /// merge added for itself.
    async fn read_describe_multi(
        &mut self,
        w: &mut Work,
        shard: usize,
        visible_cut: usize,
    ) -> Result<bool, (usize, RelayError)> {
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
                    match wire::truncate_row_description(&m.data, n.saturating_sub(visible_cut)) {
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

    /// Every shard's result of a multi-shard Execute, merged into one.
    async fn read_execute_multi(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        shards: Vec<usize>,
        merge: Option<&MergeSpec>,
    ) -> Result<bool, (usize, RelayError)> {
        let mut results = Vec::with_capacity(shards.len());
        for shard in shards {
            let w = work_for(works, shard)?;
            match read_shard_result(w, shard).await? {
                Ok(r) => results.push(r),
                Err(error) => {
                    self.client.out.extend_from_slice(&error);
                    return Ok(false);
                }
            }
        }
        let mut out = BytesMut::new();
        if let Err(e) = emit_merged(&mut out, &results, merge) {
            wire::error(
                &mut self.client.out,
                "ERROR",
                sqlstate::INTERNAL_ERROR,
                &e.to_string(),
            );
            return Ok(false);
        }
        self.client
            .out
            .extend_from_slice(&strip_row_description(out));
        Ok(true)
    }

    /// Reads one expected answer from a backend, forwarding it (or not).
    pub(super) async fn read_expect(
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

/// Statements this batch prepares, by shard: forgotten again if the batch fails.
fn prepared_by(slots: &[Slot]) -> Vec<(usize, String)> {
    slots
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
        .collect()
}

/// Appends Sync to every backend's queue and writes it; then consumes the answers of
/// internal queries pipelined ahead of the client's messages.
///
/// Every backend is written even after one fails: each that got its Sync is later read to
/// ReadyForQuery and can go back to its pool.
async fn send_all(works: &mut BTreeMap<usize, Work>) -> Unavailable {
    let mut unavailable = None;
    for (shard, w) in works.iter_mut() {
        frontend::sync(&mut w.conn.conn().wbuf);
        if let Err(e) = w.conn.conn().flush().await {
            unavailable.get_or_insert((*shard, e));
        }
    }
    if unavailable.is_some() {
        return unavailable;
    }
    for (shard, w) in works.iter_mut() {
        if let Err(e) = Session::drain_skips(w).await {
            return Some((*shard, e));
        }
    }
    None
}

/// Reads up to ReadyForQuery and records the transaction status it reports.
async fn read_to_ready(w: &mut Work) -> Result<(), BackendError> {
    loop {
        let m = w.conn.conn().read_msg().await?;
        if m.tag == b'Z' {
            w.conn.conn().status = m.body().first().copied().unwrap_or(b'I');
            return Ok(());
        }
    }
}

/// The backend for `shard` in this batch.
fn work_for(
    works: &mut BTreeMap<usize, Work>,
    shard: usize,
) -> Result<&mut Work, (usize, RelayError)> {
    works
        .get_mut(&shard)
        .ok_or((shard, RelayError::Backend(BackendError::Closed)))
}

/// One shard's answer to Describe(portal) + Execute: `Ok(Err(bytes))` is an ErrorResponse
/// to relay.
async fn read_shard_result(
    w: &mut Work,
    shard: usize,
) -> Result<Result<ShardResult, bytes::Bytes>, (usize, RelayError)> {
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
            b'D' => r.rows.push(m.data),
            b'C' => {
                r.tags.push(wire::command_tag(&m.data));
                return Ok(Ok(r));
            }
            b'I' | b's' => return Ok(Ok(r)),
            b'E' => return Ok(Err(m.data)),
            b'N' => r.notices.push(m.data),
            _ => {}
        }
    }
}
