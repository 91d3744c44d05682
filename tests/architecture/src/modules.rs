//! The import graph between the modules of one crate, from its sources.
//!
//! A module `a` depends on a sibling `b` when code in `a` (or below it) names a path
//! through `b` — `crate::…::b::…` or `super::b::…`. Test code (`#[cfg(test)]`) is skipped:
//! tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use syn::visit::Visit;

/// Module path of a source file relative to `src/` (`session/extended/run.rs` →
/// `["session", "extended", "run"]`; `lib.rs`/`main.rs`/`mod.rs` name their directory).
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
    {
        parts.pop();
    }
    parts
}

/// Edges `a → b` between sibling modules (each written as a `/`-joined path), for every
/// file of the crate whose sources are in `src`.
pub fn sibling_edges(src: &Path) -> Result<BTreeSet<(String, String)>, String> {
    let files = crate::rust_files(src);
    let modules: BTreeSet<Vec<String>> = files
        .iter()
        .filter_map(|f| f.strip_prefix(src).ok())
        .map(module_of)
        .collect();
    let mut edges = BTreeSet::new();
    for file in &files {
        let Ok(rel) = file.strip_prefix(src) else {
            continue;
        };
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let ast = syn::parse_file(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let me = module_of(rel);
        let mut paths = PathCollector::default();
        paths.visit_file(&ast);
        for p in paths.found {
            let Some(target) = resolve(&me, &p) else {
                continue;
            };
            if let Some(edge) = sibling_edge(&me, &target, &modules) {
                edges.insert(edge);
            }
        }
    }
    Ok(edges)
}

/// A path as seen from module `me`, made absolute within the crate (`None` for paths into
/// other crates).
fn resolve(me: &[String], path: &[String]) -> Option<Vec<String>> {
    let first = path.first()?;
    if first == "crate" {
        return Some(path[1..].to_vec());
    }
    if first == "super" || first == "self" {
        let mut base = me.to_vec();
        let mut rest = path;
        while let Some(head) = rest.first() {
            match head.as_str() {
                "super" => {
                    base.pop()?;
                }
                "self" => {}
                _ => break,
            }
            rest = &rest[1..];
        }
        base.extend(rest.iter().cloned());
        return Some(base);
    }
    None
}

/// The edge between the two sibling modules where `me` and `target` part, if `target`
/// there is a module of the crate.
fn sibling_edge(
    me: &[String],
    target: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<(String, String)> {
    let k = me.iter().zip(target).take_while(|(a, b)| a == b).count();
    if k >= me.len() || k >= target.len() {
        return None;
    }
    let to = target[..=k].to_vec();
    if !modules.contains(&to) {
        return None;
    }
    Some((me[..=k].join("/"), to.join("/")))
}

/// Collects every `crate::`/`super::`/`self::` path outside test code.
#[derive(Default)]
struct PathCollector {
    found: Vec<Vec<String>>,
}

impl<'ast> Visit<'ast> for PathCollector {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !crate::is_test_attr(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !crate::is_test_attr(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segs.len() > 1 {
            self.found.push(segs);
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut out = Vec::new();
        flatten_use(&u.tree, &mut Vec::new(), &mut out);
        self.found.extend(out);
    }
}

/// Every path a `use` tree names.
fn flatten_use(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            flatten_use(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => out.push(with(prefix, n.ident.to_string())),
        syn::UseTree::Rename(r) => out.push(with(prefix, r.ident.to_string())),
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                flatten_use(t, prefix, out);
            }
        }
    }
}

fn with(prefix: &[String], last: String) -> Vec<String> {
    let mut v = prefix.to_vec();
    v.push(last);
    v
}

/// The modules that sit on an import circle, as groups (strongly connected components of
/// more than one module).
pub fn cycles(edges: &BTreeSet<(String, String)>) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges {
        graph.entry(a).or_default().push(b);
        graph.entry(b).or_default();
    }
    // Two modules are on one circle when each reaches the other.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            for &m in graph.get(n).into_iter().flatten() {
                if seen.insert(m) {
                    stack.push(m);
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&str, BTreeSet<&str>> = graph.keys().map(|&n| (n, reach(n))).collect();
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut placed = BTreeSet::new();
    for (&n, r) in &reaches {
        if placed.contains(n) || !r.contains(n) {
            continue;
        }
        let group: Vec<String> = r
            .iter()
            .filter(|m| reaches.get(*m).is_some_and(|rm| rm.contains(n)))
            .map(|m| (*m).to_owned())
            .collect();
        placed.extend(group.iter().cloned());
        groups.push(group);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(a: &str, b: &str) -> (String, String) {
        (a.into(), b.into())
    }

    #[test]
    fn finds_a_circle_and_only_it() {
        let edges: BTreeSet<_> = [e("a", "b"), e("b", "c"), e("c", "a"), e("c", "d")].into();
        assert_eq!(cycles(&edges), vec![vec!["a", "b", "c"]]);
        let edges: BTreeSet<_> = [e("a", "b"), e("b", "c")].into();
        assert!(cycles(&edges).is_empty());
    }

    #[test]
    fn resolves_paths_to_sibling_edges() {
        let modules: BTreeSet<Vec<String>> = [
            vec!["session".to_owned()],
            vec!["session".to_owned(), "txn".to_owned()],
            vec!["session".to_owned(), "extended".to_owned()],
            vec!["proxy".to_owned()],
        ]
        .into();
        let me = vec!["session".to_owned(), "extended".to_owned()];
        let p = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
        let t = resolve(&me, &p("super::txn::Txn")).expect("resolves");
        assert_eq!(
            sibling_edge(&me, &t, &modules),
            Some(e("session/extended", "session/txn"))
        );
        let t = resolve(&me, &p("crate::proxy::Proxy")).expect("resolves");
        assert_eq!(sibling_edge(&me, &t, &modules), Some(e("session", "proxy")));
        let t = resolve(&me, &p("super::Session")).expect("resolves");
        assert_eq!(sibling_edge(&me, &t, &modules), None);
        assert_eq!(resolve(&me, &p("std::sync::Arc")), None);
    }
}
