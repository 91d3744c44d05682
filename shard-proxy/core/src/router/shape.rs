//! Statement shapes: a simple-protocol statement with its literals taken out, so that
//! statements differing only in their literal values share one analysis.
//!
//! Why: clients that inline values (`… WHERE performer_id = 42`, most ORMs, `pgbench -M
//! simple`) send a new SQL text for every statement; keyed by the exact text, the analysis
//! cache misses every time and the proxy tokenises and parses every statement in full —
//! most of its own CPU under such a workload (see `shard-proxy/BENCHMARKS.md`). Keyed by the
//! shape, the analysis of the first statement is reused for the rest, with the shard keys
//! read from the new statement's literals.
//!
//! Why it is safe, and where it is not used:
//! - The shape keeps every byte of the statement except the *values* of numeric and
//!   plain `'…'` string literals (each replaced by a marker saying which of the two it was),
//!   so two statements with one shape parse to the same tree up to those values.
//! - Statements the lexer cannot take apart with certainty have no shape: any `$` (dollar
//!   quotes, parameters), any comment (a `/* shard=… */` hint must never be shared), any
//!   prefixed string (`E'…'`, `B'…'`, `X'…'`, `U&'…'`), a control character, an unterminated
//!   literal or quoted name, a number running into a word.
//! - Only analyses whose every value-dependent part is the shard key are reused
//!   ([`Template::of`]): no LIMIT/OFFSET, no ORDER BY or GROUP BY (`ORDER BY 1` is an
//!   ordinal), no rewritten SQL for the shards, no multi-row INSERT, no key update, no
//!   refusal; and every key value must come from exactly one literal of the statement (so
//!   `performer_id = 5 AND creator_id = 5`, or keys narrowed by `AND`, are not reused).
//! - The new statement's key literals are read as the analysis reads them (a number's text
//!   parsed as `i64`, a string's trimmed text likewise); anything else falls back to a
//!   full analysis.

use std::sync::Arc;

use super::model::{Analysis, KeyExpr, KeyValue, StatementKind};

/// Marks a numeric literal in a shape.
const NUMBER: char = '\u{1}';
/// Marks a string literal in a shape.
const STRING: char = '\u{2}';

/// A literal of the statement: where its value's text lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Literal {
    /// Byte range of the value in the SQL (inside the quotes for a string).
    start: usize,
    end: usize,
    string: bool,
}

impl Literal {
    /// The value as the analysis would read it as a shard key, if it is one.
    fn key_value(&self, sql: &str) -> Option<i64> {
        let text = sql.get(self.start..self.end)?;
        if self.string {
            if text.contains('\'') {
                return None; // a doubled quote: not an integer
            }
            text.trim().parse().ok()
        } else {
            text.parse().ok()
        }
    }
}

/// A statement's shape and its literals, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) text: String,
    pub(crate) literals: Vec<Literal>,
}

/// Whether `b` belongs to a word (a letter, a digit, `_`, a non-ASCII byte): read from
/// [`CLASS`], so the two never disagree.
fn is_word_byte(b: u8) -> bool {
    matches!(CLASS[usize::from(b)], Class::Word | Class::Digit)
}

/// What a byte can start, to the shape lexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Nothing: copied as it is.
    Plain,
    /// A word (a letter, `_`, a non-ASCII byte): skipped whole, digits included.
    Word,
    /// A number literal (a digit not inside a word).
    Digit,
    /// A quote, `$`, `-`, `/` or a control character: looked at closely.
    Special,
}

/// [`Class`] by byte: one table load per byte for most of a statement. `shape_of` runs on
/// every simple-protocol statement of a sharded database; a `match` with guards per byte
/// was the largest part of the router's cost per statement.
const CLASS: [Class; 256] = {
    let mut t = [Class::Plain; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = if b.is_ascii_digit() {
            Class::Digit
        } else if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 {
            Class::Word
        } else if matches!(b, b'$' | b'-' | b'/' | b'"' | b'\'')
            || (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
        {
            Class::Special
        } else {
            Class::Plain
        };
        c += 1;
    }
    t
};

/// The shape of `sql`, or `None` when the lexer cannot be sure of it (module doc).
pub(crate) fn shape_of(sql: &str) -> Option<Shape> {
    let b = sql.as_bytes();
    let mut shape = ShapeBuilder::new(sql);
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match CLASS[usize::from(c)] {
            Class::Plain => i += 1,
            Class::Word => {
                // A whole word: a digit inside it (`tasks1`, `x2`) is not a number.
                i += 1;
                while b.get(i).is_some_and(|&n| is_word_byte(n)) {
                    i += 1;
                }
            }
            Class::Digit => {
                let end = number_end(b, i);
                if b.get(end).is_some_and(|&n| is_word_byte(n) || n == b'.') {
                    return None; // `5abc`, `1.2.3`: not a number we can be sure of
                }
                shape.literal(i, end, false);
                i = end;
            }
            Class::Special => i = special(b, i, &mut shape)?,
        }
    }
    shape.finish()
}

