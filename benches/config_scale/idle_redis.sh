#!/usr/bin/env bash
# The CPU one Redis-mode replica, idle or under light traffic, and its
# Redis take with many budgeted keys: the config-scale bench's config (100,000 keys, every
# tenth with a daily budget) with `[state] backend = "redis"`, on a Redis
# of its own; CPU over 10 s from 20 s after start, for each binary given
# in turn, ROUNDS times (2 by default).
#
#     benches/config_scale/idle_redis.sh BIN [BIN...]
#
# BUDGETS=none takes the budgets out, BUDGETS=all gives every key one.
# RATE=N sends N requests a second from 12 s to 30 s after start, each
# of a key with a budget picked at random (20 output tokens at most), so
# that the replica is not idle. Needs python3 and redis-server.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
port=${PORT:-16399}
python3 "$here/generate.py" "$work/scale.toml"
case "${BUDGETS:-tenth}" in
  none) sed -i '/^budget_daily_usd/d' "$work/scale.toml" ;;
  all) sed -i -e '/^budget_daily_usd/d' -e '/^models = \[/a budget_daily_usd = 25.0' "$work/scale.toml" ;;
esac
cat >>"$work/scale.toml" <<TOML
[state]
backend = "redis"
url = "redis://127.0.0.1:$port/0"

[ledger]
data_dir = "$work/data"
TOML
export TOLLGATE_ADMIN_TOKEN=admintokenadmintoken1234
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
redis_pid= gateway_pid= client_pid=
stop() {
  for pid in $gateway_pid $redis_pid; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  done
  gateway_pid= redis_pid=
}
trap 'stop; rm -rf "$work"' EXIT
for round in $(seq "${ROUNDS:-2}"); do
  for bin in "$@"; do
    rm -rf "$work/data" && mkdir "$work/data"
    redis-server --port "$port" --save '' --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
    redis_pid=$!
    sleep 0.5
    RUST_LOG=warn "$bin" serve --config "$work/scale.toml" >"$work/gateway.log" 2>&1 &
    gateway_pid=$!
    sleep 12
    if [ -n "${RATE:-}" ]; then
      python3 - "$RATE" <<'PY' &
import json, random, sys, threading, time, urllib.request

def ask():
    k = 10 * random.randrange(10_000)
    body = {"model": f"model-{k % 200}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    headers = {"authorization": f"Bearer key-{k}", "content-type": "application/json"}
    url = "http://127.0.0.1:18090/v1/chat/completions"
    try:
        urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), headers), timeout=10).read()
    except OSError as e:
        print("request failed:", e, file=sys.stderr)

end = time.time() + 18
while time.time() < end:
    threading.Thread(target=ask, daemon=True).start()
    time.sleep(1 / float(sys.argv[1]))
PY
      client_pid=$!
    fi
    sleep 8
    g0=$(ticks $gateway_pid) r0=$(ticks $redis_pid)
    sleep 10
    g1=$(ticks $gateway_pid) r1=$(ticks $redis_pid)
    awk -v b="$bin" -v r="$round" -v g=$((g1 - g0)) -v s=$((r1 - r0)) -v hz="$hz" 'BEGIN {
      printf "round %d %s: gateway %.1f%% of a core, redis %.1f%%\n", r, b, g * 10 / hz, s * 10 / hz }'
    if [ -n "${client_pid:-}" ]; then wait "$client_pid"; fi
    client_pid=
    stop
  done
done
