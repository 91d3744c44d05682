//! ARCHITECTURE.md's dependency rules, held by `make test`. Each failure names the rule
//! and what broke it.

use std::collections::BTreeSet;

use taskflow_architecture::metadata::Graph;
use taskflow_architecture::{functions, modules, rust_files, workspace_root};

/// Crates that do I/O or bring an async runtime: never in a pure crate's graph.
const IMPURE: &[&str] = &[
    "tokio",
    "tokio-util",
    "mio",
    "socket2",
    "tokio-postgres",
    "postgres",
    "hyper",
    "hyper-util",
    "redis",
    "rdkafka",
    "reqwest",
    "lettre",
    "taskflow-kit",
];

/// Longest a non-test function may be without a written `// long-fn:` reason.
const MAX_FN_LINES: usize = 80;

fn graph() -> Graph {
    Graph::load().unwrap_or_else(|e| panic!("cargo metadata: {e}"))
}

fn impure_in(graph: &Graph, krate: &str) -> BTreeSet<String> {
    graph
        .normal_closure(krate)
        .into_iter()
        .filter(|d| IMPURE.contains(&d.as_str()))
        .collect()
}

#[test]
fn the_proxy_core_is_pure() {
    let g = graph();
    assert!(
        g.crates.contains_key("taskflow-proxy-core"),
        "the core crate exists"
    );
    let bad = impure_in(&g, "taskflow-proxy-core");
    assert!(
        bad.is_empty(),
        "taskflow-proxy-core must do no I/O, yet depends on {bad:?}"
    );
}

#[test]
fn the_purity_check_sees_io() {
    // The check must be able to fail: the proxy's runtime crate does I/O.
    let bad = impure_in(&graph(), "taskflow-shard-proxy");
    assert!(
        bad.contains("tokio"),
        "the runtime crate's graph has tokio: {bad:?}"
    );
}

#[test]
fn the_contracts_are_pure() {
    let bad = impure_in(&graph(), "taskflow-contracts");
    assert!(
        bad.is_empty(),
        "taskflow-contracts must do no I/O, yet depends on {bad:?}"
    );
}

#[test]
fn no_daemon_depends_on_another() {
    let g = graph();
    let daemons: BTreeSet<&str> = g
        .crates
        .values()
        .filter(|c| c.dir.starts_with("daemons/") || c.dir == "shard-proxy")
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(daemons.len(), 4, "four daemons: {daemons:?}");
    for d in &daemons {
        let c = &g.crates[*d];
        let on: Vec<_> = c
            .normal
            .union(&c.dev)
            .filter(|x| daemons.contains(x.as_str()))
            .collect();
        assert!(
            on.is_empty(),
            "{d} depends on daemon crate(s) {on:?}: daemons meet only over the wire"
        );
    }
}

#[test]
fn daemons_holds_only_daemons_and_the_proxy_needs_nothing_from_it() {
    let g = graph();
    for c in g.crates.values().filter(|c| c.dir.starts_with("daemons/")) {
        assert!(
            matches!(
                c.name.as_str(),
                "taskflow-gateway" | "taskflow-auth" | "taskflow-notify"
            ),
            "{} lives under daemons/ but is not a daemon; shared libraries go to crates/",
            c.name
        );
    }
    for p in ["taskflow-shard-proxy", "taskflow-proxy-core"] {
        for d in &g.crates[p].normal {
            if let Some(dep) = g.crates.get(d) {
                assert!(
                    !dep.dir.starts_with("daemons/"),
                    "{p} depends on {d} under daemons/"
                );
            }
        }
    }
}

#[test]
fn only_tests_and_the_dev_stack_use_the_local_stack_library() {
    let g = graph();
    let allowed = ["taskflow-devstack", "taskflow-e2e"];
    for c in g.crates.values() {
        if c.normal.contains("taskflow-localstack") {
            assert!(
                allowed.contains(&c.name.as_str()),
                "{} depends on taskflow-localstack at run time; only tests, benches and the dev stack may",
                c.name
            );
        }
    }
}

#[test]
fn no_import_circles_between_modules() {
    let g = graph();
    let root = workspace_root();
    let mut circles = Vec::new();
    for c in g.crates.values() {
        let src = root.join(&c.dir).join("src");
        let edges = modules::sibling_edges(&src).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        for group in modules::cycles(&edges) {
            circles.push(format!("{}: {}", c.name, group.join(" ⇄ ")));
        }
    }
    assert!(
        circles.is_empty(),
        "modules that import each other:\n{}",
        circles.join("\n")
    );
}

#[test]
fn functions_fit_on_a_screen() {
    let g = graph();
    let root = workspace_root();
    let mut long = Vec::new();
    for c in g.crates.values() {
        for file in rust_files(&root.join(&c.dir).join("src")) {
            for f in
                functions::long_functions(&file, MAX_FN_LINES).unwrap_or_else(|e| panic!("{e}"))
            {
                let rel = f
                    .file
                    .strip_prefix(&root)
                    .unwrap_or(&f.file)
                    .display()
                    .to_string();
                long.push(format!("{rel}:{} {} ({} lines)", f.line, f.name, f.lines));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines without a `// long-fn: <reason>` comment:\n{}",
        long.join("\n")
    );
}
