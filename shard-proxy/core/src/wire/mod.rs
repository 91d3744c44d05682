//! Messages the proxy itself writes to clients, and framing of raw backend messages.
//!
//! Why: most responses are relayed byte for byte from a shard, but the proxy also speaks
//! for itself (authentication, synthesized `BEGIN`, merged scatter results, errors naming a
//! shard). Those encoders, and the cheap tag+length framing used on the relay hot path,
//! live here so every other module writes the same bytes.

pub mod frontend;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;

/// SQLSTATE codes the proxy raises itself.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const UNDEFINED_PREPARED_STATEMENT: &str = "26000";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    pub const UNDEFINED_CURSOR: &str = "34000";
    pub const IN_FAILED_TRANSACTION: &str = "25P02";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const QUERY_CANCELED: &str = "57014";
    pub const TRANSACTION_ROLLBACK: &str = "40000";
    /// Retryable: the statement raced a change (an online migration moved its key).
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    pub const PROGRAM_LIMIT: &str = "54000";
    pub const NO_ACTIVE_TRANSACTION: &str = "25P01";
    pub const ACTIVE_TRANSACTION: &str = "25001";
}

/// One backend message, undecoded: its tag and its full bytes (tag and length included).
#[derive(Debug, Clone)]
pub struct RawMsg {
    pub tag: u8,
    pub data: Bytes,
}

/// The (code, value) fields of an ErrorResponse/NoticeResponse body.
fn error_fields(body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        out.push((code, tail[..end].to_vec()));
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    out
}

impl RawMsg {
    /// A backend's FATAL or PANIC ErrorResponse rewritten as ERROR (the same fields
    /// otherwise); anything else unchanged.
    ///
    /// Why: a backend's FATAL ends *that server connection*, not the client's connection to
    /// the proxy. Relayed as FATAL it would tell the client its own session is over (a
    /// shard restarted, `pg_terminate_backend`), while the proxy keeps serving it.
    pub fn fatal_as_error(self) -> RawMsg {
        if self.tag != b'E' {
            return self;
        }
        let fields = error_fields(self.body());
        let fatal = fields
            .iter()
            .any(|(k, v)| matches!(k, b'S' | b'V') && matches!(v.as_slice(), b"FATAL" | b"PANIC"));
        if !fatal {
            return self;
        }
        let mut body = Vec::with_capacity(self.data.len());
        for (k, v) in &fields {
            body.push(*k);
            if matches!(k, b'S' | b'V') && matches!(v.as_slice(), b"FATAL" | b"PANIC") {
                body.extend_from_slice(b"ERROR");
            } else {
                body.extend_from_slice(v);
            }
            body.push(0);
        }
        body.push(0);
        let mut data = Vec::with_capacity(body.len() + 5);
        data.push(b'E');
        data.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        data.extend_from_slice(&body);
        RawMsg {
            tag: b'E',
            data: Bytes::from(data),
        }
    }

    /// The body after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        self.data.get(5..).unwrap_or_default()
    }

    /// Decodes with `postgres-protocol` (copies; use off the hot path).
    pub fn parse(&self) -> std::io::Result<Message> {
        let mut b = BytesMut::from(&self.data[..]);
        Message::parse(&mut b)?.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "incomplete message")
        })
    }
}

/// Largest backend message accepted (guards against a misbehaving server).
pub const MAX_BACKEND_MESSAGE: usize = 1 << 30;

/// Bytes at the front of `buf` that are complete backend messages a relay forwards
/// unchanged and without looking at them: every tag but ReadyForQuery (`Z`, which ends the
/// statement), ErrorResponse (`E`, which may need rewriting: [`RawMsg::fatal_as_error`]) and
/// CopyInResponse (`G`, which hands the client's input over). Stops at the first such
/// message or at an incomplete one.
///
/// Why: a statement's answer usually arrives in one read (RowDescription, DataRows,
/// CommandComplete, ReadyForQuery); splitting each message off into its own buffer only to
/// copy it on costs more than the forwarding itself. One run is one copy.
pub fn relayable_prefix(buf: &[u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while let Some(header) = buf.get(at..at + 5) {
        if matches!(header[0], b'Z' | b'E' | b'G') {
            break;
        }
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if len < 4 || len as usize > MAX_BACKEND_MESSAGE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("invalid backend message length {len}"),
            ));
        }
        let end = at + 1 + len as usize;
        if end > buf.len() {
            break;
        }
        at = end;
    }
    Ok(at)
}

/// Splits one backend message off `buf`. `Ok(None)`: more bytes needed.
pub fn split_backend(buf: &mut BytesMut) -> std::io::Result<Option<RawMsg>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_BACKEND_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("invalid backend message length {len}"),
        ));
    }
    let total = len as usize + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    Ok(Some(RawMsg {
        tag,
        data: buf.split_to(total).freeze(),
    }))
}

/// The fields of an ErrorResponse that the proxy looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorInfo {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.severity, self.message, self.code)
    }
}

