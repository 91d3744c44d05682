//! Small, pure text helpers for the few statements the proxy must understand without the
//! router: `SET`/`RESET` (session state replayed on pooled backends), SQL-level
//! `PREPARE`/`EXECUTE`/`DEALLOCATE` (kept by the proxy because backends are shared), and
//! the first keyword of a statement (passthrough fast path: no full parse).
//!
//! Why not sqlparser: these run on every statement of the passthrough database, where a full
//! parse would cost throughput, and they only need the leading tokens.

/// Skips whitespace and SQL comments.
fn skip_ws(s: &str) -> &str {
    // The usual statement begins with its keyword: nothing to skip.
    if s.as_bytes().first().is_some_and(u8::is_ascii_alphabetic) {
        return s;
    }
    let mut s = s;
    loop {
        let t = s.trim_start();
        if let Some(rest) = t.strip_prefix("--") {
            s = rest.find('\n').map(|i| &rest[i + 1..]).unwrap_or("");
        } else if let Some(rest) = t.strip_prefix("/*") {
            s = rest.find("*/").map(|i| &rest[i + 2..]).unwrap_or("");
        } else {
            return t;
        }
    }
}

/// Splits off the next word (letters, digits, `_`, `.`) after whitespace/comments.
fn next_word(s: &str) -> (&str, &str) {
    let s = skip_ws(s);
    let end = word_len(s);
    (&s[..end], &s[end..])
}

/// Byte length of the word `s` begins with: ASCII letters, digits, `_` and `.`, and any
/// Unicode alphanumeric character. Byte by byte while the text is ASCII, because this runs
/// on every statement; a character-wise search decoded every byte as UTF-8.
fn word_len(s: &str) -> usize {
    // ASCII bytes that continue a word, one table load each.
    const WORD: [bool; 128] = {
        let mut t = [false; 128];
        let mut c = 0;
        while c < 128 {
            let b = c as u8;
            t[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'.';
            c += 1;
        }
        t
    };
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if let Some(&word) = WORD.get(usize::from(c)) {
            if !word {
                return i;
            }
            i += 1;
        } else {
            // `i` is a character boundary: it only ever advances by whole characters.
            match s.get(i..).and_then(|rest| rest.chars().next()) {
                Some(ch) if ch.is_alphanumeric() => i += ch.len_utf8(),
                _ => return i,
            }
        }
    }
    b.len()
}

/// The first word of a statement as written (any case), after whitespace and comments;
/// empty for an empty statement. Compare it with `eq_ignore_ascii_case`: unlike
/// [`first_keyword`] this allocates nothing, for the per-statement path.
pub fn first_word(sql: &str) -> &str {
    next_word(sql).0
}

/// The first keyword, upper-cased (`SELECT`, `SET`, …); empty for an empty statement.
pub fn first_keyword(sql: &str) -> String {
    first_word(sql).to_ascii_uppercase()
}

/// A session-level setting change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetCommand {
    /// `SET [SESSION] name {TO|=} value`: the value as SQL text (`'UTC'`, `10`, `DEFAULT`).
    Set {
        name: String,
        value: String,
    },
    /// `SET LOCAL …`: transaction-scoped, nothing to remember.
    Local,
    Reset {
        name: String,
    },
    ResetAll,
}

/// Recognizes `SET`/`RESET` statements; `None` for anything else (including multi-statement).
pub fn parse_set(sql: &str) -> Option<SetCommand> {
    let body = sql.trim().trim_end_matches(';').trim_end();
    if body.contains(';') {
        return None;
    }
    let (kw, rest) = next_word(body);
    if kw.eq_ignore_ascii_case("RESET") {
        parse_reset(rest)
    } else if kw.eq_ignore_ascii_case("SET") {
        parse_set_body(rest)
    } else {
        None
    }
}

/// `RESET name` / `RESET ALL` (after the keyword).
fn parse_reset(rest: &str) -> Option<SetCommand> {
    let (name, _) = next_word(rest);
    if name.eq_ignore_ascii_case("ALL") {
        return Some(SetCommand::ResetAll);
    }
    if name.is_empty() {
        return None;
    }
    Some(SetCommand::Reset {
        name: name.to_ascii_lowercase(),
    })
}

