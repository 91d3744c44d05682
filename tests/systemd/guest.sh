#!/bin/bash
# Runs inside the throwaway VM (as root, from taskflow-vmtest.service, systemd as PID 1), with
# the host's share at /mnt/taskflow: bin/ (our daemons, tansu), units/ and etc/ (rendered from
# nixos/module.nix by tests/nixos-eval, store paths rewritten), secrets/. Every check prints
# "ok <what>" or "FAIL <what>: <why>" to out/results.txt; the host (tests/systemd/run.sh)
# fails unless out/rc is 0 and nothing failed. Evidence of the sd_notify traffic comes from
# PID 1 itself: at debug log level it logs every notification message it accepts.
set -u
S=/mnt/taskflow
OUT=$S/out
mkdir -p "$OUT"
RESULTS=$OUT/results.txt
: >"$RESULTS"
UNITS=(taskflow-shard-proxy taskflow-auth taskflow-gateway taskflow-notify)
failures=0
T0=$(date +%s)

say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$RESULTS"; }
ok() { say "ok $*"; }
fail() { say "FAIL $*"; failures=$((failures + 1)); }
check() { # description, command...
  local what=$1; shift
  if out=$("$@" 2>&1); then ok "$what"; else fail "$what: $(tail -c 600 <<<"$out")"; fi
}
prop() { systemctl show -p "$2" --value "$1.service"; }
# PID 1's messages about a unit since a cursor, one per line, in journal order.
pid1_log() { # unit [cursor-file]
  local args=(_PID=1 "UNIT=$1.service" -o cat --no-pager)
  [ -n "${2:-}" ] && args+=(--after-cursor "$(cat "$2")")
  journalctl "${args[@]}"
}
cursor() { journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p' >"$1"; }
wait_for() { # seconds, command...: polls every second
  local t=$1; shift
  for _ in $(seq "$t"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  "$@"
}
finish() {
  journalctl -b --no-pager >"$OUT/journal.txt" 2>/dev/null
  say "done: $failures failure(s)"
  echo "$failures" >"$OUT/rc"
  sync
  exit 0
}
trap finish EXIT

say "guest: kernel $(uname -r), $(systemctl --version | head -1), up $(cut -d' ' -f1 /proc/uptime) s"

# ---- install what the host handed over ----------------------------------------------------
install -m 0755 "$S"/bin/* /usr/local/bin/
install -d -m 0700 /run/keys /run/keys/taskflow
install -m 0600 "$S"/secrets/* /run/keys/taskflow/
install -d -m 0755 /etc/taskflow
install -m 0644 "$S"/etc/taskflow/*.toml /etc/taskflow/
install -m 0644 "$S"/units/*.service /etc/systemd/system/
systemctl daemon-reload
for u in "${UNITS[@]}"; do
  check "$u.service loads without warnings" bash -c "! systemd-analyze verify /etc/systemd/system/$u.service 2>&1 | grep -v -e 'X-Re' -e '^\$' | grep ."
done
# Every notification PID 1 receives, and its state changes, go to the journal from here on,
# none dropped by journald's rate limit.
mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\nRateLimitBurst=0\n' >/etc/systemd/journald.conf.d/taskflow-test.conf
systemctl restart systemd-journald.service
systemd-analyze log-level debug

# ---- what the daemons talk to ---------------------------------------------------------------
before=$failures
wait_for 120 systemctl is-active postgresql@15-main.service || fail "PostgreSQL did not start"
runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 <<'SQL' || fail "PostgreSQL setup"
CREATE ROLE taskflow LOGIN PASSWORD 'taskflow';
CREATE DATABASE auth OWNER taskflow;
CREATE DATABASE tasks1 OWNER taskflow;
CREATE DATABASE tasks2 OWNER taskflow;
SQL
# The proxy's own logins to PostgreSQL skip SCRAM here: PBKDF2 in a debug build under
# emulation costs seconds per connection, more than the daemons' 5 s pool timeouts on a busy
# host. Clients still authenticate to the proxy with SCRAM (its users' password_file).
sed -i '1i host all taskflow 127.0.0.1/32 trust' /etc/postgresql/15/main/pg_hba.conf
systemctl reload postgresql@15-main.service || fail "PostgreSQL reload"
wait_for 60 systemctl is-active redis-server.service || fail "Redis did not start"
systemd-run -q --unit=tansu -p Type=exec /usr/local/bin/tansu broker --cluster-id taskflow-vm \
  --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
  --storage-engine memory://tansu/
systemd-run -q --unit=smtp-sink -p Type=exec -E PYTHONWARNINGS=ignore \
  /usr/bin/python3 -u -m smtpd -n -c DebuggingServer 127.0.0.1:1025
wait_for 60 bash -c 'exec 3<>/dev/tcp/127.0.0.1/9092' || fail "the broker does not listen"
wait_for 30 bash -c 'exec 3<>/dev/tcp/127.0.0.1/1025' || fail "the SMTP sink does not listen"
for topic in task_events notify_events; do
  /usr/local/bin/tansu topic create "$topic" --partitions 3 --broker tcp://127.0.0.1:9092 >/dev/null 2>&1 \
    || fail "creating topic $topic"
done
[ "$failures" = "$before" ] && ok "backends up: PostgreSQL, Redis, tansu, SMTP sink"

# ---- start: READY=1 before active, with a STATUS= text ---------------------------------------
cursor "$OUT/c-start"
# A start that outlasts TimeoutStartSec (a dependency slow to answer: under emulation, a
# debug build's SCRAM login to the proxy can outlast the daemons' 5 s checks) is retried by
# systemd (Restart=on-failure, no start limit), as the module intends: wait for that too.
active() { [ "$(prop "$1" ActiveState)/$(prop "$1" SubState)" = active/running ]; }
for u in "${UNITS[@]}"; do
  s=$(date +%s)
  timeout 300 systemctl start "$u.service" >/dev/null 2>&1
  if wait_for 300 active "$u"; then
    ok "$u started in $(($(date +%s) - s)) s ($(prop "$u" NRestarts) restart(s) on the way)"
  else
    fail "$u did not start: $(systemctl status --no-pager -n 30 "$u.service" 2>&1 | tail -c 1500)"
  fi
done
for u in "${UNITS[@]}"; do
  log=$(pid1_log "$u" "$OUT/c-start")
  # For the start that succeeded (the last): a READY=1 after entering "start", before
  # "start -> running".
  verdict=$(awk '/Changed .* -> start$/ { ready = "" }
                 /notification message.*READY=1/ { ready = $0 }
                 /Changed start -> running/ { ok = ready; seen = 1 }
                 END { if (seen && ok != "") print ok; else exit 1 }' <<<"$log")
  if [ -n "$verdict" ]; then
    ok "$u: READY=1 ($(grep -o '(.*)' <<<"$verdict")) before start -> running"
  else
    fail "$u: no READY=1 before start -> running: $(grep -E 'notification|Changed' <<<"$log" | head -5)"
  fi
  st=$(prop "$u" StatusText)
  if [ "$(prop "$u" ActiveState)/$(prop "$u" SubState)" = active/running ] && [ -n "$st" ] && [ "$st" != starting ]; then
    ok "$u: active (running), Status: \"$st\""
  else
    fail "$u: state $(prop "$u" ActiveState)/$(prop "$u" SubState), status \"$st\""
  fi
  # The kit pings at half of WATCHDOG_USEC (15 s).
done

# ---- secrets: delivered by LoadCredential, readable by the service only ----------------------
for u in taskflow-auth taskflow-gateway; do
  dir=/run/credentials/$u.service
  n=$(find "$dir" -type f 2>/dev/null | wc -l)
  [ "$n" -ge 2 ] && ok "$u: $n credentials in $dir" || fail "$u: no credentials in $dir"
  for f in "$dir"/*; do
    if setpriv --reuid=65534 --regid=65534 --clear-groups cat "$f" >/dev/null 2>&1; then
      fail "$f is readable by user nobody"
    else
      ok "$f: unreadable to other users (mode $(stat -c %a "$f"), dir mode $(stat -c %a "$dir"))"
    fi
  done
done
if setpriv --reuid=65534 --regid=65534 --clear-groups cat /run/keys/taskflow/jwt-private.pem >/dev/null 2>&1; then
  fail "the source secret is readable by nobody"
fi
mainpid=$(prop taskflow-auth MainPID)
user=$(ps -o user= -p "$mainpid")
[ "$user" != root ] && ok "taskflow-auth runs as dynamic user $user" || fail "taskflow-auth runs as root"

# ---- end to end through the hardened units: register, login, create a task, get the email ----
api() { # method path [json] [token] -> sets CODE, BODY
  local args=(-sS --max-time 60 -o /tmp/body -w '%{http_code}' -X "$1" "http://127.0.0.1:3000$2")
  [ -n "${3:-}" ] && args+=(-H 'content-type: application/json' --data-binary "$3")
  [ -n "${4:-}" ] && args+=(-H "authorization: Bearer $4")
  CODE=$(curl "${args[@]}" 2>/tmp/curl-err) || CODE=0
  BODY=$(cat /tmp/body 2>/dev/null)
}
email=vm-user@example.test
api POST /auth/register "{\"email\":\"$email\",\"name\":\"VM User\",\"password\":\"correct horse battery\"}"
uid=$(jq -r '.id // empty' <<<"$BODY" 2>/dev/null)
[ "$CODE" = 201 ] && [ -n "$uid" ] && ok "register through gateway -> auth -> proxy: user $uid" || fail "register: HTTP $CODE $BODY $(cat /tmp/curl-err)"
api POST /auth/login "{\"email\":\"$email\",\"password\":\"correct horse battery\"}"
token=$(jq -r '.token // empty' <<<"$BODY" 2>/dev/null)
[ "$CODE" = 200 ] && [ -n "$token" ] && ok "login: token issued" || fail "login: HTTP $CODE $BODY"
api POST /tasks "{\"title\":\"VM task\",\"description\":\"created under real systemd\",\"performer_id\":${uid:-0}}" "$token"
tid=$(jq -r '.id // empty' <<<"$BODY" 2>/dev/null)
[ "$CODE" = 201 ] && [ -n "$tid" ] && ok "create a task through the proxy: task $tid" || fail "create task: HTTP $CODE $BODY"
api GET "/tasks?performer_id=${uid:-0}" "" "$token"
[ "$CODE" = 200 ] && jq -e --arg t "$tid" '.data | any(.id|tostring == $t)' <<<"$BODY" >/dev/null \
  && ok "list tasks: task $tid is there" || fail "list tasks: HTTP $CODE $BODY"
if wait_for 120 bash -c "journalctl -u smtp-sink.service -o cat --no-pager | grep -q \"To: .*$email\""; then
  ok "notify: an email to $email reached the SMTP sink"
else
  fail "no email to $email in the SMTP sink: $(journalctl -u taskflow-notify.service -n 20 -o cat --no-pager | tail -c 1500)"
fi

# ---- structured journal fields (tracing-journald) ---------------------------------------------
for u in "${UNITS[@]}"; do
  entry=$(journalctl -u "$u.service" -o json --no-pager MESSAGE=ready | tail -1)
  if jq -e --arg id "$u" '.SYSLOG_IDENTIFIER == $id and (.TARGET|type) == "string" and (.CODE_FILE|type) == "string" and (.F_STATUS|type) == "string"' <<<"$entry" >/dev/null 2>&1; then
    ok "$u: journal entry with fields $(jq -c '{SYSLOG_IDENTIFIER, TARGET, CODE_FILE, CODE_LINE, F_STATUS, PRIORITY}' <<<"$entry")"
  else
    fail "$u: no structured \"ready\" entry in the journal: ${entry:-none}"
  fi
done

# ---- reload: RELOADING=1 -> READY=1, connections kept ------------------------------------------
cursor "$OUT/c-reload"
pid_before=$(prop taskflow-shard-proxy MainPID)
# The proxy acknowledges (READY=1) once the new configuration is applied; the session's
# second query runs after that, so it goes through the reloaded proxy.
cat >/tmp/wait-reloaded.sh <<EOF
#!/bin/bash
for _ in \$(seq 120); do
  journalctl _PID=1 UNIT=taskflow-shard-proxy.service -o cat --no-pager --after-cursor "\$(cat $OUT/c-reload)" \\
    | awk '/notification message.*RELOADING=1/ { r = 1 } r && /notification message.*READY=1/ { f = 1 } END { exit !f }' && exit 0
  sleep 1
done
exit 1
EOF
chmod +x /tmp/wait-reloaded.sh
cat >/tmp/reload.sql <<'SQL'
\set ON_ERROR_STOP on
SELECT 'before', count(*) FROM tasks;
\! systemctl reload taskflow-shard-proxy.service && echo reload-returned
\! /tmp/wait-reloaded.sh && echo reload-applied
SELECT 'after', count(*) FROM tasks;
SQL
# ---- roles: the module's default logins (daemons `taskflow`, operators `taskflow_admin`) -----
if out=$(PGPASSWORD=taskflow psql -X -h 127.0.0.1 -p 6432 -U taskflow_admin -d admin -At -c 'SHOW SHARDS' 2>&1) \
  && grep -q shard <<<"$out"; then
  ok "roles: taskflow_admin opens the admin console ($(wc -l <<<"$out") shards)"
else
  fail "roles: taskflow_admin cannot open the admin console: $out"
fi
if out=$(PGPASSWORD=taskflow psql -X -h 127.0.0.1 -p 6432 -U taskflow -d admin -At -c 'SHOW SHARDS' 2>&1); then
  fail "roles: the daemons' login opened the admin console: $out"
else
  ok "roles: the daemons' login is refused the admin console ($(head -1 <<<"$out"))"
fi
if out=$(PGPASSWORD=taskflow psql -X -h 127.0.0.1 -p 6432 -U taskflow -d tasks -At -f /tmp/reload.sql 2>&1) \
  && grep -q '^before|' <<<"$out" && grep -q reload-returned <<<"$out" && grep -q reload-applied <<<"$out" \
  && grep -q '^after|' <<<"$out"; then
  ok "reload: one client session through the proxy spans systemctl reload and its READY=1 ($(tr '\n' ' ' <<<"$out"))"
else
  fail "reload: the session did not survive: $out"
fi
log=$(pid1_log taskflow-shard-proxy "$OUT/c-reload")
rl=$(grep -n -m1 'notification message.*RELOADING=1' <<<"$log" | cut -d: -f1)
rd=$(grep -n 'notification message.*READY=1' <<<"$log" | cut -d: -f1 | awk -v r="${rl:-0}" '$1 > r' | head -1)
if [ -n "$rl" ] && [ -n "$rd" ]; then
  ok "reload: RELOADING=1 then READY=1 ($(sed -n "${rd}p" <<<"$log" | grep -o '(.*)'))"
else
  fail "reload: no RELOADING=1 -> READY=1 from PID $pid_before: $(grep notification <<<"$log" | head -5)"
fi
# systemd 252 has no Type=notify-reload: `systemctl reload` returns once ExecReload (kill -HUP)
# has, and RELOADING=1 then holds the unit in "reload" until READY=1.
if grep -q 'Changed reload -> running' <<<"$(sed -n "${rl:-1},\$p" <<<"$log")" \
  && [ "$(prop taskflow-shard-proxy MainPID)" = "$pid_before" ] && [ "$(prop taskflow-shard-proxy SubState)" = running ]; then
  ok "reload: same main PID $pid_before, back to running after READY=1"
else
  fail "reload: main PID $(prop taskflow-shard-proxy MainPID) (was $pid_before), state $(prop taskflow-shard-proxy SubState)"
fi

# ---- watchdog: a frozen daemon is killed and restarted ------------------------------------------
cursor "$OUT/c-watchdog"
u=taskflow-notify
pid=$(prop $u MainPID)
restarts=$(prop $u NRestarts)
kill -STOP "$pid"
s=$(date +%s)
if wait_for 120 bash -c "[ \$(systemctl show -p NRestarts --value $u.service) -gt $restarts ] && [ \$(systemctl show -p SubState --value $u.service) = running ] && [ \$(systemctl show -p MainPID --value $u.service) != $pid ]"; then
  log=$(pid1_log $u "$OUT/c-watchdog")
  if grep -q "Failed with result 'watchdog'" <<<"$log"; then
    ok "watchdog: SIGSTOPped $u (PID $pid) killed after the watchdog timeout and running again as PID $(prop $u MainPID) after $(($(date +%s) - s)) s"
  else
    fail "watchdog: $u restarted, but not by the watchdog: $(grep -iE 'watchdog|killing|result' <<<"$log" | head -5)"
  fi
else
  fail "watchdog: $u not restarted within 120 s of SIGSTOP: $(pid1_log $u "$OUT/c-watchdog" | tail -5)"
fi

# ---- bad configuration: exit 78, no restart loop -----------------------------------------------
cursor "$OUT/c-bad"
cp /etc/taskflow/auth.toml /tmp/auth.toml.good
echo 'no_such_key = 1' >>/etc/taskflow/auth.toml
restarts=$(prop taskflow-auth NRestarts)
systemctl restart taskflow-auth.service >/dev/null 2>&1 && fail "bad config: restart succeeded"
sleep 12 # > RestartSec=5s: a loop would have restarted it by now
st="$(prop taskflow-auth ActiveState) $(prop taskflow-auth Result) $(prop taskflow-auth ExecMainStatus) $(prop taskflow-auth NRestarts)"
if [ "$st" = "failed exit-code 78 $restarts" ]; then
  ok "bad config: taskflow-auth exited 78, failed, not restarted ($(journalctl -u taskflow-auth.service -o cat --no-pager --after-cursor "$(cat "$OUT/c-bad")" | grep -m1 no_such_key))"
else
  fail "bad config: expected 'failed exit-code 78 $restarts' (state result status restarts), got '$st'"
fi
cp /tmp/auth.toml.good /etc/taskflow/auth.toml
systemctl reset-failed taskflow-auth.service
timeout 300 systemctl start taskflow-auth.service && ok "taskflow-auth back with the good config" || fail "taskflow-auth did not come back"

# ---- stop: STOPPING=1, clean exit within the timeout ---------------------------------------------
cursor "$OUT/c-stop"
for u in taskflow-gateway taskflow-notify taskflow-auth taskflow-shard-proxy; do
  s=$(date +%s%N)
  systemctl stop "$u.service"
  ms=$((($(date +%s%N) - s) / 1000000))
  log=$(pid1_log "$u" "$OUT/c-stop")
  # A stopped unit is unloaded at once (its properties reset), so PID 1's log is the record.
  if grep -q 'notification message.*STOPPING=1' <<<"$log" \
    && grep -q 'Main process exited, code=exited, status=0/SUCCESS' <<<"$log" \
    && grep -q 'Deactivated successfully' <<<"$log" && ! grep -q 'timed out' <<<"$log"; then
    ok "$u: STOPPING=1, exited 0 in $ms ms (TimeoutStopSec $(prop "$u" TimeoutStopUSec))"
  else
    fail "$u: stop: $(grep -E 'STOPPING|Main process|Deactivated|timed out|Failed' <<<"$log" | head -5)"
  fi
done
