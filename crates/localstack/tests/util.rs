//! Checks the small helpers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use taskflow_localstack::{
    binary_path, ephemeral_ports_start, free_port, wait_until, wait_until_some, Error,
    TEST_PORTS_FROM,
};

#[test]
fn free_ports_are_never_repeated_and_bindable() {
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let p = free_port().unwrap();
        assert!(seen.insert(p), "port {p} handed out twice");
    }
    let p = free_port().unwrap();
    std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
}

/// The CI failure of 2026-12-08: the gateway's port, picked by the kernel from the
/// ephemeral range, was taken as the source port of some test's outgoing connection
/// before the gateway bound it ("Address already in use"). Ports below the ephemeral
/// range are never source ports.
#[test]
fn free_ports_lie_below_the_ephemeral_range() {
    let ephemeral_low = ephemeral_ports_start();
    assert!(
        ephemeral_low >= TEST_PORTS_FROM + 1000,
        "this host's ephemeral range starts at {ephemeral_low}: too low to test"
    );
    for _ in 0..200 {
        let p = free_port().unwrap();
        assert!(
            (TEST_PORTS_FROM..ephemeral_low).contains(&p),
            "port {p} is outside {TEST_PORTS_FROM}..{ephemeral_low}"
        );
    }
}

#[tokio::test]
async fn wait_until_polls_and_times_out() {
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    wait_until(Duration::from_secs(5), move || {
        let n = n2.clone();
        async move { n.fetch_add(1, Ordering::SeqCst) >= 3 }
    })
    .await
    .unwrap();
    assert!(n.load(Ordering::SeqCst) >= 4);

    let err = wait_until(Duration::from_millis(100), || async { false })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");

    let v = wait_until_some(Duration::from_secs(1), || async { Some(42) })
        .await
        .unwrap();
    assert_eq!(v, 42);
}

#[test]
fn binary_path_explains_a_missing_binary() {
    let err = binary_path("taskflow-no-such-binary").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("cargo build --workspace"), "{msg}");
    assert!(msg.contains("taskflow-no-such-binary"), "{msg}");
}

#[test]
fn binary_path_finds_files_next_to_the_test_executable() {
    // target/<profile>/deps/<this test> → target/<profile>/
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    assert_eq!(deps.file_name().unwrap(), "deps");
    let name = exe.file_name().unwrap().to_str().unwrap();
    // The test binary itself lives in deps/, so look it up via the override instead.
    std::env::set_var("TASKFLOW_BIN_DIR", deps);
    let found = binary_path(name).unwrap();
    std::env::remove_var("TASKFLOW_BIN_DIR");
    assert_eq!(found, exe);
}
