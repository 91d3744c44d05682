use super::*;
use crate::merge::{ColumnMerge, OrderKey};
use crate::ring::Ring;

fn rules() -> ShardingRules {
    ShardingRules {
        database: "tasks".into(),
        tables: vec!["tasks".into(), "task_observers".into(), "outbox".into()],
        key_column: "performer_id".into(),
    }
}

fn router() -> Router {
    Router::new(rules())
}

fn ring() -> Ring {
    Ring::new(["shard-1", "shard-2", "shard-3"], 256).unwrap()
}

fn plan(sql: &str) -> Result<Plan, RouteError> {
    router()
        .analyze(sql)
        .plan(&ring(), &Params::default(), None)
}

fn plan_with(
    sql: &str,
    values: &[Option<&[u8]>],
    formats: &[i16],
    types: &[u32],
) -> Result<Plan, RouteError> {
    let params = Params {
        values,
        formats,
        types,
    };
    router().analyze(sql).plan(&ring(), &params, None)
}

fn target(sql: &str) -> Target {
    plan(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).target
}

fn unsupported(sql: &str) -> String {
    match plan(sql) {
        Err(RouteError::Unsupported(m)) => m,
        other => panic!("{sql}: expected Unsupported, got {other:?}"),
    }
}

fn kind(sql: &str) -> StatementKind {
    router().analyze(sql).kind.clone()
}

/// Keys owned by shards 0, 1 and 2 (and a second key on shard 0).
fn keys() -> (i64, i64, i64, i64) {
    let r = ring();
    let find = |s: usize, skip: i64| (skip..).find(|k| r.shard_for(*k) == s).unwrap();
    let k0 = find(0, 1);
    (k0, find(1, 1), find(2, 1), find(0, k0 + 1))
}

fn merge(sql: &str) -> MergeSpec {
    let p = plan(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert!(p.scatter_read, "{sql}: not a scatter read");
    p.merge.unwrap()
}

// ---------------------------------------------------------------------------------------
// Keys in WHERE

#[test]
fn literal_key_routes_to_owner() {
    let (k0, k1, k2, _) = keys();
    assert_eq!(
        target(&format!("SELECT * FROM tasks WHERE performer_id = {k0}")),
        Target::One(0)
    );
    assert_eq!(
        target(&format!("select * from tasks where {k1} = performer_id")),
        Target::One(1)
    );
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks t WHERE t.performer_id = {k2} AND status = 'x'"
        )),
        Target::One(2)
    );
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks WHERE \"performer_id\" = '{k2}'"
        )),
        Target::One(2)
    );
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks WHERE performer_id = {k1}::bigint"
        )),
        Target::One(1)
    );
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks WHERE (performer_id = CAST('{k1}' AS bigint))"
        )),
        Target::One(1)
    );
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks WHERE performer_id IS NOT DISTINCT FROM {k1}"
        )),
        Target::One(1)
    );
    assert_eq!(
        target(&format!(
            "SELECT * FROM public.tasks WHERE PERFORMER_ID = {k0}"
        )),
        Target::One(0)
    );
    // Negative keys hash like any other.
    let owner = ring().shard_for(-7);
    assert_eq!(
        target("SELECT * FROM tasks WHERE performer_id = -7"),
        Target::One(owner)
    );
    // A quoted identifier with different case is a different column.
    assert_eq!(
        target("SELECT * FROM tasks WHERE \"Performer_Id\" = 1"),
        Target::All
    );
}

#[test]
fn in_lists_or_and_any() {
    let (k0, k1, k2, k0b) = keys();
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks WHERE performer_id IN ({k0}, {k0b})"
        )),
        Target::One(0)
    );
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks WHERE performer_id IN ({k0}, {k2})"
        )),
        Target::Many(vec![0, 2])
    );
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks WHERE performer_id = {k1} OR performer_id = {k2}"
        )),
        Target::Many(vec![1, 2])
    );
    assert_eq!(
        target(&format!("SELECT * FROM tasks WHERE (performer_id = {k0} AND status = 'a') OR (performer_id = {k1} AND status = 'b')")),
        Target::Many(vec![0, 1])
    );
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks WHERE performer_id = ANY(ARRAY[{k1}, {k2}])"
        )),
        Target::Many(vec![1, 2])
    );
    // AND of two key sets: the intersection.
    assert_eq!(
        target(&format!(
            "SELECT * FROM tasks WHERE performer_id IN ({k0}, {k1}) AND performer_id = {k1}"
        )),
        Target::One(1)
    );
    // No usable key.
    for sql in [
        "SELECT * FROM tasks",
        "SELECT * FROM tasks WHERE performer_id = 1 OR status = 'x'",
        "SELECT * FROM tasks WHERE performer_id > 5",
        "SELECT * FROM tasks WHERE performer_id NOT IN (1, 2)",
        "SELECT * FROM tasks WHERE performer_id = creator_id",
        "SELECT * FROM tasks WHERE performer_id = ANY($1)",
        "SELECT * FROM tasks WHERE performer_id IN (SELECT 1)",
    ] {
        assert_eq!(target(sql), Target::All, "{sql}");
        assert!(plan(sql).unwrap().scatter_read, "{sql}");
    }
}

#[test]
fn analysis_fields() {
    let r = router();
    let a = r.analyze("SELECT * FROM tasks WHERE performer_id = $1 AND id = $2");
    assert_eq!(a.kind, StatementKind::Select);
    assert!(a.touches_sharded);
    assert!(!a.is_write);
    assert_eq!(a.keys, KeyExpr::Any(vec![KeyValue::Param(0)]));
    assert_eq!(a.statement_count, 1);
    assert_eq!(a.hint, None);
    let a = r.analyze("INSERT INTO tasks (id, performer_id) VALUES (1, 5), (2, $1)");
    assert_eq!(
        a.keys,
        KeyExpr::PerRow(vec![KeyValue::Literal(5), KeyValue::Param(0)])
    );
    assert!(a.is_write);
    let a = r.analyze("SELECT relname FROM pg_catalog.pg_class");
    assert!(!a.touches_sharded);
    assert_eq!(a.keys, KeyExpr::None);
}

// ---------------------------------------------------------------------------------------
// Bind parameters

#[test]
fn text_and_binary_params() {
    let (_, k1, k2, _) = keys();
    let sql = "SELECT * FROM tasks WHERE performer_id = $1";
    let text = k1.to_string();
    assert_eq!(
        plan_with(sql, &[Some(text.as_bytes())], &[], &[])
            .unwrap()
            .target,
        Target::One(1)
    );
    let padded = format!(" {k1} ");
    assert_eq!(
        plan_with(sql, &[Some(padded.as_bytes())], &[0], &[20])
            .unwrap()
            .target,
        Target::One(1)
    );
    let b8 = k2.to_be_bytes();
    assert_eq!(
        plan_with(sql, &[Some(&b8)], &[1], &[20]).unwrap().target,
        Target::One(2)
    );
    assert_eq!(
        plan_with(sql, &[Some(&b8)], &[1], &[0]).unwrap().target,
        Target::One(2)
    );
    assert_eq!(
        plan_with(sql, &[Some(&b8)], &[1], &[]).unwrap().target,
        Target::One(2)
    );
    let b4 = (k2 as i32).to_be_bytes();
    assert_eq!(
        plan_with(sql, &[Some(&b4)], &[1], &[23]).unwrap().target,
        Target::One(2)
    );
    assert_eq!(
        plan_with(sql, &[Some(&b4)], &[1], &[0]).unwrap().target,
        Target::One(2)
    );
    let b2 = (k2 as i16).to_be_bytes();
    assert_eq!(
        plan_with(sql, &[Some(&b2)], &[1], &[21]).unwrap().target,
        Target::One(2)
    );
    // Binary text-typed parameter.
    assert_eq!(
        plan_with(sql, &[Some(text.as_bytes())], &[1], &[25])
            .unwrap()
            .target,
        Target::One(1)
    );
    // Per-parameter format codes.
    let sql2 = "SELECT * FROM tasks WHERE id = $1 AND performer_id = $2";
    assert_eq!(
        plan_with(sql2, &[Some(b"x"), Some(&b8)], &[0, 1], &[])
            .unwrap()
            .target,
        Target::One(2)
    );
    // NULL key: nothing matches; one shard answers.
    assert_eq!(
        plan_with(sql, &[None], &[], &[]).unwrap().target,
        Target::One(0)
    );
}

