//! Streaming scatter reads: every shard's rows flow to the client as the merge allows,
//! instead of being gathered first.
//!
//! Why: a key-less `SELECT * FROM tasks` over millions of rows must keep the proxy's memory
//! bounded (SPEC §6, limits). The pure merge ([`proxy_core::merge::Stream`]) says which
//! shard to read next and which row to send; this module does the reading and sending:
//!
//! * rows are read one message at a time from a shard's socket, so a shard the merge does
//!   not need yet is simply not read — its rows wait in the kernel and in PostgreSQL, which
//!   stops producing when its socket is full;
//! * rows go to the client's output buffer, which is written out every 64 KiB
//!   (`ClientConn::maybe_flush`): a slow client stops the reading, which stops the shards
//!   (backpressure end to end; the proxy holds a few buffers per shard, not the result);
//! * when the merge is done early (LIMIT reached), what the shards still send is read and
//!   dropped — bounded, because every shard got the LIMIT pushed down — so the backends
//!   reach ReadyForQuery and go back to their pools clean.
//!
//! A [`Cursor`] is the state of one scatter read: one [`Feed`] per shard plus the merge
//! stream. The simple protocol uses one for a single statement; the extended protocol
//! keeps it with the portal between Executes, so `Execute` with a row limit returns that
//! many rows, then PortalSuspended, and the next Execute continues where it stopped (the
//! shards' own portals stay open meanwhile, suspended the same way).

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};
use proxy_core::merge::{Column, MergeError, MergeSpec, Step, Stream};
use proxy_core::wire;

use super::{Session, Work};
use crate::backend::BackendError;
use crate::frontend::io::ClientError;

/// Why streaming stopped before the shards' answers were read to their end.
pub enum ScatterError {
    /// A shard's connection failed (its index in the topology).
    Backend(usize, BackendError),
    /// The client's connection failed.
    Client(ClientError),
}

/// How one round of streaming ended.
pub enum Pumped {
    /// Every row was sent: the rows this round sent.
    Complete(u64),
    /// No shard described rows (not a row-returning statement): the shards' tags added.
    NoRows(String),
    /// The round's row limit was reached (or a shard's fetched rows ran out first): more
    /// rows may follow in the next round.
    Suspended,
    /// A shard answered with this ErrorResponse.
    ShardError(Bytes),
    /// The shards' rows could not be merged.
    Merge(MergeError),
}

/// Where a shard's answer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeedState {
    /// Nothing asked of it yet (a portal not executed yet).
    Fresh,
    /// Its answer to the current request is arriving.
    Open,
    /// Its portal returned PortalSuspended: more rows on the next Execute.
    Suspended,
    /// CommandComplete: no more rows.
    Complete,
    /// It answered with an error.
    Failed,
}

/// One shard's side of a scatter read.
#[derive(Debug)]
pub struct Feed {
    shard: usize,
    state: FeedState,
    /// Rows read from the shard but not yet taken by the merge (only between Executes of
    /// a portal; at most the rows that Execute asked for).
    buffered: VecDeque<Bytes>,
    row_description: Option<Bytes>,
    tag: Option<String>,
}

/// What one shard is asked for by an Execute of a multi-shard portal.
#[derive(Debug, Clone, Copy)]
pub struct Fetch {
    /// Position of the shard in the cursor.
    pub pos: usize,
    /// Describe the portal first (the first Execute: the merge needs the column types).
    pub describe: bool,
    /// Row limit of the shard's Execute (0 = all).
    pub rows: i32,
}

/// The state of one scatter read (see the module documentation).
#[derive(Debug)]
pub struct Cursor {
    feeds: Vec<Feed>,
    merge: Option<MergeSpec>,
    stream: Option<Stream>,
}

impl Cursor {
    /// A read over `shards` (topology indexes) merged by `merge`; nothing asked yet.
    pub fn new(shards: &[usize], merge: Option<MergeSpec>) -> Cursor {
        let feeds = shards
            .iter()
            .map(|&shard| Feed {
                shard,
                state: FeedState::Fresh,
                buffered: VecDeque::new(),
                row_description: None,
                tag: None,
            })
            .collect();
        Cursor {
            feeds,
            merge,
            stream: None,
        }
    }

