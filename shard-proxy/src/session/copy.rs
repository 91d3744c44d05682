//! `COPY … FROM STDIN` into a sharded table: rows are split by their shard key and
//! streamed to each owning shard inside one transaction (two-phase commit when more than
//! one shard received rows).
//!
//! Why in the proxy: a COPY has no WHERE clause or VALUES the router could read; the key is
//! in the data. So the proxy answers CopyInResponse itself, reads the client's CopyData,
//! cuts it into lines (text format, or CSV without newlines inside quoted fields), finds the
//! key column, and opens a COPY on each shard the first time one of its rows appears.

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;

use super::{ExecError, Session, Txn, Work};
use crate::frontend::io::ClientError;
use proxy_core::sqltext::{copy_field, parse_copy_from, quote_literal, CopyFrom};
use proxy_core::wire::frontend::FrontendMessage;
use proxy_core::wire::{self, sqlstate};

/// Bytes buffered per shard before a CopyData is sent.
const CHUNK: usize = 64 * 1024;

/// Where the reader is in the client's lines.
struct Lines {
    /// The CSV header line, repeated to every shard's COPY.
    header: Option<Vec<u8>>,
    /// The next line is the header.
    header_next: bool,
    line_no: u64,
    /// `\\.` was seen (text format): the rest is ignored.
    ended: bool,
}

impl Lines {
    /// Consumes one line; true when it is a data row (not the header or end marker).
    fn is_row(&mut self, body: &[u8], csv: bool) -> bool {
        if self.ended {
            return false;
        }
        if !csv && body == b"\\." {
            self.ended = true;
            return false;
        }
        self.line_no += 1;
        if self.header_next {
            self.header_next = false;
            self.header = Some(body.to_vec());
            return false;
        }
        true
    }
}

/// CopyInResponse: text format, every column text.
fn copy_in_response(columns: usize) -> BytesMut {
    let mut resp = BytesMut::new();
    resp.put_u8(b'G');
    resp.put_i32(4 + 1 + 2 + 2 * columns as i32);
    resp.put_u8(0);
    resp.put_i16(columns as i16);
    for _ in 0..columns {
        resp.put_i16(0);
    }
    resp
}

struct ShardCopy {
    work: Work,
    buf: BytesMut,
}

impl Session {
    /// Runs a sharded `COPY FROM STDIN` (simple protocol).
    pub async fn copy_split(&mut self, sql: &str) -> Result<(), ExecError> {
        let spec = parse_copy_from(sql).ok_or_else(|| {
            ExecError::sql(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "sharded COPY supports FROM STDIN in text or CSV format; add /* shard=<name> */ for others",
            )
        })?;
        let key_column = self.topo.router.rules().key_column.to_ascii_lowercase();
        let columns = match &spec.columns {
            Some(c) => c.clone(),
            None => self.table_columns(&spec.table).await?,
        };
        let key_index = columns
            .iter()
            .position(|c| *c == key_column)
            .ok_or_else(|| {
                ExecError::sql(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "COPY into {} must include the shard key column {key_column}",
                        spec.table
                    ),
                )
            })?;
        let implicit = self.txn.is_none();
        if implicit {
            self.txn = Some(Txn::implicit(self.topo.clone()));
        }
        self.client
            .out
            .extend_from_slice(&copy_in_response(columns.len()));
        self.client
            .flush()
            .await
            .map_err(|e| ExecError::Client(ClientError::Io(e)))?;

