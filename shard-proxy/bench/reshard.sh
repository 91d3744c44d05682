#!/usr/bin/env bash
# Benchmarks online resharding in taskflow-shard-proxy: ADD SHARD and REMOVE SHARD under a
# steady write load (issue: "1,000,000 tasks over 3 shards; add shard-4 under a steady
# write load; print rows/s moved, and p50/p99 write latency before and during the move,
# and the same for REMOVE SHARD").
#
#   shard-proxy/bench/reshard.sh                  # ROWS=1000000 LOAD_CLIENTS=8 LOAD_RATE=200
#   PROXY_BIN=target/release/taskflow-shard-proxy shard-proxy/bench/reshard.sh  # skip the build
#   ROWS=200000 BATCH_ROWS=10000 LOAD_RATE=400 shard-proxy/bench/reshard.sh
#   LOG_LEVEL=warn,taskflow_shard_proxy::reshard=debug KEEP_LOG=/tmp/proxy.log …  # batch phases
#
# What it does (everything on loopback, in a temporary directory, cleaned up on exit):
#  1. starts one PostgreSQL 15 cluster (role taskflow/taskflow, scram) with databases
#     `auth` (the proxy's auth database: taskflow_meta, where migrations are recorded) and
#     tasks1..3 (shard schema applied by `taskflow-shard-proxy migrate`), plus an empty
#     tasks4 (ADD SHARD applies the schema itself);
#  2. starts the proxy (release build; shards shard-1..3; [reshard] batch_rows =
#     $BATCH_ROWS) and loads $ROWS tasks through it with COPY: id i = 1..$ROWS,
#     performer_id = i % $PERFORMERS, split over the 3 shards by the proxy;
#  3. the write load, through the proxy (`tasks`): pgbench, $LOAD_CLIENTS clients, open
#     loop at $LOAD_RATE transactions/s in total (-R), each transaction
#        BEGIN; INSERT a new task (random 62-bit id) for performer p;
#               UPDATE version = version + 1 of seed task k (performer p = k % $PERFORMERS);
#        COMMIT
#     retried by pgbench on SQLSTATE 40001 (--max-tries=$MAX_TRIES); every transaction is
#     logged (--log) and p50/p99 come from those logs. Latency is pgbench's: from the
#     transaction's scheduled start (includes schedule lag, so a stall is not hidden);
#  4. ADD SHARD: the load for $BEFORE_SECS s ("before"); then, with the load running in
#     $CHUNK_SECS-s pgbench runs back to back, `ADD SHARD shard-4 '…'` on the admin
#     console and SHOW MIGRATIONS polled until the migration is done ("during" = every
#     transaction that ended between the ADD SHARD and `done`); then the checks below;
#  5. REMOVE SHARD shard-4 the same way (before: the load on 4 shards), and the checks;
#  6. prints the results table: rows/s moved (SHOW MIGRATIONS' rows_per_sec: rows_moved
#     over the time in `moving`; the wall clock from the command to `done` beside it),
#     write latency p50/p99 before and during, the p99 ratio, failed transactions, and the
#     targets (≥ 20,000 rows/s; p99 during ≤ 3 × before; no lost or duplicated row).
#
# Checks after each move, straight against the shards (not through the proxy):
#  - rows: count(*) over tasks1..4 = $ROWS + committed load transactions (each inserts one
#    row), every seed id 1..$ROWS present, and count of 'load' rows = committed transactions;
#  - no duplicates: every id of every shard, `sort | uniq -d` is empty;
#  - no lost update: sum(version - 1) over the seed rows = committed transactions (each
#    bumps one seed row once);
#  - placement (PLACEMENT=1, default): for every performer, a key-routed count through the
#    proxy; their sum must equal the shards' total, i.e. every row sits on the shard the
#    proxy routes its key to. After REMOVE SHARD also: tasks4 holds no row;
#  - no prepared transaction left on any shard.
# Exit status: 0 when the run completed and every integrity check passed (speed and
# latency targets are reported, not enforced); 1 otherwise.
# Requires root (PostgreSQL runs as `postgres`), pgbench and psql 15 (`make deps` /
# scripts/install-deps.sh installs them).
set -euo pipefail

