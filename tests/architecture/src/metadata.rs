//! The workspace's crate graph, from `cargo metadata`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// One workspace crate and its direct dependencies by kind.
#[derive(Debug, Clone)]
pub struct Crate {
    pub name: String,
    /// Manifest directory, relative to the workspace root (`shard-proxy/core`).
    pub dir: String,
    /// Direct normal (non-dev, non-build) dependencies, by package name.
    pub normal: BTreeSet<String>,
    /// Direct dev-dependencies.
    pub dev: BTreeSet<String>,
}

/// The resolved graph: workspace crates, and every package's normal dependencies.
pub struct Graph {
    pub crates: BTreeMap<String, Crate>,
    /// Package name → names of its normal dependencies (resolved, all packages).
    normal_deps: BTreeMap<String, BTreeSet<String>>,
}

/// The host's target triple, from `rustc -vV`.
fn host_triple() -> Result<String, String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("cannot run rustc -vV: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "rustc -vV printed no host line".to_owned())
}

impl Graph {
    /// Runs `cargo metadata` on the workspace, for the host platform only: offline, the
    /// graph of every platform would need packages never downloaded here (Windows-only
    /// crates), and a fresh machine does not have them.
    pub fn load() -> Result<Graph, String> {
        let root = crate::workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let host = host_triple()?;
        let out = Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--offline"])
            .args(["--filter-platform", &host])
            .current_dir(&root)
            .output()
            .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(Graph::from_json(&v, &root.to_string_lossy()))
    }

    fn from_json(v: &Value, root: &str) -> Graph {
        let empty = Vec::new();
        let arr = |v: &Value, k: &str| v.get(k).and_then(Value::as_array).unwrap_or(&empty).clone();
        let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let mut names = BTreeMap::new();
        for p in arr(v, "packages") {
            names.insert(str_of(&p, "id"), str_of(&p, "name"));
        }
        let members: BTreeSet<String> = arr(v, "workspace_members")
            .iter()
            .filter_map(|m| m.as_str().map(str::to_owned))
            .collect();
        let mut crates = BTreeMap::new();
        for p in arr(v, "packages") {
            if !members.contains(&str_of(&p, "id")) {
                continue;
            }
            let manifest = str_of(&p, "manifest_path");
            let dir = manifest
                .strip_prefix(root)
                .unwrap_or(&manifest)
                .trim_start_matches('/')
                .trim_end_matches("Cargo.toml")
                .trim_end_matches('/')
                .to_owned();
            let (mut normal, mut dev) = (BTreeSet::new(), BTreeSet::new());
            for d in arr(&p, "dependencies") {
                let name = str_of(&d, "name");
                match d.get("kind").and_then(Value::as_str) {
                    Some("dev") => dev.insert(name),
                    Some("build") => false,
                    _ => normal.insert(name),
                };
            }
            let name = str_of(&p, "name");
            crates.insert(
                name.clone(),
                Crate {
                    name,
                    dir,
                    normal,
                    dev,
                },
            );
        }
        let mut normal_deps = BTreeMap::new();
        let resolve = v.get("resolve").cloned().unwrap_or(Value::Null);
        for node in arr(&resolve, "nodes") {
            let id = str_of(&node, "id");
            let mut deps = BTreeSet::new();
            for d in arr(&node, "deps") {
                let is_normal = arr(&d, "dep_kinds")
                    .iter()
                    .any(|k| k.get("kind").is_none_or(Value::is_null));
                if is_normal {
                    if let Some(n) = names.get(&str_of(&d, "pkg")) {
                        deps.insert(n.clone());
                    }
                }
            }
            if let Some(n) = names.get(&id) {
                normal_deps
                    .entry(n.clone())
                    .or_insert_with(BTreeSet::new)
                    .extend(deps);
            }
        }
        Graph {
            crates,
            normal_deps,
        }
    }

    /// Every package `name` reaches through normal dependencies (not itself).
    pub fn normal_closure(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![name.to_owned()];
        while let Some(n) = stack.pop() {
            for d in self.normal_deps.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        seen
    }
}
