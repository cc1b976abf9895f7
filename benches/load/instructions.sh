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
#   TOLLGATE_BIN=new TOLLGATE_BIN_B=old benches/load/instructions.sh
#   COUNT_NGINX=1 TOLLGATE_LOG=info benches/load/instructions.sh
#
# With TOLLGATE_BIN_B, both builds are counted, and each kind's functions
# whose own instructions per request differ most between them are listed:
# what runs on a timer (the ledger's writes, engine scrapes, the
# allocator's upkeep) moves the totals by up to ±1.5k from one pass to the
# next, and shows there as such.
#
# With COUNT_NGINX=1, the load test's proxy nginx is counted too (one
# process; its access log on unless ACCESS_LOG=0, so compare it with
# TOLLGATE_LOG=info): the floor, a proxy that only relays the bytes.
#
# Environment (defaults in brackets): TOLLGATE_BIN (else `cargo build
# --release`), TOLLGATE_BIN_B (none), LOW [100], HIGH [500], EXTRA_TOML
# (appended to the config, `\n` for newlines), MOCK_PORT [18081],
# TOLLGATE_PORT [18089], TOLLGATE_LOG [warn] (the gateway's RUST_LOG:
# `info` adds the access log), TOP [20] (functions listed), COUNT_NGINX [0].
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LOW=${LOW:-100}
HIGH=${HIGH:-500}
export MOCK_PORT=${MOCK_PORT:-18081}
TOLLGATE_PORT=${TOLLGATE_PORT:-18089}
export PROXY_PORT=${PROXY_PORT:-18082}
# Unused here, but the generated configs name it.
export HOLD_PORT=${HOLD_PORT:-18084}
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

# Instructions `bin` ran, all threads, serving n requests of `body` to
# `url` (the load tool adds n/10 to warm up); the profile stays in `out`.
# `bin` is a gateway, or `nginx` for the proxy nginx.
count() { # bin body n out
    rm -f "$4" "$WORK/ledger"/* 2>/dev/null || true
    local port=$TOLLGATE_PORT path=/v1/chat/completions stop=TERM
    if [ "$1" = nginx ]; then
        # QUIT: nginx's graceful stop, after which callgrind writes.
        port=$PROXY_PORT stop=QUIT
        [ "$2" != body-stream.json ] || path=/stream/v1/chat/completions
        valgrind --tool=callgrind --callgrind-out-file="$4" \
            "$NGINX" -g 'master_process off;' -c "$WORK/proxy-nginx.conf" -p "$WORK" \
            2>"$WORK/valgrind.log" &
    else
        RUST_LOG=${TOLLGATE_LOG:-warn} valgrind --tool=callgrind --callgrind-out-file="$4" \
            "$1" serve --config "$WORK/tollgate.toml" \
            --listen "127.0.0.1:$TOLLGATE_PORT" 2>"$WORK/valgrind.log" &
    fi
    local pid=$!
    WAIT_S=30 wait_port "$port" "$pid" "$1 under valgrind"
    python3 "$HERE/loadtool.py" ttfb "http://127.0.0.1:$port$path" \
        "$WORK/$2" "$3" | grep -q '"errors": 0' || { echo "requests failed" >&2; exit 1; }
    kill -"$stop" "$pid"
    wait "$pid" || true
    awk '/^(summary|totals):/ { print $2; exit }' "$4"
}

BUILDS=(a)
[ -z "${TOLLGATE_BIN_B:-}" ] || BUILDS+=(b)
[ "${COUNT_NGINX:-0}" = 0 ] || BUILDS+=(nginx)
for kind in nonstream stream; do
    for build in "${BUILDS[@]}"; do
        case $build in
            a) bin=$TOLLGATE_BIN ;;
            b) bin=$TOLLGATE_BIN_B ;;
            nginx) bin=nginx ;;
        esac
        low=$(count "$bin" "body-$kind.json" "$LOW" "$WORK/$build-$kind-low.out")
        high=$(count "$bin" "body-$kind.json" "$HIGH" "$WORK/$build-$kind-high.out")
        python3 - "$kind" "$bin" "$low" "$high" "$LOW" "$HIGH" <<'PY'
import json, sys
kind, build = sys.argv[1:3]
low, high, n_low, n_high = map(int, sys.argv[3:])
requests = (n_high + n_high // 10) - (n_low + n_low // 10)
print("RESULT " + json.dumps({"kind": kind, "build": build, "instructions_per_request": round((high - low) / requests)}))
PY
    done
    if [ -n "${TOLLGATE_BIN_B:-}" ]; then
        echo "$kind: own instructions per request, by function (b is $TOLLGATE_BIN_B)"
        python3 "$HERE/loadtool.py" callgrind-diff "$LOW" "$HIGH" "${TOP:-20}" \
            "$WORK/a-$kind-low.out" "$WORK/a-$kind-high.out" \
            "$WORK/b-$kind-low.out" "$WORK/b-$kind-high.out"
    fi
done