/// `SET [SESSION|LOCAL] name {TO|=} value` and `SET TIME ZONE value` (after the
/// keyword). The transaction, role and authorization forms are not session settings the
/// proxy replays: `None`.
fn parse_set_body(rest: &str) -> Option<SetCommand> {
    let (mut name, mut rest) = next_word(rest);
    if name.eq_ignore_ascii_case("LOCAL") {
        return Some(SetCommand::Local);
    }
    if name.eq_ignore_ascii_case("SESSION") {
        let (n, r) = next_word(rest);
        if n.eq_ignore_ascii_case("AUTHORIZATION") || n.eq_ignore_ascii_case("CHARACTERISTICS") {
            return None;
        }
        name = n;
        rest = r;
    }
    if name.eq_ignore_ascii_case("TRANSACTION")
        || name.eq_ignore_ascii_case("CONSTRAINTS")
        || name.eq_ignore_ascii_case("ROLE")
    {
        return None;
    }
    if name.eq_ignore_ascii_case("TIME") {
        let (zone, r) = next_word(rest);
        if zone.eq_ignore_ascii_case("ZONE") {
            return Some(SetCommand::Set {
                name: "timezone".into(),
                value: r.trim().to_owned(),
            });
        }
        return None;
    }
    if name.is_empty() {
        return None;
    }
    let value = set_value(rest)?;
    let name = name.to_ascii_lowercase();
    if value.eq_ignore_ascii_case("DEFAULT") {
        return Some(SetCommand::Reset { name });
    }
    Some(SetCommand::Set {
        name,
        value: value.to_owned(),
    })
}

/// The value after `=` or `TO`, trimmed; `None` if missing.
fn set_value(rest: &str) -> Option<&str> {
    let rest = skip_ws(rest);
    let value = if let Some(v) = rest.strip_prefix('=') {
        v
    } else {
        let (to, r) = next_word(rest);
        if !to.eq_ignore_ascii_case("TO") {
            return None;
        }
        r
    };
    let value = value.trim();
    (!value.is_empty()).then_some(value)
}

/// Quotes a string as an SQL literal.
pub fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// A SQL-level `PREPARE name [(types)] AS body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlPrepare {
    pub name: String,
    pub types: Vec<String>,
    pub body: String,
}

/// Parses `PREPARE`.
pub fn parse_prepare(sql: &str) -> Option<SqlPrepare> {
    let (kw, rest) = next_word(sql);
    if !kw.eq_ignore_ascii_case("PREPARE") {
        return None;
    }
    let (name, rest) = next_word(rest);
    if name.is_empty() || name.eq_ignore_ascii_case("TRANSACTION") {
        return None;
    }
    let mut rest = skip_ws(rest);
    let mut types = Vec::new();
    if let Some(r) = rest.strip_prefix('(') {
        let close = matching_paren(r)?;
        types = split_top_level(&r[..close])
            .into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        rest = &r[close + 1..];
    }
    let (as_kw, body) = next_word(rest);
    if !as_kw.eq_ignore_ascii_case("AS") {
        return None;
    }
    let body = body.trim().trim_end_matches(';').trim_end();
    if body.is_empty() {
        return None;
    }
    Some(SqlPrepare {
        name: name.to_ascii_lowercase(),
        types,
        body: body.to_owned(),
    })
}

/// Parses `EXECUTE name [(args)]` into the name and argument texts.
pub fn parse_execute(sql: &str) -> Option<(String, Vec<String>)> {
    let (kw, rest) = next_word(sql);
    if !kw.eq_ignore_ascii_case("EXECUTE") {
        return None;
    }
    let (name, rest) = next_word(rest);
    if name.is_empty() {
        return None;
    }
    let rest = skip_ws(rest).trim_end().trim_end_matches(';').trim_end();
    let args = if let Some(r) = rest.strip_prefix('(') {
        let close = matching_paren(r)?;
        if !r[close + 1..].trim().is_empty() {
            return None;
        }
        split_top_level(&r[..close])
            .into_iter()
            .map(|a| a.trim().to_owned())
            .collect()
    } else if rest.is_empty() {
        Vec::new()
    } else {
        return None;
    };
    Some((name.to_ascii_lowercase(), args))
}

