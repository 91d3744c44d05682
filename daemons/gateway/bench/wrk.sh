#!/usr/bin/env bash
# Gateway benchmark with wrk (issue 4). Not a timed test: run it by hand and record the
# numbers in daemons/gateway/BENCHMARKS.md.
#
#   daemons/gateway/bench/wrk.sh            # through the shard proxy over 3 shards
#   daemons/gateway/bench/wrk.sh --direct   # gateway on one PostgreSQL shard directly
#
# Env: DURATION (default 10s), THREADS (2), CONNS (32), POST_RATE (500 req/s target for
# the paced POST run), POST_CONNS (10), ROUNDS (2: the five runs are repeated, ceiling and
# gateway interleaved, and the median of each is reported — a shared machine is noisy),
# BENCH_RATE_LIMIT=off (measure without rate limits, to see their cost).
#
# One run measures, on loopback:
#   1. ceiling   — a bare hyper "hello" binary (examples/hello.rs)
#   2. get       — GET /tasks/{id}, a cache hit (JWT check + in-process rate limit +
#                  in-process cache; no Redis round trip)
#   3. list      — GET /tasks?performer_id=2&limit=50
#   4. post      — POST /tasks, unpaced (max throughput)
#   5. post@rate — POST /tasks paced to ~POST_RATE req/s (p99 target ≤ 25 ms)
# and prints req/s, p50, p99 and the ratio to the ceiling.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
POST_RATE=${POST_RATE:-500}
POST_CONNS=${POST_CONNS:-10}
ROUNDS=${ROUNDS:-2}
mode_arg=${1:-}

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }

echo "== building release binaries" >&2
crates=(-p taskflow-gateway -p taskflow-auth)
[ "$mode_arg" = "--direct" ] || crates+=(-p taskflow-shard-proxy)
(cd "$root" && cargo build --release -q "${crates[@]}" \
  && cargo build --release -q -p taskflow-gateway --example hello --example bench_stack)
export TASKFLOW_BIN_DIR="$root/target/release"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

hello_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$root/target/release/examples/hello" "127.0.0.1:$hello_port" >/dev/null &
pids+=($!)

echo "== starting the bench stack ${mode_arg:-(proxy, 3 shards)}" >&2
"$root/target/release/examples/bench_stack" "$work/bench.env" $mode_arg </dev/null >"$work/stack.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do [ -s "$work/bench.env" ] && break; sleep 0.2; done
[ -s "$work/bench.env" ] || { cat "$work/stack.log" >&2; echo "bench stack did not start" >&2; exit 1; }
# shellcheck disable=SC1091
. "$work/bench.env"

cat >"$work/auth.lua" <<EOF
wrk.headers["Authorization"] = "Bearer $TOKEN"
EOF
cat >"$work/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"title":"bench task","description":"created by wrk","performer_id":$PERFORMER_ID,"observer_ids":[1]}'
EOF
# Paced POST: each connection waits so that POST_CONNS connections together offer about
# POST_RATE requests per second (plain wrk has no -R; wrk2 would be exact).
delay_ms=$(( POST_CONNS * 1000 / POST_RATE ))
cat "$work/post.lua" >"$work/post_paced.lua"
cat >>"$work/post_paced.lua" <<EOF
function delay() return $delay_ms end
EOF

results="$work/results.txt"
: >"$results"
run() { # name, extra wrk args..., url
  local name=$1; shift
  local out="$work/$name.$round.out"
  wrk --latency -d "$DURATION" "$@" >"$out" 2>&1 || { cat "$out" >&2; return 1; }
  local rps p50 p99 non2xx
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  p50=$(awk '$1=="50%" {print $2}' "$out")
  p99=$(awk '$1=="99%" {print $2}' "$out")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$out")
  echo "$round $name $rps $p50 $p99 ${non2xx:-0}" >>"$results"
  echo "   round $round $name: $rps req/s, p99 $p99" >&2
}

echo "== wrk runs (${DURATION} each, ${THREADS} threads, ${CONNS} connections, ${ROUNDS} rounds)" >&2
for round in $(seq 1 "$ROUNDS"); do
  run ceiling   -t "$THREADS" -c "$CONNS" "http://127.0.0.1:$hello_port/"
  run get       -t "$THREADS" -c "$CONNS" -s "$work/auth.lua" "$BASE/tasks/$TASK_ID"
  run list      -t "$THREADS" -c "$CONNS" -s "$work/auth.lua" "$BASE/tasks?performer_id=$PERFORMER_ID&limit=50"
  run post      -t "$THREADS" -c "$CONNS" -s "$work/post.lua" "$BASE/tasks"
  run post@rate -t "$THREADS" -c "$POST_CONNS" -s "$work/post_paced.lua" "$BASE/tasks"
done

# Per round: each run's ratio to that round's ceiling. Then the median over rounds of
# req/s, p50, p99 and the ratio (wrk prints latencies with units; they are converted to ms).
python3 - "$results" "$MODE" "$(nproc)" "wrk -t$THREADS -c$CONNS -d$DURATION (post@rate: -c$POST_CONNS, ~$POST_RATE req/s offered)" <<'PY'
import statistics, sys
path, mode, cpus, how = sys.argv[1:5]
def ms(v):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float("nan")
rows = [l.split() for l in open(path) if l.strip()]
ceil = {r[0]: float(r[2]) for r in rows if r[1] == "ceiling"}
order = ["ceiling", "get", "list", "post", "post@rate"]
print(f"mode: {mode} | {cpus} CPUs | {how} | {len(ceil)} rounds, medians")
print(f"{'run':<10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'x ceiling':>10} {'non-2xx':>8}   per round (req/s, x)")
for name in order:
    rs = [r for r in rows if r[1] == name]
    if not rs:
        continue
    rps = [float(r[2]) for r in rs]
    ratio = [float(r[2]) / ceil[r[0]] for r in rs]
    per = ", ".join(f"{float(r[2]):.0f} ({float(r[2]) / ceil[r[0]]:.2f})" for r in rs)
    print(f"{name:<10} {statistics.median(rps):>10.0f} {statistics.median(ms(r[3]) for r in rs):>8.2f} "
          f"{statistics.median(ms(r[4]) for r in rs):>8.2f} {statistics.median(ratio):>10.2f} "
          f"{sum(int(r[5]) for r in rs):>8}   {per}")
PY
