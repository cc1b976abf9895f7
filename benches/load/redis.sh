#!/usr/bin/env bash
# tollgate in Redis mode against tollgate in memory mode, both with the
# same key limits and budget, so that every request is admitted against
# them: the first through one script call to Redis, the second in
# process. Redis runs on the load core, as a fleet's Redis runs on a
# machine of its own. See benches/load/README.md; figures in
# docs/replicas.md.
#
#   benches/load/redis.sh                # ~3 minutes with the defaults
#
# Environment (defaults in brackets): ROUNDS [3], DURATION [10s],
# LAT_DURATION [DURATION], WARMUP [2s], CONNECTIONS [32], PROXY_CORE [0],
# LOAD_CORE [1], TOLLGATE_BIN (else `cargo build --release`), NO_INSTALL=1,
# MOCK_PORT [18081] MEMORY_PORT [18086] REDIS_MODE_PORT [18087]
# REDIS_PORT [18088].
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
LAT_DURATION=${LAT_DURATION:-$DURATION}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-32}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
export MOCK_PORT=${MOCK_PORT:-18081}
MEMORY_PORT=${MEMORY_PORT:-18086}
REDIS_MODE_PORT=${REDIS_MODE_PORT:-18087}
REDIS_PORT=${REDIS_PORT:-18088}
# Unused here, but the generated configs name them.
export PROXY_PORT=${PROXY_PORT:-18082} HOLD_PORT=${HOLD_PORT:-18084}