/// Parses `DEALLOCATE [PREPARE] name|ALL`: `Some(None)` means ALL.
pub fn parse_deallocate(sql: &str) -> Option<Option<String>> {
    let (kw, rest) = next_word(sql);
    if !kw.eq_ignore_ascii_case("DEALLOCATE") {
        return None;
    }
    let (mut name, rest2) = next_word(rest);
    if name.eq_ignore_ascii_case("PREPARE") {
        name = next_word(rest2).0;
    }
    if name.is_empty() {
        return None;
    }
    if name.eq_ignore_ascii_case("ALL") {
        return Some(None);
    }
    Some(Some(name.to_ascii_lowercase()))
}

/// Replaces `$n` placeholders (outside quotes) with the argument texts, cast to the declared
/// types when given. `None` if an argument is missing.
pub fn substitute(body: &str, args: &[String], types: &[String]) -> Option<String> {
    let b = body.as_bytes();
    let mut out = String::with_capacity(body.len() + 16);
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let start = i;
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let n: usize = body[start + 1..i].parse().ok()?;
                let arg = args.get(n.checked_sub(1)?)?;
                out.push_str(&body[last..start]);
                match types.get(n - 1) {
                    Some(t) => out.push_str(&format!("({arg})::{t}")),
                    None => out.push_str(&format!("({arg})")),
                }
                last = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&body[last.min(body.len())..]);
    Some(out)
}

/// Index of the `)` closing an already-opened parenthesis.
fn matching_paren(s: &str) -> Option<usize> {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => {
                if depth == 0 {
                    return Some(i);
                }
                depth -= 1;
            }
            _ => {}
        }
    }
    None
}

/// Splits at commas that are not inside parentheses or quotes.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !s[start..].trim().is_empty() || !out.is_empty() {
        out.push(&s[start..]);
    }
    out
}

/// Session state a statement may leave on a server connection that the proxy can neither
/// replay on another connection nor take back: the kind, for the log, or `None`.
///
/// Why lexical and conservative: this runs on every statement, so a cheap case-insensitive
/// search for a few markers comes first; only when one is present are the statement's words
/// read (skipping string literals and comments, so a marker inside data does not count). A
/// false positive costs one server reconnect, a false negative a leak to the next client.
pub fn session_state(sql: &str) -> Option<&'static str> {
    const MARKERS: &[(&str, &str)] = &[
        ("set_config", "set_config()"),
        ("pg_advisory_lock", "session advisory lock"),
        ("pg_advisory_lock_shared", "session advisory lock"),
        ("pg_try_advisory_lock", "session advisory lock"),
        ("pg_try_advisory_lock_shared", "session advisory lock"),
        ("listen", "LISTEN"),
        ("temp", "temporary object"),
        ("temporary", "temporary object"),
        ("authorization", "SET SESSION AUTHORIZATION"),
        ("hold", "cursor WITH HOLD"),
    ];
    if !may_hold_marker(sql.as_bytes()) {
        return None;
    }
    let words = code_words(sql);
    for (i, w) in words.iter().enumerate() {
        let next = words.get(i + 1).map(String::as_str);
        let prev = i
            .checked_sub(1)
            .and_then(|j| words.get(j))
            .map(String::as_str);
        let hit = match w.as_str() {
            "temp" | "temporary" => {
                matches!(prev, Some("create" | "or" | "global" | "local"))
                    || words.first().map(String::as_str) == Some("create") && i < 4
            }
            "authorization" => {
                prev == Some("session") && words.first().map(String::as_str) != Some("reset")
            }
            "hold" => prev == Some("with") && words.iter().any(|x| x == "cursor"),
            "listen" => i == 0,
            other => MARKERS.iter().any(|(m, _)| *m == other) && next == Some("("),
        };
        if hit {
            return MARKERS
                .iter()
                .find(|(m, _)| *m == w.as_str())
                .map(|(_, kind)| *kind);
        }
    }
    None
}

