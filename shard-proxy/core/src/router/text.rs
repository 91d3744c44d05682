//! Lexical helpers: the `/* shard=name */` hint, and a keyword fallback for statements the
//! SQL parser can't read (RESET, ABORT, VACUUM, `COPY … FROM STDIN` without its data, …).
//!
//! The hint is read from the raw text because the parser discards comments. The scanner
//! skips string literals, quoted identifiers and dollar-quoted bodies, so a `/* shard=x */`
//! inside a string value is not a hint.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::model::{Analysis, StatementKind};

/// The shard named by the first `/* … shard=name … */` comment, if any. The name may be
/// bare (`[A-Za-z0-9_.:-]`) or quoted with `'` or `"`.
pub(crate) fn shard_hint(sql: &str) -> Option<String> {
    if !sql.contains("/*") {
        return None;
    }
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if let Some(next) = skip_non_code(sql, i) {
            i = next;
            continue;
        }
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let (end, body) = block_comment(sql, i);
                if let Some(name) = hint_in_comment(body) {
                    return Some(name);
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    None
}

/// An upper bound on how deep the statement's expression trees can be: operator symbols
/// and operator keywords outside literals and comments. A chain like `a = 1 AND b = 2 AND
/// …` parses into a tree as deep as it is long, and walking (or cloning) a very deep tree
/// needs a deep stack; the router uses this count to pick a bigger stack or refuse.
pub(crate) fn operator_count(sql: &str) -> usize {
    let b = sql.as_bytes();
    let mut count = 0;
    let mut i = 0;
    while i < b.len() {
        if let Some(next) = skip_non_code(sql, i) {
            i = next;
            continue;
        }
        let c = b[i];
        match c {
            b'/' if b.get(i + 1) == Some(&b'*') => i = block_comment(sql, i).0,
            b'+' | b'-' | b'*' | b'/' | b'%' | b'<' | b'>' | b'=' | b'!' | b'|' | b'&' | b'^'
            | b'~' | b'#' | b'@' | b'?' | b':' => {
                count += 1;
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$')
                {
                    i += 1;
                }
                let w = &sql[start..i];
                if w.len() <= 8
                    && [
                        "and", "or", "not", "is", "in", "like", "ilike", "between", "similar",
                        "collate", "at", "overlaps", "escape",
                    ]
                    .iter()
                    .any(|k| k.eq_ignore_ascii_case(w))
                {
                    count += 1;
                }
            }
            _ => i += 1,
        }
    }
    count
}

/// If a string literal (`'…'`, `E'…'`), a quoted identifier, a `--` comment or a
/// dollar-quoted body starts at `i`, the index just past it. The lexers here all skip
/// these the same way; block comments are left to each caller (the hint lives in them).
fn skip_non_code(sql: &str, i: usize) -> Option<usize> {
    let b = sql.as_bytes();
    match b[i] {
        b'\'' => Some(skip_quoted(
            b,
            i + 1,
            b'\'',
            i > 0 && matches!(b[i - 1], b'e' | b'E'),
        )),
        b'"' => Some(skip_quoted(b, i + 1, b'"', false)),
        b'-' if b.get(i + 1) == Some(&b'-') => Some(
            b[i..]
                .iter()
                .position(|c| *c == b'\n')
                .map_or(b.len(), |p| i + p + 1),
        ),
        b'$' => Some(skip_dollar(sql, i)),
        _ => None,
    }
}

/// Index after a quoted literal starting at `start` (just past the opening quote).
fn skip_quoted(b: &[u8], mut i: usize, quote: u8, backslash_escapes: bool) -> usize {
    while i < b.len() {
        if backslash_escapes && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// Index after a `$tag$ … $tag$` body starting at `i`, or `i + 1` if it isn't one (`$1`).
fn skip_dollar(sql: &str, i: usize) -> usize {
    let b = sql.as_bytes();
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        if j == i + 1 && b[j].is_ascii_digit() {
            return i + 1; // a parameter like $1
        }
        j += 1;
    }
    if b.get(j) != Some(&b'$') {
        return i + 1;
    }
    let tag = &sql[i..=j];
    match sql[j + 1..].find(tag) {
        Some(p) => j + 1 + p + tag.len(),
        None => b.len(),
    }
}

/// (index after the comment, comment body) for a (nestable) block comment at `start`.
fn block_comment(sql: &str, start: usize) -> (usize, &str) {
    let b = sql.as_bytes();
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return (i, &sql[start + 2..i - 2]);
            }
        } else {
            i += 1;
        }
    }
    (b.len(), sql.get(start + 2..).unwrap_or(""))
}

