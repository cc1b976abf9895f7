#!/usr/bin/env bash
# tollgate's load test against nginx. See benches/load/README.md; the
# latest figures are in docs/performance.md.
#
#   benches/load/run.sh                  # ~8 minutes with the defaults
#   DURATION=30s benches/load/run.sh     # the figures for a report
#
# Environment (defaults in brackets):
#   ROUNDS [3]            rounds; each measures every target in turn, and the
#                         report gives medians and each ratio's spread
#   DURATION [10s]        each wrk throughput run (32 connections)
#   LAT_DURATION [DURATION] each wrk latency run (1 connection)
#   WARMUP [2s]           wrk warm-up before each target's runs
#   CONNECTIONS [32]      connections for the throughput runs
#   TTFB_REQUESTS [2000]  sequential streamed requests for time to first chunk
#   STREAMS [10000]       streams held open for the memory test, over HTTP/1.1
#                         and over HTTP/2 (0 skips it)
#   PROXY_CORE [0]        the core nginx-as-proxy and tollgate run on
#   LOAD_CORE [1]         the core the load generators and mocks run on
#   MOCK_PORT [18081] PROXY_PORT [18082] TOLLGATE_PORT [18083]
#   HOLD_PORT [18084] HOLD_TOLLGATE_PORT [18085]
#   TOLLGATE_BIN          use this binary instead of the one the image ships
#                         (deploy/release/build.sh; TOLLGATE_BIN=
#                         target/release/tollgate for plain `cargo build
#                         --release`)
#   TOLLGATE_BIN_B        a second build to compare with the first: measured
#                         as the target `tollgate-b` in every round, the two
#                         taking turns in alternating order, and the report
#                         gives its figures as ratios to the first's (the
#                         open-streams test runs the first only)
#   TOLLGATE_B_PORT [18086]
#   ACCESS_LOG [1]        1: both proxies log every request, as they do by
#                         default (nginx's access log; tollgate's `request
#                         done` line at info, both to a file); 0: neither
#                         (nginx `access_log off`; tollgate
#                         RUST_LOG=info,tollgate::metering=warn)
#   TOLLGATE_LOG          RUST_LOG for the gateway (overrides ACCESS_LOG's)
#   NO_INSTALL=1          never apt-get; fail if a tool is missing
#   PERF=1                record `perf record --call-graph dwarf` of tollgate
#                         during its two throughput runs, into PERF_DIR
#                         [target/load-perf]
#   OUT [benches/load/results.md]  where the table is written; the figures
#                         it is made from go beside it, as .jsonl
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
LAT_DURATION=${LAT_DURATION:-$DURATION}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-32}
TTFB_REQUESTS=${TTFB_REQUESTS:-2000}
STREAMS=${STREAMS:-10000}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
export MOCK_PORT=${MOCK_PORT:-18081}
export PROXY_PORT=${PROXY_PORT:-18082}
TOLLGATE_PORT=${TOLLGATE_PORT:-18083}
export HOLD_PORT=${HOLD_PORT:-18084}
HOLD_TOLLGATE_PORT=${HOLD_TOLLGATE_PORT:-18085}
TOLLGATE_B_PORT=${TOLLGATE_B_PORT:-18086}
OUT=${OUT:-$HERE/results.md}
export ACCESS_LOG=${ACCESS_LOG:-1}
if [ "$ACCESS_LOG" = 0 ]; then
    TOLLGATE_LOG=${TOLLGATE_LOG:-info,tollgate::metering=warn}
else
    TOLLGATE_LOG=${TOLLGATE_LOG:-info}
fi

log() { printf '\n== %s\n' "$*" >&2; }