/// Texts every marker of [`session_state`] contains: `advisory_lock` covers the four
/// advisory-lock functions, `temp` covers `temporary`. Each is at least 4 bytes long (the
/// trigram filter below relies on it).
const MARKER_CORES: [&str; 6] = [
    "set_config",
    "advisory_lock",
    "authorization",
    "listen",
    "temp",
    "hold",
];

/// Whether `sql` contains (case-insensitively, anywhere) one of the [`MARKER_CORES`].
///
/// It runs on every passthrough statement, so it looks at every other byte only: every
/// occurrence of a core (4 bytes or more) has one of its trigrams start at an even
/// offset of the text. The trigram at each even offset is hashed into a 4,096-bit table of
/// the cores' trigrams; only where it is present (a real trigram of a core, or a 1-in-100
/// collision) are the bytes around it compared with the cores. A first-letter filter
/// before it cost ~15 instructions per byte, because ordinary SQL is full of the cores'
/// first letters and their first two letters' pairs (`se` in `SELECT`); a generic
/// automaton (`aho-corasick`'s DFA, case-insensitive) cost as much.
fn may_hold_marker(bytes: &[u8]) -> bool {
    let mut p = 0;
    while let Some(&[a, b, c]) = bytes.get(p..p + 3) {
        let g = trigram_slot(a, b, c);
        if CORE_TRIGRAMS[g / 64] & (1 << (g % 64)) != 0 {
            // An occurrence whose trigram starts at `p` starts at most 10 bytes before it
            // and ends at most 13 after it (cores are 4 to 13 bytes long).
            let window = &bytes[p.saturating_sub(10)..bytes.len().min(p + 13)];
            if MARKER_CORES
                .iter()
                .any(|core| contains_ignore_case(window, core.as_bytes()))
            {
                return true;
            }
        }
        p += 2;
    }
    false
}

/// The slot in [`CORE_TRIGRAMS`] of a trigram, any case (`| 0x20` folds ASCII letters;
/// other bytes may collide, which only costs a comparison).
const fn trigram_slot(a: u8, b: u8, c: u8) -> usize {
    let x = (a | 0x20) as u32 | (((b | 0x20) as u32) << 8) | (((c | 0x20) as u32) << 16);
    (x.wrapping_mul(0x9E37_79B1) >> 20) as usize
}

/// Every trigram of every marker core, as bits of a 4,096-bit table.
const CORE_TRIGRAMS: [u64; 64] = {
    let mut table = [0u64; 64];
    let mut k = 0;
    while k < MARKER_CORES.len() {
        let core = MARKER_CORES[k].as_bytes();
        let mut i = 0;
        while i + 3 <= core.len() {
            let g = trigram_slot(core[i], core[i + 1], core[i + 2]);
            table[g / 64] |= 1 << (g % 64);
            i += 1;
        }
        k += 1;
    }
    table
};

