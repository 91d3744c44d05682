# Faults (SPEC §6, §9): a shard cut off the network fails only the statements that need it,
# with an error naming it, and recovers when it is back; Kafka stopped while tasks are written
# loses no event (transactional outbox), and every email still goes out once it returns.
{ pkgs }:

let
  common = import ./common.nix { inherit pkgs; };
  shards = [
    1
    2
    3
  ];
in
pkgs.testers.runNixOSTest {
  name = "taskflow-faults";

  inherit (common) defaults;

  nodes = common.backendNodes shards // {
    app = common.appNode { inherit shards; };
  };

  testScript = ''
    ${common.pythonPrelude}


    def count_sql(key):
        return f"SELECT count(*) FROM tasks WHERE performer_id = {key}"


    def proxy_psql_cmd(sql):
        return f"{PG_ENV} timeout 60 psql -X -h 127.0.0.1 -p 6432 -U taskflow -d tasks -At -c {shlex.quote(sql)}"


    def created_event_task_ids():
        """Task ids of every task.created event in the topic, read from the beginning."""
        out = kafka.succeed(
            "kafka-console-consumer.sh --bootstrap-server localhost:9092 --topic task_events "
            "--from-beginning --timeout-ms 15000 2>/dev/null || true"
        )
        ids = set()
        for line in out.splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("type") == "task.created":
                ids.add(event["task"]["id"])
        return ids


    wait_for_backends([(authdb, "auth"), (shard1, "tasks"), (shard2, "tasks"), (shard3, "tasks")])
    start_app()

    with subtest("find a key on shard-2 and one elsewhere"):
        # 30 keys: with three shards, each certainly owns some.
        emails = {register(i): email(i) for i in range(1, 31)}
        token = login(1)
        owners = {key: admin(f"SHOW SHARD FOR {key}") for key in emails}
        on_shard2 = [k for k, owner in owners.items() if "shard-2" in owner]
        elsewhere = [k for k, owner in owners.items() if "shard-2" not in owner]
        assert on_shard2 and elsewhere, f"owners: {owners}"
        k2, k1 = on_shard2[0], elsewhere[0]
        create_task(token, k2, "before the fault")
        create_task(token, k1, "before the fault")

    with subtest("a blocked shard fails only the statements that need it"):
        shard2.block()
        # The error must name the shard; retried because pooled connections may first have to
        # notice that the link is gone.
        app.wait_until_succeeds(
            f"out=$({proxy_psql_cmd(count_sql(k2))} 2>&1) && exit 1; grep -q shard-2 <<<\"$out\"",
            timeout=300,
        )
        app.succeed(proxy_psql_cmd(count_sql(k1)))
        expect(200, "GET", f"/tasks?performer_id={k1}", token=token)
        create_task(token, k1, "while shard-2 is unreachable")
        status, answer = api("GET", f"/tasks?performer_id={k2}", token=token)
        assert status >= 500, f"a read on the blocked shard must fail clearly, got {status}: {answer}"
        status, answer = api("GET", "/tasks", token=token)
        assert status >= 500, f"a scatter read must not silently skip the blocked shard, got {status}: {answer}"
        status, answer = api("POST", "/tasks", {"title": "needs shard-2", "performer_id": k2}, token)
        assert status != 201, f"a write for a key on the blocked shard cannot succeed: {answer}"

    with subtest("the shard is used again once reachable"):
        shard2.unblock()
        app.wait_until_succeeds(proxy_psql_cmd(count_sql(k2)), timeout=300)
        eventually(lambda: api("GET", f"/tasks?performer_id={k2}", token=token)[0] == 200,
                   "reads on shard-2 to work again", timeout=300)
        create_task(token, k2, "after the fault")
        expect(200, "GET", "/tasks", token=token)

    with subtest("tasks written while Kafka is down still produce their events"):
        before = len(mail_to(emails[k1]))
        kafka.succeed("systemctl stop apache-kafka.service")
        # The writes are acknowledged: the event waits in the shard's outbox.
        during = [create_task(token, k1, f"while kafka is down {n}") for n in range(5)]
        kafka.succeed("systemctl start apache-kafka.service")
        kafka.wait_for_open_port(9092)
        eventually(lambda: set(during) <= created_event_task_ids(),
                   f"task.created events in task_events for {during}", timeout=600)
        eventually(lambda: len(mail_to(emails[k1])) >= before + len(during),
                   f"{len(during)} more emails to the performer", timeout=600)
  '';
}
