//! Byte-level rewrites of client messages: a Bind renamed to the proxy-global statement
//! name, a Bind carrying only some parameters (a multi-row INSERT split by shard), and a
//! merged result without its RowDescription.
//!
//! Why by hand: these copy the client's bytes with one field changed; re-encoding through
//! `postgres-protocol` would first need every parameter decoded.

use bytes::{BufMut, Bytes, BytesMut};
use proxy_core::wire::frontend::Bind;

/// Re-encodes a Bind with another statement name.
pub(super) fn rename_bind(b: &Bind, raw: &[u8], global: &str) -> BytesMut {
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
pub(super) fn subset_bind(b: &Bind, statement: &str, keep: &[usize]) -> BytesMut {
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

/// Removes the RowDescription (first message) from a merged output: in the extended
/// protocol it is only sent in answer to Describe.
pub(super) fn strip_row_description(out: BytesMut) -> Bytes {
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
    use postgres_protocol::message::frontend;
    use proxy_core::wire::frontend::{decode_message, FrontendMessage};

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