#[test]
fn bad_params_are_typed_errors() {
    let sql = "SELECT * FROM tasks WHERE id = $1 AND performer_id = $2";
    let bad = |values: &[Option<&[u8]>], formats: &[i16], types: &[u32]| match plan_with(
        sql, values, formats, types,
    ) {
        Err(RouteError::BadKeyParam { index, reason }) => {
            assert_eq!(index, 1);
            reason
        }
        other => panic!("{other:?}"),
    };
    bad(&[Some(b"1"), Some(b"abc")], &[], &[]);
    bad(&[Some(b"1"), Some(b"99999999999999999999")], &[], &[]);
    bad(&[Some(b"1"), Some(&[0xff, 0xfe])], &[], &[]);
    bad(&[Some(b"1"), Some(&[1, 2, 3])], &[1], &[]);
    bad(&[Some(b"1"), Some(&[0; 8])], &[1], &[0, 23]);
    bad(&[Some(b"1"), Some(&[0; 8])], &[1], &[0, 1700]);
    bad(&[Some(b"1"), Some(&[0; 16])], &[1], &[0, 2950]);
    bad(&[Some(b"1"), Some(b"1")], &[0, 7], &[]);
    let reason = bad(&[Some(b"1")], &[], &[]);
    assert!(reason.contains("1 parameters"), "{reason}");
    let e = plan_with(sql, &[Some(b"1"), Some(b"x")], &[], &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("shard key parameter $2 is unusable"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// INSERT

#[test]
fn insert_routes_by_row_keys() {
    let (k0, k1, _, k0b) = keys();
    assert_eq!(
        target(&format!(
            "INSERT INTO tasks (id, performer_id, title) VALUES (1, {k1}, 'a')"
        )),
        Target::One(1)
    );
    let p = plan(&format!(
        "INSERT INTO tasks (id, performer_id) VALUES (1, {k0}), (2, {k0b})"
    ))
    .unwrap();
    assert_eq!(p.target, Target::One(0));
    assert_eq!(p.per_shard_sql, None);
    assert!(!p.scatter_read);
    // Parameter keys.
    let sql = "INSERT INTO outbox (performer_id, event_id) VALUES ($1, $2)";
    let v = k1.to_string();
    assert_eq!(
        plan_with(sql, &[Some(v.as_bytes()), Some(b"e")], &[], &[])
            .unwrap()
            .target,
        Target::One(1)
    );
    // NULL key in a row.
    match plan_with(sql, &[None, Some(b"e")], &[], &[]) {
        Err(RouteError::BadKeyParam { index: 0, reason }) => {
            assert!(reason.contains("NULL"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn multi_row_insert_is_split_with_renumbered_params() {
    let (k0, k1, k2, k0b) = keys();
    let sql = "INSERT INTO tasks (id, performer_id, title) VALUES ($1, $2, $3), ($4, $5, 'lit'), ($6, $7, $8) \
               ON CONFLICT (id) DO UPDATE SET title = $9 RETURNING id";
    let (a, b, c) = (k1.to_string(), k0.to_string(), k1.to_string());
    let values: Vec<Option<&[u8]>> = vec![
        Some(b"10"),
        Some(a.as_bytes()),
        Some(b"t1"),
        Some(b"11"),
        Some(b.as_bytes()),
        Some(b"12"),
        Some(c.as_bytes()),
        Some(b"t3"),
        Some(b"x"),
    ];
    let p = plan_with(sql, &values, &[], &[]).unwrap();
    assert_eq!(p.target, Target::Many(vec![0, 1]));
    let per = p.per_shard_sql.unwrap();
    assert_eq!(per.len(), 2);
    assert_eq!(per[0].0, 0);
    assert_eq!(
        per[0].1,
        "INSERT INTO tasks (id, performer_id, title) VALUES ($1, $2, 'lit') ON CONFLICT(id) DO UPDATE SET title = $3 RETURNING id"
    );
    assert_eq!(per[0].2, vec![3, 4, 8]);
    assert_eq!(per[1].0, 1);
    assert_eq!(
        per[1].1,
        "INSERT INTO tasks (id, performer_id, title) VALUES ($1, $2, $3), ($4, $5, $6) ON CONFLICT(id) DO UPDATE SET title = $7 RETURNING id"
    );
    assert_eq!(per[1].2, vec![0, 1, 2, 5, 6, 7, 8]);

    // Literal rows on three shards.
    let p = plan(&format!("INSERT INTO tasks (performer_id, title) VALUES ({k2}, 'c'), ({k0}, 'a'), ({k1}, 'b'), ({k0b}, 'd')")).unwrap();
    assert_eq!(p.target, Target::Many(vec![0, 1, 2]));
    let per = p.per_shard_sql.unwrap();
    assert_eq!(
        per[0].1,
        format!("INSERT INTO tasks (performer_id, title) VALUES ({k0}, 'a'), ({k0b}, 'd')")
    );
    assert_eq!(
        per[1].1,
        format!("INSERT INTO tasks (performer_id, title) VALUES ({k1}, 'b')")
    );
    assert_eq!(
        per[2].1,
        format!("INSERT INTO tasks (performer_id, title) VALUES ({k2}, 'c')")
    );
    assert!(per.iter().all(|(_, _, kept)| kept.is_empty()));
}

#[test]
fn insert_without_key_is_refused_clearly() {
    for sql in [
        "INSERT INTO tasks (id, title) VALUES (1, 'x')",
        "INSERT INTO tasks VALUES (1, 2, 3)",
        "INSERT INTO tasks DEFAULT VALUES",
        "INSERT INTO public.tasks (title) VALUES ('x')",
    ] {
        let e = plan(sql).unwrap_err();
        assert_eq!(
            e,
            RouteError::InsertWithoutKey {
                table: "tasks".into(),
                column: "performer_id".into()
            },
            "{sql}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("\"tasks\"") && msg.contains("\"performer_id\""),
            "{msg}"
        );
    }
    let m = unsupported(
        "INSERT INTO tasks (performer_id, title) SELECT performer_id, title FROM tasks",
    );
    assert!(m.contains("INSERT … SELECT"), "{m}");
    let m = unsupported("INSERT INTO tasks (performer_id, title) VALUES (1, 'a'), (1 + 1, 'b')");
    assert!(m.contains("row 2") && m.contains("1 + 1"), "{m}");
    let m = unsupported("INSERT INTO tasks (performer_id, title) VALUES (DEFAULT, 'a')");
    assert!(m.contains("row 1"), "{m}");
    let m = unsupported("INSERT INTO tasks (id, performer_id) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET performer_id = 3");
    assert!(m.starts_with("changing performer_id in UPDATE"), "{m}");
    // Unsharded target: broadcast; a hint routes a key-less insert.
    assert_eq!(
        target("INSERT INTO audit_log (msg) VALUES ('x')"),
        Target::All
    );
    assert_eq!(
        target("/* shard=shard-2 */ INSERT INTO tasks (id, title) VALUES (1, 'x')"),
        Target::One(1)
    );
}

// ---------------------------------------------------------------------------------------
// UPDATE / DELETE

#[test]
fn update_delete_route_or_broadcast() {
    let (k0, k1, _, k0b) = keys();
    assert_eq!(
        target(&format!(
            "UPDATE tasks SET title = 'x' WHERE performer_id = {k1} AND id = 4"
        )),
        Target::One(1)
    );
    assert_eq!(
        target("UPDATE tasks SET title = 'x' WHERE id = 4"),
        Target::All
    );
    assert_eq!(
        target(&format!(
            "DELETE FROM task_observers WHERE performer_id IN ({k0}, {k1})"
        )),
        Target::Many(vec![0, 1])
    );
    assert_eq!(
        target("DELETE FROM outbox WHERE sent_at IS NOT NULL"),
        Target::All
    );
    let p = plan("UPDATE tasks SET status = 'done'").unwrap();
    assert!(!p.scatter_read && p.merge.is_none());
    // Changing the key: only to a key on the same shard.
    assert_eq!(
        target(&format!(
            "UPDATE tasks SET performer_id = {k0b} WHERE performer_id = {k0}"
        )),
        Target::One(0)
    );
    let expected =
        "changing performer_id in UPDATE; move the row with DELETE + INSERT in one transaction";
    assert_eq!(
        unsupported(&format!(
            "UPDATE tasks SET performer_id = {k1} WHERE performer_id = {k0}"
        )),
        expected
    );
    assert_eq!(
        unsupported(&format!(
            "UPDATE tasks SET performer_id = {k1} WHERE id = 1"
        )),
        expected
    );
    assert_eq!(
        unsupported(&format!(
            "UPDATE tasks SET performer_id = performer_id + 1 WHERE performer_id = {k0}"
        )),
        expected
    );
    assert_eq!(
        unsupported(&format!(
            "UPDATE tasks SET (performer_id, title) = ({k0}, 'x') WHERE performer_id = {k0}"
        )),
        expected
    );
    // Same with a parameter for the new key.
    let sql = format!("UPDATE tasks SET performer_id = $1 WHERE performer_id = {k0}");
    let same = k0b.to_string();
    let other = k1.to_string();
    assert_eq!(
        plan_with(&sql, &[Some(same.as_bytes())], &[], &[])
            .unwrap()
            .target,
        Target::One(0)
    );
    assert!(plan_with(&sql, &[Some(other.as_bytes())], &[], &[]).is_err());
}

// ---------------------------------------------------------------------------------------
// Hints and the session shard

#[test]
fn hints_and_session_shard() {
    let r = router();
    let (k0, ..) = keys();
    let a = r.analyze(&format!(
        "SELECT * FROM tasks /* shard=shard-3 */ WHERE performer_id = {k0}"
    ));
    assert_eq!(a.hint.as_deref(), Some("shard-3"));
    assert_eq!(
        a.plan(&ring(), &Params::default(), None).unwrap().target,
        Target::One(2)
    );
    for (sql, want) in [
        ("/* shard = 'shard-2' */ SELECT 1", Some("shard-2")),
        ("/*shard=\"shard-1\"*/ SELECT 1", Some("shard-1")),
        ("/* app=gw, shard=shard-2 */ SELECT 1", Some("shard-2")),
        (
            "/* outer /* nested */ shard=shard-2 */ SELECT 1",
            Some("shard-2"),
        ),
        ("SELECT '/* shard=shard-2 */'", None),
        ("SELECT $$ /* shard=shard-2 */ $$", None),
        ("SELECT E'\\' /* shard=shard-2 */'", None),
        ("SELECT 1 -- /* shard=shard-2 */", None),
        ("/* myshard=shard-2 */ SELECT 1", None),
        ("/* shard= */ SELECT 1", None),
    ] {
        assert_eq!(r.analyze(sql).hint.as_deref(), want, "{sql}");
    }
    // Unknown shard.
    assert_eq!(
        plan("/* shard=nope */ SELECT 1").unwrap_err(),
        RouteError::UnknownShard("nope".into())
    );
    // Session shard: below the hint, above keys.
    let sql = format!("SELECT * FROM tasks WHERE performer_id = {k0}");
    let a = r.analyze(&sql);
    assert_eq!(
        a.plan(&ring(), &Params::default(), Some("shard-2"))
            .unwrap()
            .target,
        Target::One(1)
    );
    let a = r.analyze(&format!("/* shard=shard-3 */ {sql}"));
    assert_eq!(
        a.plan(&ring(), &Params::default(), Some("shard-2"))
            .unwrap()
            .target,
        Target::One(2)
    );
    let a = r.analyze("SELECT count(*) FROM tasks");
    let p = a
        .plan(&ring(), &Params::default(), Some("shard-2"))
        .unwrap();
    assert_eq!(p.target, Target::One(1));
    assert!(!p.scatter_read);
    assert_eq!(
        a.plan(&ring(), &Params::default(), Some("gone"))
            .unwrap_err(),
        RouteError::UnknownShard("gone".into())
    );
    // SET taskflow.shard itself is not routed by the session shard.
    let a = r.analyze("SET taskflow.shard TO DEFAULT");
    assert_eq!(
        a.plan(&ring(), &Params::default(), Some("gone"))
            .unwrap()
            .target,
        Target::All
    );
    // A hint routes what the parser can't read.
    assert_eq!(target("/* shard=shard-1 */ FROB tasks"), Target::One(0));
}

#[test]
fn set_shard_statements() {
    assert_eq!(
        kind("SET taskflow.shard = 'shard-1'"),
        StatementKind::SetShard(Some("shard-1".into()))
    );
    assert_eq!(
        kind("set TASKFLOW.SHARD to 'shard-2';"),
        StatementKind::SetShard(Some("shard-2".into()))
    );
    assert_eq!(
        kind("SET taskflow.shard = shard-1"),
        StatementKind::SetShard(Some("shard-1".into()))
    );
    assert_eq!(
        kind("SET taskflow.shard = shard_1"),
        StatementKind::SetShard(Some("shard_1".into()))
    );
    assert_eq!(
        kind("SET SESSION taskflow.shard TO 'x'"),
        StatementKind::SetShard(Some("x".into()))
    );
    assert_eq!(
        kind("SET taskflow.shard TO DEFAULT"),
        StatementKind::SetShard(None)
    );
    assert_eq!(
        kind("SET taskflow.shard = default"),
        StatementKind::SetShard(None)
    );
    assert_eq!(
        kind("SET taskflow.shard = 'default'"),
        StatementKind::SetShard(Some("default".into()))
    );
    assert_eq!(kind("RESET taskflow.shard"), StatementKind::SetShard(None));
    assert_eq!(kind("reset TaskFlow.Shard;"), StatementKind::SetShard(None));
    assert_eq!(kind("RESET ALL"), StatementKind::Set);
    assert_eq!(kind("RESET statement_timeout"), StatementKind::Set);
    assert_eq!(kind("SET statement_timeout = 1000"), StatementKind::Set);
    assert_eq!(kind("SET search_path TO public, other"), StatementKind::Set);
    assert_eq!(kind("SET TIME ZONE 'UTC'"), StatementKind::Set);
    assert_eq!(kind("DISCARD ALL"), StatementKind::Set);
    assert_eq!(target("SET statement_timeout = 1000"), Target::All);
    assert!(!router().analyze("SET x = 1").is_write);
}

// ---------------------------------------------------------------------------------------
// Statement kinds and unsharded statements

#[test]
fn statement_kinds() {
    use StatementKind as K;
    for (sql, want) in [
        ("BEGIN", K::Begin),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", K::Begin),
        ("START TRANSACTION READ ONLY", K::Begin),
        ("COMMIT", K::Commit),
        ("END", K::Commit),
        ("ROLLBACK", K::Rollback),
        ("ABORT", K::Rollback),
        ("ROLLBACK TO SAVEPOINT s1", K::Rollback),
        ("SAVEPOINT s1", K::Savepoint),
        ("RELEASE SAVEPOINT s1", K::Savepoint),
        ("SHOW search_path", K::Show),
        ("SHOW ALL", K::Show),
        ("EXPLAIN SELECT * FROM tasks", K::Show),
        ("COPY tasks FROM STDIN", K::Copy { from_stdin: true }),
        (
            "COPY tasks (performer_id, title) FROM STDIN WITH (FORMAT csv)",
            K::Copy { from_stdin: true },
        ),
        ("COPY tasks TO STDOUT", K::Copy { from_stdin: false }),
        (
            "COPY (SELECT * FROM tasks) TO STDOUT",
            K::Copy { from_stdin: false },
        ),
        (
            "PREPARE p (bigint) AS SELECT * FROM tasks WHERE performer_id = $1",
            K::Prepare,
        ),
        ("EXECUTE p(1)", K::Execute),
        ("DEALLOCATE p", K::Deallocate),
        ("DEALLOCATE ALL", K::Deallocate),
        ("CREATE TABLE t (id int)", K::Utility),
        ("CREATE INDEX CONCURRENTLY i ON tasks (title)", K::Utility),
        ("ALTER TABLE tasks ADD COLUMN x int", K::Utility),
        ("TRUNCATE tasks", K::Utility),
        ("VACUUM tasks", K::Utility),
        ("LOCK TABLE tasks IN SHARE MODE", K::Utility),
        ("VALUES (1), (2)", K::Select),
        ("WITH x AS (SELECT 1) SELECT * FROM x", K::Select),
        ("UPDATE tasks SET a = 1", K::Update),
        ("DELETE FROM tasks", K::Delete),
        ("INSERT INTO tasks (performer_id) VALUES (1)", K::Insert),
        ("", K::Empty),
        ("   ", K::Empty),
        (";", K::Empty),
        ("/* only a comment */", K::Empty),
    ] {
        assert_eq!(kind(sql), want, "{sql}");
    }
    let a = router().analyze("");
    assert_eq!(a.statement_count, 0);
    assert_eq!(
        a.plan(&ring(), &Params::default(), None).unwrap().target,
        Target::One(0)
    );
    for sql in [
        "DO $$ BEGIN END $$",
        "FROB",
        "SELECT FROM WHERE (",
        "COMMIT PREPARED 'tx1'",
        "\u{0}\u{1}",
        "SELECT 'unterminated",
    ] {
        assert!(
            matches!(kind(sql), K::Unparsed(_)),
            "{sql}: {:?}",
            kind(sql)
        );
        let m = unsupported(sql);
        assert!(m.contains("could not parse"), "{m}");
    }
    let a = router().analyze("COPY tasks FROM STDIN");
    assert!(a.touches_sharded && a.is_write);
    assert_eq!(
        a.plan(&ring(), &Params::default(), None).unwrap().target,
        Target::All
    );
    assert!(router().analyze("CREATE TABLE t (id int)").is_write);
    assert!(router().analyze("VACUUM tasks").touches_sharded);
}

#[test]
fn transaction_control_and_utility_targets() {
    for sql in [
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT a",
        "PREPARE p AS SELECT 1",
        "DEALLOCATE p",
        "CREATE TABLE t (id int)",
        "TRUNCATE tasks",
    ] {
        assert_eq!(target(sql), Target::All, "{sql}");
    }
    let m = unsupported("EXECUTE p(1)");
    assert!(m.contains("EXECUTE"), "{m}");
    assert_eq!(target("/* shard=shard-2 */ EXECUTE p(1)"), Target::One(1));
}

#[test]
fn unsharded_reads_go_to_shard_zero_writes_everywhere() {
    for sql in [
        "SELECT 1",
        "select now(), version()",
        "SELECT relname FROM pg_catalog.pg_class WHERE relkind = 'r'",
        "SELECT table_name FROM information_schema.tables",
        "SELECT * FROM pg_stat_activity",
        "SHOW server_version",
        "EXPLAIN SELECT 1",
        "COPY (SELECT 1) TO STDOUT",
        "VALUES (1)",
    ] {
        let p = plan(sql).unwrap();
        assert_eq!(p.target, Target::One(0), "{sql}");
        assert!(!p.scatter_read);
    }
    for sql in [
        "INSERT INTO schema_migrations (v) VALUES (1)",
        "UPDATE settings SET v = 1",
        "DELETE FROM settings",
    ] {
        assert_eq!(target(sql), Target::All, "{sql}");
    }
}

#[test]
fn explain_routes_like_its_statement() {
    let (k0, k1, ..) = keys();
    assert_eq!(
        target(&format!(
            "EXPLAIN SELECT * FROM tasks WHERE performer_id = {k1}"
        )),
        Target::One(1)
    );
    assert_eq!(target("EXPLAIN SELECT count(*) FROM tasks"), Target::One(0));
    assert_eq!(
        target(&format!(
            "EXPLAIN SELECT * FROM tasks WHERE performer_id IN ({k0}, {k1})"
        )),
        Target::One(0)
    );
    assert_eq!(
        target("EXPLAIN INSERT INTO tasks (title) VALUES ('x')"),
        Target::One(0)
    );
    assert!(plan("EXPLAIN ANALYZE INSERT INTO tasks (title) VALUES ('x')").is_err());
    assert!(plan("EXPLAIN ANALYZE DELETE FROM tasks").is_err());
    assert!(
        router()
            .analyze("EXPLAIN ANALYZE DELETE FROM tasks")
            .is_write
    );
    assert!(!router().analyze("EXPLAIN DELETE FROM tasks").is_write);
}

#[test]
fn multi_statement_strings() {
    let (k0, k1, _, k0b) = keys();
    let a = router().analyze(&format!(
        "BEGIN; UPDATE tasks SET title = 'x' WHERE performer_id = {k1}; COMMIT;"
    ));
    assert_eq!(a.statement_count, 3);
    assert_eq!(a.kind, StatementKind::Begin);
    assert!(a.is_write);
    assert_eq!(
        a.plan(&ring(), &Params::default(), None).unwrap().target,
        Target::One(1)
    );
    assert_eq!(
        target(&format!("SELECT * FROM tasks WHERE performer_id = {k0}; DELETE FROM outbox WHERE performer_id = {k0b}")),
        Target::One(0)
    );
    let m = unsupported(&format!("SELECT * FROM tasks WHERE performer_id = {k0}; SELECT * FROM tasks WHERE performer_id = {k1}"));
    assert!(m.contains("different shards"), "{m}");
    let m = unsupported("SELECT count(*) FROM tasks; SELECT 1");
    assert!(m.contains("several statements"), "{m}");
    assert_eq!(target("SELECT 1; SELECT 2"), Target::One(0));
    assert_eq!(target("SET a = 1; SET b = 2"), Target::All);
    assert_eq!(target("SELECT 1; CREATE TABLE t (id int)"), Target::All);
    assert!(plan("INSERT INTO tasks (title) VALUES ('x'); SELECT 1").is_err());
    assert_eq!(
        target("/* shard=shard-3 */ SELECT count(*) FROM tasks; SELECT 1"),
        Target::One(2)
    );
}

#[test]
fn data_modifying_with() {
    let (k0, k1, ..) = keys();
    let a = router().analyze(&format!("WITH d AS (DELETE FROM tasks WHERE performer_id = {k1} RETURNING *) SELECT count(*) FROM d"));
    assert!(a.is_write);
    assert_eq!(
        a.plan(&ring(), &Params::default(), None).unwrap().target,
        Target::One(1)
    );
    assert!(
        unsupported("WITH d AS (DELETE FROM tasks WHERE id = 1 RETURNING *) SELECT * FROM d")
            .contains("data-modifying")
    );
    assert_eq!(
        target(&format!("WITH i AS (INSERT INTO outbox (performer_id) VALUES ({k0}) RETURNING id) SELECT * FROM tasks WHERE performer_id = {k1}")),
        Target::Many(vec![0, 1])
    );
}

// ---------------------------------------------------------------------------------------
// Scatter reads and their merge specs

fn ok(column: usize, descending: bool) -> OrderKey {
    OrderKey {
        column,
        descending,
        nulls_first: descending,
    }
}

#[test]
fn scatter_plain_concatenation() {
    let p = plan("SELECT id, title FROM tasks WHERE creator_id = 7").unwrap();
    assert_eq!(p.target, Target::All);
    assert!(p.scatter_read);
    assert_eq!(p.merge, Some(MergeSpec::default()));
    // Keyed reads spanning several shards merge too.
    let (k0, k1, ..) = keys();
    let p = plan(&format!(
        "SELECT id FROM tasks WHERE performer_id IN ({k0}, {k1}) ORDER BY id LIMIT 5"
    ))
    .unwrap();
    assert_eq!(p.target, Target::Many(vec![0, 1]));
    assert!(p.scatter_read);
    assert_eq!(p.merge.unwrap().order_by, vec![ok(0, false)]);
}

#[test]
fn scatter_order_limit_offset() {
    let m = merge("SELECT id, title FROM tasks ORDER BY created_at DESC, id LIMIT 10 OFFSET 5");
    assert_eq!(m.order_by, vec![ok(2, true), ok(0, false)]);
    assert_eq!(m.limit, Some(10));
    assert_eq!(m.offset, 5);
    assert_eq!(m.hidden_columns, 1);
    assert!(!m.order_by_hidden);
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT id, title, created_at FROM tasks ORDER BY created_at DESC, id LIMIT 15")
    );
    // By position, alias, qualified name, explicit NULLS.
    let m = merge("SELECT t.id AS task, title FROM tasks t ORDER BY 2 DESC NULLS LAST, task ASC NULLS FIRST, t.title");
    assert_eq!(
        m.order_by,
        vec![
            OrderKey {
                column: 1,
                descending: true,
                nulls_first: false
            },
            OrderKey {
                column: 0,
                descending: false,
                nulls_first: true
            },
            ok(1, false)
        ]
    );
    assert_eq!(m.shard_sql, None);
    // LIMIT only: shard SQL unchanged.
    let m = merge("SELECT id FROM tasks ORDER BY id LIMIT 3");
    assert_eq!((m.limit, m.offset, m.shard_sql), (Some(3), 0, None));
    // OFFSET only: stripped from the shards.
    let m = merge("SELECT id FROM tasks ORDER BY id OFFSET 4");
    assert_eq!((m.limit, m.offset), (None, 4));
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT id FROM tasks ORDER BY id")
    );
    // FETCH FIRST.
    let m = merge("SELECT id FROM tasks ORDER BY id OFFSET 2 ROWS FETCH FIRST 3 ROWS ONLY");
    assert_eq!((m.limit, m.offset), (Some(3), 2));
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT id FROM tasks ORDER BY id LIMIT 5")
    );
    assert!(
        unsupported("SELECT id FROM tasks ORDER BY id FETCH FIRST 3 ROWS WITH TIES")
            .contains("WITH TIES")
    );
    // ORDER BY an expression not selected.
    let m = merge("SELECT id FROM tasks ORDER BY lower(title)");
    assert_eq!(m.order_by, vec![ok(1, false)]);
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT id, lower(title) FROM tasks ORDER BY lower(title)")
    );
}

#[test]
fn scatter_star_orders_by_hidden_columns() {
    let m = merge("SELECT * FROM tasks WHERE creator_id = 3 ORDER BY created_at DESC, id LIMIT 20");
    assert!(m.order_by_hidden);
    assert_eq!(m.hidden_columns, 2);
    assert_eq!(m.order_by, vec![ok(0, true), ok(1, false)]);
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT *, created_at, id FROM tasks WHERE creator_id = 3 ORDER BY created_at DESC, id LIMIT 20")
    );
    let m = merge("SELECT *, lower(title) AS lt FROM tasks ORDER BY lt");
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT *, lower(title) AS lt, lower(title) FROM tasks ORDER BY lt")
    );
    assert!(unsupported("SELECT * FROM tasks ORDER BY 1").contains("position"));
}

#[test]
fn scatter_limit_offset_params() {
    let sql = "SELECT id FROM tasks WHERE creator_id = $1 ORDER BY id LIMIT $2 OFFSET $3";
    let a = router().analyze(sql);
    let m = a.merge.clone().unwrap();
    assert_eq!(m.shard_sql.as_deref(), Some("SELECT id FROM tasks WHERE creator_id = $1 ORDER BY id LIMIT ($2)::BIGINT + ($3)::BIGINT"));
    let params = Params {
        values: &[Some(b"7"), Some(b"10"), Some(&20i64.to_be_bytes())],
        formats: &[0, 0, 1],
        types: &[],
    };
    let p = a.plan(&ring(), &params, None).unwrap();
    let pm = p.merge.unwrap();
    assert_eq!((pm.limit, pm.offset), (Some(10), 20));
    // NULL limit = no limit.
    let params = Params {
        values: &[Some(b"7"), None, None],
        formats: &[],
        types: &[],
    };
    let pm = a.plan(&ring(), &params, None).unwrap().merge.unwrap();
    assert_eq!((pm.limit, pm.offset), (None, 0));
    let params = Params {
        values: &[Some(b"7"), Some(b"-1"), None],
        formats: &[],
        types: &[],
    };
    assert!(matches!(
        a.plan(&ring(), &params, None),
        Err(RouteError::Unsupported(_))
    ));
    let params = Params {
        values: &[Some(b"7"), Some(b"x"), None],
        formats: &[],
        types: &[],
    };
    assert!(matches!(
        a.plan(&ring(), &params, None),
        Err(RouteError::Unsupported(_))
    ));
    assert!(unsupported("SELECT id FROM tasks LIMIT 1 + 1").contains("LIMIT"));
}

#[test]
fn scatter_aggregates() {
    let m = merge("SELECT count(*) FROM tasks");
    assert_eq!(m.aggregates, vec![ColumnMerge::Count]);
    assert_eq!(m.shard_sql, None);
    let m = merge("SELECT count(*) AS n, sum(version), min(created_at), max(title), count(sent_at) FROM outbox WHERE sent_at IS NULL");
    assert_eq!(
        m.aggregates,
        vec![
            ColumnMerge::Count,
            ColumnMerge::Sum,
            ColumnMerge::Min,
            ColumnMerge::Max,
            ColumnMerge::Count
        ]
    );
    let m = merge("SELECT avg(version), count(*) FROM tasks");
    assert_eq!(
        m.aggregates,
        vec![
            ColumnMerge::Avg {
                sum_col: 2,
                count_col: 3
            },
            ColumnMerge::Count,
            ColumnMerge::Sum,
            ColumnMerge::Count
        ]
    );
    assert_eq!(m.hidden_columns, 2);
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT avg(version), count(*), sum(version), count(version) FROM tasks")
    );
    // FILTER is carried to the hidden columns.
    let m = merge("SELECT avg(version) FILTER (WHERE status = 'done') FROM tasks");
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT avg(version) FILTER (WHERE status = 'done'), sum(version) FILTER (WHERE status = 'done'), count(version) FILTER (WHERE status = 'done') FROM tasks")
    );
    // Constants may accompany aggregates; count(*)::int merges as a count.
    let m = merge("SELECT 'total', count(*)::int, min(DISTINCT id) FROM tasks");
    assert_eq!(
        m.aggregates,
        vec![ColumnMerge::Key, ColumnMerge::Count, ColumnMerge::Min]
    );
    // LIMIT/OFFSET on an aggregate: applied by the merger only.
    let m = merge("SELECT count(*) FROM tasks LIMIT 1 OFFSET 1");
    assert_eq!((m.limit, m.offset), (Some(1), 1));
    assert_eq!(m.shard_sql.as_deref(), Some("SELECT count(*) FROM tasks"));
}