/// The lexer at a [`Class::Special`] byte `b[i]`: the index after what it starts, or
/// `None` if the statement has no shape.
fn special(b: &[u8], i: usize, shape: &mut ShapeBuilder) -> Option<usize> {
    match b[i] {
        b'$' => None,
        b'-' if b.get(i + 1) == Some(&b'-') => None,
        b'/' if b.get(i + 1) == Some(&b'*') => None,
        b'-' | b'/' => Some(i + 1),
        // A quoted name, copied as it is ("" inside is a quote).
        b'"' => closing(b, i, b'"'),
        b'\'' => {
            // Words are skipped whole, so a quote right after one ends it: `E'…'`, `B'…'`,
            // `X'…'`, `U&'…'` are escapes or bits, not plain text.
            let prev = i.checked_sub(1).map(|p| b[p]);
            if prev.is_some_and(|p| is_word_byte(p) || p == b'&') {
                return None;
            }
            let end = closing(b, i, b'\'')?;
            shape.literal(i + 1, end - 1, true);
            Some(end)
        }
        // A control character other than tab, newline, carriage return.
        _ => None,
    }
}

/// A shape being built: the statement's text with each literal's value replaced by its
/// marker. Allocates nothing until the first literal (a statement without literals has no
/// shape).
struct ShapeBuilder<'a> {
    sql: &'a str,
    text: String,
    literals: Vec<Literal>,
    /// Start of the bytes not yet copied to `text`.
    copied: usize,
}