/// Whether `hay` contains `needle`, ASCII case ignored.
fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// The statement's words (lower-cased) and `(`, outside string literals, quoted names and
/// comments.
fn code_words(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\'' || c == b'"' {
            i = b[i + 1..]
                .iter()
                .position(|&x| x == c)
                .map_or(b.len(), |p| i + p + 2);
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            i = b[i..]
                .iter()
                .position(|&x| x == b'\n')
                .map_or(b.len(), |p| i + p + 1);
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = sql[i + 2..].find("*/").map_or(b.len(), |p| i + p + 4);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let end = b[i..]
                .iter()
                .position(|x| !(x.is_ascii_alphanumeric() || *x == b'_'))
                .map_or(b.len(), |p| i + p);
            out.push(sql[i..end].to_ascii_lowercase());
            i = end;
        } else {
            if c == b'(' {
                out.push("(".into());
            }
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_end_where_the_character_wise_search_ends() {
        let reference = |s: &str| {
            s.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(s.len())
        };
        for s in [
            "",
            "SELECT 1",
            "select_1.x(",
            "über_tabelle x",
            "naïve;",
            "日本語 テキスト",
            "a\u{2003}b",
            "x\u{0301}y z",
            "ﬁle(",
            "12abc de",
            "€uro",
        ] {
            assert_eq!(word_len(s), reference(s), "{s:?}");
        }
        assert_eq!(first_word("  /* c */ SeLeCt 1"), "SeLeCt");
        assert_eq!(first_keyword("  -- c\n begin;"), "BEGIN");
    }

    #[test]
    fn set_forms() {
        assert_eq!(
            parse_set("SET application_name = 'x'"),
            Some(SetCommand::Set {
                name: "application_name".into(),
                value: "'x'".into()
            })
        );
        assert_eq!(
            parse_set("set session TimeZone to UTC;"),
            Some(SetCommand::Set {
                name: "timezone".into(),
                value: "UTC".into()
            })
        );
        assert_eq!(
            parse_set("SET TIME ZONE 'Europe/Paris'"),
            Some(SetCommand::Set {
                name: "timezone".into(),
                value: "'Europe/Paris'".into()
            })
        );
        assert_eq!(parse_set("SET LOCAL x = 1"), Some(SetCommand::Local));
        assert_eq!(parse_set("RESET ALL"), Some(SetCommand::ResetAll));
        assert_eq!(
            parse_set("SET x TO DEFAULT"),
            Some(SetCommand::Reset { name: "x".into() })
        );
        assert_eq!(
            parse_set("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            None
        );
        assert_eq!(parse_set("SELECT 1"), None);
        assert_eq!(parse_set("SET a = 1; SELECT 1"), None);
    }

    #[test]
    fn prepare_execute() {
        let p = parse_prepare("PREPARE q (bigint, text) AS SELECT * FROM tasks WHERE performer_id = $1 AND title = $2")
            .expect("prepare");
        assert_eq!(p.name, "q");
        assert_eq!(p.types, vec!["bigint", "text"]);
        let (name, args) = parse_execute("EXECUTE q(42, 'a,b')").expect("execute");
        assert_eq!(name, "q");
        assert_eq!(args, vec!["42", "'a,b'"]);
        let sql = substitute(&p.body, &args, &p.types).expect("substitute");
        assert_eq!(
            sql,
            "SELECT * FROM tasks WHERE performer_id = (42)::bigint AND title = ('a,b')::text"
        );
        assert_eq!(
            substitute("SELECT '$1', $1", &["7".into()], &[]).as_deref(),
            Some("SELECT '$1', (7)")
        );
        assert_eq!(substitute("SELECT $2", &["7".into()], &[]), None);
        assert_eq!(
            parse_deallocate("DEALLOCATE PREPARE q"),
            Some(Some("q".into()))
        );
        assert_eq!(parse_deallocate("deallocate all"), Some(None));
        assert_eq!(first_keyword("  /* c */ -- x\n select 1"), "SELECT");
    }
}

/// The parts of `COPY table [(columns)] FROM STDIN [options]` the proxy needs to split rows
/// by shard key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFrom {
    pub table: String,
    pub columns: Option<Vec<String>>,
    pub csv: bool,
    pub header: bool,
    pub delimiter: u8,
}

fn unquote_ident(s: &str) -> String {
    let s = s.trim();
    match s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => s.to_ascii_lowercase(),
    }
}