/// Reads severity, SQLSTATE and message from an ErrorResponse/NoticeResponse body.
pub fn error_info(body: &[u8]) -> ErrorInfo {
    let mut info = ErrorInfo::default();
    for (k, v) in error_fields(body) {
        let v = String::from_utf8_lossy(&v).into_owned();
        match k {
            b'S' => info.severity = v,
            b'C' => info.code = v,
            b'M' => info.message = v,
            _ => {}
        }
    }
    info
}

fn frame(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let start = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - start) as i32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the string early on the client; drop it.
    buf.extend(s.bytes().filter(|&b| b != 0));
    buf.put_u8(0);
}

/// ErrorResponse with severity ERROR (or FATAL).
pub fn error(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    frame(buf, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity);
        b.put_u8(b'V');
        put_cstr(b, severity);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// NoticeResponse (severity WARNING or NOTICE).
pub fn notice(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    frame(buf, b'N', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity);
        b.put_u8(b'V');
        put_cstr(b, severity);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    buf.extend_from_slice(&[b'Z', 0, 0, 0, 5, status]);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    frame(buf, b'C', |b| put_cstr(b, tag));
}

pub fn empty_query(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'I', 0, 0, 0, 4]);
}

pub fn parse_complete(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'1', 0, 0, 0, 4]);
}

pub fn bind_complete(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'2', 0, 0, 0, 4]);
}

pub fn close_complete(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'3', 0, 0, 0, 4]);
}

pub fn no_data(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'n', 0, 0, 0, 4]);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    frame(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    frame(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn auth_ok(buf: &mut BytesMut) {
    frame(buf, b'R', |b| b.put_i32(0));
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    frame(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    frame(buf, b'R', |b| {
        b.put_i32(11);
        b.extend_from_slice(data);
    });
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    frame(buf, b'R', |b| {
        b.put_i32(12);
        b.extend_from_slice(data);
    });
}

/// A column of a synthesized RowDescription.
#[derive(Debug, Clone)]
pub struct ColumnDesc {
    pub name: String,
    pub type_oid: u32,
    pub type_size: i16,
    pub format: i16,
}

impl ColumnDesc {
    /// A text column (`text`, OID 25).
    pub fn text(name: &str) -> Self {
        ColumnDesc {
            name: name.into(),
            type_oid: crate::oid::TEXT,
            type_size: -1,
            format: 0,
        }
    }

    /// A bigint column (`int8`, OID 20) sent in text format.
    pub fn int8(name: &str) -> Self {
        ColumnDesc {
            name: name.into(),
            type_oid: crate::oid::INT8,
            type_size: 8,
            format: 0,
        }
    }
}

pub fn row_description(buf: &mut BytesMut, cols: &[ColumnDesc]) {
    frame(buf, b'T', |b| {
        b.put_i16(cols.len() as i16);
        for c in cols {
            put_cstr(b, &c.name);
            b.put_u32(0);
            b.put_i16(0);
            b.put_u32(c.type_oid);
            b.put_i16(c.type_size);
            b.put_i32(-1);
            b.put_i16(c.format);
        }
    });
}

/// Re-emits a backend RowDescription keeping only its first `keep` fields.
pub fn truncate_row_description(data: &[u8], keep: usize) -> Option<BytesMut> {
    let body = data.get(5..)?;
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let keep = keep.min(n);
    let mut pos = 2;
    for _ in 0..keep {
        let end = body.get(pos..)?.iter().position(|&c| c == 0)?;
        pos += end + 1 + 18;
    }
    let fields = body.get(2..pos)?;
    let mut out = BytesMut::with_capacity(pos + 5);
    frame(&mut out, b'T', |b| {
        b.put_i16(keep as i16);
        b.extend_from_slice(fields);
    });
    Some(out)
}

pub fn data_row<'a>(buf: &mut BytesMut, values: impl ExactSizeIterator<Item = Option<&'a [u8]>>) {
    frame(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.extend_from_slice(v);
                }
            }
        }
    });
}

/// Splits a DataRow body into its values.
pub fn data_row_values(data: &[u8]) -> Option<Vec<Option<Bytes>>> {
    let body = data.get(5..)?;
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    if n < 0 {
        return None;
    }
    let mut pos = 2usize;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let l = i32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        if l < 0 {
            out.push(None);
        } else {
            let v = body.get(pos..pos + l as usize)?;
            out.push(Some(Bytes::copy_from_slice(v)));
            pos += l as usize;
        }
    }
    Some(out)
}

/// Reads the `(type_oid, format)` of each field of a RowDescription.
pub fn row_description_columns(data: &[u8]) -> Option<Vec<(u32, i16)>> {
    let body = data.get(5..)?;
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut pos = 2usize;
    let mut out = Vec::new();
    for _ in 0..n.max(0) {
        let end = body.get(pos..)?.iter().position(|&c| c == 0)?;
        pos += end + 1;
        let f = body.get(pos..pos + 18)?;
        let oid = u32::from_be_bytes([f[6], f[7], f[8], f[9]]);
        let format = i16::from_be_bytes([f[16], f[17]]);
        out.push((oid, format));
        pos += 18;
    }
    Some(out)
}