    /// Whether an Execute's row limit can be honoured: not with DISTINCT (or UNION), where
    /// rows read may all be repeats, so no fetch size guarantees a row — such a portal is
    /// streamed whole by its first Execute instead (memory still bounded, the limit not).
    pub fn honours_row_limit(&self) -> bool {
        !self.merge.as_ref().is_some_and(|m| m.distinct)
    }

    /// The shards (topology indexes), in merge order.
    pub fn shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.feeds.iter().map(|f| f.shard)
    }

    /// What each shard must be asked for so that `max_rows` rows (0 = all) can be sent:
    /// enough rows to cover the rows still to skip (OFFSET) plus `max_rows`, minus what is
    /// already read; every row when the merge aggregates. Shards that ended get nothing.
    pub fn fetches(&self, max_rows: u32) -> Vec<Fetch> {
        let gathers = self
            .merge
            .as_ref()
            .is_some_and(|m| !m.aggregates.is_empty());
        let skip = match &self.stream {
            Some(s) => s.pending_skip(),
            None => self.merge.as_ref().map_or(0, |m| m.offset),
        };
        let need = u64::from(max_rows).saturating_add(skip);
        let mut out = Vec::new();
        for (pos, f) in self.feeds.iter().enumerate() {
            let describe = match f.state {
                FeedState::Fresh => true,
                FeedState::Suspended => false,
                _ => continue,
            };
            let rows = if max_rows == 0 || gathers {
                0
            } else {
                let held = self.stream.as_ref().is_some_and(|s| s.holds(pos));
                let have = f.buffered.len() as u64 + u64::from(held);
                if have >= need && !describe {
                    continue;
                }
                // At least one row: a shard asked for nothing would not answer at all.
                i32::try_from(need.saturating_sub(have).max(1)).unwrap_or(0)
            };
            out.push(Fetch {
                pos,
                describe,
                rows,
            });
        }
        out
    }

    /// Marks the shards of `fetches` (or every shard, for `None`) as answering now.
    pub fn open(&mut self, fetches: Option<&[Fetch]>) {
        match fetches {
            None => self
                .feeds
                .iter_mut()
                .for_each(|f| f.state = FeedState::Open),
            Some(list) => {
                for f in list {
                    if let Some(feed) = self.feeds.get_mut(f.pos) {
                        feed.state = FeedState::Open;
                    }
                }
            }
        }
    }

    /// Whether every shard's answer is read to its end (nothing left on the wire).
    pub fn settled(&self) -> bool {
        self.feeds.iter().all(|f| f.state != FeedState::Open)
    }

    /// Shards whose answer is still arriving (their connection has unread rows).
    pub fn open_shards(&self) -> Vec<usize> {
        self.feeds
            .iter()
            .filter(|f| f.state == FeedState::Open)
            .map(|f| f.shard)
            .collect()
    }

    /// The RowDescription to send the client: the first shard's, helper columns cut.
    fn client_description(&self) -> Option<BytesMut> {
        let rd = self.feeds.iter().find_map(|f| f.row_description.as_ref())?;
        let visible = self.stream.as_ref()?.visible_columns();
        wire::truncate_row_description(rd, visible)
    }

    /// The command tag when no shard described rows (the shards' tags added up).
    fn summed_tag(&self) -> String {
        let tags: Vec<String> = self.feeds.iter().filter_map(|f| f.tag.clone()).collect();
        wire::sum_tags(&tags).unwrap_or_else(|| "SELECT 0".into())
    }
}

/// One message of a shard's answer that the streaming cares about.
enum Event {
    Description(Bytes),
    Row(Bytes),
    Complete(String),
    Suspended,
    Error(Bytes),
}

/// What a shard's event leaves to the caller once the feed has taken its own part.
enum Taken {
    Row(Bytes),
    /// The shard's ErrorResponse (the feed is Failed).
    Error(Bytes),
    Nothing,
}

