#!/usr/bin/env bash
# Benchmarks taskflow-shard-proxy against direct PostgreSQL and pgbouncer, in one run.
#
#   shard-proxy/bench/pgbench.sh            # DURATION=10 CLIENTS="1 16 64" by default
#   DURATION=30 CLIENTS="1 16 64" shard-proxy/bench/pgbench.sh
#   PROXY_BIN=target/release/taskflow-shard-proxy shard-proxy/bench/pgbench.sh  # skip the build
#   REPS=3 SEED_ROWS=200000 PROFILE=1 shard-proxy/bench/pgbench.sh
#
# What it does (everything on loopback, in a temporary directory, cleaned up on exit):
#  1. starts one PostgreSQL 15 cluster (role taskflow/taskflow, scram) with database
#     `bench` (pgbench -i -s $SCALE), databases tasks1..3 (the TaskFlow shard schema) and
#     `tasksall` (the same schema, one database that will hold all the rows);
#  2. starts the proxy (release build) with `auth` → bench (passthrough) and shards
#     shard-1..3 → tasks1..3 — twice: as configured by default (one runtime thread per
#     core) and with `worker_threads = 1` ("proxy1") — and pgbouncer (transaction mode,
#     pool $POOL) with `bench` and `tasksall`. PostgreSQL gets the same number of server
#     connections either way: $POOL to `bench` from both; from the proxy $SHARD_POOL per
#     shard (default ⌈$POOL/3⌉, so ~$POOL over the 3 shards, which share this one server)
#     against pgbouncer's $POOL to `tasksall`. Loads the same $SEED_ROWS tasks through the
#     proxy (COPY, split by performer_id over the 3 shards) and straight into `tasksall`;
#  3. runs `pgbench -S` in simple and prepared mode for each client count against direct
#     PostgreSQL, pgbouncer and the proxy, and the sharded read/write workload (random
#     performer_id) through the proxy (`tasks`, 3 shards) and through pgbouncer
#     (`tasksall`, plain pooling, no routing) — every cell $REPS times, the rounds
#     interleaved (round 1 of every cell, then round 2, …) so that drifting background load
#     hits every column alike; prints each cell's median TPS, the ratios, and the CPU time
#     pgbouncer and each proxy spent per transaction (less noisy than TPS on a shared box);
#  4. with PROFILE=1 and `perf` installed: samples the proxy for $PROFILE_SECS s under
#     `pgbench -S -M simple -c 16` and prints its hottest symbols;
#  5. with INSTRUCTIONS=1 and valgrind installed: counts the user-space instructions the
#     proxy and pgbouncer execute per transaction (callgrind) — deterministic, unlike TPS
#     and CPU time on a shared machine;
#  6. opens $IDLE idle clients to the proxy and reports RSS growth per client.
# Requires root (PostgreSQL and pgbouncer run as `postgres`), pgbench, psql, pgbouncer
# (`make deps` / scripts/install-deps.sh installs them).
set -euo pipefail

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-"1 16 64"}
SCALE=${SCALE:-10}
POOL=${POOL:-20}
# The proxy's pool per shard. Its three shards live on one PostgreSQL server here, so a
# pool of $POOL each would let three times pgbouncer's connections in: measured on 64
# clients, PostgreSQL then spent 33–40 % more CPU per transaction (BENCHMARKS.md, 2026-12-08).
SHARD_POOL=${SHARD_POOL:-$(( (POOL + 2) / 3 ))}
IDLE=${IDLE:-1000}
REPS=${REPS:-2}
SEED_ROWS=${SEED_ROWS:-100000}
PROFILE=${PROFILE:-0}
PROFILE_SECS=${PROFILE_SECS:-10}
# PROFILE_LOAD=W profiles under the sharded workload instead of pgbench -S.
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

for tool in pgbench psql pgbouncer; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/install-deps.sh (make deps)" >&2; exit 1; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK=$(mktemp -d /tmp/taskflow-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  # pgbouncer runs under su: stop it through its own pid file.
  if [ -f "$WORK/bouncer/pgbouncer.pid" ]; then kill "$(cat "$WORK/bouncer/pgbouncer.pid")" 2>/dev/null || true; fi
  if [ -d "$WORK/pg" ]; then su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $WORK/pg -m immediate stop" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${PROXY_BIN:-}" ]; then
  echo "== building the proxy (release)"
  (cd "$ROOT" && cargo build --release -q -p taskflow-shard-proxy)
  PROXY_BIN="$ROOT/target/release/taskflow-shard-proxy"
