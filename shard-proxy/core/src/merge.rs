//! Combining the results of a scatter read into what one database would have returned.
//!
//! When a `SELECT` on a sharded table has no shard key, the proxy runs it on every shard
//! (usually a rewritten form, [`MergeSpec::shard_sql`]) and merges the rows it gets back.
//! Reads go through a [`Stream`] (the `stream` submodule): rows leave as soon as the merge
//! allows — concatenated, or k-way merged in ORDER BY order holding one row per shard, with
//! OFFSET/LIMIT counted on the way — and only aggregates gather, one accumulator per group,
//! in a [`Merger`]. The merger does the part of the query that can't be done shard by
//! shard:
//!
//! 1. **Aggregation** ([`MergeSpec::aggregates`]): partial `count`s are summed, `sum`s added,
//!    `min`/`max` compared, and `avg` recomputed from hidden `sum(x)`/`count(x)` columns the
//!    router appended (an average of averages would be wrong). Rows are grouped by the
//!    [`MergeSpec::group_by`] columns (one group when it is empty — and then one row comes
//!    out even if no row went in, like `SELECT count(*)` on an empty table).
//! 2. **DISTINCT** ([`MergeSpec::distinct`]) across shards.
//! 3. **ORDER BY** ([`MergeSpec::order_by`]), then **OFFSET**/**LIMIT**. Shards were asked for
//!    `LIMIT limit + offset` rows without `OFFSET`; the merger sorts, skips `offset`, takes
//!    `limit`. With a limit and no DISTINCT it keeps only the best `limit + offset` rows in
//!    memory.
//! 4. The trailing [`MergeSpec::hidden_columns`] (helper columns the router added) are cut.
//!
//! # Why values are decoded by type
//!
//! Rows arrive as raw DataRow cells, text or binary. Byte comparison would order `10` before
//! `9`, so cells are decoded by their column's type OID: `int2/int4/int8/oid`,
//! `float4/float8` (NaN sorts above everything, as in PostgreSQL), `numeric` (exact,
//! arbitrary precision, including `NaN` and `±Infinity`), `bool`, `date`, `time`,
//! `timestamp`, `timestamptz` (text in the ISO `DateStyle`, binary as days/microseconds),
//! and `uuid`. Every other type — `text`, `varchar`, `name` and `bpchar` (trailing blanks
//! ignored) included — compares **bytewise**, which is the `C` collation: a scatter
//! `ORDER BY title` comes back in byte order, which differs from a linguistic collation such
//! as `en_US`. Undecodable cells are a typed [`MergeError`], never a panic or a silent
//! misorder.
//!
//! # Matching PostgreSQL's output
//!
//! Merged aggregates are printed the way PostgreSQL prints them: `count` and integer `sum`
//! as integers (`bigint out of range` if the total overflows, as in PostgreSQL), `numeric`
//! sums with the largest input scale, `avg` over integers/numeric as `numeric` with the
//! scale PostgreSQL's `numeric` division picks (at least 16 significant digits, never fewer
//! fractional digits than the inputs', rounded half away from zero — `avg(1,2)` is
//! `1.5000000000000000`), and floats in PostgreSQL's shortest-round-trip format
//! (`1e+20`, `1.5e-05`). Differences from a single database: float sums and averages add
//! the shards' partial sums, so the last bits can differ (floating-point addition is not
//! associative); `avg(float4)` adds the shards' `sum(float4)` partials, which PostgreSQL
//! itself computes in `float4`.
//!
//! The numeric arithmetic is a small exact decimal (`BigInt` mantissa + scale) rather than a
//! general decimal crate: PostgreSQL `numeric` is unbounded (fixed-width decimals such as
//! 28-digit ones overflow), and only the plain `123.45` form that `numeric_out` produces is
//! accepted, so hostile input like `1e999999999` can't make the proxy allocate gigabytes.
//!
//! This module is pure logic: no I/O, no async.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use num_bigint::{BigInt, Sign};
use num_traits::{Signed, ToPrimitive, Zero};

mod stream;

pub use stream::{Step, Stream};

use crate::oid::{
    BOOL, BPCHAR, BYTEA, CHAR, DATE, FLOAT4, FLOAT8, INT2, INT4, INT8, NAME, NUMERIC, OID, TEXT,
    TIME, TIMESTAMP, TIMESTAMPTZ, UNKNOWN, UUID, VARCHAR,
};

/// One result row: a value per column, `None` for SQL NULL; raw DataRow bytes.
pub type Row = Vec<Option<Bytes>>;

/// How to combine a scatter read's results. Built by the router; column indexes address the
/// shard rows (visible columns first, then `hidden_columns` helper columns).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeSpec {
    /// SQL to send to every shard instead of the client's text (`None` = send it as is).
    pub shard_sql: Option<String>,
    /// Sort keys, most significant first.
    pub order_by: Vec<OrderKey>,
    /// Rows to return after `offset` (`None` = all).
    pub limit: Option<u64>,
    /// Rows to skip after sorting.
    pub offset: u64,
    /// One entry per column (hidden ones included) when the query aggregates; empty = no
    /// aggregation (rows are concatenated).
    pub aggregates: Vec<ColumnMerge>,
    /// Columns whose values identify a group (`GROUP BY`); empty with aggregates = one group.
    pub group_by: Vec<usize>,
    /// Helper columns the router appended at the end of each row; the wire layer strips
    /// that many trailing RowDescription fields, the merger strips them from rows.
    pub hidden_columns: usize,
    /// `SELECT DISTINCT`: drop duplicate rows across shards.
    pub distinct: bool,
    /// The SELECT list has `*`, so the router could not count the visible columns: then
    /// every `order_by` column indexes the hidden trailing columns (0 = first hidden
    /// column) and the merger resolves it once it knows the row width.
    pub order_by_hidden: bool,
}

/// One `ORDER BY` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderKey {
    /// Column index in the shard rows.
    pub column: usize,
    /// `DESC`.
    pub descending: bool,
    /// `NULLS FIRST` (PostgreSQL's default: last for ASC, first for DESC).
    pub nulls_first: bool,
}

/// How one column of an aggregating query is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnMerge {
    /// A grouping column (or a constant): every row of a group carries the same value.
    Key,
    /// `count(*)` / `count(x)`: partial counts are added.
    Count,
    /// `sum(x)`: partial sums are added (NULL when every partial is NULL).
    Sum,
    /// `min(x)`.
    Min,
    /// `max(x)`.
    Max,
    /// `avg(x)`: recomputed as merged `sum_col` / merged `count_col` (hidden columns).
    Avg {
        /// Column holding the shard's `sum(x)` (merged as [`ColumnMerge::Sum`]).
        sum_col: usize,
        /// Column holding the shard's `count(x)` (merged as [`ColumnMerge::Count`]).
        count_col: usize,
    },
}

/// A result column as described by the shard's RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// Type OID.
    pub type_oid: u32,
    /// Format code: 0 text, 1 binary.
    pub format: i16,
}

/// Why rows could not be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    /// The merge spec does not fit the columns the shards returned.
    #[error("cross-shard merge: {0}")]
    Spec(String),
    /// A row's width differs from the RowDescription.
    #[error("cross-shard merge: a shard returned a row with {got} columns, expected {expected}")]
    ColumnCount {
        /// Columns in the RowDescription.
        expected: usize,
        /// Columns in the row.
        got: usize,
    },
    /// A cell could not be decoded as its column's type.
    #[error("cross-shard merge: cannot decode column {column} (type OID {type_oid}): {reason}")]
    Decode {
        /// Column index.
        column: usize,
        /// Column type OID.
        type_oid: u32,
        /// What was wrong.
        reason: String,
    },
    /// The merge needs arithmetic on a type it does not support.
    #[error("cross-shard merge: cannot compute {op} over values of type OID {type_oid}")]
    UnsupportedType {
        /// `sum`, `avg`, `count`.
        op: &'static str,
        /// Column type OID.
        type_oid: u32,
    },
    /// A merged value is out of its type's range (PostgreSQL's own message).
    #[error("{0} out of range")]
    OutOfRange(&'static str),
    /// A shard's rows did not come in the ORDER BY order as the proxy compares values, so
    /// a streaming merge cannot order them (see [`stream`]).
    #[error(
        "cross-shard merge: shard #{shard} returned rows out of ORDER BY order as the proxy \
         compares them (text compares bytewise, as the C collation); sort with COLLATE \"C\" \
         or add a shard key"
    )]
    OutOfOrder {
        /// Position of the shard in the scatter.
        shard: usize,
    },
}

fn is_int(oid: u32) -> bool {
    matches!(oid, INT2 | INT4 | INT8 | OID)
}

// ---------------------------------------------------------------------------------------
// Exact decimal for `numeric`

/// An exact decimal `mantissa × 10^-scale`; `scale` is PostgreSQL's display scale.
#[derive(Debug, Clone)]
struct Dec {
    m: BigInt,
    scale: u32,
}

/// Longest numeric text we accept (PostgreSQL's own limit is 131072 + 16383 digits).
const MAX_NUMERIC_TEXT: usize = 150_000;
/// Largest display scale PostgreSQL produces.
const NUMERIC_MAX_DISPLAY_SCALE: u32 = 1000;
const NUMERIC_MAX_SCALE: u32 = 16383;

fn pow10(n: u32) -> BigInt {
    num_traits::pow(BigInt::from(10u8), n as usize)
}

impl Dec {
    fn from_int(v: i128) -> Dec {
        Dec {
            m: BigInt::from(v),
            scale: 0,
        }
    }

