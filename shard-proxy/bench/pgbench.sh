#!/usr/bin/env bash
# Benchmarks taskflow-shard-proxy against direct PostgreSQL and pgbouncer, in one run.
#
#   shard-proxy/bench/pgbench.sh            # DURATION=10 CLIENTS="1 16 64" by default
#   DURATION=30 CLIENTS="1 16 64" shard-proxy/bench/pgbench.sh
#   PROXY_BIN=target/release/taskflow-shard-proxy shard-proxy/bench/pgbench.sh  # skip the build
#
# What it does (everything on loopback, in a temporary directory, cleaned up on exit):
#  1. starts one PostgreSQL 15 cluster (role taskflow/taskflow, scram) with database
#     `bench` (pgbench -i -s $SCALE) and databases tasks1..3 (the TaskFlow shard schema);
#  2. starts the proxy (release build) with `auth` → bench (passthrough) and shards
#     shard-1..3 → tasks1..3, and pgbouncer (transaction mode, same pool size);
#  3. runs `pgbench -S` in simple and prepared mode for each client count against
#     direct PostgreSQL, the proxy, and pgbouncer, and prints TPS and ratios;
#  4. runs a sharded read/write workload (random performer_id) through the proxy;
#  5. opens 1,000 idle clients to the proxy and reports RSS growth per client.
# Requires root (PostgreSQL and pgbouncer run as `postgres`), pgbench, psql, pgbouncer.
set -euo pipefail

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-"1 16 64"}
SCALE=${SCALE:-10}
POOL=${POOL:-20}
IDLE=${IDLE:-1000}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

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
for db in bench tasks1 tasks2 tasks3; do psql_su "-c 'CREATE DATABASE $db OWNER taskflow'"; done
for db in tasks1 tasks2 tasks3; do psql -p "$PG_PORT" -d "$db" -q -f "$ROOT/migrations/sql/shard/V1__tasks.sql"; done
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
[pool]
size = $POOL
[backend]
user = "taskflow"
password_file = "$WORK/backend-password"
[auth_database]
url = "postgres://taskflow@127.0.0.1:$PG_PORT/bench"
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
"$PROXY_BIN" --config "$WORK/proxy.toml" > "$WORK/proxy.log" 2>&1 &
PROXY_PID=$!; PIDS+=("$PROXY_PID")

echo "== starting pgbouncer on $BOUNCER_PORT"
mkdir -p "$WORK/bouncer" && chown postgres "$WORK/bouncer"
echo '"taskflow" "taskflow"' > "$WORK/bouncer/users.txt"
cat > "$WORK/bouncer/pgbouncer.ini" <<CONF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
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
  if psql -p "$PROXY_PORT" -d auth -qAtc 'select 1' >/dev/null 2>&1 && psql -p "$BOUNCER_PORT" -d bench -qAtc 'select 1' >/dev/null 2>&1; then break; fi
  sleep 0.2
done

if [ -n "${HOLD:-}" ]; then
  echo "holding for ${HOLD}s: postgres $PG_PORT (db bench), proxy $PROXY_PORT (db auth/tasks/admin), pgbouncer $BOUNCER_PORT (db bench)"
  sleep "$HOLD"
  exit 0
fi

# tps TARGET_PORT DB MODE CLIENTS [extra args]: prints TPS or "error"
tps() {
  local port=$1 db=$2 mode=$3 c=$4; shift 4
  local j=$(( c < 2 ? c : 2 ))
  local out
  if out=$(pgbench -n -S -M "$mode" -c "$c" -j "$j" -T "$DURATION" -p "$port" "$@" "$db" 2>&1); then
    echo "$out" | awk '/^tps = / { printf "%.0f", $3; exit }'
  else
    echo "error"
  fi
}
ratio() { if [[ "$1" =~ ^[0-9]+$ && "$2" =~ ^[0-9]+$ && "$2" -gt 0 ]]; then awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; else echo "n/a"; fi; }

echo
echo "== pgbench -S, ${DURATION}s per cell, scale $SCALE, pool $POOL (TPS)"
printf "%-9s %7s %10s %10s %10s %12s %14s\n" mode clients direct proxy pgbouncer proxy/direct proxy/pgbouncer
for mode in simple prepared; do
  for c in $CLIENTS; do
    d=$(tps "$PG_PORT" bench "$mode" "$c")
    p=$(tps "$PROXY_PORT" auth "$mode" "$c")
    b=$(tps "$BOUNCER_PORT" bench "$mode" "$c")
    printf "%-9s %7s %10s %10s %10s %12s %14s\n" "$mode" "$c" "$d" "$p" "$b" "$(ratio "$p" "$d")" "$(ratio "$p" "$b")"
  done
done

echo
echo "== sharded workload through the proxy (random performer_id over 3 shards; 1 insert, 1 update, 2 reads per transaction)"
cat > "$WORK/sharded.sql" <<'SQL'
\set p random(1, 100000)
\set id random(1, 1000000000)
INSERT INTO tasks (id, performer_id, creator_id, title) VALUES (:id, :p, 1, 'bench') ON CONFLICT (id) DO NOTHING;
UPDATE tasks SET version = version + 1 WHERE performer_id = :p AND id = :id;
SELECT id, title FROM tasks WHERE performer_id = :p AND id = :id;
SELECT count(*) FROM tasks WHERE performer_id = :p;
SQL
printf "%-9s %7s %10s\n" mode clients tps
for mode in simple prepared; do
  for c in $CLIENTS; do
    j=$(( c < 2 ? c : 2 ))
    t=$(pgbench -n -M "$mode" -c "$c" -j "$j" -T "$DURATION" -p "$PROXY_PORT" -f "$WORK/sharded.sql" tasks 2>&1 | awk '/^tps = / { printf "%.0f", $3; exit }')
    printf "%-9s %7s %10s\n" "$mode" "$c" "${t:-error}"
  done
done

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
clients=$(psql -p "$PROXY_PORT" -d admin -qAtc 'SHOW STATS' | awk -F'|' '$1=="clients" {print $2}')
wait "$IDLE_PID" || true
echo "proxy RSS before: ${before} KiB, with ${clients:-?} clients: ${peak} KiB"
awk -v b="$before" -v p="$peak" -v n="${clients:-$IDLE}" 'BEGIN { if (n > 0) printf "per idle client: %.1f KiB\n", (p - b) / n }'