fi

PG_PORT=$(free_port); PROXY_PORT=$(free_port); BOUNCER_PORT=$(free_port); METRICS_PORT=$(free_port)
PROXY1_PORT=$(free_port); METRICS1_PORT=$(free_port)
export PGPASSWORD=taskflow PGUSER=taskflow PGHOST=127.0.0.1

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
fsync = off
synchronous_commit = off
CONF
su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $WORK/pg -l $WORK/pg/server.log -w start >/dev/null"
psql_su() { su postgres -s /bin/sh -c "psql -h $WORK/pg -p $PG_PORT -U postgres -qAt -v ON_ERROR_STOP=1 $*"; }
psql_su "-c \"CREATE ROLE taskflow LOGIN PASSWORD 'taskflow'\""
for db in bench tasks1 tasks2 tasks3 tasksall; do psql_su "-c 'CREATE DATABASE $db OWNER taskflow'"; done
for db in tasks1 tasks2 tasks3 tasksall; do psql -p "$PG_PORT" -d "$db" -q -f "$ROOT/migrations/sql/shard/V1__tasks.sql"; done
pgbench -i -q -s "$SCALE" -p "$PG_PORT" bench >/dev/null 2>&1

echo "== starting the proxy on $PROXY_PORT"
echo taskflow > "$WORK/backend-password"
cat > "$WORK/proxy.toml" <<CONF
listen = "127.0.0.1:$PROXY_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
state_dir = "$WORK/state"
[log]
level = "warn"
format = "text"
[[users]]
name = "taskflow"
password = "taskflow"
[[users]]
name = "taskflow_admin"
password = "taskflow"
admin = true
[pool]
size = $SHARD_POOL
[backend]
user = "taskflow"
password_file = "$WORK/backend-password"
[auth_database]
url = "postgres://taskflow@127.0.0.1:$PG_PORT/bench"
pool_size = $POOL
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
ulimit -n 65536 2>/dev/null || true
# Each server in a session of its own (`setsid`), as PostgreSQL (pg_ctl) and pgbouncer
# (su) already are and as systemd runs every service: with the kernel's autogroup
# scheduling (on by default) a process started plainly from this script would share one
# CPU group with pgbench, the load generator, and get a smaller share of the machine than
# pgbouncer does. (Before 2026-12-07 the proxies ran so; see BENCHMARKS.md.)
setsid "$PROXY_BIN" --config "$WORK/proxy.toml" > "$WORK/proxy.log" 2>&1 < /dev/null &
PROXY_PID=$!; PIDS+=("$PROXY_PID")
# The same proxy configured with `worker_threads = 1` (one thread, as pgbouncer runs), over
# the same shards: a second column, so the runtime's cost shows side by side.
echo "== starting the one-thread proxy on $PROXY1_PORT"
sed -e "s/^listen = .*/listen = \"127.0.0.1:$PROXY1_PORT\"/" \
    -e "s/^metrics_listen = .*/metrics_listen = \"127.0.0.1:$METRICS1_PORT\"\nworker_threads = 1/" \
    -e "s#^state_dir = .*#state_dir = \"$WORK/state1\"#" "$WORK/proxy.toml" > "$WORK/proxy1.toml"
setsid "$PROXY_BIN" --config "$WORK/proxy1.toml" > "$WORK/proxy1.log" 2>&1 < /dev/null &
PROXY1_PID=$!; PIDS+=("$PROXY1_PID")