    /// Parses `[+-]digits[.digits]` (also `.5`, `5.`), what `numeric_out` prints.
    fn parse(s: &str) -> Option<Dec> {
        let s = s.trim_matches(|c: char| c.is_ascii_whitespace());
        if s.len() > MAX_NUMERIC_TEXT {
            return None;
        }
        let (neg, body) = match s.as_bytes().first()? {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let (int, frac) = match body.split_once('.') {
            Some((i, f)) => (i, f),
            None => (body, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = format!("{int}{frac}");
        let m = if digits.is_empty() {
            BigInt::zero()
        } else {
            digits.parse::<BigInt>().ok()?
        };
        let scale = u32::try_from(frac.len()).ok()?;
        Some(Dec {
            m: if neg { -m } else { m },
            scale,
        })
    }

    fn rescaled(&self, scale: u32) -> BigInt {
        if scale > self.scale {
            &self.m * pow10(scale - self.scale)
        } else {
            self.m.clone()
        }
    }

    fn add(&self, other: &Dec) -> Dec {
        let scale = self.scale.max(other.scale);
        Dec {
            m: self.rescaled(scale) + other.rescaled(scale),
            scale,
        }
    }

    fn cmp(&self, other: &Dec) -> Ordering {
        let scale = self.scale.max(other.scale);
        self.rescaled(scale).cmp(&other.rescaled(scale))
    }

    /// (weight, first digit) in base 10000, as PostgreSQL's `select_div_scale` sees them.
    fn weight_and_first_digit(&self) -> (i64, u32) {
        if self.m.is_zero() {
            return (0, 0);
        }
        let abs = self.m.abs();
        let ndigits = abs.to_string().len() as i64;
        let exp10 = ndigits - 1 - i64::from(self.scale);
        let weight = exp10.div_euclid(4);
        // Top base-10000 digit: floor(|v| / 10000^weight).
        let shift = i64::from(self.scale) + 4 * weight;
        let top = if shift >= 0 {
            abs / pow10(shift as u32)
        } else {
            abs * pow10((-shift) as u32)
        };
        (weight, top.to_u32().unwrap_or(0))
    }

    /// `self / other` exactly as PostgreSQL's `numeric_div` (scale from `select_div_scale`,
    /// round half away from zero). `other` must not be zero.
    fn div_pg(&self, other: &Dec) -> Dec {
        const NUMERIC_MIN_SIG_DIGITS: i64 = 16;
        let (w1, d1) = self.weight_and_first_digit();
        let (w2, d2) = other.weight_and_first_digit();
        let mut qweight = w1 - w2;
        if d1 <= d2 {
            qweight -= 1;
        }
        let rscale = (NUMERIC_MIN_SIG_DIGITS - qweight * 4)
            .max(i64::from(self.scale))
            .max(i64::from(other.scale))
            .clamp(0, i64::from(NUMERIC_MAX_DISPLAY_SCALE)) as u32;
        // q = self/other * 10^rscale = m1 * 10^(s2 - s1 + rscale) / m2
        let e = i64::from(other.scale) - i64::from(self.scale) + i64::from(rscale);
        let (num, den) = if e >= 0 {
            (&self.m * pow10(e as u32), other.m.clone())
        } else {
            (self.m.clone(), &other.m * pow10((-e) as u32))
        };
        let negative = (num.sign() == Sign::Minus) != (den.sign() == Sign::Minus);
        let (num, den) = (num.abs(), den.abs());
        let q: BigInt = (num * 2u8 + &den) / (den * 2u8);
        Dec {
            m: if negative { -q } else { q },
            scale: rscale,
        }
    }

    fn to_text(&self) -> String {
        let digits = self.m.abs().to_string();
        let scale = self.scale as usize;
        let mut out = String::with_capacity(digits.len() + scale + 3);
        if self.m.sign() == Sign::Minus {
            out.push('-');
        }
        if scale == 0 {
            out.push_str(&digits);
        } else if digits.len() > scale {
            let (i, f) = digits.split_at(digits.len() - scale);
            out.push_str(i);
            out.push('.');
            out.push_str(f);
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', scale - digits.len()));
            out.push_str(&digits);
        }
        out
    }

    fn to_f64(&self) -> f64 {
        self.to_text().parse().unwrap_or(f64::NAN)
    }
}

/// PostgreSQL `numeric`, including its special values; the derived order is PostgreSQL's
/// (`-Infinity` < numbers < `Infinity` < `NaN`).
#[derive(Debug, Clone)]
enum Numeric {
    NegInf,
    Fin(Dec),
    PosInf,
    NaN,
}

impl Numeric {
    fn rank(&self) -> u8 {
        match self {
            Numeric::NegInf => 0,
            Numeric::Fin(_) => 1,
            Numeric::PosInf => 2,
            Numeric::NaN => 3,
        }
    }

    fn cmp(&self, other: &Numeric) -> Ordering {
        match (self, other) {
            (Numeric::Fin(a), Numeric::Fin(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }

    fn parse_text(s: &str) -> Option<Numeric> {
        match s.trim_matches(|c: char| c.is_ascii_whitespace()) {
            t if t.eq_ignore_ascii_case("nan") => Some(Numeric::NaN),
            t if t.eq_ignore_ascii_case("infinity") || t.eq_ignore_ascii_case("+infinity") => {
                Some(Numeric::PosInf)
            }
            t if t.eq_ignore_ascii_case("-infinity") => Some(Numeric::NegInf),
            t => Dec::parse(t).map(Numeric::Fin),
        }
    }

    fn decode_binary(b: &[u8]) -> Result<Numeric, String> {
        if b.len() < 8 {
            return Err("binary numeric shorter than its 8-byte header".into());
        }
        let ndigits = i16::from_be_bytes([b[0], b[1]]);
        let weight = i16::from_be_bytes([b[2], b[3]]);
        let sign = u16::from_be_bytes([b[4], b[5]]);
        let dscale = u16::from_be_bytes([b[6], b[7]]);
        match sign {
            0xC000 => return Ok(Numeric::NaN),
            0xD000 => return Ok(Numeric::PosInf),
            0xF000 => return Ok(Numeric::NegInf),
            0x0000 | 0x4000 => {}
            other => return Err(format!("bad numeric sign word {other:#06x}")),
        }
        if ndigits < 0 || b.len() != 8 + 2 * ndigits as usize {
            return Err(format!(
                "binary numeric with {ndigits} digits has {} bytes",
                b.len()
            ));
        }
        if u32::from(dscale) > NUMERIC_MAX_SCALE {
            return Err(format!("numeric display scale {dscale} out of range"));
        }
        let n = ndigits as i64;
        let weight = i64::from(weight);
        // Fractional decimal digits the stored base-10000 digits need.
        let needed = (4 * (n - 1 - weight)).max(0);
        let scale = needed.max(i64::from(dscale));
        let mut m = BigInt::zero();
        let base = BigInt::from(10_000u32);
        for i in 0..n as usize {
            let d = u16::from_be_bytes([b[8 + 2 * i], b[9 + 2 * i]]);
            if d >= 10_000 {
                return Err(format!("numeric digit {d} out of range"));
            }
            m = m * &base + BigInt::from(d);
        }
        // value = m * 10000^(weight - n + 1); as mantissa at `scale`:
        let exp = 4 * (weight - n + 1) + scale;
        if !(0..=4 * 40_000).contains(&exp) {
            return Err("numeric exponent out of range".into());
        }
        m *= pow10(exp as u32);
        if sign == 0x4000 {
            m = -m;
        }
        let mut dec = Dec {
            m,
            scale: scale as u32,
        };
        // Display with the sender's dscale when the digits allow it (they always should).
        if i64::from(dscale) < scale {
            let drop = pow10((scale - i64::from(dscale)) as u32);
            if (&dec.m % &drop).is_zero() {
                dec.m /= drop;
                dec.scale = u32::from(dscale);
            }
        }
        Ok(Numeric::Fin(dec))
    }

    fn to_text(&self) -> String {
        match self {
            Numeric::NegInf => "-Infinity".into(),
            Numeric::PosInf => "Infinity".into(),
            Numeric::NaN => "NaN".into(),
            Numeric::Fin(d) => d.to_text(),
        }
    }

    fn encode_binary(&self) -> Result<Vec<u8>, MergeError> {
        let header = |ndigits: i16, weight: i16, sign: u16, dscale: u16| {
            let mut v = Vec::with_capacity(8);
            v.extend_from_slice(&ndigits.to_be_bytes());
            v.extend_from_slice(&weight.to_be_bytes());
            v.extend_from_slice(&sign.to_be_bytes());
            v.extend_from_slice(&dscale.to_be_bytes());
            v
        };
        let d = match self {
            Numeric::NaN => return Ok(header(0, 0, 0xC000, 0)),
            Numeric::PosInf => return Ok(header(0, 0, 0xD000, 0)),
            Numeric::NegInf => return Ok(header(0, 0, 0xF000, 0)),
            Numeric::Fin(d) => d,
        };
        let dscale = u16::try_from(d.scale).map_err(|_| MergeError::OutOfRange("numeric"))?;
        if d.m.is_zero() {
            return Ok(header(0, 0, 0, dscale));
        }
        let sign = if d.m.sign() == Sign::Minus { 0x4000 } else { 0 };
        let pad = (4 - d.scale % 4) % 4;
        let mut a = d.m.abs() * pow10(pad);
        let frac_groups = i64::from((d.scale + pad) / 4);
        let base = BigInt::from(10_000u32);
        let mut digits = Vec::new();
        while !a.is_zero() {
            let r = (&a % &base).to_u16().unwrap_or(0);
            digits.push(r);
            a /= &base;
        }
        digits.reverse();
        let weight = digits.len() as i64 - 1 - frac_groups;
        while digits.last() == Some(&0) {
            digits.pop();
        }
        let weight = i16::try_from(weight).map_err(|_| MergeError::OutOfRange("numeric"))?;
        let ndigits = i16::try_from(digits.len()).map_err(|_| MergeError::OutOfRange("numeric"))?;
        let mut out = header(ndigits, weight, sign, dscale);
        for dg in digits {
            out.extend_from_slice(&dg.to_be_bytes());
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Floats in PostgreSQL's output format

/// Formats like PostgreSQL's `float8out`/`float4out` (extra_float_digits > 0, the default
/// since PostgreSQL 12): shortest round-trip digits, fixed notation for decimal exponents
/// in `[-4, fixed_max)`, otherwise `d.ddde±XX`.
fn pg_float_text(sci: &str, fixed_max: i32) -> String {
    // `sci` is Rust's shortest round-trip `{:e}` rendering, e.g. "-1.2345e-7".
    let (neg, rest) = match sci.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, sci),
    };
    let Some((mant, exp)) = rest.split_once('e') else {
        return sci.to_string();
    };
    let Ok(exp) = exp.parse::<i32>() else {
        return sci.to_string();
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    let olen = digits.len() as i32;
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if (-4..fixed_max).contains(&exp) {
        if exp >= 0 {
            if olen <= exp + 1 {
                out.push_str(digits);
                out.extend(std::iter::repeat_n('0', (exp + 1 - olen) as usize));
            } else {
                let (i, f) = digits.split_at((exp + 1) as usize);
                out.push_str(i);
                out.push('.');
                out.push_str(f);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(digits);
        }
    } else {
        let (first, tail) = digits.split_at(1);
        out.push_str(first);
        if !tail.is_empty() {
            out.push('.');
            out.push_str(tail);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.unsigned_abs()));
    }
    out
}

fn float8_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if v == 0.0 {
        if v.is_sign_negative() { "-0" } else { "0" }.into()
    } else {
        pg_float_text(&format!("{v:e}"), 15)
    }
}

fn float4_text(v: f32) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if v == 0.0 {
        if v.is_sign_negative() { "-0" } else { "0" }.into()
    } else {
        pg_float_text(&format!("{v:e}"), 6)
    }
}

fn parse_float(s: &str) -> Option<f64> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    if t.eq_ignore_ascii_case("infinity") || t.eq_ignore_ascii_case("+infinity") {
        return Some(f64::INFINITY);
    }
    if t.eq_ignore_ascii_case("-infinity") {
        return Some(f64::NEG_INFINITY);
    }
    if t.eq_ignore_ascii_case("nan") {
        return Some(f64::NAN);
    }
    // Reject Rust-only spellings ("inf"); accept what float8out prints.
    if t.bytes()
        .any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E')
    {
        return None;
    }
    t.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Dates and times (ISO DateStyle text, or binary)

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days between 1970-01-01 and 2000-01-01 (PostgreSQL's binary epoch).
const PG_EPOCH_DAYS: i64 = 10_957;
const USECS_PER_DAY: i64 = 86_400_000_000;

fn num(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `YYYY-MM-DD[ BC]` → days since 2000-01-01 (the binary epoch, so text and binary agree).
fn parse_date(s: &str) -> Option<i64> {
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(r) => (r, true),
        None => (s, false),
    };
    let mut parts = s.splitn(3, '-');
    let y = num(parts.next()?)?;
    let m = num(parts.next()?)?;
    let d = num(parts.next()?)?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if bc { 1 - y } else { y };
    Some(days_from_civil(y, m, d) - PG_EPOCH_DAYS)
}

/// `HH:MM:SS[.ffffff]` → microseconds.
fn parse_time(s: &str) -> Option<i64> {
    let mut parts = s.splitn(3, ':');
    let h = num(parts.next()?)?;
    let mi = num(parts.next()?)?;
    let sec = parts.next()?;
    let (sec, frac) = match sec.split_once('.') {
        Some((a, b)) => (a, b),
        None => (sec, ""),
    };
    let sec = num(sec)?;
    let mut us = 0i64;
    if !frac.is_empty() {
        if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        us = num(frac)? * 10i64.pow(6 - frac.len() as u32);
    }
    if h > 24 || mi > 59 || sec > 60 {
        return None;
    }
    Some(((h * 60 + mi) * 60 + sec) * 1_000_000 + us)
}

/// `±HH[:MM[:SS]]` → seconds east of UTC.
fn parse_offset(s: &str) -> Option<i64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let mut secs = 0;
    let mut mult = 3600;
    for part in rest.split(':') {
        if mult == 0 {
            return None;
        }
        secs += num(part)? * mult;
        mult /= 60;
    }
    Some(sign * secs)
}

/// ISO timestamp[tz] text → microseconds since 2000-01-01 UTC (`infinity` → i64 bounds).
fn parse_timestamp(s: &str, with_tz: bool) -> Option<i64> {
    match s {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(r) => (r, true),
        None => (s, false),
    };
    let (date, rest) = s.split_once(' ')?;
    let days = parse_date(&(date.to_string() + if bc { " BC" } else { "" }))?;
    let (time, offset) = if with_tz {
        let pos = rest.rfind(['+', '-'])?;
        (&rest[..pos], parse_offset(&rest[pos..])?)
    } else {
        (rest, 0)
    };
    let t = parse_time(time)?;
    Some(days * USECS_PER_DAY + t - offset * 1_000_000)
}

// ---------------------------------------------------------------------------------------
// Decoded values

/// A decoded cell, for comparisons and arithmetic. Within one column every value has the
/// same variant.
#[derive(Debug, Clone)]
enum Val {
    Int(i128),
    Float(f64),
    Num(Numeric),
    Bool(bool),
    /// Microseconds (timestamps, time) or days (date).
    Time(i64),
    Uuid([u8; 16]),
    /// Bytewise (C collation) comparison.
    Bytes(Bytes),
}

impl Val {
    fn rank(&self) -> u8 {
        match self {
            Val::Int(_) => 0,
            Val::Float(_) => 1,
            Val::Num(_) => 2,
            Val::Bool(_) => 3,
            Val::Time(_) => 4,
            Val::Uuid(_) => 5,
            Val::Bytes(_) => 6,
        }
    }

    /// Total order; PostgreSQL's for the decoded types (NaN greatest, -0 = 0).
    fn cmp(&self, other: &Val) -> Ordering {
        match (self, other) {
            (Val::Int(a), Val::Int(b)) => a.cmp(b),
            (Val::Float(a), Val::Float(b)) => match (a.is_nan(), b.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => a.partial_cmp(b).unwrap_or(Ordering::Equal),
            },
            (Val::Num(a), Val::Num(b)) => a.cmp(b),
            (Val::Bool(a), Val::Bool(b)) => a.cmp(b),
            (Val::Time(a), Val::Time(b)) => a.cmp(b),
            (Val::Uuid(a), Val::Uuid(b)) => a.cmp(b),
            (Val::Bytes(a), Val::Bytes(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

/// A nullable decoded value with a total order (NULL first), for grouping and DISTINCT.
#[derive(Debug, Clone)]
struct KeyVal(Option<Val>);

impl PartialEq for KeyVal {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for KeyVal {}
impl PartialOrd for KeyVal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for KeyVal {
    fn cmp(&self, other: &Self) -> Ordering {
        match (&self.0, &other.0) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(a), Some(b)) => a.cmp(b),
        }
    }
}

fn utf8(b: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(b).map_err(|_| "text value is not UTF-8".to_string())
}

fn be<const N: usize>(b: &[u8], what: &str) -> Result<[u8; N], String> {
    <[u8; N]>::try_from(b).map_err(|_| format!("binary {what} must be {N} bytes, got {}", b.len()))
}

/// Decodes one non-NULL cell of a column.
fn decode(col: Column, b: &Bytes) -> Result<Val, String> {
    let binary = col.format == 1;
    match col.type_oid {
        INT2 | INT4 | INT8 | OID if binary => Ok(Val::Int(match col.type_oid {
            INT2 => i128::from(i16::from_be_bytes(be(b, "int2")?)),
            INT4 => i128::from(i32::from_be_bytes(be(b, "int4")?)),
            OID => i128::from(u32::from_be_bytes(be(b, "oid")?)),
            _ => i128::from(i64::from_be_bytes(be(b, "int8")?)),
        })),
        INT2 | INT4 | INT8 | OID => utf8(b)?
            .trim_matches(|c: char| c.is_ascii_whitespace())
            .parse::<i64>()
            .map(|v| Val::Int(i128::from(v)))
            .map_err(|_| "not an integer".to_string()),
        FLOAT4 if binary => Ok(Val::Float(f64::from(f32::from_be_bytes(be(b, "float4")?)))),
        FLOAT8 if binary => Ok(Val::Float(f64::from_be_bytes(be(b, "float8")?))),
        FLOAT4 | FLOAT8 => parse_float(utf8(b)?)
            .map(Val::Float)
            .ok_or_else(|| "not a floating-point number".to_string()),
        NUMERIC if binary => Numeric::decode_binary(b).map(Val::Num),
        NUMERIC => Numeric::parse_text(utf8(b)?)
            .map(Val::Num)
            .ok_or_else(|| "not a numeric value".to_string()),
        BOOL if binary => match b.as_ref() {
            [0] => Ok(Val::Bool(false)),
            [1] => Ok(Val::Bool(true)),
            _ => Err("binary bool must be one byte 0 or 1".into()),
        },
        BOOL => match b.as_ref() {
            b"t" => Ok(Val::Bool(true)),
            b"f" => Ok(Val::Bool(false)),
            _ => Err("text bool must be t or f".into()),
        },
        DATE if binary => Ok(Val::Time(i64::from(i32::from_be_bytes(be(b, "date")?)))),
        DATE => date_text(utf8(b)?).map(Val::Time),
        TIME | TIMESTAMP | TIMESTAMPTZ if binary => {
            Ok(Val::Time(i64::from_be_bytes(be(b, "time/timestamp")?)))
        }
        TIME => parse_time(utf8(b)?)
            .map(Val::Time)
            .ok_or_else(|| "time is not HH:MM:SS[.ffffff]".to_string()),
        TIMESTAMP | TIMESTAMPTZ => parse_timestamp(utf8(b)?, col.type_oid == TIMESTAMPTZ)
            .map(Val::Time)
            .ok_or_else(|| "timestamp is not in ISO format (DateStyle ISO)".to_string()),
        UUID if binary => Ok(Val::Uuid(be(b, "uuid")?)),
        UUID => uuid_text(b).map(Val::Uuid),
        BPCHAR => {
            // Trailing blanks are insignificant for character(n).
            let end = b.iter().rposition(|c| *c != b' ').map_or(0, |p| p + 1);
            Ok(Val::Bytes(b.slice(..end)))
        }
        TEXT | VARCHAR | NAME | CHAR | UNKNOWN | BYTEA => Ok(Val::Bytes(b.clone())),
        _ => Ok(Val::Bytes(b.clone())),
    }
}

/// A text `date` (ISO DateStyle, or `±infinity`) as days, infinities at the extremes.
fn date_text(s: &str) -> Result<i64, String> {
    match s {
        "infinity" => Ok(i64::MAX),
        "-infinity" => Ok(i64::MIN),
        _ => parse_date(s).ok_or_else(|| "date is not in ISO format (DateStyle ISO)".to_string()),
    }
}

/// A text `uuid` (hyphens anywhere, 32 hex digits) as its 16 bytes.
fn uuid_text(b: &[u8]) -> Result<[u8; 16], String> {
    let hex: Vec<u8> = b.iter().copied().filter(|c| *c != b'-').collect();
    if hex.len() != 32 {
        return Err("uuid text must have 32 hex digits".into());
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = utf8(pair)?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| "uuid has a non-hex digit")?;
    }
    Ok(out)
}

fn decode_cell(columns: &[Column], idx: usize, cell: &Option<Bytes>) -> Result<KeyVal, MergeError> {
    match cell {
        None => Ok(KeyVal(None)),
        Some(b) => {
            let col = columns[idx];
            decode(col, b)
                .map(|v| KeyVal(Some(v)))
                .map_err(|reason| MergeError::Decode {
                    column: idx,
                    type_oid: col.type_oid,
                    reason,
                })
        }
    }
}

// ---------------------------------------------------------------------------------------
// Encoding merged aggregates

fn encode_int(col: Column, v: i128) -> Result<Bytes, MergeError> {
    let (name, lo, hi) = match col.type_oid {
        INT2 => ("smallint", i128::from(i16::MIN), i128::from(i16::MAX)),
        INT4 => ("integer", i128::from(i32::MIN), i128::from(i32::MAX)),
        OID => ("oid", 0, i128::from(u32::MAX)),
        _ => ("bigint", i128::from(i64::MIN), i128::from(i64::MAX)),
    };
    if v < lo || v > hi {
        return Err(MergeError::OutOfRange(name));
    }
    if col.format != 1 {
        return Ok(Bytes::from(v.to_string()));
    }
    // In range, so these conversions are exact.
    Ok(Bytes::from(match col.type_oid {
        INT2 => (v as i16).to_be_bytes().to_vec(),
        INT4 => (v as i32).to_be_bytes().to_vec(),
        OID => (v as u32).to_be_bytes().to_vec(),
        _ => (v as i64).to_be_bytes().to_vec(),
    }))
}

fn encode_numeric(col: Column, n: &Numeric) -> Result<Bytes, MergeError> {
    if col.format == 1 {
        n.encode_binary().map(Bytes::from)
    } else {
        Ok(Bytes::from(n.to_text()))
    }
}

fn encode_float(col: Column, v: f64) -> Bytes {
    match (col.type_oid, col.format) {
        (FLOAT4, 1) => Bytes::from((v as f32).to_be_bytes().to_vec()),
        (FLOAT4, _) => Bytes::from(float4_text(v as f32)),
        (_, 1) => Bytes::from(v.to_be_bytes().to_vec()),
        _ => Bytes::from(float8_text(v)),
    }
}

// ---------------------------------------------------------------------------------------
// Aggregate state

#[derive(Debug, Clone)]
enum Sum {
    Int(i128),
    Num(Numeric),
    F32(f32),
    F64(f64),
}

#[derive(Debug, Clone)]
enum Acc {
    /// First value seen (`None` until a row arrives).
    Key(Option<Option<Bytes>>),
    Count(i128),
    Sum(Option<Sum>),
    Min(Option<(Val, Bytes)>),
    Max(Option<(Val, Bytes)>),
    Avg,
}

fn add_sum(acc: Option<Sum>, v: Val, oid: u32) -> Result<Option<Sum>, MergeError> {
    let next = match (acc, v) {
        (None, Val::Int(i)) => Sum::Int(i),
        (None, Val::Num(n)) => Sum::Num(n),
        (None, Val::Float(f)) if oid == FLOAT4 => Sum::F32(f as f32),
        (None, Val::Float(f)) => Sum::F64(f),
        (Some(Sum::Int(a)), Val::Int(b)) => {
            Sum::Int(a.checked_add(b).ok_or(MergeError::OutOfRange("bigint"))?)
        }
        (Some(Sum::Num(a)), Val::Num(b)) => Sum::Num(num_add(&a, &b)),
        (Some(Sum::F32(a)), Val::Float(b)) => Sum::F32(a + b as f32),
        (Some(Sum::F64(a)), Val::Float(b)) => Sum::F64(a + b),
        _ => {
            return Err(MergeError::UnsupportedType {
                op: "sum",
                type_oid: oid,
            })
        }
    };
    Ok(Some(next))
}

/// PostgreSQL numeric addition with special values.
fn num_add(a: &Numeric, b: &Numeric) -> Numeric {
    match (a, b) {
        (Numeric::NaN, _) | (_, Numeric::NaN) => Numeric::NaN,
        (Numeric::PosInf, Numeric::NegInf) | (Numeric::NegInf, Numeric::PosInf) => Numeric::NaN,
        (Numeric::PosInf, _) | (_, Numeric::PosInf) => Numeric::PosInf,
        (Numeric::NegInf, _) | (_, Numeric::NegInf) => Numeric::NegInf,
        (Numeric::Fin(x), Numeric::Fin(y)) => Numeric::Fin(x.add(y)),
    }
}

// ---------------------------------------------------------------------------------------
// The merger

#[derive(Debug, Clone, Copy)]
struct Key {
    column: usize,
    descending: bool,
    nulls_first: bool,
}

/// Accumulates the rows of every shard and produces the merged result. Feed it every
/// DataRow of every shard with [`Merger::push`], then call [`Merger::finish`].
///
/// Aggregating, it holds one accumulator per group; otherwise it holds the rows (all of
/// them without a LIMIT), which is why scatter reads use [`Stream`] and only a broadcast
/// write's RETURNING rows are still merged here.
#[derive(Debug)]
pub struct Merger {
    columns: Vec<Column>,
    visible: usize,
    order: Vec<Key>,
    limit: Option<u64>,
    offset: u64,
    distinct: bool,
    aggregates: Vec<ColumnMerge>,
    group_by: Vec<usize>,
    /// A spec/columns mismatch found in `new`, reported by the first `push`/`finish`.
    init_error: Option<MergeError>,
    /// Plain mode: rows with their decoded sort keys.
    rows: Vec<(Vec<KeyVal>, Row)>,
    /// Aggregating mode.
    groups: BTreeMap<Vec<KeyVal>, Vec<Acc>>,
}

impl Merger {
    /// `columns` is the shard RowDescription (hidden columns included).
    ///
    /// Never fails: a spec that doesn't fit the columns (a router bug, or shards whose
    /// schemas differ) is kept and reported by the first [`Merger::push`] or
    /// [`Merger::finish`], where the caller already handles merge errors.
    pub fn new(spec: &MergeSpec, columns: Vec<Column>) -> Merger {
        let visible = columns.len().checked_sub(spec.hidden_columns);
        let order = order_keys(spec, visible.unwrap_or(0));
        let init_error = check_spec(spec, &columns, visible, &order).err();
        Merger {
            columns,
            visible: visible.unwrap_or(0),
            order,
            limit: spec.limit,
            offset: spec.offset,
            distinct: spec.distinct,
            aggregates: spec.aggregates.clone(),
            group_by: spec.group_by.clone(),
            init_error,
            rows: Vec::new(),
            groups: BTreeMap::new(),
        }
    }

    /// Columns left after hidden ones are cut (what the client's RowDescription has).
    pub fn visible_columns(&self) -> usize {
        self.visible
    }

    /// Rows worth keeping in plain mode with a limit: `limit + offset`.
    fn keep(&self) -> Option<usize> {
        if self.distinct || !self.aggregates.is_empty() {
            return None;
        }
        let l = self.limit?;
        Some(usize::try_from(l.saturating_add(self.offset)).unwrap_or(usize::MAX))
    }

    /// Adds one row from any shard.
    pub fn push(&mut self, row: Row) -> Result<(), MergeError> {
        if let Some(e) = &self.init_error {
            return Err(e.clone());
        }
        if row.len() != self.columns.len() {
            return Err(MergeError::ColumnCount {
                expected: self.columns.len(),
                got: row.len(),
            });
        }
        if self.aggregates.is_empty() {
            return self.push_plain(row);
        }
        let key = self
            .group_by
            .iter()
            .map(|&g| decode_cell(&self.columns, g, &row[g]))
            .collect::<Result<Vec<_>, _>>()?;
        if !self.groups.contains_key(&key) {
            let fresh = self.fresh_accs();
            self.groups.insert(key.clone(), fresh);
        }
        let columns = &self.columns;
        let Some(accs) = self.groups.get_mut(&key) else {
            return Ok(());
        };
        for (i, cell) in row.into_iter().enumerate() {
            let col = columns[i];
            let acc = &mut accs[i];
            match acc {
                Acc::Key(first) => {
                    if first.is_none() {
                        *first = Some(cell);
                    }
                }
                Acc::Avg => {}
                Acc::Count(total) => {
                    if let KeyVal(Some(Val::Int(n))) = decode_cell(columns, i, &cell)? {
                        *total += n;
                    }
                }
                Acc::Sum(s) => {
                    if let KeyVal(Some(v)) = decode_cell(columns, i, &cell)? {
                        *s = add_sum(s.take(), v, col.type_oid)?;
                    }
                }
                Acc::Min(best) | Acc::Max(best) => {
                    let want = if matches!(accs_kind(&self.aggregates, i), ColumnMerge::Min) {
                        Ordering::Less
                    } else {
                        Ordering::Greater
                    };
                    if let (KeyVal(Some(v)), Some(raw)) = (decode_cell(columns, i, &cell)?, cell) {
                        let replace = match best {
                            None => true,
                            Some((cur, _)) => v.cmp(cur) == want,
                        };
                        if replace {
                            *best = Some((v, raw));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn fresh_accs(&self) -> Vec<Acc> {
        self.aggregates
            .iter()
            .map(|a| match a {
                ColumnMerge::Key => Acc::Key(None),
                ColumnMerge::Count => Acc::Count(0),
                ColumnMerge::Sum => Acc::Sum(None),
                ColumnMerge::Min => Acc::Min(None),
                ColumnMerge::Max => Acc::Max(None),
                ColumnMerge::Avg { .. } => Acc::Avg,
            })
            .collect()
    }

    fn sort_keys(&self, row: &Row) -> Result<Vec<KeyVal>, MergeError> {
        self.order
            .iter()
            .map(|k| decode_cell(&self.columns, k.column, &row[k.column]))
            .collect()
    }

    fn push_plain(&mut self, row: Row) -> Result<(), MergeError> {
        let keys = self.sort_keys(&row)?;
        if self.distinct {
            // Validate now so bad bytes fail early, not at finish.
            for (i, cell) in row.iter().enumerate().take(self.visible) {
                decode_cell(&self.columns, i, cell)?;
            }
        }
        match self.keep() {
            Some(keep) if self.order.is_empty() => {
                // No order: any `keep` rows are a correct answer.
                if self.rows.len() < keep {
                    self.rows.push((keys, row));
                }
            }
            Some(keep) => {
                self.rows.push((keys, row));
                if self.rows.len() >= keep.saturating_mul(2).max(64) {
                    self.sort_rows();
                    self.rows.truncate(keep);
                }
            }
            None => self.rows.push((keys, row)),
        }
        Ok(())
    }

    fn compare(order: &[Key], a: &[KeyVal], b: &[KeyVal]) -> Ordering {
        for (k, (x, y)) in order.iter().zip(a.iter().zip(b.iter())) {
            let o = match (&x.0, &y.0) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => {
                    if k.nulls_first {
                        Ordering::Less
                    } else {
                        Ordering::Greater
                    }
                }
                (Some(_), None) => {
                    if k.nulls_first {
                        Ordering::Greater
                    } else {
                        Ordering::Less
                    }
                }
                (Some(p), Some(q)) => {
                    let o = p.cmp(q);
                    if k.descending {
                        o.reverse()
                    } else {
                        o
                    }
                }
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    fn sort_rows(&mut self) {
        if self.order.is_empty() {
            return;
        }
        let order = &self.order;
        self.rows.sort_by(|a, b| Self::compare(order, &a.0, &b.0));
    }

    /// Finishes the merge: the result rows, hidden columns removed.
    pub fn finish(mut self) -> Result<Vec<Row>, MergeError> {
        if let Some(e) = self.init_error.take() {
            return Err(e);
        }
        if !self.aggregates.is_empty() {
            if self.groups.is_empty() && self.group_by.is_empty() {
                let fresh = self.fresh_accs();
                self.groups.insert(Vec::new(), fresh);
            }
            let groups = std::mem::take(&mut self.groups);
            let mut rows = Vec::with_capacity(groups.len());
            for accs in groups.into_values() {
                let row = self.finish_group(&accs)?;
                let keys = self.sort_keys(&row)?;
                rows.push((keys, row));
            }
            self.rows = rows;
        }
        if self.distinct {
            let mut seen = BTreeSet::new();
            let mut kept = Vec::with_capacity(self.rows.len());
            for (keys, row) in std::mem::take(&mut self.rows) {
                let ident = (0..self.visible)
                    .map(|i| decode_cell(&self.columns, i, &row[i]))
                    .collect::<Result<Vec<_>, _>>()?;
                if seen.insert(ident) {
                    kept.push((keys, row));
                }
            }
            self.rows = kept;
        }
        self.sort_rows();
        let offset = usize::try_from(self.offset).unwrap_or(usize::MAX);
        let limit = self
            .limit
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let visible = self.visible;
        Ok(self
            .rows
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|(_, mut row)| {
                row.truncate(visible);
                row
            })
            .collect())
    }

    fn finish_group(&self, accs: &[Acc]) -> Result<Row, MergeError> {
        let mut out: Row = Vec::with_capacity(accs.len());
        for (i, acc) in accs.iter().enumerate() {
            let col = self.columns[i];
            let cell = match acc {
                Acc::Key(first) => first.clone().flatten(),
                Acc::Count(n) => Some(encode_int(col, *n)?),
                Acc::Sum(None) => None,
                Acc::Sum(Some(s)) => Some(match s {
                    Sum::Int(v) => encode_int(col, *v)?,
                    Sum::Num(n) => encode_numeric(col, n)?,
                    Sum::F32(f) => encode_float(col, f64::from(*f)),
                    Sum::F64(f) => encode_float(col, *f),
                }),
                Acc::Min(best) | Acc::Max(best) => best.as_ref().map(|(_, raw)| raw.clone()),
                Acc::Avg => match self.aggregates[i] {
                    ColumnMerge::Avg { sum_col, count_col } => {
                        self.avg(col, accs.get(sum_col), accs.get(count_col))?
                    }
                    _ => None,
                },
            };
            out.push(cell);
        }
        Ok(out)
    }

    fn avg(
        &self,
        col: Column,
        sum: Option<&Acc>,
        count: Option<&Acc>,
    ) -> Result<Option<Bytes>, MergeError> {
        let n = match count {
            Some(Acc::Count(n)) => *n,
            _ => return Err(MergeError::Spec("avg without a count column".into())),
        };
        let sum = match sum {
            Some(Acc::Sum(s)) => s,
            _ => return Err(MergeError::Spec("avg without a sum column".into())),
        };
        let Some(sum) = sum else { return Ok(None) };
        if n == 0 {
            return Ok(None);
        }
        match col.type_oid {
            NUMERIC => {
                let s = match sum {
                    Sum::Int(v) => Numeric::Fin(Dec::from_int(*v)),
                    Sum::Num(n) => n.clone(),
                    Sum::F32(_) | Sum::F64(_) => {
                        return Err(MergeError::UnsupportedType {
                            op: "avg",
                            type_oid: col.type_oid,
                        })
                    }
                };
                let q = match s {
                    Numeric::Fin(d) => Numeric::Fin(d.div_pg(&Dec::from_int(n))),
                    other => other,
                };
                encode_numeric(col, &q).map(Some)
            }
            _ => {
                let s = match sum {
                    Sum::Int(v) => *v as f64,
                    Sum::Num(Numeric::Fin(d)) => d.to_f64(),
                    Sum::Num(Numeric::PosInf) => f64::INFINITY,
                    Sum::Num(Numeric::NegInf) => f64::NEG_INFINITY,
                    Sum::Num(Numeric::NaN) => f64::NAN,
                    Sum::F32(f) => f64::from(*f),
                    Sum::F64(f) => *f,
                };
                Ok(Some(encode_float(col, s / n as f64)))
            }
        }
    }
}

/// The sort keys as shard-row column indexes: with [`MergeSpec::order_by_hidden`] they
/// count from the first hidden column, which only the row width tells.
fn order_keys(spec: &MergeSpec, visible: usize) -> Vec<Key> {
    spec.order_by
        .iter()
        .map(|k| Key {
            column: if spec.order_by_hidden {
                visible + k.column
            } else {
                k.column
            },
            descending: k.descending,
            nulls_first: k.nulls_first,
        })
        .collect()
}

/// Whether `spec` fits rows shaped like `columns` (`visible`: the width without hidden
/// columns, `None` if there are fewer columns than hidden ones): the first mismatch.
fn check_spec(
    spec: &MergeSpec,
    columns: &[Column],
    visible: Option<usize>,
    order: &[Key],
) -> Result<(), MergeError> {
    let width = columns.len();
    if visible.is_none() {
        return Err(MergeError::Spec(format!(
            "{} hidden columns but rows have only {width}",
            spec.hidden_columns
        )));
    }
    let in_range = |what: &str, idx: usize| {
        if idx >= width {
            return Err(MergeError::Spec(format!(
                "{what} refers to column {idx}, rows have {width}"
            )));
        }
        Ok(())
    };
    for k in order {
        in_range("ORDER BY", k.column)?;
    }
    for &g in &spec.group_by {
        in_range("GROUP BY", g)?;
    }
    if spec.aggregates.is_empty() {
        return Ok(());
    }
    if spec.aggregates.len() != width {
        return Err(MergeError::Spec(format!(
            "{} aggregate entries for {width} columns",
            spec.aggregates.len()
        )));
    }
    for (i, a) in spec.aggregates.iter().enumerate() {
        check_aggregate(&spec.aggregates, i, *a, columns[i].type_oid)?;
    }
    for &g in &spec.group_by {
        if spec.aggregates.get(g) != Some(&ColumnMerge::Key) {
            return Err(MergeError::Spec(format!(
                "GROUP BY column {g} is an aggregate"
            )));
        }
    }
    Ok(())
}

/// Whether column `i`'s merge `a` can be computed over values of type `oid` (and an avg's
/// helper columns are a sum and a count).
fn check_aggregate(
    aggregates: &[ColumnMerge],
    i: usize,
    a: ColumnMerge,
    oid: u32,
) -> Result<(), MergeError> {
    let unsupported = |op| Err(MergeError::UnsupportedType { op, type_oid: oid });
    match a {
        ColumnMerge::Avg { sum_col, count_col } => {
            let bad = |c: usize, want: ColumnMerge| aggregates.get(c) != Some(&want);
            if bad(sum_col, ColumnMerge::Sum) || bad(count_col, ColumnMerge::Count) {
                return Err(MergeError::Spec(format!(
                    "avg column {i} needs a sum and a count column"
                )));
            }
            if !matches!(oid, NUMERIC | FLOAT8 | FLOAT4) {
                return unsupported("avg");
            }
        }
        ColumnMerge::Count if !is_int(oid) => return unsupported("count"),
        ColumnMerge::Sum if !(is_int(oid) || matches!(oid, NUMERIC | FLOAT4 | FLOAT8)) => {
            return unsupported("sum")
        }
        _ => {}
    }
    Ok(())
}

fn accs_kind(aggs: &[ColumnMerge], i: usize) -> ColumnMerge {
    aggs.get(i).copied().unwrap_or(ColumnMerge::Key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }
    fn b(v: &[u8]) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(v))
    }
    fn text(oid: u32) -> Column {
        Column {
            type_oid: oid,
            format: 0,
        }
    }
    fn bin(oid: u32) -> Column {
        Column {
            type_oid: oid,
            format: 1,
        }
    }
    fn strs(rows: &[Row]) -> Vec<Vec<Option<String>>> {
        rows.iter()
            .map(|r| {
                r.iter()
                    .map(|c| c.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
                    .collect()
            })
            .collect()
    }
    fn key(column: usize, descending: bool) -> OrderKey {
        // PostgreSQL defaults: NULLS LAST for ASC, FIRST for DESC.
        OrderKey {
            column,
            descending,
            nulls_first: descending,
        }
    }
    fn run(spec: &MergeSpec, cols: Vec<Column>, rows: Vec<Row>) -> Result<Vec<Row>, MergeError> {
        let mut m = Merger::new(spec, cols);
        for r in rows {
            m.push(r)?;
        }
        m.finish()
    }
    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn concatenation_keeps_all_rows() {
        let spec = MergeSpec::default();
        let out = run(
            &spec,
            vec![text(TEXT)],
            vec![vec![t("a")], vec![t("b")], vec![None]],
        )
        .unwrap();
        assert_eq!(strs(&out), vec![vec![s("a")], vec![s("b")], vec![None]]);
    }

    #[test]
    fn order_by_int_text_numeric_not_bytewise() {
        let spec = MergeSpec {
            order_by: vec![key(0, false)],
            ..Default::default()
        };
        let rows = vec![vec![t("10")], vec![t("9")], vec![t("-3")], vec![t("100")]];
        let out = run(&spec, vec![text(INT8)], rows.clone()).unwrap();
        assert_eq!(
            strs(&out),
            vec![vec![s("-3")], vec![s("9")], vec![s("10")], vec![s("100")]]
        );
        let out = run(
            &spec,
            vec![text(NUMERIC)],
            vec![
                vec![t("10.5")],
                vec![t("9.75")],
                vec![t("NaN")],
                vec![t("-Infinity")],
            ],
        )
        .unwrap();
        assert_eq!(
            strs(&out),
            vec![
                vec![s("-Infinity")],
                vec![s("9.75")],
                vec![s("10.5")],
                vec![s("NaN")]
            ]
        );
        // Text is bytewise (C collation).
        let out = run(
            &spec,
            vec![text(TEXT)],
            vec![vec![t("b")], vec![t("B")], vec![t("a")]],
        )
        .unwrap();
        assert_eq!(strs(&out), vec![vec![s("B")], vec![s("a")], vec![s("b")]]);
    }

    #[test]
    fn order_by_nulls_and_desc() {
        let rows = || vec![vec![t("2")], vec![None], vec![t("1")], vec![t("3")]];
        let asc = MergeSpec {
            order_by: vec![key(0, false)],
            ..Default::default()
        };
        assert_eq!(
            strs(&run(&asc, vec![text(INT4)], rows()).unwrap()),
            vec![vec![s("1")], vec![s("2")], vec![s("3")], vec![None]]
        );
        let desc = MergeSpec {
            order_by: vec![key(0, true)],
            ..Default::default()
        };
        assert_eq!(
            strs(&run(&desc, vec![text(INT4)], rows()).unwrap()),
            vec![vec![None], vec![s("3")], vec![s("2")], vec![s("1")]]
        );
        let asc_nf = MergeSpec {
            order_by: vec![OrderKey {
                column: 0,
                descending: false,
                nulls_first: true,
            }],
            ..Default::default()
        };
        assert_eq!(
            strs(&run(&asc_nf, vec![text(INT4)], rows()).unwrap()),
            vec![vec![None], vec![s("1")], vec![s("2")], vec![s("3")]]
        );
        let desc_nl = MergeSpec {
            order_by: vec![OrderKey {
                column: 0,
                descending: true,
                nulls_first: false,
            }],
            ..Default::default()
        };
        assert_eq!(
            strs(&run(&desc_nl, vec![text(INT4)], rows()).unwrap()),
            vec![vec![s("3")], vec![s("2")], vec![s("1")], vec![None]]
        );
    }

    #[test]
    fn order_by_multiple_keys_and_offset_limit() {
        let spec = MergeSpec {
            order_by: vec![key(0, false), key(1, true)],
            limit: Some(3),
            offset: 2,
            ..Default::default()
        };
        let mut rows = Vec::new();
        for shard in 0..3 {
            for i in 0..5 {
                rows.push(vec![t(&(i % 3).to_string()), t(&format!("{shard}{i}"))]);
            }
        }
        let out = run(&spec, vec![text(INT4), text(TEXT)], rows.clone()).unwrap();
        // Sorted: group 0: 23,20,13,10,03,00 ; take offset 2 → 13,10,03
        assert_eq!(
            strs(&out),
            vec![
                vec![s("0"), s("13")],
                vec![s("0"), s("10")],
                vec![s("0"), s("03")]
            ]
        );
        // Same answer with many more rows than limit+offset (pruning path).
        let mut many = rows.clone();
        for i in 0..500 {
            many.push(vec![t("5"), t(&format!("x{i}"))]);
        }
        let out2 = run(&spec, vec![text(INT4), text(TEXT)], many).unwrap();
        assert_eq!(out, out2);
        // Offset beyond the end.
        let far = MergeSpec {
            offset: 100,
            ..spec.clone()
        };
        assert!(run(&far, vec![text(INT4), text(TEXT)], rows)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn limit_without_order() {
        let spec = MergeSpec {
            limit: Some(2),
            ..Default::default()
        };
        let out = run(
            &spec,
            vec![text(INT4)],
            (0..10).map(|i| vec![t(&i.to_string())]).collect(),
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        let spec = MergeSpec {
            limit: Some(0),
            ..Default::default()
        };
        assert!(run(&spec, vec![text(INT4)], vec![vec![t("1")]])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn binary_ints_floats_timestamps() {
        let spec = MergeSpec {
            order_by: vec![key(0, false)],
            ..Default::default()
        };
        let out = run(
            &spec,
            vec![bin(INT8)],
            vec![
                vec![b(&5i64.to_be_bytes())],
                vec![b(&(-5i64).to_be_bytes())],
                vec![b(&300i64.to_be_bytes())],
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            vec![
                vec![b(&(-5i64).to_be_bytes())],
                vec![b(&5i64.to_be_bytes())],
                vec![b(&300i64.to_be_bytes())]
            ]
        );
        let out = run(
            &spec,
            vec![bin(FLOAT8)],
            vec![
                vec![b(&f64::NAN.to_be_bytes())],
                vec![b(&1.5f64.to_be_bytes())],
                vec![b(&f64::INFINITY.to_be_bytes())],
                vec![b(&(-2.0f64).to_be_bytes())],
            ],
        )
        .unwrap();
        let vals: Vec<f64> = out
            .iter()
            .map(|r| f64::from_be_bytes(r[0].as_ref().unwrap()[..].try_into().unwrap()))
            .collect();
        assert_eq!(vals[..3], [-2.0, 1.5, f64::INFINITY]);
        assert!(vals[3].is_nan());
        let out = run(
            &spec,
            vec![bin(TIMESTAMPTZ)],
            vec![
                vec![b(&10i64.to_be_bytes())],
                vec![b(&(-10i64).to_be_bytes())],
            ],
        )
        .unwrap();
        assert_eq!(out[0][0], b(&(-10i64).to_be_bytes()));
        let out = run(
            &spec,
            vec![bin(INT2)],
            vec![
                vec![b(&7i16.to_be_bytes())],
                vec![b(&(-7i16).to_be_bytes())],
            ],
        )
        .unwrap();
        assert_eq!(out[0][0], b(&(-7i16).to_be_bytes()));
    }

    #[test]
    fn text_timestamps_dates_with_offsets_and_bc() {
        let spec = MergeSpec {
            order_by: vec![key(0, false)],
            ..Default::default()
        };
        let rows = vec![
            vec![t("2024-01-01 10:00:00+02")],
            vec![t("2024-01-01 09:30:00.5+00")],
            vec![t("2024-01-01 09:00:00+00")],
            vec![t("infinity")],
            vec![t("0044-03-15 12:00:00+00 BC")],
        ];
        let out = run(&spec, vec![text(TIMESTAMPTZ)], rows).unwrap();
        assert_eq!(
            strs(&out),
            vec![
                vec![s("0044-03-15 12:00:00+00 BC")],
                vec![s("2024-01-01 10:00:00+02")], // 08:00 UTC
                vec![s("2024-01-01 09:00:00+00")],
                vec![s("2024-01-01 09:30:00.5+00")],
                vec![s("infinity")],
            ]
        );
        let out = run(
            &spec,
            vec![text(TIMESTAMP)],
            vec![
                vec![t("2024-01-01 09:00:00.25")],
                vec![t("2024-01-01 09:00:00")],
                vec![t("1999-12-31 23:59:59.999999")],
            ],
        )
        .unwrap();
        assert_eq!(strs(&out)[0][0], s("1999-12-31 23:59:59.999999"));
        assert_eq!(strs(&out)[1][0], s("2024-01-01 09:00:00"));
        let out = run(
            &spec,
            vec![text(DATE)],
            vec![
                vec![t("2024-02-01")],
                vec![t("2023-12-31")],
                vec![t("-infinity")],
            ],
        )
        .unwrap();
        assert_eq!(
            strs(&out),
            vec![
                vec![s("-infinity")],
                vec![s("2023-12-31")],
                vec![s("2024-02-01")]
            ]
        );
        // Non-ISO DateStyle is refused rather than misordered.
        let err = run(
            &spec,
            vec![text(TIMESTAMPTZ)],
            vec![vec![t("Mon Jan 01 09:00:00 2024 UTC")]],
        )
        .unwrap_err();
        assert!(matches!(
            err,
            MergeError::Decode {
                column: 0,
                type_oid: TIMESTAMPTZ,
                ..
            }
        ));
        // Text date and binary date agree on the epoch.
        assert_eq!(parse_date("2000-01-01"), Some(0));
        assert_eq!(
            parse_timestamp("2000-01-01 00:00:01+00", true),
            Some(1_000_000)
        );
    }

    #[test]
    fn bool_uuid_bpchar() {
        let spec = MergeSpec {
            order_by: vec![key(0, false)],
            ..Default::default()
        };
        let out = run(&spec, vec![text(BOOL)], vec![vec![t("t")], vec![t("f")]]).unwrap();
        assert_eq!(strs(&out), vec![vec![s("f")], vec![s("t")]]);
        let out = run(
            &spec,
            vec![text(UUID)],
            vec![
                vec![t("ff000000-0000-0000-0000-000000000000")],
                vec![t("0A000000-0000-0000-0000-000000000000")],
            ],
        )
        .unwrap();
        assert_eq!(strs(&out)[0][0], s("0A000000-0000-0000-0000-000000000000"));
        let distinct = MergeSpec {
            distinct: true,
            ..Default::default()
        };
        let out = run(
            &distinct,
            vec![text(BPCHAR)],
            vec![vec![t("ab  ")], vec![t("ab")]],
        )
        .unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn distinct_across_shards_by_value() {
        let spec = MergeSpec {
            distinct: true,
            order_by: vec![key(0, false)],
            ..Default::default()
        };
        let rows = vec![
            vec![t("1.0")],
            vec![t("2")],
            vec![t("1.00")],
            vec![None],
            vec![None],
            vec![t("2")],
        ];
        let out = run(&spec, vec![text(NUMERIC)], rows).unwrap();
        assert_eq!(strs(&out), vec![vec![s("1.0")], vec![s("2")], vec![None]]);
        // Distinct + limit: duplicates must not eat the limit.
        let spec = MergeSpec {
            distinct: true,
            limit: Some(2),
            order_by: vec![key(0, false)],
            ..Default::default()
        };
        let rows = vec![
            vec![t("1")],
            vec![t("1")],
            vec![t("1")],
            vec![t("2")],
            vec![t("3")],
        ];
        assert_eq!(
            strs(&run(&spec, vec![text(INT4)], rows).unwrap()),
            vec![vec![s("1")], vec![s("2")]]
        );
    }

    fn agg_spec(aggs: Vec<ColumnMerge>, hidden: usize) -> MergeSpec {
        MergeSpec {
            aggregates: aggs,
            hidden_columns: hidden,
            ..Default::default()
        }
    }

    #[test]
    fn count_sum_min_max_without_group_by() {
        use ColumnMerge::*;
        let spec = agg_spec(vec![Count, Sum, Min, Max, Sum], 0);
        let cols = vec![
            text(INT8),
            text(INT8),
            text(TEXT),
            text(INT4),
            text(NUMERIC),
        ];
        let rows = vec![
            vec![t("3"), t("10"), t("b"), t("7"), t("1.5")],
            vec![t("0"), None, None, None, None],
            vec![t("2"), t("-4"), t("a"), t("9"), t("2.25")],
        ];
        let out = run(&spec, cols.clone(), rows).unwrap();
        assert_eq!(
            strs(&out),
            vec![vec![s("5"), s("6"), s("a"), s("9"), s("3.75")]]
        );
        // No rows at all: one row, count 0 and NULLs.
        let out = run(&spec, cols, vec![]).unwrap();
        assert_eq!(strs(&out), vec![vec![s("0"), None, None, None, None]]);
    }

    #[test]
    fn sum_bigint_overflow_is_an_error() {
        let spec = agg_spec(vec![ColumnMerge::Sum], 0);
        let max = i64::MAX.to_string();
        let err = run(&spec, vec![text(INT8)], vec![vec![t(&max)], vec![t("1")]]).unwrap_err();
        assert_eq!(err, MergeError::OutOfRange("bigint"));
        assert_eq!(err.to_string(), "bigint out of range");
        // sum(int8) is numeric in PostgreSQL and does not overflow.
        let out = run(
            &spec,
            vec![text(NUMERIC)],
            vec![vec![t(&max)], vec![t(&max)]],
        )
        .unwrap();
        assert_eq!(strs(&out)[0][0], s("18446744073709551614"));
    }

    #[test]
    fn avg_like_postgres() {
        use ColumnMerge::*;
        // SELECT avg(x) → shard SQL: SELECT avg(x), sum(x), count(x)
        let spec = agg_spec(
            vec![
                Avg {
                    sum_col: 1,
                    count_col: 2,
                },
                Sum,
                Count,
            ],
            2,
        );
        let cols = vec![text(NUMERIC), text(INT8), text(INT8)];
        // values 1 and 2 on two shards: avg = 1.5000000000000000
        let out = run(
            &spec,
            cols.clone(),
            vec![
                vec![t("1.0000000000000000"), t("1"), t("1")],
                vec![t("2.0000000000000000"), t("2"), t("1")],
            ],
        )
        .unwrap();
        assert_eq!(strs(&out), vec![vec![s("1.5000000000000000")]]);
        // 10/3
        let out = run(
            &spec,
            cols.clone(),
            vec![vec![t("5"), t("5"), t("1")], vec![t("2.5"), t("5"), t("2")]],
        )
        .unwrap();
        assert_eq!(strs(&out), vec![vec![s("3.3333333333333333")]]);
        // Large values: avg(1000000, 2000000) = 1500000.000000000000 (checked on PostgreSQL 15).
        let out = run(
            &spec,
            cols.clone(),
            vec![
                vec![t("x"), t("1000000"), t("1")],
                vec![t("x"), t("2000000"), t("1")],
            ],
        );
        // The visible avg cell from the shards is ignored, but it is not decoded either.
        assert_eq!(strs(&out.unwrap()), vec![vec![s("1500000.000000000000")]]);
        // Small: avg(0.001, 0.002) numeric = 0.00150000000000000000
        let cols_n = vec![text(NUMERIC), text(NUMERIC), text(INT8)];
        let out = run(
            &spec,
            cols_n.clone(),
            vec![
                vec![None, t("0.001"), t("1")],
                vec![None, t("0.002"), t("1")],
            ],
        )
        .unwrap();
        assert_eq!(strs(&out), vec![vec![s("0.00150000000000000000")]]);
        // Negative and rounding half away from zero: -2/3
        let out = run(&spec, cols.clone(), vec![vec![None, t("-2"), t("3")]]).unwrap();
        assert_eq!(strs(&out), vec![vec![s("-0.66666666666666666667")]]);
        // No rows → NULL.
        let out = run(&spec, cols.clone(), vec![vec![None, None, t("0")]]).unwrap();
        assert_eq!(strs(&out), vec![vec![None]]);
        // float8 avg
        let cols_f = vec![text(FLOAT8), text(FLOAT8), text(INT8)];
        let out = run(
            &spec,
            cols_f,
            vec![vec![None, t("1.5"), t("1")], vec![None, t("3"), t("2")]],
        )
        .unwrap();
        assert_eq!(strs(&out), vec![vec![s("1.5")]]);
        // numeric NaN propagates
        let out = run(
            &spec,
            cols_n,
            vec![vec![None, t("NaN"), t("1")], vec![None, t("1"), t("1")]],
        )
        .unwrap();
        assert_eq!(strs(&out), vec![vec![s("NaN")]]);
    }

    #[test]
    fn numeric_division_scale_rules() {
        let d = |s: &str| Dec::parse(s).unwrap();
        let q = |a: &str, b: &str| d(a).div_pg(&d(b)).to_text();
        // Values checked against PostgreSQL's numeric_div.
        assert_eq!(q("1", "3"), "0.33333333333333333333");
        assert_eq!(q("10", "4"), "2.5000000000000000");
        assert_eq!(q("12345678", "1"), "12345678.000000000000");
        assert_eq!(q("123456789", "1"), "123456789.000000000000");
        assert_eq!(q("0", "5"), "0.00000000000000000000");
        assert_eq!(q("1.123456789012345678901", "1"), "1.123456789012345678901");
        assert_eq!(q("2", "3"), "0.66666666666666666667");
    }

    #[test]
    fn group_by_merges_partial_groups() {
        use ColumnMerge::*;
        // SELECT status, count(*), sum(n), avg(n) ... GROUP BY status ORDER BY status
        let spec = MergeSpec {
            aggregates: vec![
                Key,
                Count,
                Sum,
                Avg {
                    sum_col: 4,
                    count_col: 5,
                },
                Sum,
                Count,
            ],
            group_by: vec![0],
            hidden_columns: 2,
            order_by: vec![key(0, false)],
            ..Default::default()
        };
        let cols = vec![
            text(TEXT),
            text(INT8),
            text(INT8),
            text(NUMERIC),
            text(INT8),
            text(INT8),
        ];
        let rows = vec![
            vec![t("open"), t("2"), t("10"), None, t("10"), t("2")],
            vec![t("done"), t("1"), t("1"), None, t("1"), t("1")],
            vec![t("open"), t("1"), t("5"), None, t("5"), t("1")],
            vec![None, t("4"), t("4"), None, t("4"), t("4")],
        ];
        let out = run(&spec, cols, rows).unwrap();
        assert_eq!(
            strs(&out),
            vec![
                vec![s("done"), s("1"), s("1"), s("1.00000000000000000000")],
                vec![s("open"), s("3"), s("15"), s("5.0000000000000000")],
                vec![None, s("4"), s("4"), s("1.00000000000000000000")],
            ]
        );
    }

    #[test]
    fn group_by_order_by_aggregate_and_limit() {
        use ColumnMerge::*;
        let spec = MergeSpec {
            aggregates: vec![Key, Count],
            group_by: vec![0],
            order_by: vec![key(1, true)],
            limit: Some(1),
            ..Default::default()
        };
        let rows = vec![
            vec![t("a"), t("2")],
            vec![t("b"), t("3")],
            vec![t("a"), t("2")],
        ];
        let out = run(&spec, vec![text(TEXT), text(INT8)], rows).unwrap();
        assert_eq!(strs(&out), vec![vec![s("a"), s("4")]]);
    }

    #[test]
    fn binary_aggregates_round_trip() {
        use ColumnMerge::*;
        let spec = agg_spec(
            vec![
                Count,
                Sum,
                Avg {
                    sum_col: 3,
                    count_col: 4,
                },
                Sum,
                Count,
            ],
            2,
        );
        let cols = vec![
            bin(INT8),
            bin(NUMERIC),
            bin(NUMERIC),
            bin(NUMERIC),
            bin(INT8),
        ];
        let n = |s: &str| b(&Numeric::parse_text(s).unwrap().encode_binary().unwrap());
        let rows = vec![
            vec![
                b(&2i64.to_be_bytes()),
                n("1.25"),
                None,
                n("1.25"),
                b(&2i64.to_be_bytes()),
            ],
            vec![
                b(&1i64.to_be_bytes()),
                n("100000.5"),
                None,
                n("100000.5"),
                b(&1i64.to_be_bytes()),
            ],
        ];
        let out = run(&spec, cols, rows).unwrap();
        assert_eq!(out[0][0], b(&3i64.to_be_bytes()));
        let dec = |c: &Option<Bytes>| {
            Numeric::decode_binary(c.as_ref().unwrap())
                .unwrap()
                .to_text()
        };
        assert_eq!(dec(&out[0][1]), "100001.75");
        assert_eq!(dec(&out[0][2]), "33333.916666666667");
        assert_eq!(out[0].len(), 3);
    }

    #[test]
    fn numeric_binary_codec() {
        for s in [
            "0",
            "0.00",
            "1",
            "-1",
            "12345.678",
            "10000",
            "0.0001",
            "-0.00012",
            "99999999.99999999",
            "NaN",
            "Infinity",
            "-Infinity",
            "123456789012345678901234567890.123",
        ] {
            let n = Numeric::parse_text(s).unwrap();
            let enc = n.encode_binary().unwrap();
            assert_eq!(Numeric::decode_binary(&enc).unwrap().to_text(), s, "{s}");
        }
        // Known wire bytes: 12345.678 = ndigits 3, weight 1, sign 0, dscale 3, digits 1 2345 6780
        let enc = Numeric::parse_text("12345.678")
            .unwrap()
            .encode_binary()
            .unwrap();
        assert_eq!(enc, [0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1A, 0x7C]);
        // Malformed.
        assert!(Numeric::decode_binary(&[0, 1]).is_err());
        assert!(Numeric::decode_binary(&[0, 2, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(Numeric::decode_binary(&[0, 1, 0, 0, 0x12, 0x34, 0, 0, 0, 1]).is_err());
        assert!(Numeric::decode_binary(&[0, 1, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF]).is_err());
        assert!(Numeric::decode_binary(&[0xFF, 0xFF, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn float_output_like_postgres() {
        assert_eq!(float8_text(1.5), "1.5");
        assert_eq!(float8_text(100.0), "100");
        assert_eq!(float8_text(1e20), "1e+20");
        assert_eq!(float8_text(123456789012345.0), "123456789012345");
        assert_eq!(float8_text(1234567890123456.0), "1.234567890123456e+15");
        assert_eq!(float8_text(0.0001), "0.0001");
        assert_eq!(float8_text(0.00001), "1e-05");
        assert_eq!(float8_text(-1.5e-7), "-1.5e-07");
        assert_eq!(float8_text(1e300), "1e+300");
        assert_eq!(float8_text(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(float8_text(f64::NAN), "NaN");
        assert_eq!(float8_text(f64::NEG_INFINITY), "-Infinity");
        assert_eq!(float8_text(-0.0), "-0");
        assert_eq!(float4_text(100000.0), "100000");
        assert_eq!(float4_text(1000000.0), "1e+06");
        assert_eq!(float4_text(1.1), "1.1");
        assert_eq!(float4_text(3.4028235e38), "3.4028235e+38");
    }

    #[test]
    fn float_sums() {
        let spec = agg_spec(vec![ColumnMerge::Sum], 0);
        let out = run(
            &spec,
            vec![text(FLOAT8)],
            vec![vec![t("0.1")], vec![t("0.2")]],
        )
        .unwrap();
        assert_eq!(strs(&out), vec![vec![s("0.30000000000000004")]]);
        let out = run(
            &spec,
            vec![text(FLOAT4)],
            vec![vec![t("1.5")], vec![t("Infinity")]],
        )
        .unwrap();
        assert_eq!(strs(&out), vec![vec![s("Infinity")]]);
        let out = run(
            &spec,
            vec![bin(FLOAT4)],
            vec![
                vec![b(&1.25f32.to_be_bytes())],
                vec![b(&2f32.to_be_bytes())],
            ],
        )
        .unwrap();
        assert_eq!(out, vec![vec![b(&3.25f32.to_be_bytes())]]);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let spec = MergeSpec {
            order_by: vec![key(0, false)],
            ..Default::default()
        };
        for (col, cell) in [
            (text(INT8), t("12x")),
            (text(INT8), b(&[0xFF, 0xFE])),
            (bin(INT8), b(&[1, 2, 3])),
            (bin(INT4), b(&[1, 2, 3, 4, 5])),
            (bin(FLOAT8), b(&[0; 3])),
            (text(FLOAT8), t("inf")),
            (text(NUMERIC), t("1e5")),
            (text(NUMERIC), t("--1")),
            (text(NUMERIC), t(".")),
            (bin(NUMERIC), b(&[0; 3])),
            (text(BOOL), t("yes")),
            (bin(BOOL), b(&[2])),
            (text(DATE), t("2024-13-01")),
            (text(TIMESTAMPTZ), t("2024-01-01 10:00:00")),
            (text(TIME), t("10:00")),
            (text(UUID), t("not-a-uuid")),
            (text(UUID), t("zz000000-0000-0000-0000-000000000000")),
            (bin(UUID), b(&[1, 2])),
        ] {
            let err = run(&spec, vec![col], vec![vec![t("1")], vec![cell.clone()]]);
            let err2 = run(&spec, vec![col], vec![vec![cell.clone()]]);
            assert!(err.is_err() || err2.is_err(), "{col:?} {cell:?} accepted");
        }
        // Wrong width.
        let mut m = Merger::new(&spec, vec![text(INT4)]);
        assert_eq!(
            m.push(vec![]).unwrap_err(),
            MergeError::ColumnCount {
                expected: 1,
                got: 0
            }
        );
        // Spec that doesn't fit.
        let bad = MergeSpec {
            order_by: vec![key(3, false)],
            ..Default::default()
        };
        let mut m = Merger::new(&bad, vec![text(INT4)]);
        assert!(matches!(m.push(vec![t("1")]), Err(MergeError::Spec(_))));
        assert!(matches!(
            Merger::new(&bad, vec![text(INT4)]).finish(),
            Err(MergeError::Spec(_))
        ));
        let bad = MergeSpec {
            hidden_columns: 2,
            ..Default::default()
        };
        assert!(Merger::new(&bad, vec![text(INT4)]).finish().is_err());
        let bad = agg_spec(vec![ColumnMerge::Sum], 0);
        assert_eq!(
            Merger::new(&bad, vec![text(TEXT)]).finish().unwrap_err(),
            MergeError::UnsupportedType {
                op: "sum",
                type_oid: TEXT
            }
        );
        let bad = agg_spec(
            vec![ColumnMerge::Avg {
                sum_col: 0,
                count_col: 0,
            }],
            0,
        );
        assert!(Merger::new(&bad, vec![text(NUMERIC)]).finish().is_err());
        let bad = agg_spec(vec![ColumnMerge::Count, ColumnMerge::Count], 0);
        assert!(Merger::new(&bad, vec![text(INT8)]).finish().is_err());
    }

    #[test]
    fn hidden_columns_are_stripped_and_star_relative_keys() {
        // SELECT * ... ORDER BY created_at: the router appended created_at as hidden col 0.
        let spec = MergeSpec {
            order_by: vec![key(0, true)],
            hidden_columns: 1,
            order_by_hidden: true,
            ..Default::default()
        };
        let cols = vec![text(TEXT), text(TEXT), text(INT4)];
        let mut m = Merger::new(&spec, cols);
        assert_eq!(m.visible_columns(), 2);
        m.push(vec![t("a"), t("x"), t("1")]).unwrap();
        m.push(vec![t("b"), t("y"), t("2")]).unwrap();
        let out = m.finish().unwrap();
        assert_eq!(strs(&out), vec![vec![s("b"), s("y")], vec![s("a"), s("x")]]);
    }
}