impl Feed {
    /// Applies `ev` to this feed's state (description, tag, completion, suspension,
    /// failure) and hands back what the caller must deal with: a row or an error.
    fn take(&mut self, ev: Event) -> Taken {
        match ev {
            Event::Row(r) => Taken::Row(r),
            Event::Description(rd) => {
                self.row_description.get_or_insert(rd);
                Taken::Nothing
            }
            Event::Complete(tag) => {
                self.tag = Some(tag);
                self.state = FeedState::Complete;
                Taken::Nothing
            }
            Event::Suspended => {
                self.state = FeedState::Suspended;
                Taken::Nothing
            }
            Event::Error(e) => {
                self.state = FeedState::Failed;
                Taken::Error(e)
            }
        }
    }
}

/// Reads a shard's next row-level message; notices and parameter changes go straight to
/// the client's output.
async fn read_event(w: &mut Work, out: &mut BytesMut) -> Result<Event, BackendError> {
    loop {
        let m = w.conn.conn().read_msg().await?;
        match m.tag {
            b'T' => return Ok(Event::Description(m.data)),
            b'D' => return Ok(Event::Row(m.data)),
            b'C' => return Ok(Event::Complete(wire::command_tag(&m.data))),
            b'I' => return Ok(Event::Complete(String::new())),
            b's' => return Ok(Event::Suspended),
            b'E' => return Ok(Event::Error(m.data)),
            b'N' | b'S' | b'A' => out.extend_from_slice(&m.data),
            b'Z' | b'G' | b'H' | b'W' => {
                return Err(BackendError::Protocol(format!(
                    "unexpected message '{}' in a scatter read",
                    char::from(m.tag)
                )))
            }
            _ => {}
        }
    }
}

/// What the next row of a feed turned out to be.
enum Next {
    Row(Bytes),
    Ended,
    Suspended,
    Error(Bytes),
}

impl Session {
    /// Streams one round of a scatter read to the client: up to `max_rows` rows (0 = all).
    /// With `describe`, the (cut) RowDescription is sent first (simple protocol). The
    /// shards' answers are not read to their end here: see [`Session::settle`].
    pub async fn pump(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        cursor: &mut Cursor,
        max_rows: u64,
        describe: bool,
    ) -> Result<Pumped, ScatterError> {
        if let Some(error) = self.prime(works, cursor).await? {
            return Ok(Pumped::ShardError(error));
        }
        if cursor.stream.is_none() {
            let Some(rd) = cursor.feeds.iter().find_map(|f| f.row_description.clone()) else {
                return Ok(Pumped::NoRows(cursor.summed_tag()));
            };
            let Some(cols) = wire::row_description_columns(&rd) else {
                return Ok(Pumped::Merge(MergeError::Spec(
                    "malformed RowDescription from a shard".into(),
                )));
            };
            let columns = cols
                .into_iter()
                .map(|(type_oid, format)| Column { type_oid, format })
                .collect();
            let n = cursor.feeds.len();
            cursor.stream = Some(Stream::new(cursor.merge.as_ref(), columns, n));
            if describe {
                if let Some(t) = cursor.client_description() {
                    self.client.out.extend_from_slice(&t);
                }
            }
        }
        self.pump_rows(works, cursor, max_rows).await
    }

    /// Reads every answering shard up to its RowDescription (or its end), so errors that
    /// come before any row (planning, permissions) are seen before a row is sent.
    async fn prime(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        cursor: &mut Cursor,
    ) -> Result<Option<Bytes>, ScatterError> {
        for f in cursor.feeds.iter_mut() {
            while f.state == FeedState::Open && f.row_description.is_none() {
                let w = work_of(works, f.shard)?;
                let ev = read_event(w, &mut self.client.out)
                    .await
                    .map_err(|e| ScatterError::Backend(f.shard, e))?;
                match f.take(ev) {
                    Taken::Row(r) => f.buffered.push_back(r),
                    Taken::Error(e) => return Ok(Some(e)),
                    Taken::Nothing => {}
                }
            }
        }
        Ok(None)
    }