/// Parses a `COPY … FROM STDIN` in text or CSV format; `None` for anything else (binary
/// format, a query source, PROGRAM/file targets).
pub fn parse_copy_from(sql: &str) -> Option<CopyFrom> {
    let (kw, rest) = next_word(sql);
    if !kw.eq_ignore_ascii_case("COPY") {
        return None;
    }
    let rest = skip_ws(rest);
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '(')
        .unwrap_or(rest.len());
    let table = rest[..end].to_owned();
    if table.is_empty() {
        return None;
    }
    let mut rest = skip_ws(&rest[end..]);
    let mut columns = None;
    if let Some(r) = rest.strip_prefix('(') {
        let close = matching_paren(r)?;
        columns = Some(
            split_top_level(&r[..close])
                .into_iter()
                .map(unquote_ident)
                .collect(),
        );
        rest = &r[close + 1..];
    }
    let (from, rest) = next_word(rest);
    let (stdin, options) = next_word(rest);
    if !from.eq_ignore_ascii_case("FROM") || !stdin.eq_ignore_ascii_case("STDIN") {
        return None;
    }
    let lower = options.to_ascii_lowercase();
    if lower.contains("binary") {
        return None;
    }
    let csv = lower.contains("csv");
    let header = lower.contains("header")
        && !lower.contains("header false")
        && !lower.contains("header off");
    let mut delimiter = if csv { b',' } else { b'\t' };
    if let Some(pos) = lower.find("delimiter") {
        let after = options[pos + "delimiter".len()..].trim_start();
        let after = after
            .strip_prefix("as")
            .map(str::trim_start)
            .unwrap_or(after);
        let after = after.strip_prefix('E').unwrap_or(after);
        let bytes = after.as_bytes();
        if bytes.first() == Some(&b'\'') && bytes.len() >= 3 && bytes[2] == b'\'' {
            delimiter = bytes[1];
        } else {
            return None;
        }
    }
    Some(CopyFrom {
        table: unquote_ident(&table),
        columns,
        csv,
        header,
        delimiter,
    })
}