        let mut copies: BTreeMap<usize, ShardCopy> = BTreeMap::new();
        let result = self.copy_rows(sql, &spec, key_index, &mut copies).await;
        let result = match result {
            Ok(()) => self.finish_copies(&mut copies).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(total) => {
                for (_, c) in std::mem::take(&mut copies) {
                    self.put_back(c.work, true);
                }
                if implicit {
                    if let Some(t) = self.txn.take() {
                        self.finish_commit(t).await?;
                    }
                }
                wire::command_complete(&mut self.client.out, &format!("COPY {total}"));
                Ok(())
            }
            Err(e) => {
                self.abort_copies(std::mem::take(&mut copies)).await;
                self.fail_txn(implicit).await;
                Err(e)
            }
        }
    }

    /// Column names of `table` in order, asked of a shard.
    async fn table_columns(&mut self, table: &str) -> Result<Vec<String>, ExecError> {
        let shard = self.default_shard();
        let pool = self
            .pool(shard)
            .ok_or_else(|| ExecError::sql(sqlstate::INTERNAL_ERROR, "no shard"))?;
        let mut conn = pool.get().await?;
        let q = format!(
            "SELECT attname FROM pg_attribute WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            quote_literal(table)
        );
        let r = conn.conn().simple_query(&q).await;
        let status_ok = conn.conn().status == b'I';
        match r {
            Ok(r) => {
                if status_ok {
                    conn.release();
                }
                Ok(r.rows
                    .into_iter()
                    .filter_map(|mut row| row.pop().flatten())
                    .collect())
            }
            Err(crate::backend::BackendError::Server(info)) => {
                if status_ok {
                    conn.release();
                }
                Err(ExecError::sql(sqlstate::SYNTAX_ERROR, info.message))
            }
            Err(e) => Err(ExecError::Unavailable {
                shard: pool.name.clone(),
                message: e.to_string(),
            }),
        }
    }

    async fn open_copy(
        &mut self,
        shard: usize,
        sql: &str,
        header: Option<&[u8]>,
    ) -> Result<ShardCopy, ExecError> {
        let mut work = self.acquire(shard).await?;
        let name = self.shard_name(shard);
        let unavailable = |e: crate::backend::BackendError| ExecError::Unavailable {
            shard: name.clone(),
            message: e.to_string(),
        };
        let c = work.conn.conn();
        frontend::query(sql, &mut c.wbuf)
            .map_err(|e| ExecError::sql(sqlstate::PROGRAM_LIMIT, e.to_string()))?;
        c.flush().await.map_err(unavailable)?;
        Self::drain_skips(&mut work).await.map_err(unavailable)?;
        loop {
            let m = work.conn.conn().read_msg().await.map_err(unavailable)?;
            match m.tag {
                b'G' => break,
                b'E' => {
                    let info = wire::error_info(m.body());
                    // Wait for ReadyForQuery so the backend is reusable.
                    let _ = work.conn.conn().collect_until_ready().await;
                    self.put_back(work, false);
                    return Err(ExecError::sql(
                        sqlstate::INTERNAL_ERROR,
                        format!("shard {name}: {}", info.message),
                    ));
                }
                _ => {}
            }
        }
        let mut buf = BytesMut::new();
        if let Some(h) = header {
            buf.extend_from_slice(h);
            buf.put_u8(b'\n');
        }
        Ok(ShardCopy { work, buf })
    }

    /// Ends every shard's COPY with CopyFail; clean backends go back to their pools.
    async fn abort_copies(&mut self, copies: BTreeMap<usize, ShardCopy>) {
        for (_, mut c) in copies {
            let conn = c.work.conn.conn();
            let ok = frontend::copy_fail("COPY aborted by the shard proxy", &mut conn.wbuf).is_ok()
                && conn.flush().await.is_ok()
                && matches!(
                    conn.collect_until_ready().await,
                    Ok(_) | Err(crate::backend::BackendError::Server(_))
                );
            if ok {
                self.put_back(c.work, true);
            } else {
                self.discard(c.work);
            }
        }
    }

    async fn copy_rows(
        &mut self,
        sql: &str,
        spec: &CopyFrom,
        key_index: usize,
        copies: &mut BTreeMap<usize, ShardCopy>,
    ) -> Result<(), ExecError> {
        let mut pending = BytesMut::new();
        let mut lines = Lines {
            header: None,
            header_next: spec.header,
            line_no: 0,
            ended: false,
        };
        loop {
            let done = self.next_copy_data(&mut pending).await?;
            if done && !pending.is_empty() && !pending.ends_with(b"\n") {
                pending.put_u8(b'\n');
            }
            while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line = pending.split_to(pos + 1);
                let body = line.strip_suffix(b"\n").unwrap_or(&line);
                let body = body.strip_suffix(b"\r").unwrap_or(body);
                if !lines.is_row(body, spec.csv) {
                    continue;
                }
                let key = match copy_field(body, key_index, spec.csv, spec.delimiter) {
                    Some(Some(v)) => v.trim().parse::<i64>().ok(),
                    _ => None,
                };
                let Some(key) = key else {
                    return Err(ExecError::sql(
                        "22P02",
                        format!(
                            "COPY line {}: the shard key column must hold a bigint",
                            lines.line_no
                        ),
                    ));
                };
                self.copy_row(sql, lines.header.as_deref(), key, body, copies)
                    .await?;
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Appends the client's next CopyData to `pending`; true at CopyDone.
    async fn next_copy_data(&mut self, pending: &mut BytesMut) -> Result<bool, ExecError> {
        let frame = match self.client.read_frame().await? {
            Some(f) => f,
            None => return Err(ExecError::Client(ClientError::Truncated)),
        };
        match frame.msg {
            FrontendMessage::CopyData(d) => {
                pending.extend_from_slice(&d);
                Ok(false)
            }
            FrontendMessage::CopyDone => Ok(true),
            FrontendMessage::CopyFail(msg) => Err(ExecError::sql(
                sqlstate::QUERY_CANCELED,
                format!("COPY from stdin failed: {msg}"),
            )),
            FrontendMessage::Flush | FrontendMessage::Sync => Ok(false),
            _ => Err(ExecError::sql(
                sqlstate::PROTOCOL_VIOLATION,
                "unexpected message type during COPY from stdin",
            )),
        }
    }

    /// Sends one row to the shard that owns `key`, opening that shard's COPY on its first
    /// row and flushing its buffer every [`CHUNK`] bytes.
    async fn copy_row(
        &mut self,
        sql: &str,
        header: Option<&[u8]>,
        key: i64,
        body: &[u8],
        copies: &mut BTreeMap<usize, ShardCopy>,
    ) -> Result<(), ExecError> {
        let topo = self
            .txn
            .as_ref()
            .map(|t| t.topo.clone())
            .unwrap_or_else(|| self.topo.clone());
        let at = proxy_core::placement::Locate::locate(&topo.placement, key);
        if at.arc.is_some() {
            // A moving key would need the migration guard, which a COPY stream cannot
            // take per row; INSERT can.
            return Err(ExecError::sql(
                sqlstate::SERIALIZATION_FAILURE,
                format!(
                    "COPY row with {} {key}: an online migration is moving this key between shards; \
                     retry after it (SHOW MIGRATIONS) or send the row as an INSERT",
                    "performer_id"
                ),
            ));
        }
        let shard = at.shard;
        let c = match copies.entry(shard) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(self.open_copy(shard, sql, header).await?)
            }
        };
        c.buf.extend_from_slice(body);
        c.buf.put_u8(b'\n');
        if c.buf.len() >= CHUNK {
            let name = topo
                .shards
                .get(shard)
                .map(|p| p.name.clone())
                .unwrap_or_default();
            send_chunk(&name, c).await?;
        }
        Ok(())
    }

    /// Sends the rest and CopyDone to every shard; returns the total row count.
    async fn finish_copies(
        &mut self,
        copies: &mut BTreeMap<usize, ShardCopy>,
    ) -> Result<u64, ExecError> {
        let mut total = 0u64;
        for c in copies.values_mut() {
            let name = self.shard_name(c.work.shard);
            send_chunk(&name, c).await?;
            let conn = c.work.conn.conn();
            frontend::copy_done(&mut conn.wbuf);
            conn.flush().await.map_err(|e| ExecError::Unavailable {
                shard: name.clone(),
                message: e.to_string(),
            })?;
        }
        let mut failure = None;
        for c in copies.values_mut() {
            let name = self.shard_name(c.work.shard);
            match c.work.conn.conn().collect_until_ready().await {
                Ok(r) => {
                    total += r
                        .tags
                        .last()
                        .and_then(|t| t.strip_prefix("COPY "))
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0)
                }
                Err(crate::backend::BackendError::Server(info)) => {
                    failure.get_or_insert(ExecError::sql(
                        sqlstate::INTERNAL_ERROR,
                        format!("shard {name}: {}", info.message),
                    ));
                }
                Err(e) => {
                    failure.get_or_insert(ExecError::Unavailable {
                        shard: name,
                        message: e.to_string(),
                    });
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }
}

async fn send_chunk(name: &str, c: &mut ShardCopy) -> Result<(), ExecError> {
    if c.buf.is_empty() {
        return Ok(());
    }
    let conn = c.work.conn.conn();
    conn.wbuf.put_u8(b'd');
    conn.wbuf.put_i32(4 + c.buf.len() as i32);
    conn.wbuf.extend_from_slice(&c.buf);
    c.buf.clear();
    conn.flush().await.map_err(|e| ExecError::Unavailable {
        shard: name.to_owned(),
        message: e.to_string(),
    })
}