#[test]
fn scatter_group_by() {
    let m =
        merge("SELECT status, count(*) FROM tasks GROUP BY status ORDER BY count(*) DESC LIMIT 3");
    assert_eq!(m.aggregates, vec![ColumnMerge::Key, ColumnMerge::Count]);
    assert_eq!(m.group_by, vec![0]);
    assert_eq!(m.order_by, vec![ok(1, true)]);
    assert_eq!(m.limit, Some(3));
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT status, count(*) FROM tasks GROUP BY status")
    );
    // Group key not selected → hidden; ORDER BY the output name of an aggregate.
    let m = merge("SELECT count(*) FROM tasks GROUP BY status ORDER BY count");
    assert_eq!(m.aggregates, vec![ColumnMerge::Count, ColumnMerge::Key]);
    assert_eq!(m.group_by, vec![1]);
    assert_eq!(m.hidden_columns, 1);
    assert_eq!(m.order_by, vec![ok(0, false)]);
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT count(*), status FROM tasks GROUP BY status")
    );
    // GROUP BY position, expression of group key, aggregate in ORDER BY not selected.
    let m = merge(
        "SELECT lower(status) AS s, avg(version) FROM tasks GROUP BY 1 ORDER BY max(version) DESC",
    );
    assert_eq!(
        m.aggregates,
        vec![
            ColumnMerge::Key,
            ColumnMerge::Avg {
                sum_col: 2,
                count_col: 3
            },
            ColumnMerge::Sum,
            ColumnMerge::Count,
            ColumnMerge::Max
        ]
    );
    assert_eq!(m.group_by, vec![0]);
    assert_eq!(m.order_by, vec![ok(4, true)]);
    assert_eq!(
        m.shard_sql.as_deref(),
        Some("SELECT lower(status) AS s, avg(version), sum(version), count(version), max(version) FROM tasks GROUP BY 1")
    );
    // Two keys; GROUP BY without aggregates acts like DISTINCT.
    let m = merge("SELECT creator_id, status FROM tasks GROUP BY creator_id, status");
    assert_eq!(m.aggregates, vec![ColumnMerge::Key, ColumnMerge::Key]);
    assert_eq!(m.group_by, vec![0, 1]);
}

