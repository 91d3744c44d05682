//! The streaming form of the merge: rows leave as soon as the merge allows, so a scatter
//! read holds at most one row per shard (plus, for DISTINCT, the distinct values seen and,
//! for aggregates, one accumulator per group) instead of every shard's whole result.
//!
//! The runtime drives a [`Stream`] with raw DataRow messages and asks it what to do next
//! ([`Stream::step`]): read a row of one shard ([`Step::Read`]), send a row to the client
//! ([`Step::Emit`]), or stop ([`Step::Done`]). Three modes, chosen from the [`MergeSpec`]:
//!
//! * **concatenation** (no ORDER BY, no aggregate): shard after shard, each row passed on
//!   as it arrives — the raw message itself unless helper columns must be cut;
//! * **ordered** (ORDER BY): a k-way merge. Every shard already returns its rows in the
//!   query's order, so the stream keeps one *head* row per shard and emits the smallest;
//!   a shard whose rows come out of order (its collation sorts text differently from the
//!   proxy's bytewise comparison) is an error, never a silently misordered result;
//! * **gathering** (aggregates, GROUP BY): rows are folded into a [`Merger`], which keeps
//!   one accumulator per group; the groups are emitted once every shard has ended.
//!
//! OFFSET/LIMIT are applied to the emitted rows (skipped, then counted); once the LIMIT is
//! reached the stream says [`Step::Done`] and the runtime stops reading. DISTINCT keeps
//! the set of rows emitted so far and drops repeats.
//!
//! Pure logic: no I/O, no async.

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};

use super::{decode_cell, order_keys, Column, Key, KeyVal, MergeError, MergeSpec, Merger, Row};
use crate::wire;

/// What the runtime should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Read the next row of this shard (by position in the stream's shard list) and hand
    /// it to [`Stream::push`], or call [`Stream::end`] if that shard's result ended.
    Read(usize),
    /// Send this DataRow message to the client.
    Emit(Bytes),
    /// No more rows: stop reading (what the shards still send is not needed).
    Done,
}

/// One shard's place in an ordered merge.
#[derive(Debug)]
enum Head {
    /// Its next row is needed before anything can be emitted.
    Want,
    /// Its smallest unsent row, with the row's sort keys.
    Have(Vec<KeyVal>, Bytes),
    /// Its result ended.
    Ended,
}

#[derive(Debug)]
enum Mode {
    /// Shard `at` is being read; `ready` is the row it just gave.
    Concat {
        at: usize,
        ended: Vec<bool>,
        ready: Option<Bytes>,
    },
    /// One head per shard; `last` is each shard's previous sort key (order check).
    Ordered {
        heads: Vec<Head>,
        last: Vec<Option<Vec<KeyVal>>>,
    },
    /// Aggregation: every row goes into the merger; its result is emitted at the end.
    Gather {
        merger: Option<Box<Merger>>,
        ended: Vec<bool>,
        out: Option<std::vec::IntoIter<Row>>,
    },
}

/// A scatter read's merge, fed and drained row by row. See the module documentation.
#[derive(Debug)]
pub struct Stream {
    columns: Vec<Column>,
    visible: usize,
    order: Vec<Key>,
    mode: Mode,
    /// DISTINCT: the visible values of every row emitted so far.
    seen: Option<BTreeSet<Vec<KeyVal>>>,
    /// OFFSET rows still to skip.
    skip: u64,
    /// LIMIT rows still to emit (`None` = no limit).
    left: Option<u64>,
    init_error: Option<MergeError>,
}

impl Stream {
    /// A stream over `shards` shards whose rows are shaped like `columns` (the shard
    /// RowDescription, helper columns included). `spec` `None` is plain concatenation.
    ///
    /// Never fails: a spec that does not fit the columns is reported by the first
    /// [`Stream::step`] or [`Stream::push`].
    pub fn new(spec: Option<&MergeSpec>, columns: Vec<Column>, shards: usize) -> Stream {
        let default = MergeSpec::default();
        let spec = spec.unwrap_or(&default);
        let visible = columns.len().checked_sub(spec.hidden_columns);
        let order = order_keys(spec, visible.unwrap_or(0));
        let init_error = super::check_spec(spec, &columns, visible, &order).err();
        let gather = !spec.aggregates.is_empty();
        let mode = if gather {
            Mode::Gather {
                merger: Some(Box::new(Merger::new(spec, columns.clone()))),
                ended: vec![false; shards],
                out: None,
            }
        } else if order.is_empty() {
            Mode::Concat {
                at: 0,
                ended: vec![false; shards],
                ready: None,
            }
        } else {
            Mode::Ordered {
                heads: (0..shards).map(|_| Head::Want).collect(),
                last: vec![None; shards],
            }
        };
        Stream {
            columns,
            visible: visible.unwrap_or(0),
            order,
            mode,
            // The merger of the gathering mode applies DISTINCT, OFFSET and LIMIT itself.
            seen: (spec.distinct && !gather).then(BTreeSet::new),
            skip: if gather { 0 } else { spec.offset },
            left: if gather { None } else { spec.limit },
            init_error,
        }
    }

