//! Decoding a Bind parameter that holds a shard key (or a LIMIT/OFFSET count).
//!
//! Why here and not in the wire layer: what counts as a usable key (text or binary int2/4/8,
//! text-typed binary values, no numerics) is a routing rule, and its errors are
//! [`RouteError::BadKeyParam`]s the client sees.

use super::model::{Params, RouteError};
use crate::oid::{INT2, INT4, INT8, NUMERIC, TEXT, UNKNOWN, VARCHAR};

impl Params<'_> {
    /// Decodes parameter `index` as an integer shard key: `Ok(None)` for NULL.
    ///
    /// Text format: a decimal integer (surrounding blanks allowed). Binary: big-endian
    /// int2/int4/int8 by type OID (21/23/20); with no type, by length (2, 4, 8 bytes);
    /// text-typed binary parameters are their UTF-8 text.
    pub fn key(&self, index: usize) -> Result<Option<i64>, RouteError> {
        let bad = |reason: String| RouteError::BadKeyParam { index, reason };
        let value = self.values.get(index).ok_or_else(|| {
            bad(format!(
                "the statement has {} parameters",
                self.values.len()
            ))
        })?;
        let Some(bytes) = value else {
            return Ok(None);
        };
        let format = match self.formats {
            [] => 0,
            [one] => *one,
            many => *many
                .get(index)
                .ok_or_else(|| bad("no format code for it in Bind".into()))?,
        };
        let oid = self.types.get(index).copied().unwrap_or(0);
        let parse_text = |b: &[u8]| -> Result<Option<i64>, RouteError> {
            let s = std::str::from_utf8(b).map_err(|_| bad("text value is not UTF-8".into()))?;
            s.trim_matches(|c: char| c.is_ascii_whitespace())
                .parse::<i64>()
                .map(Some)
                .map_err(|_| bad(format!("{s:?} is not a bigint")))
        };
        match format {
            0 => parse_text(bytes),
            1 => match (oid, bytes.len()) {
                (INT8, 8) | (0, 8) => Ok(Some(i64::from_be_bytes(arr(bytes)))),
                (INT4, 4) | (0, 4) => Ok(Some(i64::from(i32::from_be_bytes(arr(bytes))))),
                (INT2, 2) | (0, 2) => Ok(Some(i64::from(i16::from_be_bytes(arr(bytes))))),
                (TEXT | VARCHAR | UNKNOWN, _) => parse_text(bytes),
                (INT8 | INT4 | INT2 | 0, n) => Err(bad(format!(
                    "binary integer of type OID {oid} has {n} bytes"
                ))),
                (NUMERIC, _) => Err(bad(
                    "binary numeric is not accepted as a shard key; send it as int8 or text".into(),
                )),
                (other, _) => Err(bad(format!(
                    "binary parameter of type OID {other} can't be a bigint shard key"
                ))),
            },
            other => Err(bad(format!("unknown format code {other}"))),
        }
    }
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}
