//! Decoder for messages a PostgreSQL *client* sends (protocol v3), the one codec
//! `postgres-protocol` does not provide.
//!
//! Why hand-written and small: the proxy must read untrusted bytes from any client, so this
//! module is the trust boundary. It never panics, bounds every length
//! ([`MAX_MESSAGE_LEN`], [`MAX_STARTUP_LEN`]), and keeps each message's raw bytes so the hot
//! path can forward them to a backend without re-encoding. It is the target of the
//! `frontend_decoder` fuzz target.

use bytes::{Buf, Bytes, BytesMut};

/// Largest regular message accepted (PostgreSQL itself allows 1 GiB; 64 MiB bounds memory
/// per client while leaving room for large COPY rows and bulk INSERTs).
pub const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;
/// Largest startup packet (PostgreSQL uses 10,000 bytes too).
pub const MAX_STARTUP_LEN: usize = 10_000;

const SSL_REQUEST_CODE: i32 = 80_877_103;
const GSSENC_REQUEST_CODE: i32 = 80_877_104;
const CANCEL_REQUEST_CODE: i32 = 80_877_102;
const PROTOCOL_V3: i32 = 196_608;

/// Type tags of the messages [`decode_message`] accepts (checked from the header alone, so
/// an unknown type is refused before its body is buffered); [`parse_body`] has one arm
/// each.
const KNOWN_TAGS: &[u8] = b"QPBDECHSXdcfpF";

/// Why a client's bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("startup packet of {0} bytes is invalid")]
    BadStartupLength(i64),
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("unknown message type {0:?}")]
    UnknownType(char),
    #[error("malformed {0} message: {1}")]
    Malformed(&'static str, &'static str),
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    Cancel { process_id: i32, secret_key: i32 },
    Startup { params: Vec<(String, String)> },
}

/// One decoded client message. `Bytes` fields share the received buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    Query(String),
    Parse {
        name: String,
        query: String,
        param_types: Vec<u32>,
    },
    Bind(Bind),
    Describe {
        kind: u8,
        name: String,
    },
    Execute {
        portal: String,
        max_rows: i32,
    },
    Close {
        kind: u8,
        name: String,
    },
    Flush,
    Sync,
    Terminate,
    CopyData(Bytes),
    CopyDone,
    CopyFail(String),
    /// `p`: a password, SASLInitialResponse or SASLResponse; meaning depends on the auth state.
    Password(Bytes),
    FunctionCall,
}

/// A Bind message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<Bytes>>,
    pub result_formats: Vec<i16>,
    /// Offset in the raw message where the parameter-format section starts, so the Bind can
    /// be re-emitted with another statement name by copying the tail.
    pub tail_offset: usize,
}

/// A decoded message together with its raw bytes (tag + length + body).
#[derive(Debug, Clone)]
pub struct Frame {
    pub msg: FrontendMessage,
    pub raw: Bytes,
}

/// Decodes the first packet of a connection. `Ok(None)`: more bytes needed.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<Startup>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(DecodeError::BadStartupLength(len.into()));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut body = buf.split_to(len).freeze();
    body.advance(4);
    let code = body.get_i32();
    match code {
        SSL_REQUEST_CODE => Ok(Some(Startup::SslRequest)),
        GSSENC_REQUEST_CODE => Ok(Some(Startup::GssEncRequest)),
        CANCEL_REQUEST_CODE => {
            if body.len() < 8 {
                return Err(DecodeError::Malformed("CancelRequest", "too short"));
            }
            Ok(Some(Startup::Cancel {
                process_id: body.get_i32(),
                secret_key: body.get_i32(),
            }))
        }
        PROTOCOL_V3 => {
            let mut params = Vec::new();
            loop {
                let key = cstr(&mut body, "StartupMessage")?;
                if key.is_empty() {
                    break;
                }
                let value = cstr(&mut body, "StartupMessage")?;
                params.push((key, value));
            }
            Ok(Some(Startup::Startup { params }))
        }
        other => Err(DecodeError::UnsupportedProtocol {
            major: (other >> 16) as u16,
            minor: (other & 0xffff) as u16,
        }),
    }
}