# ------------------------------------------------------------------ tools

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
if [ -z "${TOLLGATE_BIN:-}" ]; then command -v llvm-bolt-19 >/dev/null || need+=(bolt-19 libbolt-19-dev); fi
if [ "$STREAMS" -gt 0 ]; then command -v h2load >/dev/null || need+=(nghttp2-client); fi
if [ -n "${PERF:-}" ]; then command -v perf >/dev/null || need+=(linux-perf); fi
if [ ${#need[@]} -gt 0 ]; then
    if [ -n "${NO_INSTALL:-}" ]; then
        echo "missing: ${need[*]} (NO_INSTALL is set)" >&2
        exit 1
    fi
    log "installing ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y "${need[@]}" || { $sudo apt-get update && $sudo apt-get install -y "${need[@]}"; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ "$(nproc --all)" -lt 2 ]; then
    echo "needs at least 2 cores (proxy on core $PROXY_CORE, load on core $LOAD_CORE)" >&2
    exit 1
fi

if [ -z "${TOLLGATE_BIN:-}" ]; then
    log "building tollgate as the image does (deploy/release/build.sh)"
    "$ROOT/deploy/release/build.sh"
    TOLLGATE_BIN="$ROOT/target/release-bolt/tollgate"
fi

# Every stream held through the gateway costs it two descriptors.
hard=$(ulimit -Hn)
[ "$hard" != unlimited ] || hard=1048576
ulimit -n "$hard" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)

# ------------------------------------------------------------------ processes

WORK=$(mktemp -d /tmp/tollgate-load.XXXXXX)
# tollgate watches its config's directory for changes: the logs, its own and
# nginx's, go elsewhere, or every line would wake its file watcher on the
# proxies' core.
LOGS=$WORK/logs
mkdir "$LOGS"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ -z "${KEEP_WORK:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export TOLLGATE_BENCH_KEY="tg-bench-$RANDOM$RANDOM"
python3 "$HERE/loadtool.py" gen "$WORK"
"$TOLLGATE_BIN" check --config "$WORK/tollgate.toml"
"$TOLLGATE_BIN" check --config "$WORK/tollgate-hold.toml"
TARGETS=(direct nginx tollgate)
if [ -n "${TOLLGATE_BIN_B:-}" ]; then
    # The same config with a ledger of its own.
    sed "s#$WORK/ledger#$WORK/ledger-b#" "$WORK/tollgate.toml" >"$WORK/tollgate-b.toml"
    "$TOLLGATE_BIN_B" check --config "$WORK/tollgate-b.toml"
    TARGETS+=(tollgate-b)
fi

. "$HERE/common.sh"

for port in "$MOCK_PORT" "$PROXY_PORT" "$TOLLGATE_PORT" "$HOLD_PORT" "$HOLD_TOLLGATE_PORT" "$TOLLGATE_B_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is already in use; stop what listens there or set the *_PORT variables" >&2
        exit 1
    fi
done

log "starting the mock (core $LOAD_CORE), nginx proxy and tollgate (core $PROXY_CORE)"
taskset -c "$LOAD_CORE" "$NGINX" -c "$WORK/mock-nginx.conf" -p "$WORK" &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
taskset -c "$PROXY_CORE" "$NGINX" -c "$WORK/proxy-nginx.conf" -p "$WORK" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
RUST_LOG=$TOLLGATE_LOG taskset -c "$PROXY_CORE" "$TOLLGATE_BIN" serve \
    --config "$WORK/tollgate.toml" --listen "127.0.0.1:$TOLLGATE_PORT" 2>"$LOGS/tollgate.log" &
TOLLGATE_PID=$!
PIDS+=("$TOLLGATE_PID")
TOLLGATE_B_PID=""
if [ -n "${TOLLGATE_BIN_B:-}" ]; then
    RUST_LOG=$TOLLGATE_LOG taskset -c "$PROXY_CORE" "$TOLLGATE_BIN_B" serve \
        --config "$WORK/tollgate-b.toml" --listen "127.0.0.1:$TOLLGATE_B_PORT" 2>"$LOGS/tollgate-b.log" &
    TOLLGATE_B_PID=$!
    PIDS+=("$TOLLGATE_B_PID")
fi
wait_port "$MOCK_PORT" "$MOCK_PID" "mock nginx"
wait_port "$PROXY_PORT" "$PROXY_PID" "proxy nginx"
wait_port "$TOLLGATE_PORT" "$TOLLGATE_PID" tollgate
[ -z "$TOLLGATE_B_PID" ] || wait_port "$TOLLGATE_B_PORT" "$TOLLGATE_B_PID" tollgate-b

url() { # target mode
    local path=/v1/chat/completions
    case $1 in
        direct | nginx) [ "$2" != stream ] || path=/stream/v1/chat/completions ;;
    esac
    case $1 in
        direct) echo "http://127.0.0.1:$MOCK_PORT$path" ;;
        nginx) echo "http://127.0.0.1:$PROXY_PORT$path" ;;
        tollgate) echo "http://127.0.0.1:$TOLLGATE_PORT$path" ;;
        tollgate-b) echo "http://127.0.0.1:$TOLLGATE_B_PORT$path" ;;
    esac
}
body() { echo "$WORK/body-$1.json"; }