impl<'a> ShapeBuilder<'a> {
    fn new(sql: &'a str) -> ShapeBuilder<'a> {
        ShapeBuilder {
            sql,
            text: String::new(),
            literals: Vec::new(),
            copied: 0,
        }
    }

    /// A literal whose value spans `start..end` (inside the quotes for a string), its
    /// whole text (quotes included) ending where the lexer goes on.
    fn literal(&mut self, start: usize, end: usize, string: bool) {
        if self.literals.is_empty() {
            self.text.reserve(self.sql.len());
        }
        let (from, marker, resume) = if string {
            (start - 1, STRING, end + 1)
        } else {
            (start, NUMBER, end)
        };
        self.text.push_str(&self.sql[self.copied..from]);
        self.text.push(marker);
        self.literals.push(Literal { start, end, string });
        self.copied = resume;
    }

    fn finish(mut self) -> Option<Shape> {
        if self.literals.is_empty() {
            return None; // nothing to share: the exact text is the key
        }
        self.text.push_str(&self.sql[self.copied..]);
        Some(Shape {
            text: self.text,
            literals: self.literals,
        })
    }
}

/// The index just past the quote that closes the one at `open` (a doubled quote is part
/// of the text), or `None` if unterminated.
fn closing(b: &[u8], open: usize, quote: u8) -> Option<usize> {
    let mut i = open + 1;
    while i < b.len() {
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// End of the number starting at `start`: digits, an optional fraction, an optional
/// exponent.
fn number_end(b: &[u8], start: usize) -> usize {
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = digits(start);
    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i = digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        if b.get(i + 1 + sign).is_some_and(u8::is_ascii_digit) {
            i = digits(i + 1 + sign);
        }
    }
    i
}

/// An analysis that statements of one shape can share: its keys are
/// `KeyValue::Param(literal index)`, filled from each statement's literals. Kept in the
/// analysis cache under the shape's text.
#[derive(Debug, Clone)]
pub(crate) struct Template(pub(crate) Arc<Analysis>);

impl Template {
    /// The template `analysis` of the statement `sql` (of shape `shape`) makes, if it is
    /// one whose only value-dependent part is its shard keys (module doc).
    pub(crate) fn of(analysis: &Analysis, shape: &Shape, sql: &str) -> Option<Template> {
        let reusable_kind = matches!(
            analysis.kind,
            StatementKind::Select
                | StatementKind::Insert
                | StatementKind::Update
                | StatementKind::Delete
        );
        let d = &analysis.detail;
        let merge_is_plain = analysis.merge.as_ref().is_none_or(|m| {
            m.shard_sql.is_none()
                && m.limit.is_none()
                && m.offset == 0
                && m.order_by.is_empty()
                && m.group_by.is_empty()
        });
        if !reusable_kind
            || analysis.statement_count != 1
            || analysis.hint.is_some()
            || !merge_is_plain
            || d.refusal.is_some()
            || d.scatter_refusal.is_some()
            || d.limit.is_some()
            || d.offset.is_some()
            || d.key_update.is_some()
            || d.insert.is_some()
            || d.multi
            || d.broadcast
        {
            return None;
        }
        let slots = |values: &[KeyValue]| -> Option<Vec<KeyValue>> {
            if values.is_empty() {
                return None;
            }
            values
                .iter()
                .map(|v| match v {
                    KeyValue::Literal(k) => sole_literal(shape, sql, *k).map(KeyValue::Param),
                    KeyValue::Param(_) => None,
                })
                .collect()
        };
        let keys = match &analysis.keys {
            KeyExpr::Any(values) => KeyExpr::Any(slots(values)?),
            KeyExpr::PerRow(values) if values.len() == 1 => KeyExpr::PerRow(slots(values)?),
            KeyExpr::PerRow(_) | KeyExpr::None => return None,
        };
        let mut template = analysis.clone();
        template.keys = keys;
        Some(Template(Arc::new(template)))
    }

    /// The analysis of `sql` (of this template's shape `shape`), or `None` if one of its
    /// key literals is not an integer.
    pub(crate) fn instantiate(&self, shape: &Shape, sql: &str) -> Option<Analysis> {
        let fill = |values: &[KeyValue]| -> Option<Vec<KeyValue>> {
            values
                .iter()
                .map(|v| match v {
                    KeyValue::Param(slot) => shape
                        .literals
                        .get(*slot)?
                        .key_value(sql)
                        .map(KeyValue::Literal),
                    KeyValue::Literal(_) => None,
                })
                .collect()
        };
        let keys = match &self.0.keys {
            KeyExpr::Any(values) => KeyExpr::Any(fill(values)?),
            KeyExpr::PerRow(values) => KeyExpr::PerRow(fill(values)?),
            KeyExpr::None => return None,
        };
        // Field by field, not `clone()` and then replace: the template's own keys would be
        // cloned (an allocation) only to be dropped. A new field of `Analysis` must be
        // named here (no `..`), so it cannot be forgotten.
        let t = &*self.0;
        Some(Analysis {
            kind: t.kind.clone(),
            hint: t.hint.clone(),
            touches_sharded: t.touches_sharded,
            keys,
            merge: t.merge.clone(),
            is_write: t.is_write,
            statement_count: t.statement_count,
            session_state: t.session_state,
            detail: t.detail.clone(),
        })
    }
}

/// The index of the one literal of `sql` whose key reading is `key`; `None` if none or
/// several are.
fn sole_literal(shape: &Shape, sql: &str, key: i64) -> Option<usize> {
    let mut found = None;
    for (i, l) in shape.literals.iter().enumerate() {
        if l.key_value(sql) == Some(key) {
            if found.is_some() {
                return None;
            }
            found = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word test as it was, independent of the byte table.
    fn reference_is_word_byte(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
    }

    /// The lexer as it was before the byte-class table: the model the table lexer must
    /// agree with.
    fn reference_shape_of(sql: &str) -> Option<Shape> {
        let b = sql.as_bytes();
        let mut text = String::with_capacity(sql.len());
        let mut literals = Vec::new();
        // Start of the bytes not yet copied to `text`.
        let mut copied = 0;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let prev = i.checked_sub(1).map(|p| b[p]);
            match c {
                b'$' => return None,
                b'-' if b.get(i + 1) == Some(&b'-') => return None,
                b'/' if b.get(i + 1) == Some(&b'*') => return None,
                0..=0x1f if !matches!(c, b'\t' | b'\n' | b'\r') => return None,
                b'"' => {
                    // A quoted name, copied as it is ("" inside is a quote).
                    i = closing(b, i, b'"')?;
                }
                b'\'' => {
                    if prev.is_some_and(|p| reference_is_word_byte(p) || p == b'&') {
                        return None; // E'…', B'…', X'…', U&'…': escapes or bits, not plain text
                    }
                    let end = closing(b, i, b'\'')?;
                    text.push_str(&sql[copied..i]);
                    text.push(STRING);
                    literals.push(Literal {
                        start: i + 1,
                        end: end - 1,
                        string: true,
                    });
                    copied = end;
                    i = end;
                }
                b'0'..=b'9' if !prev.is_some_and(reference_is_word_byte) => {
                    let end = number_end(b, i);
                    if b.get(end)
                        .is_some_and(|&n| reference_is_word_byte(n) || n == b'.')
                    {
                        return None; // `5abc`, `1.2.3`: not a number we can be sure of
                    }
                    text.push_str(&sql[copied..i]);
                    text.push(NUMBER);
                    literals.push(Literal {
                        start: i,
                        end,
                        string: false,
                    });
                    copied = end;
                    i = end;
                }
                _ => i += 1,
            }
        }
        if literals.is_empty() {
            return None; // nothing to share: the exact text is the key
        }
        text.push_str(&sql[copied..]);
        Some(Shape { text, literals })
    }

    fn shape(sql: &str) -> Option<String> {
        shape_of(sql).map(|s| s.text.replace(NUMBER, "#").replace(STRING, "'?'"))
    }

    #[test]
    fn the_table_lexer_agrees_with_the_reference_lexer() {
        const PIECES: &[&str] = &[
            "SELECT ",
            "id",
            " FROM tasks",
            " WHERE ",
            "performer_id",
            " = ",
            "42",
            "4.5",
            "1e3",
            "1.",
            ".5",
            "'a'",
            "'it''s'",
            "'",
            "\"q\"",
            "\"",
            "E",
            "&",
            "$1",
            "$",
            "--",
            "-",
            "/*",
            "/",
            "*",
            "x2",
            "_",
            "é",
            "\t",
            "\n",
            "\u{1}",
            "(",
            ")",
            ",",
            ";",
            "5abc",
            "1.2.3",
            "::int8",
            "+",
            "U&",
            "0",
            "9",
        ];
        // A fixed linear congruential sequence: the same texts on every run.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            usize::try_from(state >> 33).unwrap_or(0) % n
        };
        for _ in 0..40_000 {
            let sql: String = (0..1 + next(12))
                .map(|_| PIECES[next(PIECES.len())])
                .collect();
            assert_eq!(shape_of(&sql), reference_shape_of(&sql), "{sql:?}");
        }
    }

    #[test]
    fn literals_are_taken_out_and_the_rest_kept() {
        assert_eq!(
            shape("SELECT id FROM tasks WHERE performer_id = 42 AND title = 'a''b'").as_deref(),
            Some("SELECT id FROM tasks WHERE performer_id = # AND title = '?'")
        );
        assert_eq!(
            shape("select * from t1 where x2 = 1.5e3 and \"col 3\" = 7").as_deref(),
            Some("select * from t1 where x2 = # and \"col 3\" = #")
        );
        assert_eq!(
            shape("SELECT 5::int8, int8 '6', -7, +8").as_deref(),
            Some("SELECT #::int8, int8 '?', -#, +#")
        );
    }

    #[test]
    fn what_cannot_be_lexed_for_sure_has_no_shape() {
        for sql in [
            "SELECT 1 -- c",
            "/* shard=shard-1 */ SELECT 1",
            "SELECT $1",
            "SELECT $$5$$",
            "SELECT E'5'",
            "SELECT U&'5'",
            "SELECT X'1F'",
            "SELECT 'open",
            "SELECT \"open",
            "SELECT 5abc",
            "SELECT 1.2.3",
            "SELECT \u{1}",
            "SELECT id FROM tasks",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }

    #[test]
    fn key_values_are_read_as_the_analysis_reads_them() {
        let sql = "x = 42 AND y = ' 43 ' AND z = '4''4' AND w = 4.5 AND v = 99999999999999999999";
        let s = shape_of(sql).unwrap();
        let values: Vec<Option<i64>> = s.literals.iter().map(|l| l.key_value(sql)).collect();
        assert_eq!(values, [Some(42), Some(43), None, None, None]);
    }
}