/// Decodes one regular message. `Ok(None)`: more bytes needed (the buffer is untouched).
pub fn decode_message(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    decode_message_within(buf, MAX_MESSAGE_LEN)
}

/// [`decode_message`] with a lower size limit (e.g. before authentication, when nobody
/// should be able to make the proxy reserve more than a few KiB). A message declaring more
/// is refused from its header, before its body is buffered.
pub fn decode_message_within(
    buf: &mut BytesMut,
    limit: usize,
) -> Result<Option<Frame>, DecodeError> {
    let limit = limit.min(MAX_MESSAGE_LEN);
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(DecodeError::BadLength(len.into()));
    }
    let total = len as usize + 1;
    if total > limit {
        return Err(DecodeError::TooLarge { size: total, limit });
    }
    if !KNOWN_TAGS.contains(&tag) {
        return Err(DecodeError::UnknownType(char::from(tag)));
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let raw = buf.split_to(total).freeze();
    let msg = parse_body(tag, raw.slice(5..))?;
    Ok(Some(Frame { msg, raw }))
}

/// Bytes still needed before the next message is complete (for read sizing), if known.
pub fn pending_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 5 {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    usize::try_from(len).ok().map(|l| l + 1)
}

/// Decodes a message body by its type tag. Each kind has its own parser below; all of
/// them bound every count and length by the bytes actually present, so a hostile length
/// field can't make the proxy allocate or read past the message.
fn parse_body(tag: u8, mut b: Bytes) -> Result<FrontendMessage, DecodeError> {
    let msg = match tag {
        b'Q' => FrontendMessage::Query(cstr(&mut b, "Query")?),
        b'P' => parse_parse(b)?,
        b'B' => FrontendMessage::Bind(parse_bind(b)?),
        b'D' | b'C' => parse_describe_or_close(tag, b)?,
        b'E' => parse_execute(b)?,
        b'H' => FrontendMessage::Flush,
        b'S' => FrontendMessage::Sync,
        b'X' => FrontendMessage::Terminate,
        b'd' => FrontendMessage::CopyData(b),
        b'c' => FrontendMessage::CopyDone,
        b'f' => FrontendMessage::CopyFail(cstr(&mut b, "CopyFail")?),
        b'p' => FrontendMessage::Password(b),
        b'F' => FrontendMessage::FunctionCall,
        other => return Err(DecodeError::UnknownType(char::from(other))),
    };
    Ok(msg)
}

/// Parse: statement name, query text, parameter type OIDs.
fn parse_parse(mut b: Bytes) -> Result<FrontendMessage, DecodeError> {
    let name = cstr(&mut b, "Parse")?;
    let query = cstr(&mut b, "Parse")?;
    let n = i16_at(&mut b, "Parse")?;
    if n < 0 {
        return Err(DecodeError::Malformed("Parse", "negative parameter count"));
    }
    let n = n as usize;
    if b.len() < n * 4 {
        return Err(DecodeError::Malformed("Parse", "truncated parameter types"));
    }
    let param_types = (0..n).map(|_| b.get_u32()).collect();
    Ok(FrontendMessage::Parse {
        name,
        query,
        param_types,
    })
}

/// Bind: portal, statement, parameter formats, parameter values, result formats. Records
/// where the formats start so the proxy can re-emit the Bind for another statement name.
fn parse_bind(mut b: Bytes) -> Result<Bind, DecodeError> {
    let total = b.len();
    let portal = cstr(&mut b, "Bind")?;
    let statement = cstr(&mut b, "Bind")?;
    let tail_offset = 5 + (total - b.len());
    let param_formats = format_codes(&mut b, "truncated parameter formats")?;
    let nf = param_formats.len();
    let np = count(&mut b, "Bind")?;
    if nf > 1 && nf != np {
        return Err(DecodeError::Malformed(
            "Bind",
            "parameter format count does not match parameter count",
        ));
    }
    let params = bind_values(&mut b, np)?;
    let result_formats = format_codes(&mut b, "truncated result formats")?;
    Ok(Bind {
        portal,
        statement,
        param_formats,
        params,
        result_formats,
        tail_offset,
    })
}