#[test]
fn scatter_distinct_and_union() {
    let m = merge("SELECT DISTINCT status FROM tasks ORDER BY status LIMIT 2");
    assert!(m.distinct);
    assert_eq!(m.limit, Some(2));
    let m = merge(
        "SELECT id FROM tasks UNION ALL SELECT task_id FROM task_observers ORDER BY 1 DESC LIMIT 4",
    );
    assert!(!m.distinct);
    assert_eq!(m.order_by, vec![ok(0, true)]);
    assert_eq!(m.limit, Some(4));
    let m = merge("SELECT id FROM tasks UNION SELECT task_id AS id FROM task_observers UNION SELECT 0 ORDER BY id");
    assert!(m.distinct);
    assert_eq!(m.order_by, vec![ok(0, false)]);
    assert!(
        unsupported("SELECT id FROM tasks INTERSECT SELECT task_id FROM task_observers")
            .contains("INTERSECT")
    );
    assert!(
        unsupported("SELECT id FROM tasks EXCEPT SELECT task_id FROM task_observers")
            .contains("EXCEPT")
    );
    assert!(unsupported("SELECT id FROM tasks UNION ALL SELECT 0").contains("repeated"));
    assert!(unsupported(
        "SELECT id FROM tasks UNION SELECT id FROM outbox UNION ALL SELECT 1 FROM tasks"
    )
    .contains("mixing"));
    assert!(
        unsupported("SELECT count(*) FROM tasks UNION ALL SELECT count(*) FROM outbox")
            .contains("aggregates")
    );
    assert!(
        unsupported("SELECT id FROM tasks UNION ALL SELECT id FROM outbox ORDER BY lower(id)")
            .contains("ORDER BY")
    );
}

