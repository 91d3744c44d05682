//! Server-to-server COPY: the rows one query selects on one backend streamed into a table
//! on another, in PostgreSQL's binary COPY format, without decoding them.
//!
//! Why: online resharding moves rows between shards that share one schema. Binary COPY is
//! the cheapest path PostgreSQL offers for that — no text or JSON rendering and parsing on
//! either side — and the proxy only forwards CopyData frames as they arrive (at most
//! [`FLUSH_BYTES`] buffered, whatever the row count).

use postgres_protocol::message::frontend;

use super::{BackendConn, BackendError};
use proxy_core::wire;

/// Flush to the destination once this much CopyData is queued.
const FLUSH_BYTES: usize = 256 * 1024;

/// Runs `copy_in` (`COPY t (cols) FROM STDIN (FORMAT binary)`) on `dst`, then `copy_out`
/// (`COPY (SELECT cols …) TO STDOUT (FORMAT binary)`) on `src`, forwarding every CopyData
/// frame; returns the rows copied (the source's `COPY n`).
///
/// Both connections are back at ReadyForQuery when it returns, also on a server error (a
/// failed source aborts the destination's COPY with CopyFail); on an I/O error they are
/// not, and the caller must discard them. Inside a transaction block an error aborts it,
/// as any failed statement does.
pub async fn copy_between(
    src: &mut BackendConn,
    copy_out: &str,
    dst: &mut BackendConn,
    copy_in: &str,
) -> Result<u64, BackendError> {
    frontend::query(copy_in, &mut dst.wbuf)?;
    dst.flush().await?;
    loop {
        let m = dst.read_msg().await?;
        match m.tag {
            b'G' => break,
            b'E' => {
                // The COPY was refused: the error, once the server is ready again.
                let err = wire::error_info(m.body());
                dst.collect_until_ready().await?;
                return Err(BackendError::Server(err));
            }
            b'Z' => {
                return Err(BackendError::Protocol(
                    "COPY FROM STDIN did not start".into(),
                ))
            }
            _ => {}
        }
    }
    frontend::query(copy_out, &mut src.wbuf)?;
    src.flush().await?;
    let (rows, src_error) = forward(src, dst).await?;
    match &src_error {
        None => frontend::copy_done(&mut dst.wbuf),
        Some(e) => frontend::copy_fail(&format!("source failed: {}", e.message), &mut dst.wbuf)?,
    }
    dst.flush().await?;
    let dst_result = dst.collect_until_ready().await;
    if let Some(e) = src_error {
        return Err(BackendError::Server(e));
    }
    dst_result?;
    Ok(rows)
}

/// Forwards the source's CopyData frames to `dst` until the source's ReadyForQuery;
/// returns its row count and its error, if any.
async fn forward(
    src: &mut BackendConn,
    dst: &mut BackendConn,
) -> Result<(u64, Option<wire::ErrorInfo>), BackendError> {
    let mut rows = 0;
    let mut err = None;
    loop {
        let m = src.read_msg().await?;
        match m.tag {
            b'd' if err.is_none() => {
                dst.wbuf.extend_from_slice(&m.data);
                if dst.wbuf.len() >= FLUSH_BYTES {
                    dst.flush().await?;
                }
            }
            b'C' => {
                rows = wire::command_tag(&m.data)
                    .strip_prefix("COPY ")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            }
            b'E' => {
                err.get_or_insert_with(|| wire::error_info(m.body()));
            }
            b'Z' => {
                src.status = m.body().first().copied().unwrap_or(b'I');
                return Ok((rows, err));
            }
            _ => {}
        }
    }
}
