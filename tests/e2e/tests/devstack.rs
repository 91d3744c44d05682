//! The local stack as an operator uses it (`make up`, `status`, `down`), and the VM test
//! `tests/vm/basic.nix` mirrored on one machine: all four daemons reach READY, the seed's
//! requests work through gateway → auth/proxy → shards, mail arrives at the SMTP sink, and
//! `down` leaves nothing answering on any of the stack's ports. `make add-shard` and
//! `make remove-shard` grow and shrink the running stack's ring, and the stack keeps
//! the added shard across `make restart`.

use std::process::Command;
use std::time::Duration;

use taskflow_localstack::{binary_path, free_port, wait_until};

/// Service names of the stack (see tools/devstack/src/layout.rs) — each gets a free port.
const SERVICES: [&str; 16] = [
    "pg-auth",
    "pg-shard-1",
    "pg-shard-2",
    "pg-shard-3",
    "pg-shard-4",
    "redis",
    "kafka",
    "smtp",
    "smtp-ui",
    "shard-proxy",
    "proxy-metrics",
    "auth",
    "auth-ops",
    "gateway",
    "gateway-ops",
    "notify-metrics",
];

struct Stack {
    state: tempfile::TempDir,
    ports: Vec<(String, u16)>,
}

impl Stack {
    /// A state directory and a free port for every service (nothing started yet).
    fn new() -> Self {
        Stack {
            state: tempfile::tempdir().expect("state dir"),
            ports: SERVICES
                .iter()
                .map(|s| (s.to_string(), free_port().expect("port")))
                .collect(),
        }
    }

    fn port(&self, name: &str) -> u16 {
        self.ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .expect("known service")
    }