log() { printf '\n== %s\n' "$*" >&2; }

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
    [ -z "${NO_INSTALL:-}" ] || { echo "missing: ${need[*]} (NO_INSTALL is set)" >&2; exit 1; }
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y "${need[@]}" || { $sudo apt-get update && $sudo apt-get install -y "${need[@]}"; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ -z "${TOLLGATE_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --bin tollgate)
    TOLLGATE_BIN="$ROOT/target/release/tollgate"
fi

WORK=$(mktemp -d /tmp/tollgate-redis-load.XXXXXX)
mkdir "$WORK/logs" "$WORK/redis"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export TOLLGATE_BENCH_KEY="tg-bench-$RANDOM$RANDOM"
python3 "$HERE/loadtool.py" gen "$WORK"
# The bench key with limits and a budget far above what the run uses.
limited() {
    sed 's/^key_env = "TOLLGATE_BENCH_KEY"$/key_env = "TOLLGATE_BENCH_KEY"\nrpm = 100000000\ntpm = 1000000000\nbudget_daily_usd = 1000000/' "$WORK/tollgate.toml"
}
limited | sed "s|$WORK/ledger\"|$WORK/ledger-memory\"|" >"$WORK/memory.toml"
{
    limited | sed "s|$WORK/ledger\"|$WORK/ledger-redis\"|"
    printf '\n[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:%s/0"\n' "$REDIS_PORT"
} >"$WORK/redis.toml"
"$TOLLGATE_BIN" check --config "$WORK/memory.toml" >/dev/null
"$TOLLGATE_BIN" check --config "$WORK/redis.toml" >/dev/null

. "$HERE/common.sh"

taskset -c "$LOAD_CORE" "$NGINX" -c "$WORK/mock-nginx.conf" -p "$WORK" &
PIDS+=($!)
taskset -c "$LOAD_CORE" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK/redis" \
    --save "" --appendonly no >"$WORK/logs/redis.log" 2>&1 &
PIDS+=($!)
for mode in memory redis; do
    port=$MEMORY_PORT
    [ $mode = redis ] && port=$REDIS_MODE_PORT
    RUST_LOG=info taskset -c "$PROXY_CORE" "$TOLLGATE_BIN" serve --config "$WORK/$mode.toml" \
        --listen "127.0.0.1:$port" 2>"$WORK/logs/$mode.log" &
    PIDS+=($!)
    eval "PID_$mode=$!"
done
REDIS_PID=${PIDS[1]}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
seconds() { awk -v t="$1" -v hz="$HZ" 'BEGIN { printf "%.3f", t / hz }'; }
wait_port "$MOCK_PORT" "${PIDS[0]}" "mock nginx"
wait_port "$REDIS_PORT" "$REDIS_PID" redis
wait_port "$MEMORY_PORT" "$PID_memory" "tollgate (memory mode)"
wait_port "$REDIS_MODE_PORT" "$PID_redis" "tollgate (Redis mode)"

run_wrk() { # connections duration url
    BODY_FILE="$WORK/body-nonstream.json" taskset -c "$LOAD_CORE" wrk -t1 -c"$1" -d"$2" --timeout 10s \
        -s "$HERE/post.lua" "$3" | grep '^RESULT ' | sed 's/^RESULT //'
}
RESULTS="$WORK/results.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    for mode in memory redis; do
        port=$MEMORY_PORT
        [ $mode = redis ] && port=$REDIS_MODE_PORT
        u="http://127.0.0.1:$port/v1/chat/completions"
        log "round $round/$ROUNDS: $mode"
        w=$(run_wrk "$CONNECTIONS" "$WARMUP" "$u")
        pid_var="PID_$mode"
        g0=$(ticks "${!pid_var}")
        r0=$(ticks "$REDIS_PID")
        r=$(run_wrk "$CONNECTIONS" "$DURATION" "$u")
        g1=$(ticks "${!pid_var}")
        r1=$(ticks "$REDIS_PID")
        l=$(run_wrk 1 "$LAT_DURATION" "$u")
        echo "  $CONNECTIONS conns: $r" >&2
        echo "  1 conn: $l" >&2
        printf '{"mode":"%s","warmup":%s,"rps":%s,"lat":%s,"gateway_cpu_s":%s,"redis_cpu_s":%s}\n' \
            "$mode" "$w" "$r" "$l" "$(seconds $((g1 - g0)))" "$(seconds $((r1 - r0)))" >>"$RESULTS"
    done
done
if grep -q 'does not answer' "$WORK/logs/redis.log"; then
    echo "the Redis-mode gateway counted Redis away during the run; its figures are not Redis mode's:" >&2
    grep 'does not answer' "$WORK/logs/redis.log" >&2
    exit 1
fi

# What Redis did for the Redis-mode gateway: script calls, and their cost
# on Redis's core.
redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' | grep -E '^cmdstat_(evalsha|eval):' >"$WORK/redis-stats.txt" || true
# Where the Redis-mode gateway decided its admissions: from credit, or in
# a script call.
curl -sf "http://127.0.0.1:$REDIS_MODE_PORT/metrics" | grep '^tollgate_state_admissions_total' >"$WORK/admissions.txt" || true

python3 - "$RESULTS" "$WORK/redis-stats.txt" "$WORK/admissions.txt" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(mode, kind, field):
    return statistics.median(r[kind][field] for r in rows if r["mode"] == mode)
for r in rows:
    assert r["rps"]["errors"] == 0 and r["lat"]["errors"] == 0, r
m_rps, r_rps = med("memory", "rps", "rps"), med("redis", "rps", "rps")
m_p50, r_p50 = med("memory", "lat", "p50_us"), med("redis", "lat", "p50_us")
def cpu_us(mode, field):
    # CPU seconds over requests served in the 32-connection runs.
    return statistics.median(
        r[field] / r["rps"]["requests"] * 1e6 for r in rows if r["mode"] == mode)
ratios = [r["rps"]["rps"] / m["rps"]["rps"]
          for m, r in zip([x for x in rows if x["mode"] == "memory"], [x for x in rows if x["mode"] == "redis"])]
print(f"| mode | requests/s (32 conns) | p50, 1 conn | gateway CPU per request | Redis CPU per request |")
print(f"| --- | --- | --- | --- | --- |")
print(f"| memory | {m_rps:.0f} | {m_p50:.0f} µs | {cpu_us('memory', 'gateway_cpu_s'):.0f} µs | — |")
print(f"| redis | {r_rps:.0f} ({r_rps / m_rps:.2f}×; per round {min(ratios):.2f}–{max(ratios):.2f}×) | {r_p50:.0f} µs (+{r_p50 - m_p50:.0f} µs) "
      f"| {cpu_us('redis', 'gateway_cpu_s'):.0f} µs | {cpu_us('redis', 'redis_cpu_s'):.0f} µs |")
requests = sum(r[kind]["requests"] for r in rows if r["mode"] == "redis" for kind in ("warmup", "rps", "lat"))
for line in open(sys.argv[2]):
    name, fields = line.strip().split(":", 1)
    stats = dict(f.split("=") for f in fields.split(","))
    calls = int(stats["calls"])
    print(f"\nRedis {name[8:]}: {calls} calls, {calls / requests:.4f} a request, "
          f"{float(stats['usec_per_call']):.1f} µs each on Redis's core")
admitted = {}
for line in open(sys.argv[3]):
    series, value = line.rsplit(" ", 1)
    admitted[series.split('"')[1]] = float(value)
if admitted:
    total = sum(admitted.values())
    print("\nAdmissions: " + ", ".join(
        f"{n:.0f} from {source} ({n / total:.2%})" for source, n in sorted(admitted.items())))
PY