echo "== starting pgbouncer on $BOUNCER_PORT"
mkdir -p "$WORK/bouncer" && chown postgres "$WORK/bouncer"
echo '"taskflow" "taskflow"' > "$WORK/bouncer/users.txt"
cat > "$WORK/bouncer/pgbouncer.ini" <<CONF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
tasksall = host=127.0.0.1 port=$PG_PORT dbname=tasksall
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/bouncer/users.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 2000
logfile = $WORK/bouncer/pgbouncer.log
pidfile = $WORK/bouncer/pgbouncer.pid
CONF
chown -R postgres "$WORK/bouncer"
su postgres -s /bin/sh -c "pgbouncer $WORK/bouncer/pgbouncer.ini" >/dev/null 2>&1 &
PIDS+=("$!")
for _ in $(seq 50); do
  if psql -p "$PROXY_PORT" -d auth -qAtc 'select 1' >/dev/null 2>&1 && psql -p "$PROXY1_PORT" -d auth -qAtc 'select 1' >/dev/null 2>&1 \
    && psql -p "$BOUNCER_PORT" -d bench -qAtc 'select 1' >/dev/null 2>&1; then break; fi
  sleep 0.2
done

for port_db_log in "$PROXY_PORT auth proxy.log" "$PROXY1_PORT auth proxy1.log" "$BOUNCER_PORT bench bouncer/pgbouncer.log"; do
  set -- $port_db_log
  if ! psql -p "$1" -d "$2" -qAtc 'select 1' >/dev/null 2>&1; then
    echo "the server on port $1 did not come up; the end of $3:" >&2
    tail -20 "$WORK/$3" >&2
    exit 1
  fi
done
# The scheduling groups (see `setsid` above): the poolers must not share pgbench's.
if [ -r /proc/self/autogroup ]; then
  BOUNCER_PID_FILE="$WORK/bouncer/pgbouncer.pid"
  echo "autogroups: pgbench $(cut -d' ' -f1 /proc/$$/autogroup), proxy $(cut -d' ' -f1 "/proc/$PROXY_PID/autogroup")," \
    "proxy1 $(cut -d' ' -f1 "/proc/$PROXY1_PID/autogroup"), pgbouncer $(cut -d' ' -f1 "/proc/$(cat "$BOUNCER_PID_FILE")/autogroup")"
fi

if [ -n "${HOLD:-}" ]; then
  echo "holding for ${HOLD}s: postgres $PG_PORT (db bench), proxy $PROXY_PORT (db auth/tasks/admin), pgbouncer $BOUNCER_PORT (db bench)"
  sleep "$HOLD"
  exit 0
fi

echo "== loading $SEED_ROWS tasks through the proxy (3 shards) and into tasksall (one database)"
awk -v n="$SEED_ROWS" 'BEGIN { srand(42); for (i = 1; i <= n; i++) printf "%d,%d,1,seed\n", 1000000000 + i, 1 + int(rand() * 100000) }' > "$WORK/seed.csv"
psql -p "$PROXY_PORT" -d tasks -q -v ON_ERROR_STOP=1 -c "\copy tasks (id, performer_id, creator_id, title) FROM '$WORK/seed.csv' WITH (FORMAT csv)"
psql -p "$PG_PORT" -d tasksall -q -v ON_ERROR_STOP=1 -c "\copy tasks (id, performer_id, creator_id, title) FROM '$WORK/seed.csv' WITH (FORMAT csv)"
for db in tasks1 tasks2 tasks3 tasksall; do psql -p "$PG_PORT" -d "$db" -qc 'VACUUM ANALYZE tasks'; done
echo "rows per shard: $(for db in tasks1 tasks2 tasks3; do psql -p "$PG_PORT" -d "$db" -qAtc 'SELECT count(*) FROM tasks'; done | paste -sd/)," \
  "in tasksall: $(psql -p "$PG_PORT" -d tasksall -qAtc 'SELECT count(*) FROM tasks')"

cat > "$WORK/sharded.sql" <<'SQL'
\set p random(1, 100000)
\set id random(1, 1000000000)
INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (:id, :p, 1, 'bench') ON CONFLICT (id) DO NOTHING;
UPDATE tasks SET version = version + 1 WHERE performer_id = :p AND id = :id;
SELECT id, title FROM tasks WHERE performer_id = :p AND id = :id;
SELECT count(*) FROM tasks WHERE performer_id = :p;
SQL