    /// Columns the client sees (helper columns cut).
    pub fn visible_columns(&self) -> usize {
        self.visible
    }

    /// OFFSET rows not yet skipped.
    pub fn pending_skip(&self) -> u64 {
        self.skip
    }

    /// Whether the stream needs every row of every shard before it can emit (aggregates).
    pub fn gathers(&self) -> bool {
        matches!(self.mode, Mode::Gather { .. })
    }

    /// Whether the stream holds an unsent row of shard `i` (an ordered merge's head).
    pub fn holds(&self, i: usize) -> bool {
        match &self.mode {
            Mode::Ordered { heads, .. } => matches!(heads.get(i), Some(Head::Have(..))),
            Mode::Concat { at, ready, .. } => *at == i && ready.is_some(),
            Mode::Gather { .. } => false,
        }
    }

    /// Hands over the next DataRow message of shard `i` (asked for by [`Step::Read`]).
    pub fn push(&mut self, i: usize, data_row: Bytes) -> Result<(), MergeError> {
        if let Some(e) = &self.init_error {
            return Err(e.clone());
        }
        match &mut self.mode {
            Mode::Concat { ready, .. } => {
                *ready = Some(data_row);
                Ok(())
            }
            Mode::Gather { merger, .. } => {
                let row = row_of(&data_row, self.columns.len())?;
                match merger {
                    Some(m) => m.push(row),
                    None => Ok(()),
                }
            }
            Mode::Ordered { .. } => self.push_ordered(i, data_row),
        }
    }

