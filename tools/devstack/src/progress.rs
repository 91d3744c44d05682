//! A migration as the proxy's `SHOW MIGRATIONS` lists it, and the one progress line
//! `make add-shard`/`make remove-shard` draw from it:
//!
//! ```text
//! shard-4 ▕██████░░░░▏ 61%  412,000/675,000 rows  21,300 rows/s  ETA 12 s
//! ```
//!
//! Pure: rows in, text out, so the formatting is tested without a proxy.
//!
//! Why columns are read by name: the console's contract names them (`epoch`, `state`,
//! `change`, `arcs_done`, `arcs_total`, `rows_moved`, `rows_total`, `rows_per_sec`,
//! `eta_secs`, `error`, …, all text) and may grow more; positions would break on the
//! first new column.

/// Cells of the bar.
const BAR_CELLS: usize = 10;

/// Where a migration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Waiting,
    Moving,
    Paused,
    Done,
    Failed,
    /// A state this version does not know; shown as the proxy wrote it.
    Other(String),
}

impl State {
    fn parse(s: &str) -> Self {
        match s {
            "waiting" => State::Waiting,
            "moving" => State::Moving,
            "paused" => State::Paused,
            "done" => State::Done,
            "failed" => State::Failed,
            other => State::Other(other.to_owned()),
        }
    }

    fn word(&self) -> &str {
        match self {
            State::Waiting => "waiting",
            State::Moving => "moving",
            State::Paused => "paused",
            State::Done => "done",
            State::Failed => "failed",
            State::Other(s) => s,
        }
    }

    /// `done` or `failed`: nothing more will change.
    pub fn finished(&self) -> bool {
        matches!(self, State::Done | State::Failed)
    }
}

/// One row of `SHOW MIGRATIONS`. Counts the proxy left empty (or wrote as something that
/// is not a number) are `None`: unknown, not zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Migration {
    pub epoch: String,
    pub state: State,
    pub change: String,
    pub arcs_done: Option<u64>,
    pub arcs_total: Option<u64>,
    pub rows_moved: Option<u64>,
    pub rows_total: Option<u64>,
    pub rows_per_sec: Option<f64>,
    pub eta_secs: Option<f64>,
    pub error: Option<String>,
}

impl Migration {
    /// Reads a row given as (column name, value) pairs; `state` must be there, every
    /// other column may be missing or empty. Extra columns are ignored.
    pub fn from_columns(row: &[(String, Option<String>)]) -> Result<Self, String> {
        let text = |name: &str| -> Option<String> {
            row.iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.as_deref())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let count = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok());
        let real = |name: &str| {
            text(name)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        let state = text("state").ok_or("SHOW MIGRATIONS has no `state` column")?;
        Ok(Migration {
            epoch: text("epoch").unwrap_or_default(),
            state: State::parse(&state),
            change: text("change").unwrap_or_default(),
            arcs_done: count("arcs_done"),
            arcs_total: count("arcs_total"),
            rows_moved: count("rows_moved"),
            rows_total: count("rows_total"),
            rows_per_sec: real("rows_per_sec"),
            eta_secs: real("eta_secs"),
            error: text("error"),
        })
    }

    /// Whether its `change` names `shard` as a word (`adds shard-4`, not `shard-40`).
    pub fn concerns(&self, shard: &str) -> bool {
        self.change
            .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
            .any(|w| w == shard)
    }

    /// Whether it adds (`Some(true)`) or removes (`Some(false)`) `shard`, when its
    /// `change` says so in the console's words (`adds shard-4`, `removes shard-4`).
    pub fn adds(&self, shard: &str) -> Option<bool> {
        if !self.concerns(shard) {
            return None;
        }
        match self.change.split_whitespace().next()? {
            "adds" | "add" => Some(true),
            "removes" | "remove" => Some(false),
            _ => None,
        }
    }

    /// How far it is, 0..=1: by rows when their total is known, else by arcs; `None`
    /// when neither total is. Done is always 1; anything else stays below it.
    fn fraction(&self) -> Option<f64> {
        if self.state == State::Done {
            return Some(1.0);
        }
        let of = |done: Option<u64>, total: Option<u64>| match (done, total) {
            (Some(d), Some(t)) if t > 0 => Some((d as f64 / t as f64).min(1.0)),
            _ => None,
        };
        of(self.rows_moved, self.rows_total).or_else(|| of(self.arcs_done, self.arcs_total))
    }
}