# CPU time (user + system, in clock ticks) a process has used so far; 0 without one.
cpu_ticks() { if [ -n "$1" ] && [ -r "/proc/$1/stat" ]; then awk '{ print $14 + $15 }' "/proc/$1/stat"; else echo 0; fi; }
TICKS=$(getconf CLK_TCK)
# run PID PORT DB MODE CLIENTS [pgbench args]: prints "TPS CPU" — CPU is the microseconds
# of CPU process PID (the pooler; empty: none) spent per transaction — or "error"
run() {
  local pid=$1 port=$2 db=$3 mode=$4 c=$5; shift 5
  local j=$(( c < 2 ? c : 2 ))
  local out before after
  before=$(cpu_ticks "$pid")
  if out=$(pgbench -n -M "$mode" -c "$c" -j "$j" -T "$DURATION" -p "$port" "$@" "$db" 2>&1 </dev/null); then
    after=$(cpu_ticks "$pid")
    echo "$out" | awk -v t=$(( after - before )) -v hz="$TICKS" -v pid="$pid" '
      /^tps = / { tps = $3 } /actually processed:/ { n = $NF }
      END { if (pid == "" || n == 0) printf "%.0f -\n", tps; else printf "%.0f %.1f\n", tps, t * 1e6 / hz / n }'
  else
    echo "error -"
  fi
}
# median of the numeric arguments ("error" if none is numeric)
median() { printf '%s\n' "$@" | { grep -E '^[0-9]+$' || true; } | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "error"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { if [[ "$1" =~ ^[0-9]+$ && "$2" =~ ^[0-9]+$ && "$2" -gt 0 ]]; then awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; else echo "n/a"; fi; }
# median of decimal numbers ("-" if none)
median_dec() { printf '%s\n' "$@" | { grep -E '^[0-9.]+$' || true; } | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Every cell: kind (S = pgbench -S, W = sharded workload) mode clients target. `proxy1`
# is the proxy with worker_threads = 1.
declare -A RESULTS CPU
cells() {
  for kind in S W; do
    for mode in simple prepared; do
      for c in $CLIENTS; do
        if [ "$kind" = S ]; then echo "S $mode $c direct"; fi
        echo "$kind $mode $c pgbouncer"; echo "$kind $mode $c proxy"; echo "$kind $mode $c proxy1"
      done
    done
  done
}
BOUNCER_PID=$(cat "$WORK/bouncer/pgbouncer.pid" 2>/dev/null || true)
cell() {
  local kind=$1 mode=$2 c=$3 target=$4
  case "$kind/$target" in
    S/direct) run "" "$PG_PORT" bench "$mode" "$c" -S ;;
    S/pgbouncer) run "$BOUNCER_PID" "$BOUNCER_PORT" bench "$mode" "$c" -S ;;
    S/proxy) run "$PROXY_PID" "$PROXY_PORT" auth "$mode" "$c" -S ;;
    S/proxy1) run "$PROXY1_PID" "$PROXY1_PORT" auth "$mode" "$c" -S ;;
    W/pgbouncer) run "$BOUNCER_PID" "$BOUNCER_PORT" tasksall "$mode" "$c" -f "$WORK/sharded.sql" ;;
    W/proxy) run "$PROXY_PID" "$PROXY_PORT" tasks "$mode" "$c" -f "$WORK/sharded.sql" ;;
    W/proxy1) run "$PROXY1_PID" "$PROXY1_PORT" tasks "$mode" "$c" -f "$WORK/sharded.sql" ;;
  esac
}
ncells=$(cells | wc -l)
echo
echo "== $REPS interleaved rounds of $ncells cells, ${DURATION}s each (~$(( REPS * ncells * DURATION / 60 + 1 )) min)"
for rep in $(seq "$REPS"); do
  while read -r kind mode c target; do
    read -r t u < <(cell "$kind" "$mode" "$c" "$target")
    RESULTS["$kind $mode $c $target"]+="$t "
    CPU["$kind $mode $c $target"]+="$u "
    printf '  round %s: %s %-8s %3s %-9s %s TPS, %s µs CPU/tx\n' "$rep" "$kind" "$mode" "$c" "$target" "$t" "$u"
  done < <(cells)
done
med() { # shellcheck disable=SC2086
  median ${RESULTS["$1"]}; }
runs() { echo "${RESULTS["$1"]}" | sed 's/ *$//; s/ /, /g'; }
cpu() { # shellcheck disable=SC2086
  median_dec ${CPU["$1"]}; }

