//! Faults and bad input: a stopped shard fails only the statements that need it (naming the
//! shard, SQLSTATE 08006) and is used again once back; scatter reads fail rather than skip;
//! malformed, truncated, oversized and unknown protocol messages get an ErrorResponse or a
//! clean close while the proxy keeps serving everyone else; bad passwords are refused; a
//! server connection's FATAL reaches the client as ERROR (its session goes on); 2PC
//! recovery's kept connection, closed by the server, is replaced.

mod common;

use std::time::Duration;

use common::{rows, Env};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_shard_fails_only_what_needs_it() {
    let mut env = Env::start(3).await;
    let ring = env.ring();
    let c = env.client("tasks").await;
    let down = 1usize;
    let on_down = (1..1000i64)
        .find(|k| ring.shard_for(*k) == down)
        .expect("key on shard-2");
    let on_up = (1..1000i64)
        .find(|k| ring.shard_for(*k) != down)
        .expect("key elsewhere");
    let insert = "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, 't')";
    c.execute(insert, &[&1i64, &on_down]).await.expect("insert");
    c.execute(insert, &[&2i64, &on_up]).await.expect("insert");

    env.shards[down].stop().await.expect("stop shard-2");
    let err = c
        .query("SELECT id FROM tasks WHERE performer_id = $1", &[&on_down])
        .await
        .expect_err("shard-2 is down");
    assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{err}");
    assert!(format!("{err:?}").contains("shard-2"), "{err}");
    let err = c
        .simple_query(&format!(
            "SELECT id FROM tasks WHERE performer_id = {on_down}"
        ))
        .await
        .expect_err("simple: shard-2 is down");
    assert!(format!("{err:?}").contains("shard-2"), "{err}");
    // Other shards keep working, on the same connection.
    let row = c
        .query_one("SELECT id FROM tasks WHERE performer_id = $1", &[&on_up])
        .await
        .expect("other shard works");
    assert_eq!(row.get::<_, i64>(0), 2);
    // A scatter read fails instead of silently skipping shard-2.
    let err = c
        .query("SELECT count(*) FROM tasks", &[])
        .await
        .expect_err("scatter must fail");
    assert!(format!("{err:?}").contains("shard-2"), "{err}");

    env.shards[down].start().await.expect("restart shard-2");
    let mut ok = false;
    for _ in 0..50 {
        if c.query("SELECT id FROM tasks WHERE performer_id = $1", &[&on_down])
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the proxy reconnects when the shard returns");
    let mut direct = 0;
    for i in 0..3 {
        direct += env
            .shard(i)
            .await
            .query_one("SELECT count(*) FROM tasks", &[])
            .await
            .expect("direct")
            .get::<_, i64>(0);
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .expect("scatter")
        .get(0);
    assert_eq!(n, direct, "scatter count equals the shards' total");
    assert_eq!(n, 2);
}

/// A shard ending one server connection (`pg_terminate_backend`, a shard shutting down)
/// sends FATAL on *that* connection. The proxy relays it as ERROR with the same SQLSTATE:
/// the client's own session is not over, and its next statement works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_server_connection_ends_the_statement_not_the_session() {
    let env = Env::start(2).await;
    let ring = env.ring();
    let c = env.client("tasks").await;
    let performer = 7i64;
    c.execute(
        "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (1, $1, 1, 't')",
        &[&performer],
    )
    .await
    .expect("insert");
    let shard = env.shard(ring.shard_for(performer)).await;
    let slow = tokio::spawn(async move {
        let r = c
            .query(
                "SELECT id, pg_sleep(30) FROM tasks WHERE performer_id = $1",
                &[&performer],
            )
            .await;
        (c, r)
    });
    // Only the executing backend: the statement's text also shows on a pooled connection
    // that merely described it (idle), and terminating that one proves nothing.
    let mut killed = false;
    for _ in 0..100 {
        let n = shard
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("terminate")
            .get::<_, i64>(0);
        if n > 0 {
            killed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(killed, "the slow statement reached the shard");
    let (c, r) = slow.await.expect("join");
    let err = r.expect_err("the statement's server connection was terminated");
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a closed socket");
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert_eq!(
        db.severity(),
        "ERROR",
        "the client's session goes on: {db:?}"
    );
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM tasks WHERE performer_id = $1",
            &[&performer],
        )
        .await
        .expect("the same client connection keeps working")
        .get(0);
    assert_eq!(n, 1);
}

/// Logs in over a raw socket with SCRAM and reads up to the first ReadyForQuery.
async fn raw_login(addr: std::net::SocketAddr) -> TcpStream {
    use bytes::BytesMut;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use postgres_protocol::message::{backend::Message, frontend};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&startup("taskflow", "tasks"))
        .await
        .expect("startup");
    let mut buf = BytesMut::new();
    let mut scram = ScramSha256::new(common::PASSWORD.as_bytes(), ChannelBinding::unsupported());
    loop {
        let msg = loop {
            if let Some(m) = Message::parse(&mut buf).expect("valid server message") {
                break m;
            }
            let n = s.read_buf(&mut buf).await.expect("read");
            assert!(n > 0, "server closed during login");
        };
        let mut out = BytesMut::new();
        match msg {
            Message::AuthenticationSasl(_) => {
                frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut out)
                    .expect("encode");
            }
            Message::AuthenticationSaslContinue(b) => {
                scram.update(b.data()).expect("scram update");
                frontend::sasl_response(scram.message(), &mut out).expect("encode");
            }
            Message::AuthenticationSaslFinal(b) => scram.finish(b.data()).expect("server proof"),
            Message::ReadyForQuery(_) => return s,
            Message::ErrorResponse(_) => panic!("login refused"),
            _ => {}
        }
        if !out.is_empty() {
            s.write_all(&out).await.expect("write");
        }
    }
}

