#!/usr/bin/env bash
# Instructions per request, counted by callgrind: the machine's load does
# not change them, so two builds compare to a fraction of a percent where
# the load test's ratios vary by ±10%. Runs the gateway of the load test
# (benches/load/tollgate.toml) under valgrind twice per request kind, for
# LOW and HIGH sequential requests on one keep-alive connection, and
# divides the difference in instructions by the difference in requests,
# so start-up and shutdown cancel out.
#
#   TOLLGATE_BIN=target/release/tollgate benches/load/instructions.sh
#   EXTRA_TOML='[tracing]\notlp_endpoint = "http://127.0.0.1:18081"' …
#
# Environment (defaults in brackets): TOLLGATE_BIN (else `cargo build
# --release`), LOW [100], HIGH [500], EXTRA_TOML (appended to the config,
# `\n` for newlines), MOCK_PORT [18081], TOLLGATE_PORT [18089],
# TOLLGATE_LOG [warn] (the gateway's RUST_LOG: `info` adds the access log).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LOW=${LOW:-100}
HIGH=${HIGH:-500}
export MOCK_PORT=${MOCK_PORT:-18081}
TOLLGATE_PORT=${TOLLGATE_PORT:-18089}
# Unused here, but the generated configs name them.
export PROXY_PORT=${PROXY_PORT:-18082} HOLD_PORT=${HOLD_PORT:-18084}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ -z "${TOLLGATE_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --bin tollgate)
    TOLLGATE_BIN="$ROOT/target/release/tollgate"
fi

WORK=$(mktemp -d /tmp/tollgate-instructions.XXXXXX)
NGINX_PID=""
cleanup() {
    [ -z "$NGINX_PID" ] || kill "$NGINX_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

export TOLLGATE_BENCH_KEY="tg-bench-$RANDOM$RANDOM"
python3 "$HERE/loadtool.py" gen "$WORK" >/dev/null
printf '%b\n' "${EXTRA_TOML:-}" >>"$WORK/tollgate.toml"
"$TOLLGATE_BIN" check --config "$WORK/tollgate.toml" >/dev/null
"$NGINX" -c "$WORK/mock-nginx.conf" -p "$WORK" &
NGINX_PID=$!

. "$HERE/common.sh"
wait_port "$MOCK_PORT" "$NGINX_PID" "mock nginx"

# Instructions the gateway ran, all threads, serving n requests of `body`
# (the load tool adds n/10 to warm up).
count() { # body n
    local out="$WORK/callgrind.out"
    rm -f "$out" "$WORK/ledger"/* 2>/dev/null || true
    RUST_LOG=${TOLLGATE_LOG:-warn} valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$TOLLGATE_BIN" serve --config "$WORK/tollgate.toml" \
        --listen "127.0.0.1:$TOLLGATE_PORT" 2>"$WORK/valgrind.log" &
    local pid=$!
    WAIT_S=30 wait_port "$TOLLGATE_PORT" "$pid" "tollgate under valgrind"
    python3 "$HERE/loadtool.py" ttfb "http://127.0.0.1:$TOLLGATE_PORT/v1/chat/completions" \
        "$WORK/$1" "$2" | grep -q '"errors": 0' || { echo "requests failed" >&2; exit 1; }
    kill -TERM "$pid"
    wait "$pid" || true
    awk '/^(summary|totals):/ { print $2; exit }' "$out"
}

for kind in nonstream stream; do
    low=$(count "body-$kind.json" "$LOW")
    high=$(count "body-$kind.json" "$HIGH")
    python3 - "$kind" "$low" "$high" "$LOW" "$HIGH" <<'PY'
import json, sys
kind, low, high, n_low, n_high = sys.argv[1], *map(int, sys.argv[2:])
requests = (n_high + n_high // 10) - (n_low + n_low // 10)
print("RESULT " + json.dumps({"kind": kind, "instructions_per_request": round((high - low) / requests)}))
PY
done
