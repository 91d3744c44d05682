//! taskflow-architecture: reads the workspace (its `cargo metadata` and its sources) so
//! the tests beside this crate can hold ARCHITECTURE.md's rules as compile-time-like
//! checks: which crate may depend on which, that modules inside a crate import each other
//! in one direction only, and that functions fit on a screen.
//!
//! Why tests and not a lint: the rules are ours, not rustc's or clippy's; a failing test
//! names the rule and the offending crate, module or function, in `make test`.

pub mod functions;
pub mod metadata;
pub mod modules;

use std::path::{Path, PathBuf};

/// The workspace root (this crate lives at `tests/architecture`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Every `.rs` file under `dir`, sorted, skipping build output.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "target") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// True for `#[cfg(test)]` and `#[test]`-like attributes (`#[tokio::test]` too).
pub fn is_test_attr(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let path = a.path();
        let last = path.segments.last().map(|s| s.ident.to_string());
        if last.as_deref() == Some("test") {
            return true;
        }
        if path.is_ident("cfg") {
            let tokens = a
                .meta
                .require_list()
                .map(|l| l.tokens.to_string())
                .unwrap_or_default();
            return tokens.trim() == "test";
        }
        false
    })
}