echo
echo "== pgbench -S (select-only), scale $SCALE, pool $POOL: median TPS of $REPS runs [runs];"
echo "   proxy1 = the proxy with worker_threads = 1; ratios: proxy/direct, proxy/pgbouncer (proxy1 in brackets)"
printf "%-9s %7s %8s %9s %8s %8s %14s %17s %s   %s\n" mode clients direct pgbouncer proxy proxy1 "/direct" "/pgbouncer" "CPU µs/tx bouncer|proxy|proxy1" "runs direct | pgbouncer | proxy | proxy1"
for mode in simple prepared; do
  for c in $CLIENTS; do
    d=$(med "S $mode $c direct"); b=$(med "S $mode $c pgbouncer"); p=$(med "S $mode $c proxy"); q=$(med "S $mode $c proxy1")
    printf "%-9s %7s %8s %9s %8s %8s %14s %17s %s   %s | %s | %s | %s\n" "$mode" "$c" "$d" "$b" "$p" "$q" \
      "$(ratio "$p" "$d") ($(ratio "$q" "$d"))" "$(ratio "$p" "$b") ($(ratio "$q" "$b"))" \
      "$(cpu "S $mode $c pgbouncer")|$(cpu "S $mode $c proxy")|$(cpu "S $mode $c proxy1")" \
      "$(runs "S $mode $c direct")" "$(runs "S $mode $c pgbouncer")" "$(runs "S $mode $c proxy")" "$(runs "S $mode $c proxy1")"
  done
done

echo
echo "== sharded workload (1 insert, 1 update, 2 keyed reads per transaction; random performer_id):"
echo "   proxy → 3 shards (pool $SHARD_POOL each) vs pgbouncer → tasksall (one database, all rows; pool $POOL); median TPS of $REPS runs [runs]"
printf "%-9s %7s %16s %12s %13s %17s %s   %s\n" mode clients "pgbouncer(1 db)" "proxy(3 sh)" "proxy1(3 sh)" "/pgbouncer" "CPU µs/tx bouncer|proxy|proxy1" "runs pgbouncer | proxy | proxy1"
for mode in simple prepared; do
  for c in $CLIENTS; do
    b=$(med "W $mode $c pgbouncer"); p=$(med "W $mode $c proxy"); q=$(med "W $mode $c proxy1")
    printf "%-9s %7s %16s %12s %13s %17s %s   %s | %s | %s\n" "$mode" "$c" "$b" "$p" "$q" "$(ratio "$p" "$b") ($(ratio "$q" "$b"))" \
      "$(cpu "W $mode $c pgbouncer")|$(cpu "W $mode $c proxy")|$(cpu "W $mode $c proxy1")" \
      "$(runs "W $mode $c pgbouncer")" "$(runs "W $mode $c proxy")" "$(runs "W $mode $c proxy1")"
  done
done

if [ "$PROFILE" = 1 ]; then
  echo
  if command -v perf >/dev/null; then
    if [ "${PROFILE_LOAD:-S}" = W ]; then
      echo "== perf: proxy under the sharded workload, -M simple -c 16, for ${PROFILE_SECS}s (self time, top symbols)"
      pgbench -n -M simple -c 16 -j 2 -T "$(( PROFILE_SECS + 2 ))" -p "$PROXY_PORT" -f "$WORK/sharded.sql" tasks >/dev/null 2>&1 &
    else
      echo "== perf: proxy under pgbench -S -M simple -c 16 for ${PROFILE_SECS}s (self time, top symbols)"
      pgbench -n -S -M simple -c 16 -j 2 -T "$(( PROFILE_SECS + 2 ))" -p "$PROXY_PORT" auth >/dev/null 2>&1 &
    fi
    LOAD_PID=$!; PIDS+=("$LOAD_PID")
    sleep 1
    perf record -q -F 1999 -p "$PROXY_PID" -o "$WORK/perf.data" -- sleep "$PROFILE_SECS" >/dev/null 2>&1 || true
    wait "$LOAD_PID" || true
    # (|| true: head closing the pipe must not stop the script under pipefail)
    perf report -i "$WORK/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
      | grep -E '^ +[0-9]' | sed 's/ *-  *- *$//' | head -"${PROFILE_TOP:-40}" || true
    echo "-- by shared object:"
    perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null \
      | grep -E '^ +[0-9]' | head -8 || true
  else
    echo "== perf is not installed (apt-get install linux-perf): no profile"
  fi
