//! The 2PC decision log: one fsync'd file per committed cross-shard transaction, written
//! after every shard prepared and before any shard commits.
//!
//! Why files, and why fsync on a blocking thread: the decision must survive a crash of the
//! proxy between two `COMMIT PREPARED`s, so recovery can finish what was decided; fsync
//! can take milliseconds and must not stall a runtime worker that other clients share.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Prefix of every prepared-transaction id the proxy creates.
pub const GID_PREFIX: &str = "taskflow_";

/// Where decision files live under the state directory.
pub fn decisions_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("2pc")
}

/// The gid of transaction `id` on shard `shard`.
pub fn gid(id: &str, shard: &str) -> String {
    format!("{GID_PREFIX}{id}_{shard}")
}

/// The uuid part of one of our gids.
pub fn gid_id(gid: &str) -> Option<&str> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let id = rest.get(..32)?;
    if id.bytes().all(|b| b.is_ascii_hexdigit()) && rest.as_bytes().get(32) == Some(&b'_') {
        Some(id)
    } else {
        None
    }
}

/// Records the commit decision durably, on a blocking thread.
pub async fn record(state_dir: &Path, id: &str, gids: Vec<String>) -> std::io::Result<PathBuf> {
    let (dir, id) = (state_dir.to_owned(), id.to_owned());
    tokio::task::spawn_blocking(move || write_decision(&dir, &id, &gids))
        .await
        .map_err(std::io::Error::other)?
}

/// Writes the commit decision durably (file and directory fsync'd).
fn write_decision(state_dir: &Path, id: &str, gids: &[String]) -> std::io::Result<PathBuf> {
    let dir = decisions_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("{id}.tmp"));
    let path = dir.join(format!("{id}.commit"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(gids.join("\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(path)
}

/// The ids of every recorded decision.
pub fn decided(state_dir: &Path) -> std::collections::HashSet<String> {
    std::fs::read_dir(decisions_dir(state_dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".commit").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Forgets a decision once every shard committed.
pub fn forget(state_dir: &Path, id: &str) {
    let _ = std::fs::remove_file(decisions_dir(state_dir).join(format!("{id}.commit")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_ids() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(gid_id(&gid(id, "shard-1")), Some(id));
        assert_eq!(gid_id("taskflow_short_shard-1"), None);
        assert_eq!(gid_id("other_0123456789abcdef0123456789abcdef_x"), None);
    }

    #[test]
    fn decision_is_written_and_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write_decision(dir.path(), "abc", &["g1".into(), "g2".into()]).expect("write");
        assert_eq!(std::fs::read_to_string(p).expect("read"), "g1\ng2");
        assert!(decided(dir.path()).contains("abc"));
        forget(dir.path(), "abc");
        assert!(decided(dir.path()).is_empty());
    }
}