#[test]
fn scatter_refusals() {
    for (sql, needle) in [
        // PgDog #1172: plain columns mixed with aggregates.
        ("SELECT title, count(*) FROM tasks", "mixed with aggregates"),
        ("SELECT count(DISTINCT creator_id) FROM tasks", "DISTINCT"),
        ("SELECT sum(DISTINCT version) FROM tasks", "DISTINCT"),
        ("SELECT string_agg(title, ',') FROM tasks", "string_agg"),
        ("SELECT stddev(version) FROM tasks", "stddev"),
        ("SELECT count(*) + 1 FROM tasks", "computes with aggregates"),
        (
            "SELECT sum(version) / count(*) FROM tasks",
            "computes with aggregates",
        ),
        (
            "SELECT status, count(*) FROM tasks GROUP BY status HAVING count(*) > 1",
            "HAVING",
        ),
        (
            "SELECT id, row_number() OVER (ORDER BY id) FROM tasks",
            "window",
        ),
        (
            "SELECT DISTINCT ON (creator_id) * FROM tasks",
            "DISTINCT ON",
        ),
        (
            "SELECT status FROM tasks GROUP BY ROLLUP (status)",
            "ROLLUP",
        ),
        ("SELECT *, count(*) FROM tasks GROUP BY id", "SELECT *"),
        (
            "SELECT * FROM tasks WHERE version > (SELECT avg(version) FROM tasks)",
            "subquery",
        ),
        (
            "SELECT * FROM (SELECT * FROM tasks ORDER BY id LIMIT 5) t",
            "subquery",
        ),
        (
            "WITH c AS (SELECT status, count(*) FROM tasks GROUP BY status) SELECT * FROM c",
            "subquery",
        ),
        ("SELECT (SELECT count(*) FROM tasks)", "subquery"),
        (
            "SELECT 1 WHERE EXISTS (SELECT 1 FROM tasks)",
            "once per shard",
        ),
        (
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY version) FROM tasks",
            "percentile_cont",
        ),
        ("SELECT array_agg(id ORDER BY id) FROM tasks", "array_agg"),
        ("SELECT id INTO new_table FROM tasks", "INTO"),
    ] {
        let m = unsupported(sql);
        assert!(m.contains(needle), "{sql}: {m}");
    }
    // The same statements are fine on one shard.
    let (k0, ..) = keys();
    assert_eq!(
        target(&format!(
            "SELECT title, count(*) FROM tasks WHERE performer_id = {k0}"
        )),
        Target::One(0)
    );
    // Row-local subqueries and per-key groups are accepted.
    for sql in [
        "SELECT * FROM tasks WHERE id IN (SELECT task_id FROM task_observers WHERE user_id = 5)",
        "SELECT * FROM (SELECT id, title FROM tasks WHERE status = 'x') t ORDER BY id",
        "SELECT max(n) FROM (SELECT performer_id, count(*) AS n FROM tasks GROUP BY performer_id) per",
        "WITH mine AS (SELECT * FROM tasks WHERE creator_id = 1) SELECT count(*) FROM mine",
        "SELECT t.id, o.user_id FROM tasks t JOIN task_observers o ON o.task_id = t.id",
        "SELECT id FROM tasks FOR UPDATE",
        "SELECT id, (SELECT now()) FROM tasks",
    ] {
        assert!(plan(sql).is_ok(), "{sql}: {:?}", plan(sql));
    }
}