fi

# instructions PID PORT DB -- pgbench args: user-space instructions per transaction of
# process PID, running under callgrind: pgbench (4 clients, simple protocol) runs 250 and
# then 1,250 transactions per client, callgrind's counters dumped after each; the
# difference over the 4,000 extra transactions leaves out what does not grow with them
# (connecting, authenticating). The proxy's 5-second background pass is not left out:
# since 2PC recovery keeps its connections, a pass costs ~0.3-0.45 M instructions, and the
# measured phases last seconds, so it moves a count by ~1 % at most.
instructions() {
  local pid=$1 port=$2 db=$3; shift 4
  local i
  for i in $(seq 120); do psql -p "$port" -d "$db" -qAtc 'select 1' >/dev/null 2>&1 && break; sleep 1; done
  pgbench -n -M simple -c 4 -j 1 -t 200 -p "$port" "$@" "$db" >/dev/null 2>&1   # warm pools and caches
  cg_control -z "$pid"
  pgbench -n -M simple -c 4 -j 1 -t 250 -p "$port" "$@" "$db" >/dev/null 2>&1
  cg_control -d "$pid"
  pgbench -n -M simple -c 4 -j 1 -t 1250 -p "$port" "$@" "$db" >/dev/null 2>&1
  cg_control -d "$pid"
  local a b
  a=$(cg_total 1); b=$(cg_total 2)
  echo $(( (b - a) / 4000 ))
}
# callgrind_control talks to the process through vgdb's pipes, kept in $WORK. Processes are
# named by pid: a name after -d is taken as the dump's description (dumping every process),
# and one after -z matches the program's file name (another with PROXY_BIN=/tmp/x).
cg_control() { callgrind_control --vgdb-prefix="$WORK/cg/vgdb" "$@" >/dev/null; }
# cg_total N: the instruction count of dump N, once callgrind has written it.
cg_total() {
  local i f
  for i in $(seq 100); do
    f=$(ls "$WORK"/cg/out.*."$1" 2>/dev/null | head -1)
    if [ -n "$f" ] && grep -q '^totals:' "$f"; then
      awk '/^totals:/ {print $2}' "$f"
      return
    fi
    sleep 0.3
  done
  echo "callgrind dump $1 not written" >&2; echo 0
}

