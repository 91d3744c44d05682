//! The stack's shards: the three it always runs, and the spare one `make add-shard` adds
//! while it runs.
//!
//! Why added shards are remembered in a file of the state directory: the proxy stores its
//! ring durably (`taskflow_meta.ring_epochs`) and refuses to start from a configuration
//! whose shard list differs from it while shards hold rows. Once `ADD SHARD shard-4` was
//! accepted, every proxy configuration the stack writes — at `make restart`, or when the
//! supervisor restarts a crashed proxy — must list shard-4 too, and stop listing it once
//! `REMOVE SHARD` is done. `db-reset` deletes the file along with the ring it mirrors.

use std::io::ErrorKind;

use crate::layout::{Layout, Service, SERVICES, SPARE_SERVICES};

/// A shard: its name in the proxy's ring, and the stack's service running its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub name: &'static str,
    pub service: &'static str,
}

/// The shards every stack starts with.
pub const BASE: [Shard; 3] = [
    Shard {
        name: "shard-1",
        service: "pg-shard-1",
    },
    Shard {
        name: "shard-2",
        service: "pg-shard-2",
    },
    Shard {
        name: "shard-3",
        service: "pg-shard-3",
    },
];

/// The shards `make add-shard` may add (each has a service in `SPARE_SERVICES`).
pub const SPARE: [Shard; 1] = [Shard {
    name: "shard-4",
    service: "pg-shard-4",
}];

/// The spare shard called `name`.
pub fn spare(name: &str) -> Option<Shard> {
    SPARE.iter().copied().find(|s| s.name == name)
}

/// The spare shards added to this stack's ring (unknown names in the file are ignored).
pub fn added(layout: &Layout) -> Vec<Shard> {
    let text = std::fs::read_to_string(layout.added_shards_file()).unwrap_or_default();
    SPARE
        .iter()
        .copied()
        .filter(|s| text.lines().any(|l| l.trim() == s.name))
        .collect()
}

/// Every shard of the stack's ring: the base ones, then the added ones.
pub fn all(layout: &Layout) -> Vec<Shard> {
    BASE.iter().copied().chain(added(layout)).collect()
}

/// Remembers that `shard` is part of the ring.
pub fn remember(layout: &Layout, shard: Shard) -> std::io::Result<()> {
    let mut names: Vec<&str> = added(layout).iter().map(|s| s.name).collect();
    if !names.contains(&shard.name) {
        names.push(shard.name);
    }
    write(layout, &names)
}

/// Forgets `shard` (no longer part of the ring).
pub fn forget(layout: &Layout, shard: Shard) -> std::io::Result<()> {
    let names: Vec<&str> = added(layout)
        .iter()
        .map(|s| s.name)
        .filter(|n| *n != shard.name)
        .collect();
    write(layout, &names)
}

fn write(layout: &Layout, names: &[&str]) -> std::io::Result<()> {
    let path = layout.added_shards_file();
    if names.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let mut text = String::new();
    for n in names {
        text.push_str(n);
        text.push('\n');
    }
    // Written aside and renamed, so a reader never sees half a list.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// The services of this stack: the fixed ones and the clusters of added shards.
pub fn services(layout: &Layout) -> Vec<Service> {
    let added = added(layout);
    SERVICES
        .iter()
        .copied()
        .chain(
            SPARE_SERVICES
                .iter()
                .copied()
                .filter(|svc| added.iter().any(|s| s.service == svc.name)),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout {
            root: dir.path().to_path_buf(),
        };
        (dir, layout)
    }

    #[test]
    fn added_shards_are_remembered_and_forgotten() {
        let (_dir, layout) = layout();
        let names = |l: &Layout| all(l).iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(names(&layout), ["shard-1", "shard-2", "shard-3"]);
        let four = spare("shard-4").expect("spare shard-4");
        remember(&layout, four).expect("remember");
        remember(&layout, four).expect("remember twice");
        assert_eq!(names(&layout), ["shard-1", "shard-2", "shard-3", "shard-4"]);
        assert!(services(&layout).iter().any(|s| s.name == "pg-shard-4"));
        forget(&layout, four).expect("forget");
        assert_eq!(names(&layout), ["shard-1", "shard-2", "shard-3"]);
        assert!(!layout.added_shards_file().exists());
        assert!(!services(&layout).iter().any(|s| s.name == "pg-shard-4"));
        forget(&layout, four).expect("forget what is not there");
    }

    #[test]
    fn unknown_names_in_the_file_are_ignored() {
        let (_dir, layout) = layout();
        std::fs::write(layout.added_shards_file(), "shard-9\n shard-4 \n").expect("write");
        assert_eq!(added(&layout), vec![SPARE[0]]);
        assert_eq!(spare("shard-1"), None);
    }
}