#[test]
fn copy_out_of_many_shards_only_concatenates() {
    assert_eq!(target("COPY tasks TO STDOUT"), Target::All);
    let p = plan("COPY (SELECT id FROM tasks WHERE status = 'x') TO STDOUT").unwrap();
    assert_eq!(p.target, Target::All);
    assert!(
        unsupported("COPY (SELECT id FROM tasks ORDER BY id LIMIT 3) TO STDOUT").contains("COPY")
    );
    assert!(unsupported("COPY tasks FROM '/tmp/x.csv'").contains("STDIN"));
    let (k0, ..) = keys();
    assert_eq!(
        target(&format!(
            "COPY (SELECT * FROM tasks WHERE performer_id = {k0} ORDER BY id LIMIT 3) TO STDOUT"
        )),
        Target::One(0)
    );
}

// ---------------------------------------------------------------------------------------
// Cache and robustness

#[test]
fn cache_hits_and_bounds() {
    let r = Router::with_cache_capacity(rules(), 64);
    let a = r.analyze("SELECT 1");
    let b = r.analyze("SELECT 1");
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(r.cache_stats(), (1, 1));
    // (LIMIT: statements whose analysis can't be shared by shape, so each is cached.)
    for i in 0..2000 {
        r.analyze(&format!(
            "SELECT * FROM tasks WHERE performer_id = {i} LIMIT 2"
        ));
    }
    assert!(r.cache_len() <= 64 + 16, "{}", r.cache_len());
    assert_eq!(r.cache_stats(), (1, 2001));
    // Recently used entries survive eviction.
    let r = Router::with_cache_capacity(rules(), 160);
    r.analyze("SELECT 'hot'");
    for i in 0..1000 {
        r.analyze("SELECT 'hot'");
        r.analyze(&format!("SELECT {i}"));
    }
    let (hits, _) = r.cache_stats();
    assert_eq!(hits, 1000);
    // The memory bound holds with big statements.
    // (half of the bound is for exact texts, half for shapes)
    let r = Router::with_cache_limits(rules(), 10_000, 512 * 1024);
    let filler = "x".repeat(4000);
    for i in 0..500 {
        r.analyze(&format!(
            "SELECT '{filler}' FROM tasks WHERE performer_id = {i} ORDER BY id LIMIT 3 OFFSET 1"
        ));
    }
    assert!(r.cache_bytes() <= 512 * 1024, "{}", r.cache_bytes());
    assert!(r.cache_len() >= 16, "{}", r.cache_len());
    let off = Router::with_cache_capacity(rules(), 0);
    off.analyze("SELECT 1");
    off.analyze("SELECT 1");
    assert_eq!(off.cache_stats(), (0, 2));
    assert_eq!(off.cache_len(), 0);
}