log "checking every target answers as it should"
for mode in nonstream stream; do
    for target in "${TARGETS[@]}"; do
        python3 "$HERE/loadtool.py" check-target "$(url $target $mode)" "$(body $mode)" "$mode"
    done
done

# ------------------------------------------------------------------ measure

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"

cpu_ticks() { # core -> "busy total"
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

result_line() { # RESULT-json mode target kind [extra json fields]; in a round when ROUND is set
    local json=${1#RESULT } extra=${5:-}
    [ -n "$extra" ] || extra='{}'
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(mode=sys.argv[2], target=sys.argv[3], kind=sys.argv[4]); r.update(json.loads(sys.argv[5])); r.update({"round": int(sys.argv[6])} if sys.argv[6] else {}); print(json.dumps(r))' \
        "$json" "$2" "$3" "$4" "$extra" "${ROUND:-}" >>"$RESULTS"
}

proc_ticks() { # pids... -> CPU clock ticks (user + system) of them and their children
    local pid total=0 t
    for pid in "$@" $(for p in "$@"; do pgrep -P "$p" || true; done); do
        t=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)

run_wrk() { # connections duration url body
    BODY_FILE=$4 taskset -c "$LOAD_CORE" wrk -t1 -c"$1" -d"$2" --timeout 10s \
        -s "$HERE/post.lua" "$3" | grep '^RESULT ' || { echo "wrk failed against $3" >&2; exit 1; }
}

measure() { # mode target: one round's figures for one target
    local mode=$1 target=$2 u b r watched p0 p1 b0 b1 t0 t1 lb0 lb1 lt0 lt1 busy lbusy proxy_cpu_s perf_pid
    u=$(url "$target" "$mode")
    b=$(body "$mode")
    log "round $ROUND/$ROUNDS, $mode / $target: $u"
    run_wrk "$CONNECTIONS" "$WARMUP" "$u" "$b" >/dev/null

    case $target in
        direct) watched=() ;;
        nginx) watched=("$PROXY_PID") ;;
        tollgate) watched=("$TOLLGATE_PID") ;;
        tollgate-b) watched=("$TOLLGATE_B_PID") ;;
    esac
    p0=$(proc_ticks "${watched[@]}")
    read -r b0 t0 <<<"$(cpu_ticks "$PROXY_CORE")"
    read -r lb0 lt0 <<<"$(cpu_ticks "$LOAD_CORE")"
    perf_pid=""
    if [ -n "${PERF:-}" ] && [ $target = tollgate ]; then
        PERF_DIR=${PERF_DIR:-$ROOT/target/load-perf}
        mkdir -p "$PERF_DIR"
        perf record -F 999 --call-graph dwarf,16384 -p "$TOLLGATE_PID" \
            -o "$PERF_DIR/tollgate-$mode.perf.data" 2>"$WORK/perf-$mode.log" &
        perf_pid=$!
    fi
    r=$(run_wrk "$CONNECTIONS" "$DURATION" "$u" "$b")
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
        echo "  perf: $PERF_DIR/tollgate-$mode.perf.data" \
            "(perf report -i … --children --sort symbol -g none)" >&2
    fi
    read -r b1 t1 <<<"$(cpu_ticks "$PROXY_CORE")"
    p1=$(proc_ticks "${watched[@]}")
    read -r lb1 lt1 <<<"$(cpu_ticks "$LOAD_CORE")"
    busy=$(( 100 * (b1 - b0) / (t1 - t0 > 0 ? t1 - t0 : 1) ))
    lbusy=$(( 100 * (lb1 - lb0) / (lt1 - lt0 > 0 ? lt1 - lt0 : 1) ))
    proxy_cpu_s=$(awk -v t=$((p1 - p0)) -v hz="$HZ" 'BEGIN { printf "%.3f", t / hz }')
    [ ${#watched[@]} -gt 0 ] || proxy_cpu_s=null
    echo "  $CONNECTIONS conns: $r  (core $PROXY_CORE ${busy}% busy, core $LOAD_CORE ${lbusy}%, proxy CPU ${proxy_cpu_s} s)" >&2
    result_line "$r" $mode $target rps "{\"core0_busy\": $busy, \"core1_busy\": $lbusy, \"proxy_cpu_s\": $proxy_cpu_s}"

    r=$(run_wrk 1 "$LAT_DURATION" "$u" "$b")
    echo "  1 conn:   $r" >&2
    result_line "$r" $mode $target lat

    if [ $mode = stream ]; then
        r=$(taskset -c "$LOAD_CORE" python3 "$HERE/loadtool.py" ttfb "$u" "$b" "$TTFB_REQUESTS" | grep '^RESULT ')
        echo "  first chunk: $r" >&2
        result_line "$r" $mode $target ttfb
    fi
}

# Targets take turns within each round, so that drift of the machine over
# minutes shows as spread between rounds rather than as a ratio. Two builds
# swap places every round, so that neither always goes first.
for ROUND in $(seq 1 "$ROUNDS"); do
    order=("${TARGETS[@]}")
    if [ ${#order[@]} -eq 4 ] && [ $((ROUND % 2)) -eq 0 ]; then
        order=(direct nginx tollgate-b tollgate)
    fi
    for mode in nonstream stream; do
        for target in "${order[@]}"; do
            measure "$mode" "$target"
        done
    done
done
ROUND=

# ------------------------------------------------------------------ open streams

if [ "$STREAMS" -gt 0 ]; then
    # Free the cores: the throughput processes are done.
    kill "$TOLLGATE_PID" "$PROXY_PID" "$MOCK_PID" $TOLLGATE_B_PID
    wait "$TOLLGATE_PID" "$PROXY_PID" "$MOCK_PID" $TOLLGATE_B_PID 2>/dev/null || true
    PIDS=()

    max_streams=$(( (FD_LIMIT - 256) / 2 ))
    streams=$STREAMS
    clamped=false
    if [ "$streams" -gt "$max_streams" ]; then
        echo "open-files limit $FD_LIMIT (hard) leaves room for $max_streams streams, not $STREAMS:" \
            "raise it (ulimit -Hn, /etc/security/limits.conf, or a container's nofile) for the full test" >&2
        streams=$max_streams
        clamped=true
    fi
    log "holding $streams streams open through tollgate"
    taskset -c "$LOAD_CORE" python3 "$HERE/loadtool.py" hold-serve "$HOLD_PORT" 2>"$WORK/hold-mock.log" &
    HOLD_PID=$!
    PIDS+=("$HOLD_PID")
    RUST_LOG=$TOLLGATE_LOG taskset -c "$PROXY_CORE" "$TOLLGATE_BIN" serve \
        --config "$WORK/tollgate-hold.toml" --listen "127.0.0.1:$HOLD_TOLLGATE_PORT" 2>"$LOGS/tollgate-hold.log" &
    HOLD_TOLLGATE_PID=$!
    PIDS+=("$HOLD_TOLLGATE_PID")
    wait_port "$HOLD_PORT" "$HOLD_PID" "hold mock"
    wait_port "$HOLD_TOLLGATE_PORT" "$HOLD_TOLLGATE_PID" "tollgate (hold)"
    r=$(taskset -c "$LOAD_CORE" python3 "$HERE/loadtool.py" hold-open \
        "http://127.0.0.1:$HOLD_TOLLGATE_PORT/v1/chat/completions" "$(body hold)" "$streams" "$HOLD_TOLLGATE_PID" |
        grep '^RESULT ')
    echo "  $r" >&2
    result_line "$r" hold tollgate hold \
        "{\"streams_target\": $STREAMS, \"clamped\": $clamped, \"fd_limit\": $FD_LIMIT}"

    # Over HTTP/2 a stream costs tollgate one descriptor, not two: all of
    # STREAMS fit where HTTP/1.1's did not. A fresh gateway, as above.
    kill "$HOLD_TOLLGATE_PID"
    wait "$HOLD_TOLLGATE_PID" 2>/dev/null || true
    log "holding $STREAMS streams open through tollgate over HTTP/2"
    RUST_LOG=$TOLLGATE_LOG taskset -c "$PROXY_CORE" "$TOLLGATE_BIN" serve \
        --config "$WORK/tollgate-hold.toml" --listen "127.0.0.1:$HOLD_TOLLGATE_PORT" 2>"$LOGS/tollgate-hold-h2.log" &
    HOLD_TOLLGATE_PID=$!
    PIDS+=("$HOLD_TOLLGATE_PID")
    wait_port "$HOLD_TOLLGATE_PORT" "$HOLD_TOLLGATE_PID" "tollgate (hold, HTTP/2)"
    r=$(taskset -c "$LOAD_CORE" python3 "$HERE/loadtool.py" hold-h2 \
        "http://127.0.0.1:$HOLD_TOLLGATE_PORT/v1/chat/completions" "$(body hold)" "$STREAMS" "$HOLD_TOLLGATE_PID" |
        grep '^RESULT ')
    echo "  $r" >&2
    result_line "$r" hold tollgate hold-h2
fi

# ------------------------------------------------------------------ report

machine="$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc --all) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
versions="tollgate $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet 2>/dev/null || echo '+dirty'), $( ("$NGINX" -v 2>&1 || true) | sed 's/.*: //'), $( (wrk -v 2>&1 || true) | head -1 | cut -d' ' -f1-2)"
builds="tollgate: $TOLLGATE_BIN${TOLLGATE_BIN_B:+; tollgate-b: $TOLLGATE_BIN_B}"
python3 - "$RESULTS" <<EOF
import json, sys
meta = {
    "mode": "meta", "target": "meta", "kind": "meta",
    "date": "$(date -u +'%Y-%m-%d %H:%M UTC')",
    "machine": "$machine",
    "versions": "$versions",
    "builds": "$builds",
    "command": "ACCESS_LOG=$ACCESS_LOG ROUNDS=$ROUNDS DURATION=$DURATION LAT_DURATION=$LAT_DURATION CONNECTIONS=$CONNECTIONS TTFB_REQUESTS=$TTFB_REQUESTS STREAMS=$STREAMS benches/load/run.sh",
    "durations": "$ROUNDS rounds of: wrk ${DURATION} at $CONNECTIONS connections, ${LAT_DURATION} at 1 connection (after ${WARMUP} warm-up), $TTFB_REQUESTS streamed requests for first-chunk times",
    "logging": "ACCESS_LOG=$ACCESS_LOG (tollgate RUST_LOG=$TOLLGATE_LOG)",
    "pinning": "proxy under test (nginx, 1 worker / tollgate) on core $PROXY_CORE; wrk, the first-chunk client and the mock on core $LOAD_CORE",
}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(meta) + "\n")
EOF
log "results"
cp "$RESULTS" "${OUT%.md}.jsonl"
python3 "$HERE/loadtool.py" report "$RESULTS" "$OUT"
echo
echo "written to $OUT, its figures to ${OUT%.md}.jsonl"
