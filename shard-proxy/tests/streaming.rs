//! Streaming scatter reads (SPEC §6, limits: "memory per scatter read — results stream"):
//! a key-less read over a million rows keeps the proxy's memory bounded; ORDER BY is a
//! k-way merge that equals a sorted union of the shards; LIMIT stops early and leaves the
//! pooled connections clean; multi-shard portals honour Execute's row limit.
//!
//! Rows are seeded directly on each shard (`INSERT … SELECT generate_series`), which is
//! fast and bypasses the proxy; only reads go through it.

mod common;

use std::time::{Duration, Instant};

use common::Env;
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Seeds `per_shard` rows on every shard: ids `i*per_shard+1 ..= (i+1)*per_shard`, with
/// `version = id*7919 % 1000`, a title from the id's md5, `creator_id = id % 7`, a status
/// cycling through three values and a 100-byte description.
async fn seed(env: &Env, per_shard: i64) {
    for i in 0..env.shards.len() {
        let c = env.shard(i).await;
        let from = i as i64 * per_shard + 1;
        let to = (i as i64 + 1) * per_shard;
        c.execute(
            "INSERT INTO tasks (id, performer_id, creator_id, title, description, status, version) \
             SELECT g, g, g % 7, 't' || substr(md5(g::text), 1, 12), repeat('x', 100), \
                    (ARRAY['pending', 'in_progress', 'completed'])[g % 3 + 1], g * 7919 % 1000 \
             FROM generate_series($1::bigint, $2::bigint) g",
            &[&from, &to],
        )
        .await
        .expect("seed shard");
        c.simple_query("ANALYZE tasks").await.expect("analyze");
    }
}

/// Every shard's result of `sql`, concatenated (the union a merge must reproduce).
async fn union_of(env: &Env, sql: &str) -> Vec<Vec<Option<String>>> {
    let mut out = Vec::new();
    for i in 0..env.shards.len() {
        let c = env.shard(i).await;
        out.extend(rows_of(&c.simple_query(sql).await.expect("direct query")));
    }
    out
}

