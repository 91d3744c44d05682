//! Prefixed log streaming: every file in the stack's `logs/` directory, one colour-free
//! `service | line` per line, new files picked up as services start.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use crate::layout::Layout;

/// `make logs`: prints the logs so far, then follows them when `follow` is set.
pub async fn follow(layout: &Layout, follow: bool) -> anyhow::Result<()> {
    if !layout.logs().is_dir() {
        anyhow::bail!("no logs yet under {}", layout.logs().display());
    }
    stream(layout, false, follow).await;
    Ok(())
}

/// Streams log files; with `from_end`, files present at the start are read from their end
/// (the foreground stack shows this run's lines, not the previous run's).
pub async fn stream(layout: &Layout, from_end: bool, follow: bool) {
    let mut offsets: BTreeMap<PathBuf, u64> = BTreeMap::new();
    let mut first = true;
    loop {
        let mut files: Vec<PathBuf> = std::fs::read_dir(layout.logs())
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for path in files {
            let start = if first && from_end {
                std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
            } else {
                0
            };
            let offset = offsets.entry(path.clone()).or_insert(start);
            let service = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(text) = read_from(&path, offset) {
                for line in text.lines() {
                    println!("{service:>14} | {line}");
                }
            }
        }
        first = false;
        if !follow {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reads whole lines appended since `offset` and advances it; a truncated file restarts.
fn read_from(path: &PathBuf, offset: &mut u64) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if len < *offset {
        *offset = 0;
    }
    if len == *offset {
        return None;
    }
    f.seek(SeekFrom::Start(*offset)).ok()?;
    let mut buf = Vec::new();
    f.take(len - *offset).read_to_end(&mut buf).ok()?;
    let end = buf.iter().rposition(|b| *b == b'\n')? + 1;
    buf.truncate(end);
    *offset += end as u64;
    Some(String::from_utf8_lossy(&buf).into_owned())
}