    fn push_ordered(&mut self, i: usize, data_row: Bytes) -> Result<(), MergeError> {
        // Only the sort columns are decoded; the row itself stays the shard's message.
        let spans = spans(&data_row, self.columns.len())?;
        let keys = self
            .order
            .iter()
            .map(|k| {
                let cell = spans
                    .get(k.column)
                    .copied()
                    .flatten()
                    .map(|(a, b)| data_row.slice(a..b));
                decode_cell(&self.columns, k.column, &cell)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Mode::Ordered { heads, last } = &mut self.mode else {
            return Ok(());
        };
        if let Some(Some(prev)) = last.get(i) {
            if Merger::compare(&self.order, &keys, prev) == std::cmp::Ordering::Less {
                return Err(MergeError::OutOfOrder { shard: i });
            }
        }
        if let Some(l) = last.get_mut(i) {
            *l = Some(keys.clone());
        }
        if let Some(h) = heads.get_mut(i) {
            *h = Head::Have(keys, data_row);
        }
        Ok(())
    }

    /// Shard `i`'s result ended (asked for by [`Step::Read`], it had no more rows).
    pub fn end(&mut self, i: usize) {
        match &mut self.mode {
            Mode::Concat { ended, .. } | Mode::Gather { ended, .. } => {
                if let Some(e) = ended.get_mut(i) {
                    *e = true;
                }
            }
            Mode::Ordered { heads, .. } => {
                if let Some(h) = heads.get_mut(i) {
                    *h = Head::Ended;
                }
            }
        }
    }

    /// What to do next. After [`Step::Done`] every further call says `Done` again.
    pub fn step(&mut self) -> Result<Step, MergeError> {
        if let Some(e) = &self.init_error {
            return Err(e.clone());
        }
        loop {
            if self.left == Some(0) {
                return Ok(Step::Done);
            }
            let row = match self.next_candidate()? {
                Candidate::Read(i) => return Ok(Step::Read(i)),
                Candidate::Done => return Ok(Step::Done),
                Candidate::Row(r) => r,
            };
            if let Some(out) = self.admit(row)? {
                return Ok(Step::Emit(out));
            }
        }
    }

    /// The next row in merge order, before DISTINCT/OFFSET/LIMIT.
    fn next_candidate(&mut self) -> Result<Candidate, MergeError> {
        match &mut self.mode {
            Mode::Concat { at, ended, ready } => loop {
                if let Some(r) = ready.take() {
                    return Ok(Candidate::Row(r));
                }
                match ended.get(*at) {
                    None => return Ok(Candidate::Done),
                    Some(true) => *at += 1,
                    Some(false) => return Ok(Candidate::Read(*at)),
                }
            },
            Mode::Ordered { heads, .. } => {
                let mut best: Option<usize> = None;
                for (i, h) in heads.iter().enumerate() {
                    match h {
                        Head::Want => return Ok(Candidate::Read(i)),
                        Head::Ended => {}
                        Head::Have(k, _) => {
                            let better = match best.and_then(|b| heads.get(b)) {
                                Some(Head::Have(bk, _)) => {
                                    Merger::compare(&self.order, k, bk).is_lt()
                                }
                                _ => true,
                            };
                            if better {
                                best = Some(i);
                            }
                        }
                    }
                }
                let Some(b) = best else {
                    return Ok(Candidate::Done);
                };
                match std::mem::replace(&mut heads[b], Head::Want) {
                    Head::Have(_, row) => Ok(Candidate::Row(row)),
                    _ => Ok(Candidate::Done),
                }
            }
            Mode::Gather { merger, ended, out } => {
                if let Some(i) = ended.iter().position(|e| !e) {
                    return Ok(Candidate::Read(i));
                }
                if let Some(m) = merger.take() {
                    *out = Some(m.finish()?.into_iter());
                }
                Ok(match out.as_mut().and_then(Iterator::next) {
                    Some(row) => Candidate::Row(encode(&row)),
                    None => Candidate::Done,
                })
            }
        }
    }

    /// DISTINCT, OFFSET, LIMIT and the cut of helper columns for one candidate row:
    /// `None` when it is not emitted.
    fn admit(&mut self, data_row: Bytes) -> Result<Option<Bytes>, MergeError> {
        let width = self.columns.len();
        let cut = self.visible < width && !self.gathers();
        let row = if cut || self.seen.is_some() {
            Some(row_of(&data_row, width)?)
        } else {
            None
        };
        if let (Some(seen), Some(row)) = (&mut self.seen, &row) {
            let ident = (0..self.visible)
                .map(|i| decode_cell(&self.columns, i, &row[i]))
                .collect::<Result<Vec<_>, _>>()?;
            if !seen.insert(ident) {
                return Ok(None);
            }
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Ok(None);
        }
        if let Some(l) = &mut self.left {
            *l = l.saturating_sub(1);
        }
        Ok(Some(match row {
            Some(mut r) if cut => {
                r.truncate(self.visible);
                encode(&r)
            }
            _ => data_row,
        }))
    }
}

enum Candidate {
    Read(usize),
    Row(Bytes),
    Done,
}

/// The cells of a DataRow message, checked against the expected width.
fn row_of(data_row: &[u8], width: usize) -> Result<Row, MergeError> {
    let row = wire::data_row_values(data_row)
        .ok_or_else(|| MergeError::Spec("malformed DataRow from a shard".into()))?;
    if row.len() != width {
        return Err(MergeError::ColumnCount {
            expected: width,
            got: row.len(),
        });
    }
    Ok(row)
}

/// Where each cell of a DataRow message lies (`None` for NULL), checked against the
/// expected width; nothing is copied.
fn spans(data_row: &[u8], width: usize) -> Result<Vec<Option<(usize, usize)>>, MergeError> {
    let malformed = || MergeError::Spec("malformed DataRow from a shard".into());
    let n = data_row
        .get(5..7)
        .and_then(|b| <[u8; 2]>::try_from(b).ok())
        .map(i16::from_be_bytes)
        .ok_or_else(malformed)?;
    let n = usize::try_from(n).map_err(|_| malformed())?;
    if n != width {
        return Err(MergeError::ColumnCount {
            expected: width,
            got: n,
        });
    }
    let mut out = Vec::with_capacity(n);
    let mut pos = 7usize;
    for _ in 0..n {
        let len = data_row
            .get(pos..pos + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(i32::from_be_bytes)
            .ok_or_else(malformed)?;
        pos += 4;
        match usize::try_from(len) {
            Err(_) => out.push(None),
            Ok(len) => {
                let end = pos
                    .checked_add(len)
                    .filter(|&e| e <= data_row.len())
                    .ok_or_else(malformed)?;
                out.push(Some((pos, end)));
                pos = end;
            }
        }
    }
    Ok(out)
}

/// A row as a DataRow message.
fn encode(row: &Row) -> Bytes {
    let mut out = BytesMut::new();
    wire::data_row(&mut out, row.iter().map(|v| v.as_deref()));
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::super::{ColumnMerge, OrderKey};
    use super::*;
    use crate::oid::{INT8, TEXT};

    type Cells = Vec<Option<String>>;

    fn dr(cells: &[Option<&str>]) -> Bytes {
        let mut out = BytesMut::new();
        wire::data_row(&mut out, cells.iter().map(|c| c.map(str::as_bytes)));
        out.freeze()
    }

    fn text_of(data_row: &Bytes) -> Vec<Option<String>> {
        wire::data_row_values(data_row)
            .expect("row")
            .into_iter()
            .map(|c| c.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .collect()
    }

    fn cols(oids: &[u32]) -> Vec<Column> {
        oids.iter()
            .map(|&type_oid| Column {
                type_oid,
                format: 0,
            })
            .collect()
    }

    /// Drives `s` over `shards` (rows per shard, read lazily); returns the emitted rows'
    /// cells and how many rows were read in all.
    fn drive(s: &mut Stream, shards: &[Vec<Bytes>]) -> Result<(Vec<Cells>, usize), MergeError> {
        let mut pos = vec![0; shards.len()];
        let mut out = Vec::new();
        let mut read = 0;
        loop {
            match s.step()? {
                Step::Read(i) => match shards[i].get(pos[i]) {
                    Some(r) => {
                        pos[i] += 1;
                        read += 1;
                        s.push(i, r.clone())?;
                    }
                    None => s.end(i),
                },
                Step::Emit(r) => out.push(text_of(&r)),
                Step::Done => return Ok((out, read)),
            }
        }
    }

    fn ints(rows: &[i64]) -> Vec<Bytes> {
        rows.iter().map(|v| dr(&[Some(&v.to_string())])).collect()
    }

    fn firsts(rows: &[Vec<Option<String>>]) -> Vec<i64> {
        rows.iter()
            .map(|r| r[0].as_deref().and_then(|v| v.parse().ok()).unwrap_or(-1))
            .collect()
    }

    #[test]
    fn concatenation_passes_rows_through_shard_by_shard() {
        let shards = [ints(&[1, 2]), ints(&[]), ints(&[3])];
        let mut s = Stream::new(None, cols(&[INT8]), 3);
        let (rows, read) = drive(&mut s, &shards).expect("merge");
        assert_eq!(firsts(&rows), vec![1, 2, 3]);
        assert_eq!(read, 3);
    }

    #[test]
    fn limit_stops_reading_early() {
        let spec = MergeSpec {
            limit: Some(2),
            offset: 1,
            ..MergeSpec::default()
        };
        let shards = [ints(&[1, 2, 3, 4]), ints(&[5, 6])];
        let mut s = Stream::new(Some(&spec), cols(&[INT8]), 2);
        let (rows, read) = drive(&mut s, &shards).expect("merge");
        assert_eq!(firsts(&rows), vec![2, 3]);
        assert_eq!(read, 3, "nothing is read past the limit");
    }

    #[test]
    fn ordered_merge_holds_one_row_per_shard() {
        let spec = MergeSpec {
            order_by: vec![OrderKey {
                column: 0,
                descending: false,
                nulls_first: false,
            }],
            limit: Some(5),
            ..MergeSpec::default()
        };
        let shards = [ints(&[1, 4, 9, 10]), ints(&[2, 3, 11]), ints(&[5, 6, 7, 8])];
        let mut s = Stream::new(Some(&spec), cols(&[INT8]), 3);
        let (rows, read) = drive(&mut s, &shards).expect("merge");
        assert_eq!(firsts(&rows), vec![1, 2, 3, 4, 5]);
        assert!(read <= 5 + 3, "read {read}");
    }

    #[test]
    fn ordered_merge_desc_with_nulls_and_hidden_key() {
        // Visible column 0 (text), hidden sort key column 1 (int8) DESC NULLS FIRST.
        let spec = MergeSpec {
            order_by: vec![OrderKey {
                column: 1,
                descending: true,
                nulls_first: true,
            }],
            hidden_columns: 1,
            ..MergeSpec::default()
        };
        let a = vec![dr(&[Some("a"), None]), dr(&[Some("b"), Some("3")])];
        let b = vec![dr(&[Some("c"), Some("10")]), dr(&[Some("d"), Some("1")])];
        let mut s = Stream::new(Some(&spec), cols(&[TEXT, INT8]), 2);
        let (rows, _) = drive(&mut s, &[a, b]).expect("merge");
        assert_eq!(
            rows,
            vec![
                vec![Some("a".to_string())],
                vec![Some("c".to_string())],
                vec![Some("b".to_string())],
                vec![Some("d".to_string())],
            ]
        );
    }

    #[test]
    fn a_shard_out_of_order_is_an_error() {
        let spec = MergeSpec {
            order_by: vec![OrderKey {
                column: 0,
                descending: false,
                nulls_first: false,
            }],
            ..MergeSpec::default()
        };
        let mut s = Stream::new(Some(&spec), cols(&[INT8]), 2);
        let err = drive(&mut s, &[ints(&[1, 3, 2]), ints(&[5])]).expect_err("misordered");
        assert_eq!(err, MergeError::OutOfOrder { shard: 0 });
    }

    #[test]
    fn distinct_across_shards_then_offset() {
        let spec = MergeSpec {
            distinct: true,
            offset: 1,
            ..MergeSpec::default()
        };
        let mut s = Stream::new(Some(&spec), cols(&[INT8]), 2);
        let (rows, _) = drive(&mut s, &[ints(&[1, 2]), ints(&[2, 3, 1])]).expect("merge");
        assert_eq!(firsts(&rows), vec![2, 3]);
    }

    #[test]
    fn aggregates_gather_groups_then_emit() {
        let spec = MergeSpec {
            aggregates: vec![ColumnMerge::Key, ColumnMerge::Count],
            group_by: vec![0],
            order_by: vec![OrderKey {
                column: 0,
                descending: false,
                nulls_first: false,
            }],
            ..MergeSpec::default()
        };
        let a = vec![dr(&[Some("x"), Some("2")]), dr(&[Some("y"), Some("1")])];
        let b = vec![dr(&[Some("x"), Some("5")])];
        let mut s = Stream::new(Some(&spec), cols(&[TEXT, INT8]), 2);
        assert!(s.gathers());
        let (rows, read) = drive(&mut s, &[a, b]).expect("merge");
        assert_eq!(read, 3);
        assert_eq!(
            rows,
            vec![
                vec![Some("x".to_string()), Some("7".to_string())],
                vec![Some("y".to_string()), Some("1".to_string())],
            ]
        );
    }

    #[test]
    fn spans_find_cells_and_refuse_truncation() {
        let row = dr(&[Some("ab"), None, Some("")]);
        let found = spans(&row, 3).expect("spans");
        assert_eq!(
            &row[found[0].expect("cell").0..found[0].expect("cell").1],
            b"ab"
        );
        assert_eq!(found[1], None);
        assert_eq!(found[2].map(|(a, b)| b - a), Some(0));
        assert!(matches!(
            spans(&row, 2),
            Err(MergeError::ColumnCount { .. })
        ));
        for cut in 0..row.len() {
            assert!(spans(&row[..cut], 3).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn malformed_rows_and_bad_specs_are_errors() {
        let mut s = Stream::new(None, cols(&[INT8, INT8]), 1);
        let short = ints(&[1]);
        // Concatenation forwards raw rows unchecked only when nothing must be cut.
        assert!(drive(&mut s, std::slice::from_ref(&short)).is_ok());
        let spec = MergeSpec {
            hidden_columns: 1,
            ..MergeSpec::default()
        };
        let mut s = Stream::new(Some(&spec), cols(&[INT8, INT8]), 1);
        assert!(matches!(
            drive(&mut s, &[short]),
            Err(MergeError::ColumnCount { .. })
        ));
        let bad = MergeSpec {
            hidden_columns: 3,
            ..MergeSpec::default()
        };
        let mut s = Stream::new(Some(&bad), cols(&[INT8]), 1);
        assert!(matches!(s.step(), Err(MergeError::Spec(_))));
    }
}