fn hint_in_comment(body: &str) -> Option<String> {
    let lower = body.to_ascii_lowercase();
    let mut from = 0;
    while let Some(p) = lower[from..].find("shard") {
        let at = from + p;
        from = at + 5;
        let word_start = at == 0 || !is_name_byte(lower.as_bytes()[at - 1]);
        if !word_start {
            continue;
        }
        let rest = body[at + 5..].trim_start();
        let Some(rest) = rest.strip_prefix('=') else {
            continue;
        };
        let rest = rest.trim_start();
        let name: String = match rest.chars().next() {
            Some(q @ ('\'' | '"')) => rest[1..].chars().take_while(|c| *c != q).collect(),
            _ => rest
                .chars()
                .take_while(|c| c.is_ascii() && is_name_byte(*c as u8))
                .collect(),
        };
        if !name.is_empty() {
            return Some(name);
        }
    }
    None
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-')
}

/// Whether any word of `sql` names a sharded table.
pub(crate) fn mentions(sql: &str, is_sharded: &dyn Fn(&str) -> bool) -> bool {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return false;
    };
    tokens.iter().any(|t| match t {
        Token::Word(w) => {
            let name = if w.quote_style.is_some() {
                w.value.clone()
            } else {
                w.value.to_lowercase()
            };
            is_sharded(&name)
        }
        _ => false,
    })
}

/// Statements the parser rejects but whose kind is clear from their keywords.
pub(crate) fn fallback(sql: &str, is_sharded: &dyn Fn(&str) -> bool) -> Option<Analysis> {
    let tokens = single_statement_tokens(sql)?;
    let word = |i: usize| -> Option<String> {
        match tokens.get(i) {
            Some(Token::Word(w)) => Some(w.value.to_ascii_uppercase()),
            _ => None,
        }
    };
    let mentions_sharded = mentions(sql, is_sharded);
    let first = word(0)?;
    let mut a = match first.as_str() {
        "RESET" => {
            let is_shard = word(1).as_deref() == Some("TASKFLOW")
                && tokens.get(2) == Some(&Token::Period)
                && word(3).as_deref() == Some("SHARD");
            Analysis::new(if is_shard {
                StatementKind::SetShard(None)
            } else {
                StatementKind::Set
            })
        }
        "DISCARD" => Analysis::new(StatementKind::Set),
        "ABORT" => Analysis::new(StatementKind::Rollback),
        "BEGIN" | "START" => Analysis::new(StatementKind::Begin),
        "COMMIT" | "END" | "ROLLBACK" => {
            // COMMIT PREPARED / ROLLBACK PREPARED belong to the proxy's two-phase commit.
            if word(1).as_deref() == Some("PREPARED") {
                return None;
            }
            Analysis::new(if first == "ROLLBACK" {
                StatementKind::Rollback
            } else {
                StatementKind::Commit
            })
        }
        "SHOW" => Analysis::new(StatementKind::Show),
        "DEALLOCATE" => Analysis::new(StatementKind::Deallocate),
        "COPY" => {
            let mut a = copy_from_stdin(&tokens)?;
            a.touches_sharded = mentions_sharded;
            a
        }
        "VACUUM" | "LOCK" | "CLUSTER" | "REINDEX" | "CHECKPOINT" | "REFRESH" | "SECURITY"
        | "ALTER" | "CREATE" | "DROP" | "GRANT" | "REVOKE" | "COMMENT" | "IMPORT" | "LISTEN"
        | "UNLISTEN" | "NOTIFY" | "LOAD" => {
            let mut a = Analysis::new(StatementKind::Utility);
            a.is_write = !matches!(first.as_str(), "LISTEN" | "UNLISTEN" | "NOTIFY" | "LOAD");
            a.touches_sharded = mentions_sharded;
            a
        }
        _ => return None,
    };
    if matches!(a.kind, StatementKind::Set | StatementKind::SetShard(_)) {
        a.is_write = false;
    }
    Some(a)
}

/// The tokens of `sql` without whitespace, if it holds one statement: a `;` may end the
/// text but not separate two statements.
fn single_statement_tokens(sql: &str) -> Option<Vec<Token>> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    let tokens: Vec<Token> = tokens
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    if let Some(p) = tokens.iter().position(|t| *t == Token::SemiColon) {
        if tokens[p..].iter().any(|t| *t != Token::SemiColon) {
            return None;
        }
    }
    Some(tokens)
}

/// `COPY [ONLY] name [(cols)] FROM STDIN …`, the form the parser rejects without its data;
/// other COPY forms it can't parse are left unparsed.
fn copy_from_stdin(tokens: &[Token]) -> Option<Analysis> {
    let from = tokens
        .iter()
        .position(|t| matches!(t, Token::Word(w) if w.value.eq_ignore_ascii_case("from")))?;
    match tokens.get(from + 1) {
        Some(Token::Word(w)) if w.value.eq_ignore_ascii_case("stdin") => {}
        _ => return None,
    }
    let mut a = Analysis::new(StatementKind::Copy { from_stdin: true });
    a.is_write = true;
    Some(a)
}