/// A Bind's count-prefixed list of format codes; `truncated` says which list was short.
fn format_codes(b: &mut Bytes, truncated: &'static str) -> Result<Vec<i16>, DecodeError> {
    let n = count(b, "Bind")?;
    if b.len() < n * 2 {
        return Err(DecodeError::Malformed("Bind", truncated));
    }
    Ok((0..n).map(|_| b.get_i16()).collect())
}

/// A Bind's `n` parameter values (length -1 = NULL), sharing the message buffer.
fn bind_values(b: &mut Bytes, n: usize) -> Result<Vec<Option<Bytes>>, DecodeError> {
    // Capacity bounded: `n` comes from the client, the values must still be present.
    let mut params = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        if b.len() < 4 {
            return Err(DecodeError::Malformed("Bind", "truncated parameter"));
        }
        let l = b.get_i32();
        if l == -1 {
            params.push(None);
        } else if l < 0 || l as usize > b.len() {
            return Err(DecodeError::Malformed("Bind", "invalid parameter length"));
        } else {
            params.push(Some(b.split_to(l as usize)));
        }
    }
    Ok(params)
}

/// Describe (`D`) or Close (`C`): the same body, a kind (`S`tatement or `P`ortal) and a
/// name.
fn parse_describe_or_close(tag: u8, mut b: Bytes) -> Result<FrontendMessage, DecodeError> {
    let what = if tag == b'D' { "Describe" } else { "Close" };
    if b.is_empty() {
        return Err(DecodeError::Malformed(what, "missing kind"));
    }
    let kind = b.get_u8();
    if kind != b'S' && kind != b'P' {
        return Err(DecodeError::Malformed(what, "kind must be 'S' or 'P'"));
    }
    let name = cstr(&mut b, what)?;
    Ok(if tag == b'D' {
        FrontendMessage::Describe { kind, name }
    } else {
        FrontendMessage::Close { kind, name }
    })
}

/// Execute: portal and row limit (0 = all).
fn parse_execute(mut b: Bytes) -> Result<FrontendMessage, DecodeError> {
    let portal = cstr(&mut b, "Execute")?;
    if b.len() < 4 {
        return Err(DecodeError::Malformed("Execute", "missing row limit"));
    }
    Ok(FrontendMessage::Execute {
        portal,
        max_rows: b.get_i32(),
    })
}

fn cstr(b: &mut Bytes, what: &'static str) -> Result<String, DecodeError> {
    let end = memchr::memchr(0, b).ok_or(DecodeError::Malformed(what, "unterminated string"))?;
    let s = std::str::from_utf8(&b[..end])
        .map_err(|_| DecodeError::Malformed(what, "string is not valid UTF-8"))?
        .to_owned();
    b.advance(end + 1);
    Ok(s)
}

fn i16_at(b: &mut Bytes, what: &'static str) -> Result<i16, DecodeError> {
    if b.len() < 2 {
        return Err(DecodeError::Malformed(what, "truncated"));
    }
    Ok(b.get_i16())
}

fn count(b: &mut Bytes, what: &'static str) -> Result<usize, DecodeError> {
    let n = i16_at(b, what)?;
    if n < 0 {
        return Err(DecodeError::Malformed(what, "negative count"));
    }
    Ok(n as usize)
}