/// The progress line for `m`, labelled `label` (the shard).
pub fn line(label: &str, m: &Migration) -> String {
    let fraction = m.fraction();
    let pct = match fraction {
        // Floor, and never 100 % before the proxy says done.
        Some(f) if m.state == State::Done => format!("{:.0}", f * 100.0),
        Some(f) => format!("{}", ((f * 100.0).floor() as u64).min(99)),
        None => "?".to_owned(),
    };
    let rows = match (m.rows_moved, m.rows_total) {
        (Some(moved), Some(total)) => format!("{}/{} rows", thousands(moved), thousands(total)),
        (Some(moved), None) => format!("{} rows", thousands(moved)),
        (None, Some(total)) => format!("?/{} rows", thousands(total)),
        (None, None) => "? rows".to_owned(),
    };
    let rate = match m.rows_per_sec {
        Some(r) => format!("{} rows/s", thousands(r.round() as u64)),
        None => "? rows/s".to_owned(),
    };
    let tail = match m.state {
        State::Moving => format!("ETA {}", eta(m.eta_secs)),
        ref other => other.word().to_owned(),
    };
    format!(
        "{label} ▕{}▏{pct:>3}%  {rows}  {rate}  {tail}",
        bar(fraction)
    )
}

/// `BAR_CELLS` cells, filled by `fraction` (rounded down); all empty when unknown.
fn bar(fraction: Option<f64>) -> String {
    let full = fraction.map_or(0, |f| {
        ((f.clamp(0.0, 1.0) * BAR_CELLS as f64).floor() as usize).min(BAR_CELLS)
    });
    let mut s = "█".repeat(full);
    s.push_str(&"░".repeat(BAR_CELLS - full));
    s
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    // The leading group holds 1–3 digits, every later group exactly 3.
    let lead = match digits.len() % 3 {
        0 => 3.min(digits.len()),
        r => r,
    };
    let (head, rest) = digits.split_at(lead);
    let mut out = head.to_owned();
    for group in rest.as_bytes().chunks(3) {
        out.push(',');
        out.extend(group.iter().map(|b| char::from(*b)));
    }
    out
}

