//! Protocol features beyond plain queries: the admin console, COPY in both directions,
//! cancel requests forwarded to the backend running the query, and TLS via SSLRequest.

mod common;

use std::time::Duration;

use common::{rows, Env};
use futures_util::{SinkExt, TryStreamExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console() {
    let env = Env::start(3).await;
    let data = env.client("tasks").await;
    data.simple_query("SELECT count(*) FROM tasks")
        .await
        .expect("scatter");
    let admin = env.client("admin").await;
    let shards = rows(
        &admin
            .simple_query("SHOW SHARDS")
            .await
            .expect("SHOW SHARDS"),
    );
    assert_eq!(shards.len(), 3);
    assert_eq!(shards[0][0], "shard-1");
    let ring = env.ring();
    for key in [1i64, 42, 123_456_789, -5] {
        let r = rows(
            &admin
                .simple_query(&format!("SHOW SHARD FOR {key}"))
                .await
                .expect("SHOW SHARD FOR"),
        );
        assert_eq!(r[0][2], ring.shard_name_for(key), "key {key}");
    }
    let r = rows(&admin.simple_query("SHOW RING").await.expect("SHOW RING"));
    assert_eq!(r.len(), 3);
    assert_eq!(r[0][2], "256");
    let pools = rows(&admin.simple_query("SHOW POOLS").await.expect("SHOW POOLS"));
    assert_eq!(pools.len(), 4, "three shards and auth");
    let clients = rows(
        &admin
            .simple_query("SHOW CLIENTS")
            .await
            .expect("SHOW CLIENTS"),
    );
    assert!(clients.len() >= 2);
    let stats = rows(&admin.simple_query("SHOW STATS").await.expect("SHOW STATS"));
    assert!(
        stats.iter().any(|r| r[0] == "scatter_reads" && r[1] != "0"),
        "{stats:?}"
    );
    admin.simple_query("PAUSE").await.expect("PAUSE");
    let pending = tokio::spawn(async move { data.simple_query("SELECT 1").await.map(|_| data) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "queries wait while paused");
    admin.simple_query("RESUME").await.expect("RESUME");
    tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("resumed")
        .expect("join")
        .expect("query after resume");
    let err = admin
        .simple_query("SHOW NONSENSE")
        .await
        .expect_err("unknown command");
    assert_eq!(err.code().map(|c| c.code()), Some("42601"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_and_cancel() {
    let env = Env::start(2).await;
    let c = env.client("auth").await;
    // COPY FROM STDIN (tokio-postgres uses the extended protocol for it).
    let sink = c
        .copy_in("COPY users (email, name, password_hash, role) FROM STDIN")
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..100 {
        data.push_str(&format!("u{i}@example.com\tUser {i}\tx\tuser\n"));
    }
    sink.send(bytes::Bytes::from(data))
        .await
        .expect("send rows");
    let n = sink.finish().await.expect("finish copy");
    assert_eq!(n, 100);
    // COPY TO STDOUT.
    let stream = c
        .copy_out("COPY (SELECT email FROM users ORDER BY id) TO STDOUT")
        .await
        .expect("copy out");
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.expect("copy data");
    let text: String = chunks
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert_eq!(text.lines().count(), 100);
    assert!(text.starts_with("u0@example.com\n"));
    // Simple-protocol COPY through psql on the sharded database, with a shard hint.
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-q",
            "-d",
            &env.conn_string("tasks"),
            "-c",
            "SET taskflow.shard = 'shard-1'",
            "-c",
            "\\copy (SELECT 1 AS x) TO STDOUT",
        ])
        .output();
    if let Ok(out) = out {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    }

    // Cancel: the backend running pg_sleep gets the cancel.
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let err = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancelled in time")
        .expect("join")
        .expect_err("query was cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_when_configured() {
    let mut env = Env::start(1).await;
    let dir = env.dir.path().to_owned();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("openssl not available; skipping");
        return;
    }
    env.config.tls.cert_file = Some(cert);
    env.config.tls.key_file = Some(key);
    env.stop_proxy().await;
    env.start_proxy().await;
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-qAt",
            "-d",
            &format!("{} sslmode=require", env.conn_string("tasks")),
            "-c",
            "SELECT 'over tls'",
        ])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over tls");
    let admin = env.client("admin").await;
    let clients = rows(&admin.simple_query("SHOW CLIENTS").await.expect("clients"));
    assert!(
        clients.iter().all(|c| c[5] == "false"),
        "admin itself is plain"
    );
    // Plain connections still work when the client does not ask for TLS.
    env.client("tasks")
        .await
        .simple_query("SELECT 1")
        .await
        .expect("plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_users_and_shards() {
    let mut env = Env::start(2).await;
    let path = env.dir.path().join("proxy.toml");
    // Start with shard-1 only, then RELOAD with both shards and a second user.
    let all_shards = env.config.shards.clone();
    env.config.shards.truncate(1);
    std::fs::write(&path, env.config_toml("")).expect("write config");
    env.config_path = Some(path.clone());
    env.stop_proxy().await;
    env.start_proxy().await;
    let admin = env.client("admin").await;
    assert_eq!(
        rows(&admin.simple_query("SHOW SHARDS").await.expect("shards")).len(),
        1
    );
    let alice = format!(
        "host=127.0.0.1 port={} user=alice password=wonderland dbname=tasks",
        env.addr().port()
    );
    assert!(tokio_postgres::connect(&alice, tokio_postgres::NoTls)
        .await
        .is_err());

    env.config.shards = all_shards;
    let text = env.config_toml("") + "[[users]]\nname = \"alice\"\npassword = \"wonderland\"\n";
    std::fs::write(&path, text).expect("write config");
    admin.simple_query("RELOAD").await.expect("RELOAD");
    assert_eq!(
        rows(&admin.simple_query("SHOW SHARDS").await.expect("shards")).len(),
        2
    );
    let (c, conn) = tokio_postgres::connect(&alice, tokio_postgres::NoTls)
        .await
        .expect("alice after reload");
    tokio::spawn(conn);
    c.simple_query("SELECT count(*) FROM tasks")
        .await
        .expect("scatter over both shards");

    // A broken file is refused and the running configuration stays.
    std::fs::write(&path, "listen = 42\n").expect("write bad config");
    let err = admin
        .simple_query("RELOAD")
        .await
        .expect_err("bad config refused");
    assert!(format!("{err:?}").contains("listen"), "{err:?}");
    assert_eq!(
        rows(&admin.simple_query("SHOW SHARDS").await.expect("shards")).len(),
        2
    );

    // Once a shard holds rows, a shard list that re-routes keys starts an online migration
    // instead: the rows move to their new owner and stay reachable.
    c.simple_query(
        "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (1, 1, 1, 'kept')",
    )
    .await
    .expect("insert");
    let mut one_shard = env.config.clone();
    one_shard.shards.truncate(1);
    let full = std::mem::replace(&mut env.config, one_shard);
    std::fs::write(&path, env.config_toml("")).expect("write config");
    env.config = full;
    admin
        .simple_query("RELOAD")
        .await
        .expect("a RELOAD that moves rows starts a migration");
    let mut shards = 2;
    for _ in 0..300 {
        shards = rows(&admin.simple_query("SHOW SHARDS").await.expect("shards")).len();
        if shards == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(shards, 1, "the migration removing shard-2 finished");
    let migrations = rows(
        &admin
            .simple_query("SHOW MIGRATIONS")
            .await
            .expect("migrations"),
    );
    assert_eq!(migrations[0][1], "done");
    assert_eq!(migrations[0][2], "removes shard-2");
    let kept = c
        .simple_query("SELECT title FROM tasks WHERE performer_id = 1")
        .await
        .expect("read");
    assert_eq!(rows(&kept).len(), 1, "the row is still reachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_copy_from_stdin_splits_rows_by_key() {
    let env = Env::start(3).await;
    let ring = env.ring();
    let run = |command: &str, input: String| {
        use std::io::Write;
        let mut child = std::process::Command::new("psql")
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &env.conn_string("tasks"),
                "-c",
                command,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        child.wait_with_output().expect("psql output")
    };
    // CSV with a header and a quoted comma.
    let mut csv = String::from("id,performer_id,creator_id,title\n");
    for p in 1..=40i64 {
        csv.push_str(&format!("{},{p},1,\"title, {p}\"\n", 100 + p));
    }
    let out = run("\\copy tasks (id, performer_id, creator_id, title) FROM STDIN WITH (FORMAT csv, HEADER true)", csv);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Text format, performer_id not first.
    let mut text = String::new();
    for p in 41..=60i64 {
        text.push_str(&format!("{}\t1\ttext {p}\t{p}\n", 100 + p));
    }
    let out = run(
        "\\copy tasks (id, creator_id, title, performer_id) FROM STDIN",
        text,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in 1..=60i64 {
        assert_eq!(
            env.holders(100 + p).await,
            vec![ring.shard_for(p)],
            "performer {p}"
        );
    }
    let c = env.client("tasks").await;
    let title: String = c
        .query_one("SELECT title FROM tasks WHERE performer_id = 7", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(title, "title, 7");
    // A bad key fails the whole COPY: nothing from it is visible anywhere.
    let out = run(
        "\\copy tasks (id, performer_id, creator_id, title) FROM STDIN WITH (FORMAT csv)",
        "500,1,1,x\n501,notanumber,1,y\n".into(),
    );
    assert!(!out.status.success());
    assert!(env.holders(500).await.is_empty());
    c.simple_query("SELECT 1")
        .await
        .expect("session usable after a failed COPY");
}