fn startup(user: &str, db: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608i32.to_be_bytes());
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Reads until the server closes or 2 s pass; returns what was received.
async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_never_takes_the_proxy_down() {
    let env = Env::start(1).await;
    let addr = env.addr();
    let bystander = env.client("tasks").await;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage startup",
            b"\x00\x00\x00\x08\xde\xad\xbe\xef".to_vec(),
        ),
        (
            "huge startup length",
            b"\x7f\xff\xff\xff\x00\x03\x00\x00".to_vec(),
        ),
        ("tiny startup length", b"\x00\x00\x00\x02".to_vec()),
        (
            "truncated startup",
            b"\x00\x00\x00\x40\x00\x03\x00\x00user\x00".to_vec(),
        ),
        ("startup without terminator", {
            let mut v = 20i32.to_be_bytes().to_vec();
            v.extend_from_slice(&196_608i32.to_be_bytes());
            v.extend_from_slice(b"useruser1234");
            v
        }),
        ("unknown database", startup("taskflow", "nope")),
        ("password message before auth", {
            let mut v = startup("taskflow", "tasks");
            v.extend_from_slice(b"p\x00\x00\x00\x08abcd");
            v
        }),
        ("unknown message type during auth", {
            let mut v = startup("taskflow", "tasks");
            v.extend_from_slice(b"Z\x00\x00\x00\x04");
            v
        }),
        ("oversized message during auth", {
            let mut v = startup("taskflow", "tasks");
            v.extend_from_slice(b"p\x7f\x00\x00\x00");
            v
        }),
        ("bad SASL initial", {
            let mut v = startup("taskflow", "tasks");
            v.extend_from_slice(b"p\x00\x00\x00\x0cSCRAM\x00\xff\xff");
            v
        }),
    ];
    for (name, bytes) in cases {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(&bytes).await;
        let reply = read_all(&mut s).await;
        if let Some(&first) = reply.first() {
            // Either an ErrorResponse, or an auth request followed by an error/close.
            assert!(
                first == b'E' || first == b'R' || first == b'N',
                "{name}: unexpected reply {reply:?}"
            );
        }
        // The bystander is unaffected.
        bystander
            .simple_query("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("after {name}: {e}"));
    }

    // After authentication: malformed messages get a FATAL 08P01 and a clean close.
    let post_auth: Vec<(&str, &[u8])> = vec![
        ("unknown type", b"Y\x00\x00\x00\x04"),
        ("negative length", b"Q\xff\xff\xff\xff"),
        ("query without NUL", b"Q\x00\x00\x00\x08abcd"),
        (
            "bind with bad counts",
            b"B\x00\x00\x00\x0e\x00\x00\x00\x05\xff\xff\xff\xff\x00\x00",
        ),
        ("oversized", b"Q\x10\x00\x00\x00"),
        (
            "parse with truncated types",
            b"P\x00\x00\x00\x0b\x00x\x00\x00\x09\x00\x00",
        ),
    ];
    for (name, bytes) in post_auth {
        let mut s = raw_login(addr).await;
        s.write_all(bytes).await.expect("bad message");
        let reply = read_all(&mut s).await;
        assert!(reply.first() == Some(&b'E'), "{name}: {reply:?}");
        assert!(
            reply.windows(5).any(|w| w == b"08P01"),
            "{name}: protocol violation expected, got {reply:?}"
        );
        bystander
            .simple_query("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("after {name}: {e}"));
    }
    // A message cut off by a closed socket: the proxy just drops the client.
    let mut s = raw_login(addr).await;
    s.write_all(b"Q\x00\x00\x01\x00SELECT")
        .await
        .expect("partial");
    drop(s);
    bystander
        .simple_query("SELECT 1")
        .await
        .expect("after truncation");

    // Wrong password.
    let bad = format!(
        "host=127.0.0.1 port={} user=taskflow password=wrong dbname=tasks",
        addr.port()
    );
    let err = tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:?}").contains("password authentication failed"),
        "{err}"
    );
    let bad = format!(
        "host=127.0.0.1 port={} user=nobody password=x dbname=tasks",
        addr.port()
    );
    assert!(tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .is_err());

    // SQL that does not parse: an error from the shard, the session goes on.
    let err = bystander
        .simple_query("SELEC oops")
        .await
        .expect_err("syntax error");
    assert_eq!(err.code().map(|c| c.code()), Some("42601"), "{err}");
    let err = bystander
        .query("SELECT * FROM tasks WHERE", &[])
        .await
        .expect_err("syntax error");
    assert!(err.code().is_some(), "{err}");
    bystander
        .simple_query("SELECT 1")
        .await
        .expect("still serving");
}