/// Pairs of statements of one shape (the same text up to literal values): the first is
/// analysed in full, the second may reuse its analysis by shape. Either way the second
/// must plan exactly as a full analysis of it does.
const SAME_SHAPE: &[(&str, &str)] = &[
    (
        "SELECT id, title FROM tasks WHERE performer_id = 5 AND id = 9",
        "SELECT id, title FROM tasks WHERE performer_id = 77 AND id = 78",
    ),
    (
        "SELECT count(*) FROM tasks WHERE performer_id = 5",
        "SELECT count(*) FROM tasks WHERE performer_id = 123456",
    ),
    (
        "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (1001, 5, 1, 'bench') ON CONFLICT (id) DO NOTHING",
        "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (2002, 9, 1, 'x') ON CONFLICT (id) DO NOTHING",
    ),
    (
        "UPDATE tasks SET version = version + 1 WHERE performer_id = 5 AND id = 6",
        "UPDATE tasks SET version = version + 1 WHERE performer_id = 8 AND id = 8",
    ),
    (
        "DELETE FROM tasks WHERE performer_id = 5 AND id >= 10",
        "DELETE FROM tasks WHERE performer_id = 6 AND id >= 11",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id IN (1, 2)",
        "SELECT * FROM tasks WHERE performer_id IN (3, 3)",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id = 5 OR performer_id = 6",
        "SELECT * FROM tasks WHERE performer_id = 7 OR performer_id = 7",
    ),
    (
        "SELECT id, title FROM tasks WHERE performer_id IN (11, 12) ORDER BY 1",
        "SELECT id, title FROM tasks WHERE performer_id IN (13, 14) ORDER BY 2",
    ),
    (
        "SELECT id, title FROM tasks WHERE performer_id IN (11, 12) GROUP BY 1, 2",
        "SELECT id, title FROM tasks WHERE performer_id IN (13, 14) GROUP BY 2, 1",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id IN (11, 12) LIMIT 5 OFFSET 1",
        "SELECT * FROM tasks WHERE performer_id IN (13, 14) LIMIT 10 OFFSET 2",
    ),
    (
        "SELECT avg(version) FROM tasks WHERE performer_id IN (1, 2)",
        "SELECT avg(version) FROM tasks WHERE performer_id IN (3, 4)",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id IN (1, 2) AND performer_id IN (2, 3)",
        "SELECT * FROM tasks WHERE performer_id IN (4, 5) AND performer_id IN (6, 7)",
    ),
    (
        "UPDATE tasks SET performer_id = 5 WHERE performer_id = 6 AND id = 1",
        "UPDATE tasks SET performer_id = 7 WHERE performer_id = 7 AND id = 1",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id = '5'",
        "SELECT * FROM tasks WHERE performer_id = ' 6 '",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id = 5",
        "SELECT * FROM tasks WHERE performer_id = 5.5",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id = 5",
        "SELECT * FROM tasks WHERE performer_id = 99999999999999999999",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id = -5",
        "SELECT * FROM tasks WHERE performer_id = -6",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id = 5::bigint",
        "SELECT * FROM tasks WHERE performer_id = 6::bigint",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id = int8 '5'",
        "SELECT * FROM tasks WHERE performer_id = int8 '9'",
    ),
    (
        "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (1, 5, 1, 'a'), (2, 6, 1, 'b')",
        "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (3, 7, 1, 'c'), (4, 8, 1, 'd')",
    ),
    (
        "SELECT * FROM task_observers WHERE performer_id = 5 AND task_id IN (SELECT id FROM tasks WHERE performer_id = 5)",
        "SELECT * FROM task_observers WHERE performer_id = 6 AND task_id IN (SELECT id FROM tasks WHERE performer_id = 7)",
    ),
    (
        "SELECT * FROM tasks WHERE performer_id = 5 AND title = 'x'",
        "SELECT * FROM tasks WHERE performer_id = 6 AND title = 'it''s'",
    ),
    ("SELECT 1", "SELECT 2"),
    ("SELECT * FROM tasks WHERE id = 5", "SELECT * FROM tasks WHERE id = 6"),
];

/// The distinct keys, literals as `(0, value)` and parameters as `(1, index)`.
fn key_set(a: &Analysis) -> Option<std::collections::BTreeSet<(u8, i64)>> {
    let one = |k: &KeyValue| match *k {
        KeyValue::Literal(v) => (0, v),
        KeyValue::Param(i) => (1, i64::try_from(i).unwrap_or(i64::MAX)),
    };
    match &a.keys {
        KeyExpr::None => None,
        KeyExpr::Any(v) | KeyExpr::PerRow(v) => Some(v.iter().map(one).collect()),
    }
}

#[test]
fn statements_of_one_shape_plan_like_a_full_analysis() {
    let ring = ring();
    for (first, second) in SAME_SHAPE {
        let shared = router();
        shared.analyze(first);
        let reused = shared.analyze(second);
        let fresh = Router::with_cache_capacity(rules(), 0).analyze(second);
        assert_eq!(reused.kind, fresh.kind, "{second}");
        assert_eq!(key_set(&reused), key_set(&fresh), "{second}");
        assert_eq!(
            std::mem::discriminant(&reused.keys),
            std::mem::discriminant(&fresh.keys),
            "{second}"
        );
        assert_eq!(reused.merge, fresh.merge, "{second}");
        assert_eq!(reused.is_write, fresh.is_write, "{second}");
        assert_eq!(reused.touches_sharded, fresh.touches_sharded, "{second}");
        assert_eq!(
            reused.plan(&ring, &Params::default(), None),
            fresh.plan(&ring, &Params::default(), None),
            "{second}"
        );
    }
}

#[test]
fn keyed_statements_with_inlined_values_are_parsed_once_per_shape() {
    let r = router();
    // (from 2: `version + 1` and `creator_id = 1` would make performer 1 ambiguous)
    for p in 2..=501 {
        for sql in [
            format!("INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ({}, {p}, 1, 'bench') ON CONFLICT (id) DO NOTHING", p + 100_000),
            format!("UPDATE tasks SET version = version + 1 WHERE performer_id = {p} AND id = {}", p + 100_000),
            format!("SELECT id, title FROM tasks WHERE performer_id = {p} AND id = {}", p + 100_000),
            format!("SELECT count(*) FROM tasks WHERE performer_id = {p}"),
        ] {
            let a = r.analyze(&sql);
            assert_eq!(key_set(&a), Some([(0, p)].into()), "{sql}");
        }
    }
    // One full analysis per shape; every other statement reused its shape's.
    assert_eq!(r.cache_stats(), (1996, 4));
    assert_eq!(r.cache_len(), 4);
}