    /// `taskflow-devstack <args>` on this stack's state directory and ports.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary_path("taskflow-devstack").expect("devstack binary"));
        cmd.args(args).env("DEVSTACK_STATE_DIR", self.state.path());
        for (name, port) in &self.ports {
            cmd.env(
                format!(
                    "DEVSTACK_{}_PORT",
                    name.to_ascii_uppercase().replace('-', "_")
                ),
                port.to_string(),
            );
        }
        cmd
    }

    fn devstack(&self, args: &[&str]) -> (bool, String) {
        let out = self.command(args).output().expect("run devstack");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.devstack(&["down"]);
    }
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `curl`, waiting out the gateway's rate limit (429) the way a well-behaved client does:
/// the stack runs with the default limits (10 requests/s per user and per address).
fn curl_patiently(args: &[&str]) -> (u16, String) {
    for _ in 0..1200 {
        let (code, body) = curl(args);
        if code != 429 {
            return (code, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("still rate-limited after two minutes: {args:?}");
}

fn json_field(body: &str, field: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    match &v[field] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One statement through `psql` (unaligned, tuples only); only the operator's login may
/// open the proxy's admin console.
fn psql(port: u16, db: &str, sql: &str) -> String {
    let user = if db == "admin" {
        "taskflow_admin"
    } else {
        "taskflow"
    };
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            db,
        ])
        .args(["-XAtc", sql])
        .env("PGPASSWORD", "taskflow")
        .output()
        .expect("psql");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn answers(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

#[tokio::test]
async fn up_serves_the_seed_requests_and_down_leaves_nothing_running() {
    let stack = Stack::new();
    let (ok, out) = stack.devstack(&["up"]);
    assert!(ok, "make up failed:\n{out}");
    for daemon in ["shard-proxy", "auth", "gateway", "notify-metrics"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(daemon))
            .unwrap_or_else(|| panic!("status lists {daemon}:\n{out}"));
        assert!(line.contains(" up "), "{daemon} not up: {line}");
    }
    // A second stack on the same state directory is refused.
    let (ok, second) = stack.devstack(&["dev"]);
    assert!(
        !ok && second.contains("another stack is running"),
        "{second}"
    );

    let gw = format!("http://127.0.0.1:{}", stack.port("gateway"));
    let h = "content-type: application/json";
    let (code, body) = curl(&[&format!("{gw}/")]);
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"message":"API is working"}"#)
    );
    for (email, name) in [("user@example.com", "John Doe"), ("two@example.com", "Two")] {
        register(&gw, email, name);
    }
    let body = login(&gw, "user@example.com");
    assert_eq!(json_field(&body, "id"), "1", "login id is a string: {body}");
    let auth = format!("authorization: Bearer {}", json_field(&body, "token"));
    let (code, body) = curl(&[
        "-XPOST",
        &format!("{gw}/tasks"),
        "-H",
        h,
        "-H",
        &auth,
        "-d",
        r#"{"title":"Complete project","description":"Finish the backend implementation","performer_id":2,"creator_id":1,"observer_ids":[],"status":"pending"}"#,
    ]);
    assert_eq!(code, 201, "{body}");
    let id = json_field(&body, "id");
    let (code, body) = curl(&[
        &format!("{gw}/tasks?performer_id=2&status=pending"),
        "-H",
        &auth,
    ]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Complete project"), "{body}");

    // The task lives on its ring owner, and only there (checked through the admin console
    // and the shards themselves).
    let owner = psql(stack.port("shard-proxy"), "admin", "SHOW SHARD FOR 2");
    let owner = owner.rsplit('|').next().unwrap_or_default().to_owned();
    for (shard, svc) in [
        ("shard-1", "pg-shard-1"),
        ("shard-2", "pg-shard-2"),
        ("shard-3", "pg-shard-3"),
    ] {
        let n = psql(
            stack.port(svc),
            "tasks",
            &format!("SELECT count(*) FROM tasks WHERE id = {id}"),
        );
        let expected = if shard == owner { "1" } else { "0" };
        assert_eq!(n, expected, "task {id} on {shard} (owner {owner})");
    }

    // The notify daemon mails performer and creator.
    let ui = stack.port("smtp-ui");
    wait_until(Duration::from_secs(60), || async move {
        let (_, body) = curl(&[&format!("http://127.0.0.1:{ui}/api/email")]);
        body.matches("Complete project").count() >= 2
    })
    .await
    .expect("two mails for the new task");

    // A daemon that dies is restarted, as systemd's Restart=on-failure would, and the rest
    // of the stack keeps running (it used to stop everything).
    let pid_file = stack.state.path().join("status/gateway.pid");
    let read_pid = || -> i32 {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let killed = read_pid();
    assert!(killed > 0, "no pid file for the gateway");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the gateway");
    let gw_root = format!("{gw}/");
    wait_until(Duration::from_secs(120), || {
        let gw_root = gw_root.clone();
        async move {
            let restarted = read_pid() != killed;
            restarted && curl(&[&gw_root]).0 == 200
        }
    })
    .await
    .expect("the gateway was restarted and answers again");
    let (ok, out) = stack.devstack(&["status"]);
    assert!(ok && out.contains("stack: running"), "{out}");
    let log =
        std::fs::read_to_string(stack.state.path().join("logs/devstack.log")).unwrap_or_default();
    assert!(
        log.contains("gateway exited") && log.contains("restarting in"),
        "the restart is not logged:\n{log}"
    );

    let (ok, out) = stack.devstack(&["down"]);
    assert!(ok, "down failed: {out}");
    for (name, port) in &stack.ports {
        assert!(
            !answers(*port).await,
            "{name} still answers on {port} after down"
        );
    }
    let (ok, out) = stack.devstack(&["status"]);
    assert!(ok && out.contains("not running"), "{out}");
}

/// `make add-shard` on a stack holding rows starts the fifth cluster and draws the proxy's
/// move until done; `make restart` keeps shard-4; `make remove-shard` moves the rows back
/// and stops and deletes the cluster, also when its watching was stopped with Ctrl-C and
/// the stack restarted after. Not a row is lost or doubled on the way.
#[tokio::test]
async fn add_shard_and_remove_shard_move_rows_and_survive_a_restart() {
    let stack = Stack::new();
    let (ok, out) = stack.devstack(&["up"]);
    assert!(ok, "make up failed:\n{out}");
    let proxy = stack.port("shard-proxy");
    let count = || psql(proxy, "tasks", "SELECT count(*) FROM tasks");
    // 2,000 tasks of 97 performers through the proxy (multi-row INSERTs split by key), so
    // the new shard has rows to take.
    for batch in 0..4 {
        let values: Vec<String> = (1..=500)
            .map(|i| {
                let id = batch * 500 + i;
                format!("({id}, {}, 1, 'load {id}')", id % 97 + 1)
            })
            .collect();
        psql(
            proxy,
            "tasks",
            &format!(
                "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES {}",
                values.join(", ")
            ),
        );
    }
    assert_eq!(count(), "2000");

    // tests/vm/add-shard.nix mirrored: a client keeps creating tasks through the gateway
    // while shard-4 is added; every acknowledged task is then listed exactly once.
    let gw = format!("http://127.0.0.1:{}", stack.port("gateway"));
    let token = register_and_login(&gw, PERFORMERS);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (gw, token, stop) = (gw.clone(), token.clone(), stop.clone());
        std::thread::spawn(move || create_until(&gw, &token, PERFORMERS as i64, &stop))
    };
    let (ok, out) = stack.devstack(&["add-shard"]);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, errors) = load.join().expect("load loop");
    assert!(
        errors.is_empty(),
        "writes failed while shard-4 was added: {errors:?}"
    );
    assert!(acked.len() >= 20, "the load ran: {} tasks", acked.len());
    assert!(ok, "make add-shard failed:\n{out}");
    let listed = list_all_task_ids(&gw, &token);
    let mut seen = std::collections::BTreeSet::new();
    for id in &listed {
        assert!(seen.insert(*id), "task {id} listed twice");
    }
    for id in &acked {
        assert!(
            seen.contains(id),
            "acknowledged task {id} missing from the listing"
        );
        let (code, body) = curl_patiently(&[
            &format!("{gw}/tasks/{id}"),
            "-H",
            &format!("authorization: Bearer {token}"),
        ]);
        assert_eq!(code, 200, "GET /tasks/{id}: {body}");
    }
    let created = acked.len();
    // Not a terminal: whole progress lines, the last one the finished move.
    assert!(out.contains("adds shard-4"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("shard-4 ▕██████████▏100%") && l.ends_with("done")),
        "{out}"
    );
    let (_, status) = stack.devstack(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("pg-shard-4") && l.contains(" up ")),
        "{status}"
    );
    let on_four: u64 = psql(
        stack.port("pg-shard-4"),
        "tasks",
        "SELECT count(*) FROM tasks",
    )
    .parse()
    .expect("a count");
    assert!(on_four > 0, "shard-4 took no rows");
    let total = (2000 + created).to_string();
    assert_eq!(count(), total);

    // `make restart` keeps shard-4: the proxy starts from a file that lists it, as its
    // stored ring does.
    let (ok, out) = stack.devstack(&["restart"]);
    assert!(ok, "make restart failed:\n{out}");
    assert!(psql(proxy, "admin", "SHOW SHARDS").contains("shard-4|"));
    assert_eq!(count(), total);

    let (ok, out) = stack.devstack(&["remove-shard"]);
    assert!(ok, "make remove-shard failed:\n{out}");
    assert!(out.contains("removes shard-4"), "{out}");
    assert!(!psql(proxy, "admin", "SHOW SHARDS").contains("shard-4|"));
    assert!(
        !answers(stack.port("pg-shard-4")).await,
        "pg-shard-4 still runs"
    );
    assert!(!stack.state.path().join("pg/pg-shard-4").exists());
    let (_, status) = stack.devstack(&["status"]);
    assert!(!status.contains("pg-shard-4"), "{status}");
    assert_eq!(count(), total);

    // Ctrl-C while watching a removal: the move finishes unwatched, so nobody told the
    // stack that shard-4 left; `make restart` must still start (the proxy refuses a shard
    // list that a finished migration replaced), taking the ring the proxy stored.
    let (ok, out) = stack.devstack(&["add-shard"]);
    assert!(ok, "make add-shard (again) failed:\n{out}");
    let mut watcher = stack
        .command(&["remove-shard"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("remove-shard");
    let stdout = watcher.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("removes shard-4"))),
        "remove-shard never showed its migration"
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(watcher.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("Ctrl-C");
    let status = watcher.wait().expect("remove-shard exits");
    assert!(!status.success(), "stopped watching is not success");
    wait_until(Duration::from_secs(120), || async {
        // Newest first; the second column is the state.
        let migrations = psql(proxy, "admin", "SHOW MIGRATIONS");
        let newest = migrations.lines().next().unwrap_or_default();
        newest.split('|').nth(1) == Some("done")
    })
    .await
    .expect("the removal finishes unwatched");
    let (ok, out) = stack.devstack(&["restart"]);
    assert!(ok, "make restart after an unwatched removal failed:\n{out}");
    assert!(!psql(proxy, "admin", "SHOW SHARDS").contains("shard-4|"));
    assert!(
        !answers(stack.port("pg-shard-4")).await,
        "pg-shard-4 still runs"
    );
    assert_eq!(count(), total);

    let (ok, out) = stack.devstack(&["down"]);
    assert!(ok, "down failed: {out}");
}

/// Users the gateway load creates tasks for. The stack runs with the default rate limits:
/// registrations and logins share a burst of 5 per client address.
const PERFORMERS: usize = 4;

/// Registers `n` users (ids 1..=n on a fresh stack) and returns the first one's token.
fn register_and_login(gw: &str, n: usize) -> String {
    for i in 1..=n {
        register(gw, &format!("load{i}@example.com"), &format!("Load {i}"));
    }
    json_field(&login(gw, "load1@example.com"), "token")
}

/// Registers a user (password `securepassword`); any answer but 201 fails the test.
fn register(gw: &str, email: &str, name: &str) {
    let (code, body) = curl(&[
        "-XPOST",
        &format!("{gw}/auth/register"),
        "-H",
        "content-type: application/json",
        "-d",
        &format!(r#"{{"email":"{email}","name":"{name}","password":"securepassword"}}"#),
    ]);
    assert_eq!(code, 201, "{body}");
}

/// Logs a registered user in; the answer's body (200 or the test fails).
fn login(gw: &str, email: &str) -> String {
    let (code, body) = curl(&[
        "-XPOST",
        &format!("{gw}/auth/login"),
        "-H",
        "content-type: application/json",
        "-d",
        &format!(r#"{{"email":"{email}","password":"securepassword"}}"#),
    ]);
    assert_eq!(code, 200, "{body}");
    body
}

/// Creates tasks round-robin over performers 1..=n until `stop`: the ids acknowledged
/// (201), and every other answer (a 429 is waited out, not an answer).
fn create_until(
    gw: &str,
    token: &str,
    n: i64,
    stop: &std::sync::atomic::AtomicBool,
) -> (Vec<i64>, Vec<String>) {
    let (mut acked, mut errors) = (Vec::new(), Vec::new());
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let (code, body) = curl_patiently(&[
            "-XPOST",
            &format!("{gw}/tasks"),
            "-H",
            "content-type: application/json",
            "-H",
            &format!("authorization: Bearer {token}"),
            "-d",
            &format!(r#"{{"title":"load {i}","performer_id":{}}}"#, i % n + 1),
        ]);
        let id = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .filter(|_| code == 201)
            .and_then(|v| match &v["id"] {
                serde_json::Value::String(s) => s.parse().ok(),
                other => other.as_i64(),
            });
        match id {
            Some(id) => acked.push(id),
            None => errors.push(format!("{code} {body}")),
        }
        i += 1;
    }
    (acked, errors)
}

/// Every task id the API lists, following `next_cursor` page by page.
fn list_all_task_ids(gw: &str, token: &str) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let auth = format!("authorization: Bearer {token}");
        let url = format!("{gw}/tasks");
        let mut args = vec![
            "-G",
            url.as_str(),
            "--data-urlencode",
            "limit=500",
            "-H",
            auth.as_str(),
        ];
        let after = cursor.as_ref().map(|c| format!("cursor={c}"));
        if let Some(a) = &after {
            args.extend(["--data-urlencode", a.as_str()]);
        }
        let (code, body) = curl_patiently(&args);
        assert_eq!(code, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).expect("json page");
        for t in page["data"].as_array().expect("data") {
            let id = match &t["id"] {
                serde_json::Value::String(s) => s.parse().expect("id"),
                other => other.as_i64().expect("id"),
            };
            ids.push(id);
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return ids,
        }
    }
}
