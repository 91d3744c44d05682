//! A reload swaps the whole configuration at once: users, TLS and topology come from one
//! snapshot. A client that connects while reloads race never authenticates with one
//! configuration's users against another configuration's databases.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::Env;
use taskflow_shard_proxy::config::{ProxyConfig, UserConfig};

/// Configuration `name`: the usual user plus `user`, serving the sharded database `db`.
fn variant(base: &ProxyConfig, user: &str, db: &str) -> ProxyConfig {
    let mut c = base.clone();
    c.users.push(UserConfig {
        name: user.into(),
        password: Some("secret".into()),
        password_file: None,
        databases: None,
        admin: false,
    });
    c.sharding.database = db.into();
    c
}

async fn can_connect(port: u16, user: &str, db: &str) -> bool {
    let dsn = format!("host=127.0.0.1 port={port} user={user} password=secret dbname={db}");
    match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            drop(client);
            true
        }
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_racing_with_clients_never_mixes_users_and_databases() {
    let env = Env::start(1).await;
    let a = variant(&env.config, "alice", "tasks_a");
    let b = variant(&env.config, "bob", "tasks_b");
    let proxy = env.proxy.as_ref().expect("running").proxy.clone();
    proxy.reload(a.clone()).await.expect("reload to A");
    let port = env.addr().port();

    let stop = Arc::new(AtomicBool::new(false));
    let reloads = Arc::new(AtomicUsize::new(0));
    let reloader = {
        let (proxy, stop, reloads) = (proxy.clone(), stop.clone(), reloads.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let next = if i.is_multiple_of(2) {
                    b.clone()
                } else {
                    a.clone()
                };
                proxy.reload(next).await.expect("reload");
                reloads.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::task::yield_now().await;
            }
        })
    };

    let mut mixed = Vec::new();
    let (mut legit_a, mut legit_b) = (0, 0);
    for round in 0..60 {
        let (x, y, p, q) = tokio::join!(
            can_connect(port, "alice", "tasks_b"),
            can_connect(port, "bob", "tasks_a"),
            can_connect(port, "alice", "tasks_a"),
            can_connect(port, "bob", "tasks_b"),
        );
        if x {
            mixed.push(format!(
                "round {round}: alice (config A) reached tasks_b (config B)"
            ));
        }
        if y {
            mixed.push(format!(
                "round {round}: bob (config B) reached tasks_a (config A)"
            ));
        }
        legit_a += usize::from(p);
        legit_b += usize::from(q);
    }
    stop.store(true, Ordering::Relaxed);
    reloader.await.expect("reloader");
    assert!(
        mixed.is_empty(),
        "a handshake mixed two configurations:\n{}",
        mixed.join("\n")
    );
    assert!(
        reloads.load(Ordering::Relaxed) > 60,
        "reloads really raced with the handshakes"
    );
    assert!(
        legit_a > 0 && legit_b > 0,
        "each configuration served its own clients (A {legit_a}, B {legit_b})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_changes_nothing() {
    let env = Env::start(1).await;
    let proxy = env.proxy.as_ref().expect("running").proxy.clone();
    let before = proxy.snapshot();
    // A new user, and a TLS key that cannot be read: the whole reload is refused.
    let mut bad = variant(&env.config, "carol", "tasks");
    bad.tls.cert_file = Some(env.dir.path().join("missing-cert.pem"));
    bad.tls.key_file = Some(env.dir.path().join("missing-key.pem"));
    let err = proxy.reload(bad).await.expect_err("unreadable TLS files");
    assert!(err.to_string().contains("tls"), "{err}");
    let after = proxy.snapshot();
    assert!(
        Arc::ptr_eq(&before, &after),
        "the running snapshot is untouched"
    );
    assert!(!after.users.contains_key("carol"));
    assert!(!can_connect(env.addr().port(), "carol", "tasks").await);
}