fn rows_of(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(String::from)).collect())
            }
            _ => None,
        })
        .collect()
}

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// A client whose socket has a small receive buffer, so the proxy's writes block as soon
/// as the client stops reading.
async fn small_buffer_client(env: &Env) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let stream = sock.connect(env.addr()).await.expect("connect");
    let config: tokio_postgres::Config = env.conn_string("tasks").parse().expect("config");
    let (client, conn) = config
        .connect_raw(stream, NoTls)
        .await
        .expect("connect through proxy");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Reads `sql` row by row, pausing every `pause_every` rows; returns (rows, sum of the
/// first column, elapsed).
async fn read_slowly(c: &Client, sql: &str, pause_every: u64) -> (u64, i64, Duration) {
    let started = Instant::now();
    let rows = c
        .query_raw(sql, std::iter::empty::<&dyn tokio_postgres::types::ToSql>())
        .await
        .expect("scatter read");
    pin_mut!(rows);
    let (mut n, mut sum) = (0u64, 0i64);
    while let Some(row) = rows.try_next().await.expect("row") {
        sum += row.get::<_, i64>(0);
        n += 1;
        if pause_every > 0 && n % pause_every == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    (n, sum, started.elapsed())
}

/// The proxy runs in this process (the harness starts it in-process), so its memory is
/// this process's: the peak resident size (VmHWM, reset before the read through
/// `/proc/self/clear_refs`) must not grow by more than 64 MiB while a million rows of
/// ~250 bytes (≈ 250 MB of results) stream through it to a slow client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_scatter_read_streams_in_bounded_memory() {
    let env = Env::start(3).await;
    let per_shard = 333_334i64;
    let total = per_shard * 3;
    let seeding = Instant::now();
    seed(&env, per_shard).await;
    eprintln!("seeded {total} rows in {:?}", seeding.elapsed());
    let c = small_buffer_client(&env).await;
    // Warm up pools and allocator on a small read.
    c.simple_query("SELECT id FROM tasks LIMIT 10")
        .await
        .expect("warm up");
    let base = status_kb("VmRSS:");
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let (n, sum, slow) = read_slowly(&c, "SELECT * FROM tasks", 5_000).await;
    let peak = status_kb("VmHWM:");
    assert_eq!(n as i64, total, "every row exactly once");
    assert_eq!(sum, total * (total + 1) / 2, "every id exactly once");
    let growth_mib = peak.saturating_sub(base) / 1024;
    eprintln!(
        "slow client: {n} rows in {slow:?}; RSS before {} MiB, peak {} MiB, growth {growth_mib} MiB",
        base / 1024,
        peak / 1024
    );
    // The same read at full speed, for throughput.
    let fast = env.client("tasks").await;
    let (n2, _, elapsed) = read_slowly(&fast, "SELECT * FROM tasks", 0).await;
    eprintln!(
        "fast client: {n2} rows in {elapsed:?} ({:.0} rows/s)",
        n2 as f64 / elapsed.as_secs_f64()
    );
    assert!(
        growth_mib < 64,
        "the proxy's memory grew by {growth_mib} MiB while streaming {total} rows"
    );
    // The simple protocol streams the same way.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let base = status_kb("VmRSS:");
    let started = Instant::now();
    let msgs = c
        .simple_query_raw("SELECT * FROM tasks")
        .await
        .expect("simple scatter read");
    pin_mut!(msgs);
    let mut rows = 0i64;
    while let Some(m) = msgs.try_next().await.expect("message") {
        if let SimpleQueryMessage::Row(_) = m {
            rows += 1;
            if rows % 5_000 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    let growth_mib = status_kb("VmHWM:").saturating_sub(base) / 1024;
    eprintln!(
        "simple protocol: {rows} rows in {:?}, growth {growth_mib} MiB",
        started.elapsed()
    );
    assert_eq!(rows, total);
    assert!(growth_mib < 64, "simple protocol grew by {growth_mib} MiB");
    // An ordered scatter read streams too (k-way merge, one row per shard held).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let base = status_kb("VmRSS:");
    let (n3, _, ordered) = read_slowly(&c, "SELECT * FROM tasks ORDER BY version, id", 0).await;
    let growth_mib = status_kb("VmHWM:").saturating_sub(base) / 1024;
    eprintln!("ordered: {n3} rows in {ordered:?}, growth {growth_mib} MiB");
    assert_eq!(n3 as i64, total);
    assert!(growth_mib < 64, "ordered merge grew by {growth_mib} MiB");
}

fn sort_key(r: &[Option<String>]) -> (i64, String, i64) {
    let int = |v: &Option<String>| v.as_deref().and_then(|s| s.parse().ok()).unwrap_or(-1);
    (int(&r[1]), r[2].clone().unwrap_or_default(), int(&r[0]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_merge_equals_the_sorted_union_of_the_shards() {
    let env = Env::start(3).await;
    seed(&env, 4_000).await;
    let c = env.client("tasks").await;
    let mut union = union_of(&env, "SELECT id, version, title FROM tasks").await;
    union.sort_by_key(|r| sort_key(r));
    let q = "SELECT id, version, title FROM tasks ORDER BY version, title, id";
    let merged = rows_of(&c.simple_query(q).await.expect("ordered scatter"));
    assert_eq!(merged.len(), union.len());
    assert!(
        merged == union,
        "simple protocol: globally sorted, every row once"
    );
    // Extended protocol, descending, with LIMIT/OFFSET.
    let q = "SELECT id, version, title FROM tasks ORDER BY version DESC, title DESC, id DESC \
             LIMIT 25 OFFSET 1000";
    let got: Vec<Vec<Option<String>>> = c
        .query(q, &[])
        .await
        .expect("ordered extended")
        .iter()
        .map(|r| {
            vec![
                Some(r.get::<_, i64>(0).to_string()),
                Some(r.get::<_, i64>(1).to_string()),
                r.get::<_, Option<String>>(2),
            ]
        })
        .collect();
    let expected: Vec<_> = union.iter().rev().skip(1000).take(25).cloned().collect();
    assert_eq!(got, expected, "DESC LIMIT 25 OFFSET 1000");
    // A sort key that is not selected (a hidden column) and $n parameters.
    let ids: Vec<i64> = c
        .query(
            "SELECT id FROM tasks ORDER BY version, title, id LIMIT $1 OFFSET $2",
            &[&10i64, &5i64],
        )
        .await
        .expect("hidden key")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<i64> = union
        .iter()
        .skip(5)
        .take(10)
        .map(|r| r[0].as_deref().and_then(|s| s.parse().ok()).unwrap_or(-1))
        .collect();
    assert_eq!(ids, expected);
    // LIMIT without ORDER BY: any LIMIT rows, each a real row, none twice.
    let some = rows_of(
        &c.simple_query("SELECT id FROM tasks LIMIT 7 OFFSET 3")
            .await
            .expect("limit"),
    );
    let mut ids: Vec<_> = some.iter().map(|r| r[0].clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_group_by_and_distinct_are_unchanged() {
    let env = Env::start(3).await;
    seed(&env, 3_000).await;
    let c = env.client("tasks").await;
    let union = union_of(&env, "SELECT id, version, status, creator_id FROM tasks").await;
    let int = |v: &Option<String>| {
        v.as_deref()
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(0)
    };
    let versions: Vec<i64> = union.iter().map(|r| int(&r[1])).collect();
    let row = &rows_of(
        &c.simple_query(
            "SELECT count(*), sum(version), min(version), max(version), avg(version) FROM tasks",
        )
        .await
        .expect("aggregates"),
    )[0];
    assert_eq!(int(&row[0]), union.len() as i64);
    assert_eq!(int(&row[1]), versions.iter().sum::<i64>());
    assert_eq!(int(&row[2]), versions.iter().copied().min().unwrap_or(0));
    assert_eq!(int(&row[3]), versions.iter().copied().max().unwrap_or(0));
    let avg: f64 = row[4]
        .as_deref()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    let expected = versions.iter().sum::<i64>() as f64 / versions.len() as f64;
    assert!((avg - expected).abs() < 1e-9, "avg {avg} vs {expected}");
    // GROUP BY.
    let groups = rows_of(
        &c.simple_query("SELECT status, count(*) FROM tasks GROUP BY status ORDER BY status")
            .await
            .expect("group by"),
    );
    let mut expected = std::collections::BTreeMap::new();
    for r in &union {
        *expected
            .entry(r[2].clone().unwrap_or_default())
            .or_insert(0i64) += 1;
    }
    let got: Vec<(String, i64)> = groups
        .iter()
        .map(|r| (r[0].clone().unwrap_or_default(), int(&r[1])))
        .collect();
    assert_eq!(got, expected.into_iter().collect::<Vec<_>>());
    // DISTINCT, ordered and not.
    let distinct = rows_of(
        &c.simple_query("SELECT DISTINCT creator_id FROM tasks ORDER BY creator_id")
            .await
            .expect("distinct"),
    );
    let got: Vec<i64> = distinct.iter().map(|r| int(&r[0])).collect();
    assert_eq!(got, (0..7).collect::<Vec<i64>>());
    let unordered = rows_of(
        &c.simple_query("SELECT DISTINCT status FROM tasks")
            .await
            .expect("distinct"),
    );
    let mut got: Vec<_> = unordered
        .iter()
        .map(|r| r[0].clone().unwrap_or_default())
        .collect();
    got.sort();
    assert_eq!(got, ["completed", "in_progress", "pending"]);
}

/// `Execute` with a row limit on a portal over every shard: at most that many rows per
/// Execute (then PortalSuspended), the next Execute goes on where the last stopped, and
/// every row arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_shard_portals_honour_execute_row_limits() {
    let env = Env::start(3).await;
    seed(&env, 1_000).await;
    let mut c = env.client("tasks").await;
    let cases: [(&str, usize, Vec<i64>); 4] = [
        (
            "SELECT id FROM tasks ORDER BY id",
            128,
            (1..=3000).collect(),
        ),
        (
            "SELECT id FROM tasks ORDER BY id DESC LIMIT 250 OFFSET 10",
            100,
            (2741..=2990).rev().collect(),
        ),
        ("SELECT id FROM tasks", 333, (1..=3000).collect()),
        (
            "SELECT creator_id FROM tasks GROUP BY creator_id ORDER BY creator_id",
            3,
            (0..7).collect(),
        ),
    ];
    for (sql, chunk, expected) in cases {
        let tx = c.transaction().await.expect("begin");
        let stmt = tx.prepare(sql).await.expect("prepare");
        let portal = tx.bind(&stmt, &[]).await.expect("bind");
        let mut got = Vec::new();
        let mut executes = 0;
        loop {
            let rows = tx
                .query_portal(&portal, chunk as i32)
                .await
                .expect("execute");
            executes += 1;
            assert!(
                rows.len() <= chunk,
                "{sql}: {} rows > max_rows {chunk}",
                rows.len()
            );
            if rows.is_empty() {
                break;
            }
            got.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
            assert!(executes < 10_000, "{sql}: no end");
        }
        if !sql.contains("ORDER BY") {
            got.sort();
        }
        assert_eq!(got, expected, "{sql}: every row exactly once, in order");
        let full_chunks = expected.len() / chunk;
        assert!(
            executes > full_chunks,
            "{sql}: {executes} Executes for {} rows of {chunk}: the row limit was not honoured",
            expected.len()
        );
        // The transaction is healthy afterwards.
        tx.simple_query("SELECT 1").await.expect("after the portal");
        tx.commit().await.expect("commit");
    }
    // DISTINCT across shards cannot be fetched in parts (rows read may all be repeats):
    // the first Execute streams every row and completes.
    let tx = c.transaction().await.expect("begin");
    let stmt = tx
        .prepare("SELECT DISTINCT creator_id FROM tasks ORDER BY creator_id")
        .await
        .expect("prepare");
    let portal = tx.bind(&stmt, &[]).await.expect("bind");
    let all = tx.query_portal(&portal, 2).await.expect("execute");
    assert_eq!(all.len(), 7);
    assert!(tx.query_portal(&portal, 2).await.expect("again").is_empty());
    tx.commit().await.expect("commit");
    // The first Execute of an unordered scatter read returns exactly max_rows rows.
    let tx = c.transaction().await.expect("begin");
    let stmt = tx.prepare("SELECT id FROM tasks").await.expect("prepare");
    let portal = tx.bind(&stmt, &[]).await.expect("bind");
    let first = tx.query_portal(&portal, 10).await.expect("execute");
    assert_eq!(first.len(), 10);
    // Closing the transaction ends it; the connections are clean for the next client.
    tx.rollback().await.expect("rollback");
    let n: i64 = c
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 3000);
}

/// A LIMIT reached early leaves every shard's rest unread on the wire; the proxy must
/// read it off (or close the connection) before the backend serves anyone else. With one
/// pooled connection per shard, every query below reuses the same backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_early_limit_the_pooled_connections_are_clean() {
    let mut env = Env::start(3).await;
    env.config.pool.size = 1;
    env.stop_proxy().await;
    env.start_proxy().await;
    seed(&env, 20_000).await;
    let c = env.client("tasks").await;
    let other = env.client("tasks").await;
    for round in 0..5 {
        let few = rows_of(
            &c.simple_query("SELECT * FROM tasks ORDER BY id LIMIT 3")
                .await
                .expect("limit"),
        );
        assert_eq!(few.len(), 3);
        assert_eq!(few[0][0].as_deref(), Some("1"));
        let few = c
            .query("SELECT id FROM tasks ORDER BY version, id LIMIT 2", &[])
            .await
            .expect("limit extended");
        assert_eq!(few.len(), 2);
        let few = rows_of(
            &c.simple_query("SELECT id FROM tasks LIMIT 1")
                .await
                .expect("limit"),
        );
        assert_eq!(few.len(), 1);
        // Another client on the same backends sees clean answers.
        let n: i64 = other
            .query_one("SELECT count(*) FROM tasks", &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"))
            .get(0);
        assert_eq!(n, 60_000, "round {round}");
        let one: i64 = other
            .query_one("SELECT id FROM tasks WHERE id = $1", &[&42i64])
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"))
            .get(0);
        assert_eq!(one, 42);
    }
    // A statement error on one shard after rows were streamed closes the others cleanly.
    let err = c
        .simple_query("SELECT id, 1 / (id - 40000) FROM tasks ORDER BY id")
        .await
        .expect_err("division by zero on one shard");
    assert_eq!(
        err.as_db_error().map(|d| d.code().code()),
        Some("22012"),
        "{err:?}"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .expect("usable after the error")
        .get(0);
    assert_eq!(n, 60_000);
    // The same in the extended protocol, and inside a transaction (which the error fails).
    let err = c
        .query("SELECT id, 1 / (id - 40000) FROM tasks ORDER BY id", &[])
        .await
        .expect_err("division by zero on one shard");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("22012"));
    c.simple_query("BEGIN").await.expect("begin");
    let err = c
        .query("SELECT id, 1 / (id - 20001) FROM tasks", &[])
        .await
        .expect_err("division by zero on one shard");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("22012"));
    let aborted = c
        .query("SELECT 1", &[])
        .await
        .expect_err("the transaction failed");
    assert_eq!(
        aborted.as_db_error().map(|d| d.code().code()),
        Some("25P02")
    );
    c.simple_query("ROLLBACK").await.expect("rollback");
    for _ in 0..3 {
        let n: i64 = c
            .query_one("SELECT count(*) FROM tasks", &[])
            .await
            .expect("usable after the errors")
            .get(0);
        assert_eq!(n, 60_000);
        let n: i64 = other
            .query_one("SELECT count(*) FROM tasks", &[])
            .await
            .expect("others unaffected")
            .get(0);
        assert_eq!(n, 60_000);
    }
}

mod raw {
    //! A client over a raw socket, to see the protocol messages themselves.

    use bytes::BytesMut;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use postgres_protocol::message::backend::Message;
    use postgres_protocol::message::frontend;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub struct Raw {
        s: TcpStream,
        buf: BytesMut,
    }

    /// What a server message was, for assertions: its tag and, for a DataRow, the first
    /// value; for an ErrorResponse, its SQLSTATE.
    pub type Seen = (char, Option<String>);

    impl Raw {
        /// Logs in with SCRAM and reads up to the first ReadyForQuery.
        pub async fn login(addr: std::net::SocketAddr) -> Raw {
            let s = TcpStream::connect(addr).await.expect("connect");
            let mut r = Raw {
                s,
                buf: BytesMut::new(),
            };
            let mut out = BytesMut::new();
            frontend::startup_message([("user", "taskflow"), ("database", "tasks")], &mut out)
                .expect("startup");
            r.send(&out).await;
            let mut scram = ScramSha256::new(
                super::common::PASSWORD.as_bytes(),
                ChannelBinding::unsupported(),
            );
            loop {
                let mut out = BytesMut::new();
                match r.next().await {
                    Message::AuthenticationSasl(_) => {
                        frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut out)
                            .expect("encode")
                    }
                    Message::AuthenticationSaslContinue(b) => {
                        scram.update(b.data()).expect("scram update");
                        frontend::sasl_response(scram.message(), &mut out).expect("encode");
                    }
                    Message::AuthenticationSaslFinal(b) => {
                        scram.finish(b.data()).expect("server proof")
                    }
                    Message::ReadyForQuery(_) => return r,
                    Message::ErrorResponse(_) => panic!("login refused"),
                    _ => {}
                }
                if !out.is_empty() {
                    r.send(&out).await;
                }
            }
        }

        pub async fn send(&mut self, bytes: &[u8]) {
            self.s.write_all(bytes).await.expect("write");
        }

        async fn next(&mut self) -> Message {
            loop {
                if let Some(m) = Message::parse(&mut self.buf).expect("valid server message") {
                    return m;
                }
                let n = self.s.read_buf(&mut self.buf).await.expect("read");
                assert!(n > 0, "server closed");
            }
        }

        /// Reads up to ReadyForQuery: what was seen before it.
        pub async fn until_ready(&mut self) -> Vec<Seen> {
            let mut seen = Vec::new();
            loop {
                let m = self.next().await;
                let s = match m {
                    Message::ReadyForQuery(_) => return seen,
                    Message::DataRow(body) => {
                        let mut ranges = body.ranges();
                        let first = fallible_iterator::FallibleIterator::next(&mut ranges)
                            .ok()
                            .flatten()
                            .flatten()
                            .and_then(|r| body.buffer().get(r))
                            .map(|b| String::from_utf8_lossy(b).into_owned());
                        ('D', first)
                    }
                    Message::ErrorResponse(body) => {
                        let mut code = None;
                        let mut fields = body.fields();
                        while let Ok(Some(f)) =
                            fallible_iterator::FallibleIterator::next(&mut fields)
                        {
                            if f.type_() == b'C' {
                                code = Some(String::from_utf8_lossy(f.value_bytes()).into_owned());
                            }
                        }
                        ('E', code)
                    }
                    Message::ParseComplete => ('1', None),
                    Message::BindComplete => ('2', None),
                    Message::CloseComplete => ('3', None),
                    Message::PortalSuspended => ('s', None),
                    Message::CommandComplete(_) => ('C', None),
                    Message::RowDescription(_) => ('T', None),
                    _ => ('?', None),
                };
                seen.push(s);
            }
        }
    }

    /// Parse (unnamed) + Bind (unnamed portal, no parameters).
    pub fn parse_bind(sql: &str, out: &mut BytesMut) {
        frontend::parse("", sql, std::iter::empty(), out).expect("parse");
        frontend::bind(
            "",
            "",
            std::iter::empty::<i16>(),
            std::iter::empty::<()>(),
            |_, _: &mut BytesMut| Ok(postgres_protocol::IsNull::No),
            std::iter::empty::<i16>(),
            out,
        )
        .map_err(|_| "bind")
        .expect("bind");
    }

    pub fn execute(max_rows: i32, out: &mut BytesMut) {
        frontend::execute("", max_rows, out).expect("execute");
    }

    pub fn sync(out: &mut BytesMut) {
        frontend::sync(out);
    }

    pub fn query(sql: &str, out: &mut BytesMut) {
        frontend::query(sql, out).expect("query");
    }
}

fn ids(seen: &[raw::Seen]) -> Vec<String> {
    seen.iter()
        .filter(|(t, _)| *t == 'D')
        .filter_map(|(_, v)| v.clone())
        .collect()
}

fn tags(seen: &[raw::Seen]) -> String {
    seen.iter().map(|(t, _)| *t).filter(|t| *t != 'D').collect()
}

/// On the wire: Execute(max_rows) of a multi-shard portal answers that many DataRows and
/// PortalSuspended; the next Execute (in a transaction) continues; Sync outside one ends
/// the portal; two Executes of one such portal before a Sync are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_suspended_on_the_wire() {
    let env = Env::start(3).await;
    seed(&env, 10).await;
    let mut r = raw::Raw::login(env.addr()).await;
    let mut out = bytes::BytesMut::new();
    raw::parse_bind("SELECT id FROM tasks ORDER BY id", &mut out);
    raw::execute(4, &mut out);
    raw::sync(&mut out);
    r.send(&out).await;
    let seen = r.until_ready().await;
    assert_eq!(tags(&seen), "12s", "{seen:?}");
    assert_eq!(ids(&seen), ["1", "2", "3", "4"]);
    // Outside a transaction, Sync ended the portal.
    let mut out = bytes::BytesMut::new();
    raw::execute(4, &mut out);
    raw::sync(&mut out);
    r.send(&out).await;
    let seen = r.until_ready().await;
    assert_eq!(seen, [('E', Some("34000".to_string()))]);
    // In a transaction the portal lives on: each Execute continues where the last stopped.
    let mut out = bytes::BytesMut::new();
    raw::query("BEGIN", &mut out);
    r.send(&out).await;
    r.until_ready().await;
    let mut out = bytes::BytesMut::new();
    raw::parse_bind(
        "SELECT id FROM tasks ORDER BY id DESC LIMIT 12 OFFSET 2",
        &mut out,
    );
    raw::execute(5, &mut out);
    raw::sync(&mut out);
    r.send(&out).await;
    let seen = r.until_ready().await;
    assert_eq!(tags(&seen), "12s");
    assert_eq!(ids(&seen), ["28", "27", "26", "25", "24"]);
    let mut got = Vec::new();
    for want in ["s", "s", "C"] {
        let mut out = bytes::BytesMut::new();
        raw::execute(3, &mut out);
        raw::sync(&mut out);
        r.send(&out).await;
        let seen = r.until_ready().await;
        assert_eq!(tags(&seen), want, "{seen:?}");
        got.extend(ids(&seen));
    }
    assert_eq!(got, ["23", "22", "21", "20", "19", "18", "17"]);
    // Two Executes of one multi-shard portal in one batch: refused, clearly.
    let mut out = bytes::BytesMut::new();
    raw::parse_bind("SELECT id FROM tasks", &mut out);
    raw::execute(1, &mut out);
    raw::execute(1, &mut out);
    raw::sync(&mut out);
    r.send(&out).await;
    let seen = r.until_ready().await;
    assert_eq!(
        seen.last(),
        Some(&('E', Some("0A000".to_string()))),
        "{seen:?}"
    );
    let mut out = bytes::BytesMut::new();
    raw::query("ROLLBACK", &mut out);
    r.send(&out).await;
    r.until_ready().await;
}
