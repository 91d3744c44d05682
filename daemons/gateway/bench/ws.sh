#!/usr/bin/env bash
# WebSocket benchmark (issue 10). Not a timed test: run it by hand and record the numbers
# in daemons/gateway/BENCHMARKS.md.
#
#   daemons/gateway/bench/ws.sh                        # 10 000 connections, 200 writes/s, 30 s
#   CONNS=2000 RATE=100 SECS=10 daemons/gateway/bench/ws.sh
#
# Starts the bench stack (examples/bench_stack.rs --direct --notify: PostgreSQL, Redis,
# tansu, MailDev, auth, notify and one gateway, release builds, loopback), then runs
# examples/ws_bench.rs: CONNS authenticated idle WebSocket connections (memory per
# connection = gateway RSS growth / CONNS), then RATE task writes per second for SECS
# seconds, each pushed to the writer's own connection; latency is from the event's
# occurred_at to the push arriving.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
export CONNS=${CONNS:-10000} RATE=${RATE:-200} SECS=${SECS:-30}
# PROFILE=debug reuses the debug build (quick, but numbers are not representative).
PROFILE=${PROFILE:-release}
profile_flag=--release
[ "$PROFILE" = debug ] && profile_flag=

# 10 000 client sockets + 10 000 server sockets (same process tree): raise the fd limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "== fd limit $(ulimit -n)" >&2

echo "== building $PROFILE binaries" >&2
(cd "$root" && cargo build $profile_flag -q -p taskflow-gateway -p taskflow-auth -p taskflow-notify \
  && cargo build $profile_flag -q -p taskflow-gateway --example bench_stack --example ws_bench)
export TASKFLOW_BIN_DIR="$root/target/$PROFILE"

work=$(mktemp -d)
stack_pid=
cleanup() {
  [ -n "$stack_pid" ] && kill -TERM "$stack_pid" 2>/dev/null && wait "$stack_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting the bench stack (direct, with notify)" >&2
"$root/target/$PROFILE/examples/bench_stack" "$work/bench.env" --direct --notify </dev/null >"$work/stack.log" 2>&1 &
stack_pid=$!
for _ in $(seq 1 900); do [ -s "$work/bench.env" ] && break; sleep 0.2; done
[ -s "$work/bench.env" ] || { cat "$work/stack.log" >&2; echo "bench stack did not start" >&2; exit 1; }
set -a
# shellcheck disable=SC1091
. "$work/bench.env"
set +a

echo "== $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); CONNS=$CONNS RATE=$RATE SECS=$SECS" >&2
"$root/target/$PROFILE/examples/ws_bench"