ROWS=${ROWS:-1000000}
PERFORMERS=${PERFORMERS:-100000}
LOAD_CLIENTS=${LOAD_CLIENTS:-8}
LOAD_RATE=${LOAD_RATE:-200}
LOAD_THREADS=${LOAD_THREADS:-2}
BATCH_ROWS=${BATCH_ROWS:-5000}
# rows/s the move may take ([reshard] throttle_rows_per_sec); 0 = as fast as it goes
THROTTLE=${THROTTLE:-0}
WRITE_PAUSE_MS=${WRITE_PAUSE_MS:-1000}
BEFORE_SECS=${BEFORE_SECS:-20}
CHUNK_SECS=${CHUNK_SECS:-10}
MAX_TRIES=${MAX_TRIES:-5}
MOVE_TIMEOUT=${MOVE_TIMEOUT:-1800}
POOL=${POOL:-20}
PLACEMENT=${PLACEMENT:-1}
# e.g. LOG_LEVEL=warn,taskflow_shard_proxy::reshard=debug: a line per batch with its phases
LOG_LEVEL=${LOG_LEVEL:-warn}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

for tool in pgbench psql python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/install-deps.sh (make deps)" >&2; exit 1; }
done
[ "$PERFORMERS" -le "$ROWS" ] || { echo "PERFORMERS ($PERFORMERS) must not exceed ROWS ($ROWS)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

WORK=$(mktemp -d /tmp/taskflow-reshard.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/log"
PIDS=()
cleanup() {
  touch "$WORK/stop" 2>/dev/null || true
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  if [ -f "$WORK/loader.pid" ]; then kill "$(cat "$WORK/loader.pid")" 2>/dev/null || true; fi
  if [ -d "$WORK/pg" ]; then su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $WORK/pg -m immediate stop" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${PROXY_BIN:-}" ]; then
  echo "== building the proxy (release)"
  (cd "$ROOT" && cargo build --release -q -p taskflow-shard-proxy)
  PROXY_BIN="$ROOT/target/release/taskflow-shard-proxy"
fi

PG_PORT=$(free_port); PROXY_PORT=$(free_port); METRICS_PORT=$(free_port)
export PGPASSWORD=taskflow PGUSER=taskflow PGHOST=127.0.0.1
echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)," \
  "proxy $PROXY_BIN ($(date -u -r "$PROXY_BIN" '+built %Y-%m-%d %H:%M UTC'))"

echo "== starting PostgreSQL on $PG_PORT"
mkdir -p "$WORK/pg" && chown postgres "$WORK/pg"
su postgres -s /bin/sh -c "$PGBIN/initdb -D $WORK/pg -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null"
cat >> "$WORK/pg/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK/pg'
max_connections = 400
max_prepared_transactions = 64
shared_buffers = 256MB
max_wal_size = 4GB
fsync = off
synchronous_commit = off
CONF
su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $WORK/pg -l $WORK/pg/server.log -w start >/dev/null"
psql_su() { su postgres -s /bin/sh -c "psql -h $WORK/pg -p $PG_PORT -U postgres -qAt -v ON_ERROR_STOP=1 $*"; }
psql_su "-c \"CREATE ROLE taskflow LOGIN PASSWORD 'taskflow'\""
for db in auth tasks1 tasks2 tasks3 tasks4; do psql_su "-c 'CREATE DATABASE $db OWNER taskflow'"; done
# direct SQL on one database of the cluster (not through the proxy)
pg() { local db=$1; shift; psql -p "$PG_PORT" -d "$db" -qAt -v ON_ERROR_STOP=1 "$@"; }

echo taskflow > "$WORK/backend-password"
cat > "$WORK/proxy.toml" <<CONF
listen = "127.0.0.1:$PROXY_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
state_dir = "$WORK/state"
[log]
level = "$LOG_LEVEL"
format = "text"
[[users]]
name = "taskflow"
password = "taskflow"
[[users]]
name = "taskflow_admin"
password = "taskflow"
admin = true
[pool]
size = $POOL
[reshard]
batch_rows = $BATCH_ROWS
throttle_rows_per_sec = $THROTTLE
write_pause_ms = $WRITE_PAUSE_MS
[backend]
user = "taskflow"
password_file = "$WORK/backend-password"
[auth_database]
url = "postgres://taskflow@127.0.0.1:$PG_PORT/auth"
[[shards]]
name = "shard-1"
url = "postgres://taskflow@127.0.0.1:$PG_PORT/tasks1"
[[shards]]
name = "shard-2"
url = "postgres://taskflow@127.0.0.1:$PG_PORT/tasks2"
[[shards]]
name = "shard-3"
url = "postgres://taskflow@127.0.0.1:$PG_PORT/tasks3"
CONF
SHARD4_URL="postgres://taskflow@127.0.0.1:$PG_PORT/tasks4"

echo "== applying the schema (taskflow-shard-proxy migrate: auth database and shards 1..3)"
"$PROXY_BIN" --config "$WORK/proxy.toml" migrate > "$WORK/migrate.log" 2>&1 \
  || { cat "$WORK/migrate.log" >&2; exit 1; }

echo "== starting the proxy on $PROXY_PORT"
ulimit -n 65536 2>/dev/null || true
"$PROXY_BIN" --config "$WORK/proxy.toml" > "$WORK/proxy.log" 2>&1 &
PROXY_PID=$!; PIDS+=("$PROXY_PID")
for _ in $(seq 100); do
  if psql -p "$PROXY_PORT" -d auth -qAtc 'select 1' >/dev/null 2>&1; then break; fi
  kill -0 "$PROXY_PID" 2>/dev/null || { echo "the proxy exited:" >&2; cat "$WORK/proxy.log" >&2; exit 1; }
  sleep 0.2
done
admin() { PGUSER=taskflow_admin psql -p "$PROXY_PORT" -d admin -qAt -v ON_ERROR_STOP=1 "$@"; }

echo "== loading $ROWS tasks through the proxy (COPY; performer_id = id % $PERFORMERS)"
awk -v n="$ROWS" -v m="$PERFORMERS" 'BEGIN { for (i = 1; i <= n; i++) printf "%d,%d,1,seed\n", i, i % m }' > "$WORK/seed.csv"
t=$(now)
psql -p "$PROXY_PORT" -d tasks -q -v ON_ERROR_STOP=1 -c "\copy tasks (id, performer_id, creator_id, title) FROM '$WORK/seed.csv' WITH (FORMAT csv)"
echo "loaded in $(awk -v a="$t" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"
rm -f "$WORK/seed.csv"
for db in tasks1 tasks2 tasks3; do pg "$db" -c 'VACUUM ANALYZE tasks'; done
shard_counts() { for db in tasks1 tasks2 tasks3 tasks4; do
    if [ "$(pg "$db" -c "SELECT to_regclass('tasks') IS NOT NULL")" = t ]; then pg "$db" -c 'SELECT count(*) FROM tasks'; else echo "-"; fi
  done | paste -sd/; }
echo "rows per shard (tasks1/2/3/4): $(shard_counts)"

cat > "$WORK/write.sql" <<SQL
\set k random(1, $ROWS)
\set p :k % $PERFORMERS
\set id random(1000000000000, 4000000000000000000)
BEGIN;
INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (:id, :p, 2, 'load');
UPDATE tasks SET version = version + 1 WHERE performer_id = :p AND id = :k;
COMMIT;
SQL

# load TAG SECS: one pgbench run of the write load, logged under $WORK/log/TAG.
load() {
  local tag=$1 secs=$2 rc=0
  pgbench -n -c "$LOAD_CLIENTS" -j "$LOAD_THREADS" -R "$LOAD_RATE" -T "$secs" --max-tries="$MAX_TRIES" \
    -l --log-prefix="$WORK/log/$tag" -p "$PROXY_PORT" -f "$WORK/write.sql" tasks \
    > "$WORK/log/$tag.out" 2>&1 </dev/null &
  echo $! > "$WORK/loader.pid"
  wait $! || rc=$?
  rm -f "$WORK/loader.pid"
  return $rc
}
# load_until STOPFILE TAG: back-to-back runs of $CHUNK_SECS s until STOPFILE exists.
load_until() {
  local stop=$1 tag=$2 i=0
  while [ ! -e "$stop" ] && [ ! -e "$WORK/stop" ]; do i=$((i + 1)); load "$tag-$i" "$CHUNK_SECS" || true; done
}
# stats T0 T1 LOGFILE…: "committed failed retried p50_ms p99_ms max_ms" over the logged
# transactions that ended in [T0, T1] (T0 empty: all). Log line (pgbench 15, -R, --max-tries):
# client_id tx_no time_us script_no epoch_s epoch_us schedule_lag_us retries.
stats() {
  local t0=$1 t1=$2; shift 2
  [ $# -gt 0 ] || set -- /dev/null
  cat "$@" 2>/dev/null | awk -v t0="$t0" -v t1="$t1" '
    { t = $5 + $6 / 1e6; if (t0 != "" && (t < t0 || t > t1)) next
      if ($3 ~ /^[0-9]+$/) { ok++; if ($NF + 0 > 0) r++; print $3 > "/dev/stderr" } else f++ }
    END { printf "%d %d %d", ok, f, r }' 2> "$WORK/lat" > "$WORK/counts"
  local pct
  pct=$(sort -n "$WORK/lat" | awk '{ v[NR] = $1 } END {
      if (NR == 0) { print "n/a n/a n/a"; exit }
      i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++; i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
      printf "%.1f %.1f %.1f", v[i50] / 1000, v[i99] / 1000, v[NR] / 1000 }')
  echo "$(cat "$WORK/counts") $pct"
}
# tail T0 T1 LOGFILE…: how many committed transactions ended in [T0, T1] over 10/50/100 ms
# (tells a few long lock waits from a slower everything).
tail_counts() {
  local t0=$1 t1=$2; shift 2
  [ $# -gt 0 ] || set -- /dev/null
  cat "$@" 2>/dev/null | awk -v t0="$t0" -v t1="$t1" '
    { t = $5 + $6 / 1e6; if (t0 != "" && (t < t0 || t > t1)) next
      if ($3 ~ /^[0-9]+$/) { n++; if ($3 > 10000) a++; if ($3 > 50000) b++; if ($3 > 100000) c++ } }
    END { printf "of %d: %d over 10 ms, %d over 50 ms, %d over 100 ms", n, a, b, c }'
}
logs() { compgen -G "$WORK/log/$1*" | grep -v '\.out$' || true; }
aborted() { cat "$WORK"/log/"$1"*.out 2>/dev/null | grep -c 'aborted' || true; }
first_errors() { cat "$WORK"/log/"$1"*.out 2>/dev/null | grep -iE 'error|aborted' | sort | uniq -c | sort -rn | head -5 || true; }

# newest SHOW MIGRATIONS row, '|'-separated: epoch|state|change|owner|arcs_done|arcs_total|
# rows_moved|rows_total|rows_per_sec|eta_secs|write_pause_p99_ms|error|started_at|finished_at|throttle
newest_migration() { admin -F'|' -c 'SHOW MIGRATIONS' | awk 'NR == 1'; }
field() { echo "$1" | cut -d'|' -f"$2"; }

declare -A R
# put NAME PHASE "ok fail retried p50 p99 max": stores a stats line as R[NAME PHASE_…].
put() {
  local a b c d e f
  read -r a b c d e f <<< "$3"
  R["$1 $2_ok"]=$a; R["$1 $2_fail"]=$b; R["$1 $2_retr"]=$c; R["$1 $2_p50"]=$d; R["$1 $2_p99"]=$e; R["$1 $2_max"]=$f
}
# move NAME COMMAND: the before/during phases of one ring change; fills R[NAME …].
move() {
  local name=$1 cmd=$2
  echo
  echo "== $name: ${BEFORE_SECS}s of write load before ($LOAD_CLIENTS clients, $LOAD_RATE tx/s)"
  load "$name-before" "$BEFORE_SECS" || echo "   (pgbench exited non-zero: $(first_errors "$name-before" | head -1))"
  # shellcheck disable=SC2046
  put "$name" b "$(stats "" "" $(logs "$name-before"))"
  echo "   committed ${R[$name b_ok]}, failed ${R[$name b_fail]}, p50 ${R[$name b_p50]} ms, p99 ${R[$name b_p99]} ms"

  local prev_epoch; prev_epoch=$(field "$(newest_migration)" 1)
  echo "== $name: load running; $cmd"
  rm -f "$WORK/stop-$name"
  load_until "$WORK/stop-$name" "$name-during" &
  local loop_pid=$!; PIDS+=("$loop_pid")
  sleep 2
  local t0 t1 tmoving="" m="" state="" last_print=0 waited
  t0=$(now)
  if ! admin -c "$cmd" > "$WORK/$name.cmd" 2>&1; then
    echo "   the command failed: $(cat "$WORK/$name.cmd")"; touch "$WORK/stop-$name"; wait "$loop_pid" || true
    R["$name state"]="refused"; return 1
  fi
  echo "   accepted in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }') s"
  while :; do
    m=$(newest_migration || true)
    waited=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%d", b - a }')
    if [ -n "$m" ] && [ "$(field "$m" 1)" != "$prev_epoch" ]; then
      state=$(field "$m" 2)
      if [ -z "$tmoving" ] && [ "$state" != setup ] && [ "$state" != waiting ]; then tmoving=$(now); fi
      if [ "$state" = done ] || [ "$state" = failed ]; then break; fi
      if [ $((waited - last_print)) -ge 5 ]; then
        last_print=$waited
        printf '   %4ss %-8s arcs %s/%s rows %s/%s %s rows/s eta %ss pause p99 %s ms%s\n' "$waited" "$state" \
          "$(field "$m" 5)" "$(field "$m" 6)" "$(field "$m" 7)" "$(field "$m" 8)" "$(field "$m" 9)" "$(field "$m" 10)" \
          "$(field "$m" 11)" "$([ -n "$(field "$m" 12)" ] && echo "; error: $(field "$m" 12)")"
      fi
    fi
    if [ "$waited" -ge "$MOVE_TIMEOUT" ]; then state="timeout"; break; fi
    if ! kill -0 "$PROXY_PID" 2>/dev/null; then state="proxy exited"; break; fi
    sleep 0.5
  done
  t1=$(now)
  touch "$WORK/stop-$name"
  echo "   $state after $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s: $m"
  echo "   (waiting for the load's last ${CHUNK_SECS}s run to end)"
  wait "$loop_pid" || true
  R["$name state"]=$state
  R["$name rows"]=$(field "$m" 7); R["$name rows_total"]=$(field "$m" 8)
  R["$name rps"]=$(field "$m" 9); R["$name pause_p99"]=$(field "$m" 11); R["$name error"]=$(field "$m" 12)
  R["$name arcs"]="$(field "$m" 5)/$(field "$m" 6)"
  R["$name wall"]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  R["$name moving_secs"]=$(awk -v a="${tmoving:-$t1}" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  R["$name wall_rps"]=$(awk -v r="${R[$name rows]:-0}" -v s="${R[$name wall]}" 'BEGIN { printf "%.0f", (s > 0 ? r / s : 0) }')
  # shellcheck disable=SC2046
  put "$name" d "$(stats "$t0" "$t1" $(logs "$name-during"))"
  R["$name aborted"]=$(( $(aborted "$name-before") + $(aborted "$name-during") ))
  echo "   during: committed ${R[$name d_ok]}, failed ${R[$name d_fail]} (after $MAX_TRIES tries), retried ${R[$name d_retr]}," \
    "p50 ${R[$name d_p50]} ms, p99 ${R[$name d_p99]} ms, max ${R[$name d_max]} ms; pgbench clients aborted: ${R[$name aborted]}"
  # shellcheck disable=SC2046
  echo "   before, $(tail_counts "" "" $(logs "$name-before")); during, $(tail_counts "$t0" "$t1" $(logs "$name-during"))"
  if [ "${R[$name aborted]}" != 0 ] || [ "${R[$name d_fail]}" != 0 ]; then first_errors "$name-" | sed 's/^/     /'; fi
  [ "$state" = done ]
}

# check NAME SHARDS_EXPECTED_EMPTY: the integrity checks against the shards; fills R[NAME ok].
check() {
  local name=$1 empty=$2 committed total load_rows seed_rows bumps dups problems=()
  echo "== $name: checking the shards directly"
  # shellcheck disable=SC2046
  committed=$(stats "" "" $(logs "") | cut -d' ' -f1)
  total=0; load_rows=0; seed_rows=0; bumps=0
  : > "$WORK/ids"
  for db in tasks1 tasks2 tasks3 tasks4; do
    local c
    c=$(pg "$db" -F' ' -c "SELECT count(*), count(*) FILTER (WHERE title = 'load'), count(*) FILTER (WHERE id <= $ROWS),
                                  coalesce(sum(version - 1) FILTER (WHERE id <= $ROWS), 0) FROM tasks")
    read -r n l s b <<< "$c"
    total=$((total + n)); load_rows=$((load_rows + l)); seed_rows=$((seed_rows + s)); bumps=$((bumps + b))
    pg "$db" -c 'COPY (SELECT id FROM tasks) TO STDOUT' >> "$WORK/ids"
    if [ "$db" = "$empty" ] && [ "$n" != 0 ]; then problems+=("$db still holds $n rows"); fi
    local prepared; prepared=$(pg "$db" -c 'SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()')
    if [ "$prepared" != 0 ]; then problems+=("$db has $prepared prepared transactions left"); fi
  done
  dups=$(sort -n "$WORK/ids" | uniq -d | wc -l)
  rm -f "$WORK/ids"
  echo "   rows per shard (tasks1/2/3/4): $(shard_counts); total $total;" \
    "expected $ROWS seed + $committed committed load transactions = $((ROWS + committed))"
  echo "   seed rows $seed_rows/$ROWS; 'load' rows $load_rows (expected $committed); seed-row updates $bumps (expected $committed);" \
    "ids on two shards or twice: $dups"
  [ "$total" = $((ROWS + committed)) ] || problems+=("total $total != $((ROWS + committed))")
  [ "$seed_rows" = "$ROWS" ] || problems+=("seed rows $seed_rows != $ROWS")
  [ "$load_rows" = "$committed" ] || problems+=("load rows $load_rows != committed $committed")
  [ "$bumps" = "$committed" ] || problems+=("seed-row updates $bumps != committed $committed")
  [ "$dups" = 0 ] || problems+=("$dups duplicated ids")
  if [ "$PLACEMENT" = 1 ]; then
    local t routed
    t=$(now)
    awk -v m="$PERFORMERS" 'BEGIN { for (p = 0; p < m; p++) printf "SELECT count(*) FROM tasks WHERE performer_id = %d;\n", p }' > "$WORK/placement.sql"
    routed=$(psql -p "$PROXY_PORT" -d tasks -qAt -v ON_ERROR_STOP=1 -f "$WORK/placement.sql" | awk '{ s += $1 } END { print s + 0 }')
    echo "   placement: key-routed counts through the proxy for all $PERFORMERS performers sum to $routed" \
      "(shards' total $total; $(awk -v a="$t" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s)"
    [ "$routed" = "$total" ] || problems+=("key-routed counts sum to $routed, not $total: rows off their owner")
  fi
  if [ ${#problems[@]} -eq 0 ]; then R["$name ok"]=yes; echo "   OK"
  else R["$name ok"]="NO: $(IFS=';'; echo "${problems[*]}")"; echo "   FAILED: ${R[$name ok]}"; fi
}

status=0
if move "ADD" "ADD SHARD shard-4 '$SHARD4_URL'"; then check "ADD" ""; else R["ADD ok"]="not checked (move ${R[ADD state]})"; status=1; fi
if [ "${R[ADD state]}" = done ]; then
  if move "REMOVE" "REMOVE SHARD shard-4"; then check "REMOVE" tasks4; else R["REMOVE ok"]="not checked (move ${R[REMOVE state]})"; status=1; fi
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a / b; else print "n/a" }'; }
verdict() { if [ "$1" = 1 ]; then echo "met"; else echo "NOT met"; fi; }
echo
echo "== results: $ROWS tasks, $PERFORMERS performers; 3 → 4 shards (ADD) and 4 → 3 (REMOVE); batch_rows $BATCH_ROWS, throttle $THROTTLE rows/s;"
echo "   load $LOAD_CLIENTS clients, $LOAD_RATE tx/s (BEGIN; INSERT; UPDATE; COMMIT), pgbench --max-tries=$MAX_TRIES;" \
  "load average now $(cut -d' ' -f1-3 /proc/loadavg)"
printf "%-7s %-6s %9s %10s %9s %10s %11s %9s %9s %9s %9s %9s %12s %9s %11s\n" \
  change state rows_moved moving_s rows/s wall_s "rows/s wall" pause_p99 "p50 bef" "p99 bef" "p50 dur" "p99 dur" "p99 dur/bef" "tx failed" "integrity"
for name in ADD REMOVE; do
  [ -n "${R[$name state]:-}" ] || continue
  printf "%-7s %-6s %9s %10s %9s %10s %11s %9s %9s %9s %9s %9s %12s %9s %11s\n" "$name" "${R[$name state]}" \
    "${R[$name rows]:-}" "${R[$name moving_secs]:-}" "${R[$name rps]:-}" "${R[$name wall]:-}" "${R[$name wall_rps]:-}" \
    "${R[$name pause_p99]:-}" "${R[$name b_p50]:-}" "${R[$name b_p99]:-}" "${R[$name d_p50]:-}" "${R[$name d_p99]:-}" \
    "$(ratio "${R[$name d_p99]:-}" "${R[$name b_p99]:-}")" "$(( ${R[$name b_fail]:-0} + ${R[$name d_fail]:-0} ))" \
    "$([ "${R[$name ok]:-}" = yes ] && echo ok || echo FAILED)"
done
echo "(ms for latencies and pause; p50/p99 over committed transactions; 'moving_s' and 'rows/s' are"
echo " the time in state moving and SHOW MIGRATIONS' rows_per_sec; 'wall' is from the command to done)"
echo
echo "== targets"
for name in ADD REMOVE; do
  [ -n "${R[$name state]:-}" ] || continue
  rps_ok=$(awk -v r="${R[$name rps]:-0}" 'BEGIN { print (r + 0 >= 20000) ? 1 : 0 }')
  lat_ok=$(awk -v d="${R[$name d_p99]:-}" -v b="${R[$name b_p99]:-}" 'BEGIN { print (d ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && d <= 3 * b) ? 1 : 0 }')
  int_ok=$([ "${R[$name ok]:-}" = yes ] && echo 1 || echo 0)
  echo "$name: ≥ 20,000 rows/s moved: $(verdict "$rps_ok") (${R[$name rps]:-?});" \
    "p99 during ≤ 3 × before: $(verdict "$lat_ok") ($(ratio "${R[$name d_p99]:-}" "${R[$name b_p99]:-}") ×);" \
    "no lost or duplicated rows: $(verdict "$int_ok")$([ "$int_ok" = 1 ] || echo " (${R[$name ok]:-not checked})")"
  [ "$int_ok" = 1 ] || status=1
done
if [ -n "${KEEP_LOG:-}" ]; then cp "$WORK/proxy.log" "$KEEP_LOG"; fi
if grep -qiE 'error|panic' "$WORK/proxy.log"; then
  echo
  echo "== proxy log: errors (first 10 distinct)"
  grep -iE 'error|panic' "$WORK/proxy.log" | sed -E 's/^[^ ]+ +//' | sort | uniq -c | sort -rn | head -10 || true
fi
exit $status