/// `12 s`, `3 min 05 s`, `1 h 02 min`; `?` when unknown.
fn eta(secs: Option<f64>) -> String {
    let Some(secs) = secs else {
        return "?".to_owned();
    };
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, &str)]) -> Migration {
        let cols: Vec<(String, Option<String>)> = pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), Some((*v).to_owned())))
            .collect();
        Migration::from_columns(&cols).expect("a migration")
    }

    fn moving() -> Migration {
        row(&[
            ("epoch", "7"),
            ("state", "moving"),
            ("change", "adds shard-4"),
            ("owner", "proxy-a"),
            ("arcs_done", "40"),
            ("arcs_total", "64"),
            ("rows_moved", "412000"),
            ("rows_total", "675000"),
            ("rows_per_sec", "21300.4"),
            ("eta_secs", "12.3"),
            ("write_pause_p99_ms", "4"),
            ("error", ""),
            ("started_at", "2026-12-01 10:00:00+00"),
            ("finished_at", ""),
            ("some_future_column", "x"),
        ])
    }

    #[test]
    fn the_line_shows_bar_rows_rate_and_eta() {
        assert_eq!(
            line("shard-4", &moving()),
            "shard-4 ▕██████░░░░▏ 61%  412,000/675,000 rows  21,300 rows/s  ETA 12 s"
        );
    }

    #[test]
    fn columns_are_read_by_name_in_any_order() {
        let m = moving();
        let mut cols: Vec<(String, Option<String>)> = vec![
            ("eta_secs".into(), Some("12.3".into())),
            ("rows_total".into(), Some("675000".into())),
            ("state".into(), Some("moving".into())),
            ("rows_per_sec".into(), Some("21300.4".into())),
            ("rows_moved".into(), Some("412000".into())),
        ];
        let shuffled = Migration::from_columns(&cols).expect("a migration");
        assert_eq!(line("shard-4", &shuffled), line("shard-4", &m));
        cols.retain(|(n, _)| n != "state");
        assert!(Migration::from_columns(&cols).is_err());
    }

    #[test]
    fn unknown_totals_fall_back_to_arcs_then_to_question_marks() {
        let mut m = moving();
        m.rows_total = None;
        assert_eq!(
            line("shard-4", &m),
            "shard-4 ▕██████░░░░▏ 62%  412,000 rows  21,300 rows/s  ETA 12 s"
        );
        m.arcs_total = None;
        m.rows_per_sec = None;
        m.eta_secs = None;
        assert_eq!(
            line("shard-4", &m),
            "shard-4 ▕░░░░░░░░░░▏  ?%  412,000 rows  ? rows/s  ETA ?"
        );
        m.rows_moved = None;
        assert_eq!(
            line("shard-4", &m),
            "shard-4 ▕░░░░░░░░░░▏  ?%  ? rows  ? rows/s  ETA ?"
        );
        // A total of zero is no total.
        m.rows_moved = Some(0);
        m.rows_total = Some(0);
        assert!(line("shard-4", &m).contains("?%  0/0 rows"));
    }

    #[test]
    fn empty_and_garbage_values_are_unknown_not_zero() {
        let m = row(&[
            ("state", "waiting"),
            ("rows_total", ""),
            ("rows_moved", "lots"),
            ("eta_secs", "-3"),
            ("rows_per_sec", "NaN"),
        ]);
        assert_eq!(
            (m.rows_total, m.rows_moved, m.eta_secs, m.rows_per_sec),
            (None, None, None, None)
        );
        assert_eq!(
            line("shard-4", &m),
            "shard-4 ▕░░░░░░░░░░▏  ?%  ? rows  ? rows/s  waiting"
        );
    }

    #[test]
    fn only_done_reaches_a_full_bar() {
        let mut m = moving();
        m.rows_moved = Some(675_000);
        assert!(line("shard-4", &m).contains("▕██████████▏ 99%"));
        m.rows_moved = Some(700_000); // the total is an estimate
        assert!(line("shard-4", &m).contains("▕██████████▏ 99%"));
        m.state = State::Done;
        assert_eq!(
            line("shard-4", &m),
            "shard-4 ▕██████████▏100%  700,000/675,000 rows  21,300 rows/s  done"
        );
        m.state = State::Paused;
        m.rows_moved = Some(5_000);
        assert!(
            line("shard-4", &m).ends_with("  paused"),
            "{}",
            line("shard-4", &m)
        );
        assert!(line("shard-4", &m).contains("▕░░░░░░░░░░▏  0%"));
    }

    #[test]
    fn thousands_separators() {
        let cases = [
            (0, "0"),
            (7, "7"),
            (999, "999"),
            (1_000, "1,000"),
            (21_300, "21,300"),
            (675_000, "675,000"),
            (1_234_567, "1,234,567"),
            (u64::MAX, "18,446,744,073,709,551,615"),
        ];
        for (n, text) in cases {
            assert_eq!(thousands(n), text);
        }
    }

    #[test]
    fn eta_formatting() {
        let cases = [
            (None, "?"),
            (Some(0.0), "0 s"),
            (Some(12.4), "12 s"),
            (Some(59.4), "59 s"),
            (Some(60.0), "1 min 00 s"),
            (Some(185.0), "3 min 05 s"),
            (Some(3599.0), "59 min 59 s"),
            (Some(3600.0), "1 h 00 min"),
            (Some(3725.0), "1 h 02 min"),
            (Some(90_000.0), "25 h 00 min"),
        ];
        for (secs, text) in cases {
            assert_eq!(eta(secs), text, "{secs:?}");
        }
    }

    #[test]
    fn a_migration_concerns_the_shard_it_names() {
        let m = moving();
        assert!(m.concerns("shard-4"));
        assert!(!m.concerns("shard-40"));
        assert!(!m.concerns("shard"));
        let other = row(&[("state", "done"), ("change", "removes shard-40")]);
        assert!(!other.concerns("shard-4"));
        assert_eq!(m.adds("shard-4"), Some(true));
        assert_eq!(other.adds("shard-40"), Some(false));
        assert_eq!(other.adds("shard-4"), None);
        let odd = row(&[("state", "done"), ("change", "rebalances shard-4")]);
        assert_eq!(odd.adds("shard-4"), None);
        assert!(State::Failed.finished() && State::Done.finished());
        assert!(!State::Paused.finished());
    }
}
