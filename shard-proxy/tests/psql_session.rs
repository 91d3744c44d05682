//! A scripted `psql` session through the proxy behaves as on one database: reads and
//! writes, `\d`-style catalog queries, BEGIN/COMMIT/ROLLBACK, PREPARE/EXECUTE. The same
//! script runs against a reference cluster and the outputs must be identical.

mod common;

use common::Env;

const SCRIPT: &str = r#"
SELECT 1 AS one;
INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (1, 10, 1, 'a'), (2, 20, 1, 'b'), (3, 30, 1, 'c');
SELECT id, title FROM tasks ORDER BY id;
BEGIN;
UPDATE tasks SET title = 'aa' WHERE performer_id = 10;
SELECT title FROM tasks WHERE performer_id = 10;
ROLLBACK;
SELECT title FROM tasks WHERE performer_id = 10;
BEGIN;
DELETE FROM tasks WHERE performer_id = 20;
INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (4, 40, 1, 'd');
COMMIT;
SELECT id, performer_id FROM tasks ORDER BY id;
PREPARE q(bigint) AS SELECT title FROM tasks WHERE performer_id = $1;
EXECUTE q(30);
DEALLOCATE q;
SELECT count(*), max(id), min(title) FROM tasks;
SELECT status, count(*) FROM tasks GROUP BY status ORDER BY status;
UPDATE tasks SET status = 'completed' WHERE id IN (1, 3);
SELECT id, status FROM tasks ORDER BY id DESC LIMIT 2;
\d tasks
\dt
SELECT * FROM no_such_table;
SELECT 'still here' AS alive;
"#;

fn run_psql(conn: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-a",
            "-v",
            "ON_ERROR_STOP=0",
            "-d",
            conn,
            "-c",
            "SET client_min_messages = warning",
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = std::process::Command::new("psql");
    cmd.args(["-X", "-a", "-v", "ON_ERROR_STOP=0", "-d", conn])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn psql");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(SCRIPT.as_bytes()).expect("write script");
    }
    let out = child.wait_with_output().expect("psql output");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr).replace("psql:<stdin>", "psql"));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_psql_session_matches_one_database() {
    if std::process::Command::new("psql")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("psql not installed; skipping");
        return;
    }
    let env = Env::start(3).await;
    let reference = taskflow_localstack::PgCluster::builder()
        .database("tasks")
        .start()
        .await
        .expect("reference cluster");
    let mut rc = reference.client("tasks").await.expect("reference client");
    taskflow_migrations::apply_shard(&mut rc)
        .await
        .expect("reference schema");
    let via_proxy = tokio::task::spawn_blocking({
        let conn = env.conn_string("tasks");
        move || run_psql(&conn)
    })
    .await
    .expect("join");
    let direct = tokio::task::spawn_blocking({
        let conn = reference.connection_string("tasks");
        move || run_psql(&conn)
    })
    .await
    .expect("join");
    assert_eq!(
        via_proxy, direct,
        "\n--- via proxy ---\n{via_proxy}\n--- direct ---\n{direct}"
    );
    assert!(via_proxy.contains("still here"));
}