    /// The merge loop: reads what the stream asks for, sends what it emits.
    async fn pump_rows(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        cursor: &mut Cursor,
        max_rows: u64,
    ) -> Result<Pumped, ScatterError> {
        let mut sent = 0u64;
        loop {
            let Some(stream) = cursor.stream.as_mut() else {
                return Ok(Pumped::Complete(sent));
            };
            let step = match stream.step() {
                Ok(s) => s,
                Err(e) => return Ok(Pumped::Merge(e)),
            };
            match step {
                Step::Read(pos) => {
                    let next = self.next_row(works, cursor, pos).await?;
                    let Some(stream) = cursor.stream.as_mut() else {
                        continue;
                    };
                    match next {
                        Next::Row(r) => {
                            if let Err(e) = stream.push(pos, r) {
                                return Ok(Pumped::Merge(e));
                            }
                        }
                        Next::Ended => stream.end(pos),
                        Next::Suspended => return Ok(Pumped::Suspended),
                        Next::Error(e) => return Ok(Pumped::ShardError(e)),
                    }
                }
                Step::Emit(row) => {
                    self.client.out.extend_from_slice(&row);
                    self.client
                        .maybe_flush()
                        .await
                        .map_err(|e| ScatterError::Client(ClientError::Io(e)))?;
                    sent += 1;
                    if max_rows > 0 && sent >= max_rows {
                        return Ok(Pumped::Suspended);
                    }
                }
                Step::Done => return Ok(Pumped::Complete(sent)),
            }
        }
    }

    /// The next row of the shard at `pos`: buffered, else read from its connection.
    async fn next_row(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        cursor: &mut Cursor,
        pos: usize,
    ) -> Result<Next, ScatterError> {
        let Some(f) = cursor.feeds.get_mut(pos) else {
            return Ok(Next::Ended);
        };
        if let Some(r) = f.buffered.pop_front() {
            return Ok(Next::Row(r));
        }
        loop {
            match f.state {
                FeedState::Open => {}
                FeedState::Suspended | FeedState::Fresh => return Ok(Next::Suspended),
                FeedState::Complete | FeedState::Failed => return Ok(Next::Ended),
            }
            let w = work_of(works, f.shard)?;
            let ev = read_event(w, &mut self.client.out)
                .await
                .map_err(|e| ScatterError::Backend(f.shard, e))?;
            match f.take(ev) {
                Taken::Row(r) => return Ok(Next::Row(r)),
                Taken::Error(e) => return Ok(Next::Error(e)),
                Taken::Nothing => {}
            }
        }
    }

    /// Reads what every shard still sends for the current request, to its end: kept for
    /// the next Execute (`keep`, a suspended portal — at most the rows that Execute asked
    /// for), else dropped (the merge is done, or failed). Returns the first shard error
    /// met on the way.
    pub async fn settle(
        &mut self,
        works: &mut BTreeMap<usize, Work>,
        cursor: &mut Cursor,
        keep: bool,
    ) -> Result<Option<Bytes>, ScatterError> {
        let mut first_error = None;
        for f in cursor.feeds.iter_mut() {
            while f.state == FeedState::Open {
                let w = work_of(works, f.shard)?;
                let ev = read_event(w, &mut self.client.out)
                    .await
                    .map_err(|e| ScatterError::Backend(f.shard, e))?;
                match f.take(ev) {
                    Taken::Row(r) if keep => f.buffered.push_back(r),
                    Taken::Row(_) | Taken::Nothing => {}
                    Taken::Error(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if !keep {
                f.buffered.clear();
            }
        }
        Ok(first_error)
    }
}

/// The backend serving `shard` in this read.
fn work_of(works: &mut BTreeMap<usize, Work>, shard: usize) -> Result<&mut Work, ScatterError> {
    works
        .get_mut(&shard)
        .ok_or(ScatterError::Backend(shard, BackendError::Closed))
}

/// Reads a backend up to ReadyForQuery (dropping what comes before it) and records the
/// transaction status it reports.
pub async fn read_to_ready(w: &mut Work) -> Result<(), BackendError> {
    loop {
        let m = w.conn.conn().read_msg().await?;
        if m.tag == b'Z' {
            w.conn.conn().status = m.body().first().copied().unwrap_or(b'I');
            return Ok(());
        }
    }
}

/// PortalSuspended.
pub fn portal_suspended(out: &mut BytesMut) {
    out.extend_from_slice(&[b's', 0, 0, 0, 4]);
}