/// The `index`th field of one COPY line (text: no quoting; CSV: double quotes).
/// `None` if the line has fewer fields; `Some(None)` for NULL (`\N` in text, empty unquoted
/// in CSV).
pub fn copy_field(line: &[u8], index: usize, csv: bool, delimiter: u8) -> Option<Option<String>> {
    let mut field = 0;
    let mut i = 0;
    while i <= line.len() {
        let start = i;
        let mut quoted = false;
        let mut value = Vec::new();
        if csv && line.get(i) == Some(&b'"') {
            quoted = true;
            i += 1;
            while i < line.len() {
                if line[i] == b'"' {
                    if line.get(i + 1) == Some(&b'"') {
                        value.push(b'"');
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                value.push(line[i]);
                i += 1;
            }
            while i < line.len() && line[i] != delimiter {
                i += 1;
            }
        } else {
            while i < line.len() && line[i] != delimiter {
                i += 1;
            }
            value.extend_from_slice(&line[start..i]);
        }
        if field == index {
            let text = String::from_utf8_lossy(&value).into_owned();
            let null = if csv {
                !quoted && text.is_empty()
            } else {
                text == "\\N"
            };
            return Some(if null { None } else { Some(text) });
        }
        field += 1;
        i += 1;
    }
    None
}

#[cfg(test)]
mod copy_tests {
    use super::*;

    #[test]
    fn copy_statements() {
        let c = parse_copy_from(
            "COPY tasks (id, \"performer_id\", title) FROM STDIN WITH (FORMAT csv, HEADER true)",
        )
        .expect("copy");
        assert_eq!(c.table, "tasks");
        assert_eq!(
            c.columns.as_deref(),
            Some(
                &[
                    "id".to_string(),
                    "performer_id".to_string(),
                    "title".to_string()
                ][..]
            )
        );
        assert!(c.csv && c.header);
        assert_eq!(c.delimiter, b',');
        let c = parse_copy_from("copy tasks from stdin delimiter '|'").expect("copy");
        assert_eq!((c.csv, c.delimiter, c.columns), (false, b'|', None));
        assert_eq!(
            parse_copy_from("COPY tasks FROM STDIN (FORMAT binary)"),
            None
        );
        assert_eq!(parse_copy_from("COPY tasks TO STDOUT"), None);
    }

    #[test]
    fn copy_fields() {
        assert_eq!(
            copy_field(b"1\t42\tx", 1, false, b'\t'),
            Some(Some("42".into()))
        );
        assert_eq!(copy_field(b"1\t\\N\tx", 1, false, b'\t'), Some(None));
        assert_eq!(
            copy_field(b"\"a,b\",\"4\"\"2\",7", 1, true, b','),
            Some(Some("4\"2".into()))
        );
        assert_eq!(copy_field(b"\"a,b\",,7", 1, true, b','), Some(None));
        assert_eq!(copy_field(b"1,2", 5, true, b','), None);
    }
}

#[cfg(test)]
mod session_state_tests {
    use super::{may_hold_marker, session_state, MARKER_CORES};

    #[test]
    fn the_single_pass_prefilter_sees_every_marker_in_any_case_and_position() {
        for marker in [
            "set_config",
            "pg_advisory_lock",
            "pg_advisory_lock_shared",
            "pg_try_advisory_lock",
            "pg_try_advisory_lock_shared",
            "listen",
            "temp",
            "temporary",
            "authorization",
            "hold",
        ] {
            for text in [
                marker.to_owned(),
                marker.to_ascii_uppercase(),
                format!("select x from t where {marker}"),
                format!("{}!", marker.to_ascii_uppercase()),
            ] {
                assert!(may_hold_marker(text.as_bytes()), "{text}");
            }
        }
        for text in [
            "",
            "SELECT 1",
            "SELECT abalone FROM shelf",
            "hol",
            "tem",
            "liste",
        ] {
            assert!(!may_hold_marker(text.as_bytes()), "{text}");
        }
    }

    /// The prefilter against its definition: every core, case-insensitively, anywhere.
    #[test]
    fn the_prefilter_agrees_with_a_plain_search() {
        let plain = |t: &str| {
            let t = t.to_ascii_lowercase();
            MARKER_CORES.iter().any(|c| t.contains(c))
        };
        // Every text of up to 4 symbols over an alphabet with the cores' near misses.
        let parts = [
            "set_config",
            "SeT_",
            "ADvisory_lock",
            "adv",
            "lIsten",
            "list",
            "TEMP",
            "te",
            "hOld",
            "ho",
            "authoriZation",
            " ",
            "@",
            "`",
        ];
        let mut texts = vec![String::new()];
        for _ in 0..4 {
            let longer: Vec<String> = texts
                .iter()
                .flat_map(|t| parts.iter().map(move |p| format!("{t}{p}")))
                .collect();
            texts.extend(longer);
            texts.dedup();
        }
        for t in &texts {
            assert_eq!(may_hold_marker(t.as_bytes()), plain(t), "{t:?}");
        }
    }

    #[test]
    fn finds_what_cannot_be_replayed() {
        for (sql, kind) in [
            (
                "select set_config('search_path','nope',false)",
                "set_config()",
            ),
            ("SELECT pg_advisory_lock(42)", "session advisory lock"),
            (
                "select pg_try_advisory_lock_shared(1, 2)",
                "session advisory lock",
            ),
            ("LISTEN chan", "LISTEN"),
            ("CREATE TEMP TABLE t (x int)", "temporary object"),
            ("create temporary view v as select 1", "temporary object"),
            ("CREATE LOCAL TEMPORARY TABLE t (x int)", "temporary object"),
            ("SET SESSION AUTHORIZATION bob", "SET SESSION AUTHORIZATION"),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                "cursor WITH HOLD",
            ),
        ] {
            assert_eq!(session_state(sql), Some(kind), "{sql}");
        }
    }

    #[test]
    fn ignores_what_is_safe_or_only_data() {
        for sql in [
            "SELECT 1",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT 'set_config(x)' AS s",
            "SELECT 1 -- LISTEN chan",
            "/* CREATE TEMP TABLE t */ SELECT 1",
            "SELECT temperature FROM readings",
            "UPDATE tasks SET title = 'listen to me' WHERE id = 1",
            "RESET SESSION AUTHORIZATION",
            "SELECT * FROM holdings",
        ] {
            assert_eq!(session_state(sql), None, "{sql}");
        }
    }
}