/// Reads the tag of a CommandComplete message.
pub fn command_tag(data: &[u8]) -> String {
    let body = data.get(5..).unwrap_or_default();
    let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

/// Adds the row counts of CommandComplete tags of one kind (`UPDATE 3` + `UPDATE 4`
/// → `UPDATE 7`, `INSERT 0 1` + `INSERT 0 2` → `INSERT 0 3`).
pub fn sum_tags(tags: &[String]) -> Option<String> {
    let first = tags.first()?;
    let mut words: Vec<&str> = first.split(' ').collect();
    let total: u64 = tags
        .iter()
        .map(|t| {
            t.rsplit(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    if words.len() >= 2 && words.last().is_some_and(|w| w.parse::<u64>().is_ok()) {
        let total = total.to_string();
        if let Some(last) = words.last_mut() {
            *last = &total;
        }
        return Some(words.join(" "));
    }
    Some(first.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_fatal_reaches_the_client_as_error() {
        let mut fatal = BytesMut::new();
        error(
            &mut fatal,
            "FATAL",
            "57P01",
            "terminating connection due to administrator command",
        );
        let m = RawMsg {
            tag: b'E',
            data: fatal.freeze(),
        }
        .fatal_as_error();
        let fields = error_fields(m.body());
        assert!(fields.contains(&(b'S', b"ERROR".to_vec())), "{fields:?}");
        assert!(fields.contains(&(b'C', b"57P01".to_vec())));
        assert!(fields
            .iter()
            .any(|(k, v)| *k == b'M' && v.starts_with(b"terminating")));
        let len = u32::from_be_bytes(m.data[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, m.data.len(), "length header matches");
        let mut plain = BytesMut::new();
        error(&mut plain, "ERROR", "42P01", "no such table");
        let before = plain.clone().freeze();
        let m = RawMsg {
            tag: b'E',
            data: before.clone(),
        }
        .fatal_as_error();
        assert_eq!(m.data, before, "an ERROR is untouched");
    }

    #[test]
    fn relayable_prefix_stops_where_the_relay_must_look() {
        let mut b = BytesMut::new();
        row_description(&mut b, &[ColumnDesc::int8("a")]);
        data_row(&mut b, [Some(&b"1"[..])].into_iter());
        let before_tag = b.len();
        command_complete(&mut b, "SELECT 1");
        let plain = b.len();
        ready_for_query(&mut b, b'I');
        assert_eq!(
            relayable_prefix(&b).expect("valid"),
            plain,
            "up to ReadyForQuery"
        );
        assert_eq!(relayable_prefix(&b[plain..]).expect("valid"), 0);
        let mut e = BytesMut::new();
        data_row(&mut e, [None].into_iter());
        let row = e.len();
        error(&mut e, "FATAL", "57P01", "terminating");
        assert_eq!(
            relayable_prefix(&e).expect("valid"),
            row,
            "stops at an error"
        );
        let mut g = BytesMut::new();
        g.extend_from_slice(&[b'G', 0, 0, 0, 7, 0, 0, 0]);
        assert_eq!(
            relayable_prefix(&g).expect("valid"),
            0,
            "stops at COPY FROM STDIN"
        );
        // An incomplete message stays for the next read; so does a lone partial header.
        assert_eq!(
            relayable_prefix(&b[..plain - 1]).expect("valid"),
            before_tag
        );
        assert_eq!(relayable_prefix(&b[..3]).expect("valid"), 0);
        let bad = [b'D', 0, 0, 0, 2];
        assert!(
            relayable_prefix(&bad).is_err(),
            "a length below 4 is refused"
        );
    }

    #[test]
    fn sums_tags() {
        let t = |v: &[&str]| sum_tags(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(t(&["UPDATE 3", "UPDATE 4"]).as_deref(), Some("UPDATE 7"));
        assert_eq!(
            t(&["INSERT 0 1", "INSERT 0 2"]).as_deref(),
            Some("INSERT 0 3")
        );
        assert_eq!(t(&["SELECT 1", "SELECT 0"]).as_deref(), Some("SELECT 1"));
    }

    #[test]
    fn row_description_round_trip() {
        let mut b = BytesMut::new();
        row_description(&mut b, &[ColumnDesc::int8("a"), ColumnDesc::text("b")]);
        assert_eq!(row_description_columns(&b), Some(vec![(20, 0), (25, 0)]));
        let t = truncate_row_description(&b, 1).expect("valid");
        assert_eq!(row_description_columns(&t), Some(vec![(20, 0)]));
        let mut d = BytesMut::new();
        data_row(&mut d, [Some(&b"1"[..]), None].into_iter());
        assert_eq!(
            data_row_values(&d),
            Some(vec![Some(Bytes::from_static(b"1")), None])
        );
        let mut e = BytesMut::new();
        error(&mut e, "ERROR", "08006", "shard x down");
        let info = error_info(&e[5..]);
        assert_eq!(info.code, "08006");
        assert_eq!(info.message, "shard x down");
    }
}