if [ "${INSTRUCTIONS:-0}" = 1 ]; then
  echo
  if command -v valgrind >/dev/null && command -v callgrind_control >/dev/null; then
    echo "== user-space instructions per transaction (callgrind; 4 clients, simple protocol)"
    CG_PORT=$(free_port); CG_BOUNCER_PORT=$(free_port)
    mkdir -p "$WORK/cg" && chown postgres "$WORK/cg"
    declare -A INSN
    sed -e "s/^listen = .*/listen = \"127.0.0.1:$CG_PORT\"/" -e "s/^metrics_listen = .*/metrics_listen = \"127.0.0.1:$(free_port)\"/" \
        -e "s#^state_dir = .*#state_dir = \"$WORK/state-cg\"#" "$WORK/proxy.toml" > "$WORK/proxy-cg.toml"
    for load in S W; do
      rm -f "$WORK"/cg/out.*
      setsid valgrind -q --tool=callgrind --vgdb-prefix="$WORK/cg/vgdb" --callgrind-out-file="$WORK/cg/out.%p" \
        "$PROXY_BIN" --config "$WORK/proxy-cg.toml" \
        > "$WORK/proxy-cg.log" 2>&1 < /dev/null &
      CG_PID=$!; PIDS+=("$CG_PID")
      if [ $load = S ]; then INSN[proxy $load]=$(instructions "$CG_PID" "$CG_PORT" auth -- -S)
      else INSN[proxy $load]=$(instructions "$CG_PID" "$CG_PORT" tasks -- -f "$WORK/sharded.sql"); fi
      kill "$CG_PID"; wait "$CG_PID" 2>/dev/null || true
    done
    sed -e "s/^listen_port = .*/listen_port = $CG_BOUNCER_PORT/" -e "s#pgbouncer\.pid#pgbouncer-cg.pid#" \
        -e "s#pgbouncer\.log#pgbouncer-cg.log#" "$WORK/bouncer/pgbouncer.ini" > "$WORK/bouncer/pgbouncer-cg.ini"
    chown postgres "$WORK/bouncer/pgbouncer-cg.ini"
    # pgbouncer idles in epoll_wait between commands, where vgdb cannot reach it without
    # ptrace: it is counted whole instead, once per run length, from start to exit.
    bouncer_total() { # TX DB [pgbench args]: instructions of one pgbouncer life
      local tx=$1 db=$2 i; shift 2
      rm -f "$WORK"/cg/out.*
      su postgres -s /bin/sh -c "valgrind -q --tool=callgrind --callgrind-out-file=$WORK/cg/out.%p pgbouncer $WORK/bouncer/pgbouncer-cg.ini" \
        > "$WORK/bouncer/cg.log" 2>&1 < /dev/null &
      for i in $(seq 120); do psql -p "$CG_BOUNCER_PORT" -d "$db" -qAtc 'select 1' >/dev/null 2>&1 && break; sleep 1; done
      pgbench -n -M simple -c 4 -j 1 -t 200 -p "$CG_BOUNCER_PORT" "$@" "$db" >/dev/null 2>&1
      pgbench -n -M simple -c 4 -j 1 -t "$tx" -p "$CG_BOUNCER_PORT" "$@" "$db" >/dev/null 2>&1
      kill "$(cat "$WORK/bouncer/pgbouncer-cg.pid")"
      for i in $(seq 100); do
        f=$(ls "$WORK"/cg/out.* 2>/dev/null | head -1)
        if [ -n "$f" ] && grep -q '^totals:' "$f"; then awk '/^totals:/ {print $2}' "$f"; return; fi
        sleep 0.3
      done
      echo 0
    }
    a=$(bouncer_total 250 bench -S); b=$(bouncer_total 1250 bench -S); INSN[pgbouncer S]=$(( (b - a) / 4000 ))
    a=$(bouncer_total 250 tasksall -f "$WORK/sharded.sql"); b=$(bouncer_total 1250 tasksall -f "$WORK/sharded.sql")
    INSN[pgbouncer W]=$(( (b - a) / 4000 ))
    printf "%-36s %12s %12s %8s\n" load pgbouncer proxy ratio
    printf "%-36s %12s %12s %8s\n" "pgbench -S (1 statement)" "${INSN[pgbouncer S]}" "${INSN[proxy S]}" "$(ratio "${INSN[proxy S]}" "${INSN[pgbouncer S]}")"
    printf "%-36s %12s %12s %8s\n" "sharded workload (4 statements)" "${INSN[pgbouncer W]}" "${INSN[proxy W]}" "$(ratio "${INSN[proxy W]}" "${INSN[pgbouncer W]}")"
  else
    echo "== valgrind is not installed (apt-get install valgrind): no instruction counts"
  fi
fi

echo
echo "== idle clients: $IDLE connections held open (no queries)"
rss() { awk '/VmRSS/ { print $2 }' "/proc/$PROXY_PID/status"; }
echo '\sleep 15 s' > "$WORK/idle.sql"
before=$(rss)
pgbench -n -c "$IDLE" -j 2 -T 20 -p "$PROXY_PORT" -f "$WORK/idle.sql" auth >/dev/null 2>&1 &
IDLE_PID=$!; PIDS+=("$IDLE_PID")
peak=$before
for _ in $(seq 40); do
  sleep 0.5
  now=$(rss); [ "$now" -gt "$peak" ] && peak=$now
done
clients=$(PGUSER=taskflow_admin psql -p "$PROXY_PORT" -d admin -qAtc 'SHOW STATS' | awk -F'|' '$1=="clients" {print $2}' || true)
wait "$IDLE_PID" || true
echo "proxy RSS before: ${before} KiB, with ${clients:-?} clients: ${peak} KiB"
awk -v b="$before" -v p="$peak" -v n="${clients:-$IDLE}" 'BEGIN { if (n > 0) printf "per idle client: %.1f KiB\n", (p - b) / n }'