/// Parses a SASLInitialResponse body: mechanism name and the client-first message.
pub fn parse_sasl_initial(mut b: Bytes) -> Result<(String, Bytes), DecodeError> {
    let mech = cstr(&mut b, "SASLInitialResponse")?;
    if b.len() < 4 {
        return Err(DecodeError::Malformed("SASLInitialResponse", "truncated"));
    }
    let len = b.get_i32();
    if len < 0 || len as usize != b.len() {
        return Err(DecodeError::Malformed(
            "SASLInitialResponse",
            "bad data length",
        ));
    }
    Ok((mech, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use postgres_protocol::message::frontend;

    #[test]
    fn decodes_what_postgres_protocol_encodes() {
        let mut buf = BytesMut::new();
        frontend::query("SELECT 1", &mut buf).expect("encode");
        frontend::parse("s1", "SELECT $1", [23u32], &mut buf).expect("encode");
        frontend::bind(
            "p",
            "s1",
            [1i16],
            [Some(7i32)],
            |v, out| {
                match v {
                    Some(v) => out.put_i32(v),
                    None => return Ok(postgres_protocol::IsNull::Yes),
                }
                Ok(postgres_protocol::IsNull::No)
            },
            [1i16],
            &mut buf,
        )
        .map_err(|_| "bind")
        .expect("encode");
        frontend::execute("p", 0, &mut buf).expect("encode");
        frontend::sync(&mut buf);
        let mut out = vec![];
        while let Some(f) = decode_message(&mut buf).expect("valid") {
            out.push(f.msg);
        }
        assert_eq!(out.len(), 5);
        assert_eq!(out[0], FrontendMessage::Query("SELECT 1".into()));
        match &out[2] {
            FrontendMessage::Bind(b) => {
                assert_eq!(b.statement, "s1");
                assert_eq!(b.params, vec![Some(Bytes::from_static(&[0, 0, 0, 7]))]);
                assert_eq!(b.param_formats, vec![1]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out[4], FrontendMessage::Sync);
    }

    #[test]
    fn refuses_bad_input() {
        let mut b = BytesMut::from(&b"Q\x00\x00\x00\x02"[..]);
        assert!(matches!(
            decode_message(&mut b),
            Err(DecodeError::BadLength(2))
        ));
        let mut b = BytesMut::from(&b"Z\x00\x00\x00\x04"[..]);
        assert!(matches!(
            decode_message(&mut b),
            Err(DecodeError::UnknownType('Z'))
        ));
        let mut b = BytesMut::from(&b"Q\x7f\x00\x00\x04"[..]);
        assert!(matches!(
            decode_message(&mut b),
            Err(DecodeError::TooLarge { .. })
        ));
        // Within a lower limit, a message declaring more is refused from its header alone,
        // and nothing is reserved for its body.
        let mut b = BytesMut::from(&b"p\x00\x10\x00\x04"[..]);
        let before = b.capacity();
        assert_eq!(
            decode_message_within(&mut b, 8192).err(),
            Some(DecodeError::TooLarge {
                size: 0x10_0005,
                limit: 8192
            })
        );
        assert_eq!(b.capacity(), before);
        let mut b = BytesMut::from(&b"Q\x00\x00\x00\x08abcd"[..]);
        assert!(matches!(
            decode_message(&mut b),
            Err(DecodeError::Malformed(..))
        ));
        let mut b = BytesMut::from(&b"Q\x00\x00\x00\x08ab"[..]);
        assert!(matches!(decode_message(&mut b), Ok(None)));
        let mut b = BytesMut::from(&b"\x00\x00\x00\x08\x00\x02\x00\x00"[..]);
        assert!(matches!(
            decode_startup(&mut b),
            Err(DecodeError::UnsupportedProtocol { major: 2, minor: 0 })
        ));
    }

    #[test]
    fn startup_params() {
        let mut buf = BytesMut::new();
        frontend::startup_message([("user", "u"), ("database", "d")], &mut buf).expect("encode");
        let s = decode_startup(&mut buf).expect("valid").expect("complete");
        assert_eq!(
            s,
            Startup::Startup {
                params: vec![("user".into(), "u".into()), ("database".into(), "d".into())]
            }
        );
    }
}