#[test]
fn router_is_send_sync_and_shared() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Router>();
    assert_send_sync::<Analysis>();
    let r = Arc::new(router());
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let r = Arc::clone(&r);
            std::thread::spawn(move || {
                for i in 0..200 {
                    let a = r.analyze(&format!(
                        "SELECT * FROM tasks WHERE performer_id = {}",
                        i % 50 + t
                    ));
                    assert!(a.touches_sharded);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let (h, m) = r.cache_stats();
    assert_eq!(h + m, 800);
}

#[test]
fn deep_nesting_does_not_overflow() {
    let deep = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
    assert!(matches!(kind(&deep), StatementKind::Unparsed(_)));
    let deep = format!(
        "SELECT * FROM tasks WHERE {}",
        vec!["performer_id = 1"; 3000].join(" OR ")
    );
    let _ = plan(&deep);
}

#[test]
fn nested_function_calls_parse_in_linear_time() {
    // sqlparser 0.58 took seconds on these (exponential backtracking); a statement must
    // never be able to pin a proxy core.
    let start = std::time::Instant::now();
    let (k0, ..) = keys();
    let sql = format!(
        "SELECT {}title{} FROM tasks WHERE performer_id = {k0}",
        "replace(".repeat(18),
        ", 'a', 'b')".repeat(18)
    );
    let _ = plan(&sql);
    // A fuzzer-found input (unbalanced nested calls).
    let fuzz = "SELECT statu oc,unsth(tnm(iSEtaTus, coun(tnm(iSEtatus, count(mhn(tiSEtlem(hn(tiSEtle/?|SELEF|t(ms, coun(tnm(iSEtatus, count(mhn(tiSEtlem(hn(tiSEtle/?|SELEF|t(mhn(tiSEtlem(hn(tiSEtle/hn(tiSEtlem(hn(tiSEtle/?|SELEF|";
    assert!(matches!(kind(fuzz), StatementKind::Unparsed(_)));
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// Deterministic xorshift so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next() % v.len() as u64) as usize]
    }
}

#[test]
fn fuzz_like_inputs_never_panic() {
    let pieces = [
        "SELECT",
        "*",
        "FROM",
        "tasks",
        "task_observers",
        "WHERE",
        "performer_id",
        "=",
        "$1",
        "$2",
        "IN",
        "(",
        ")",
        ",",
        "1",
        "-1",
        "'x'",
        "ORDER",
        "BY",
        "LIMIT",
        "OFFSET",
        "GROUP",
        "count(*)",
        "avg(version)",
        "sum(x)",
        "INSERT",
        "INTO",
        "VALUES",
        "UPDATE",
        "SET",
        "DELETE",
        "AND",
        "OR",
        ";",
        "/* shard=shard-2 */",
        "UNION",
        "ALL",
        "DISTINCT",
        "WITH",
        "AS",
        "x",
        "id",
        "DESC",
        "NULLS",
        "FIRST",
        "HAVING",
        "$0",
        "$99999999999999999999",
        "9223372036854775808",
        "::bigint",
        "RETURNING",
        "ON",
        "CONFLICT",
        "DO",
        "NOTHING",
        "taskflow.shard",
        "RESET",
        "COPY",
        "STDIN",
        "EXPLAIN",
        "ANALYZE",
        "FETCH",
        "NEXT",
        "ROWS",
        "ONLY",
        "JOIN",
        "ANY",
        "ARRAY[",
        "]",
        "$$",
        "'",
        "\"",
        "/*",
        "*/",
        "--",
        "\n",
        "é",
        "\u{0}",
    ];
    let r = router();
    let ring = ring();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let blobs: [&[u8]; 6] = [
        b"1",
        &[0, 0, 0, 0, 0, 0, 0, 1],
        &[1, 2],
        b"x",
        &[],
        &[0xff; 4],
    ];
    for _ in 0..4000 {
        let n = 1 + rng.next() % 24;
        let sql: Vec<&str> = (0..n).map(|_| *rng.pick(&pieces)).collect();
        let sql = sql.join(" ");
        let a = r.analyze(&sql);
        let values: Vec<Option<&[u8]>> = (0..(rng.next() % 4))
            .map(|_| {
                if rng.next() % 5 < 1 {
                    None
                } else {
                    Some(*rng.pick(&blobs))
                }
            })
            .collect();
        let formats: Vec<i16> = (0..(rng.next() % 3))
            .map(|_| (rng.next() % 3) as i16)
            .collect();
        let types: Vec<u32> = (0..(rng.next() % 3))
            .map(|_| *rng.pick(&[0u32, 20, 21, 23, 25, 1700]))
            .collect();
        let params = Params {
            values: &values,
            formats: &formats,
            types: &types,
        };
        let _ = a.plan(
            &ring,
            &params,
            rng.pick(&[None, Some("shard-1"), Some("x")]).as_deref(),
        );
    }
}

/// During a migration: a statement on one moving key is guarded on the shard it routes to;
/// a read of several shards reads both sides of the moving arcs instead (under the commit
/// fence a batch is seen on exactly one side); a key outside every arc routes as before.
#[test]
fn moving_keys_are_guarded_or_read_on_both_sides() {
    use crate::placement::{Locate, Placement};
    let three = ring();
    let four = Ring::new(["shard-1", "shard-2", "shard-3", "shard-4"], 256).unwrap();
    let p = Placement::moving(three.clone(), four.clone(), 2, &[]);
    let moving = (1..10_000)
        .find(|k| three.shard_name_for(*k) != four.shard_name_for(*k))
        .expect("a moving key");
    let staying = (1..10_000)
        .find(|k| {
            three.shard_name_for(*k) == four.shard_name_for(*k)
                && three.shard_for(*k) != three.shard_for(moving)
        })
        .expect("a key that stays, elsewhere");
    let at = p.locate(moving);
    let one = router()
        .analyze(&format!(
            "UPDATE tasks SET title = 'x' WHERE performer_id = {moving}"
        ))
        .plan(&p, &Params::default(), None)
        .unwrap();
    assert_eq!(one.target, Target::One(at.shard));
    assert_eq!(one.guards, vec![(at.shard, at.arc.unwrap())]);
    let read = router()
        .analyze(&format!(
            "SELECT id FROM tasks WHERE performer_id IN ({moving}, {staying})"
        ))
        .plan(&p, &Params::default(), None)
        .unwrap();
    let Target::Many(shards) = &read.target else {
        panic!("a read of several shards: {:?}", read.target);
    };
    assert!(shards.contains(&at.shard) && shards.contains(&at.other.unwrap()));
    assert!(shards.contains(&p.locate(staying).shard));
    assert!(read.guards.is_empty());
    let still = router()
        .analyze(&format!(
            "SELECT id FROM tasks WHERE performer_id = {staying}"
        ))
        .plan(&p, &Params::default(), None)
        .unwrap();
    assert!(still.guards.is_empty());
}

/// Every analysis carries the session state its text leaves, the same as
/// `sqltext::session_state` finds for that text — also when it is shared by shape, where
/// the statement that made the template had other literal values.
#[test]
fn analyses_carry_the_session_state_of_their_text() {
    let r = router();
    for sql in [
        "select set_config('search_path', 'nope', false)",
        "SELECT pg_advisory_lock(42)",
        "SELECT * FROM tasks WHERE performer_id = 5",
        "SELECT * FROM tasks WHERE performer_id = 6",
        "SELECT * FROM tasks WHERE performer_id = 7 AND title = 'listen'",
        "SELECT * FROM tasks WHERE performer_id = 8 AND title = 'temp'",
        "CREATE TEMP TABLE scratch (x int)",
        "LISTEN tasks_changed",
        "SELECT pg_advisory_lock(43)",
        "UPDATE tasks SET title = 'set_config(' WHERE performer_id = 9",
    ] {
        for _ in 0..2 {
            // The second time comes from the cache (by text or by shape).
            assert_eq!(
                r.analyze(sql).session_state,
                crate::sqltext::session_state(sql),
                "{sql}"
            );
        }
    }
    let (hits, _) = r.cache_stats();
    assert!(
        hits >= 10,
        "the second analyses came from the cache ({hits} hits)"
    );
    // A shape whose state is not none: the second statement's analysis is the first
    // one's template, and must bring the state along.
    let first = "SELECT pg_advisory_lock(1) FROM tasks WHERE performer_id = 10";
    let second = "SELECT pg_advisory_lock(2) FROM tasks WHERE performer_id = 11";
    assert_eq!(
        r.analyze(first).session_state,
        Some("session advisory lock")
    );
    let (before, _) = r.cache_stats();
    assert_eq!(
        r.analyze(second).session_state,
        Some("session advisory lock")
    );
    assert_eq!(r.cache_stats().0, before + 1, "shared by shape");
}