/// `connects` of every shard pool in `SHOW POOLS` (the 7th column; the auth pool left
/// out).
async fn shard_connects(admin: &tokio_postgres::Client) -> Vec<(String, u64)> {
    let pools = rows(&admin.simple_query("SHOW POOLS").await.expect("SHOW POOLS"));
    pools
        .into_iter()
        .filter(|r| r[0].starts_with("shard-"))
        .map(|r| (r[0].clone(), r[6].parse().expect("connects is a count")))
        .collect()
}

/// 2PC recovery runs every 5 s on every shard. It keeps its connection from one pass to
/// the next (before, each pass logged in anew: a SCRAM exchange and a server process per
/// shard every 5 s), and replaces one the server has closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_keeps_its_connection_and_replaces_a_closed_one() {
    let env = Env::start(3).await;
    let admin = env.client("admin").await;
    // Past the start-up pass and the first tick.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = shard_connects(&admin).await;
    assert_eq!(before.len(), 3, "{before:?}");
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        shard_connects(&admin).await,
        before,
        "two recovery passes opened new connections"
    );
    // The servers close recovery's connections (as a restart or an idle timeout would).
    for i in 0..3 {
        let shard = env.shard(i).await;
        let closed = shard
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE query LIKE '%pg_prepared_xacts%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("terminate recovery's connection");
        assert_eq!(
            closed.get::<_, i64>(0),
            1,
            "shard {i}: one recovery connection"
        );
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    let after = shard_connects(&admin).await;
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        assert_eq!(
            *a,
            b + 1,
            "{name}: one new connection replaces the closed one"
        );
    }
}
