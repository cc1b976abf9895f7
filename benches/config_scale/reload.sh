#!/usr/bin/env bash
# Reloads of the 100,000-key config: serves it with BIN, then N times
# changes the file (a comment appended) and asks for a reload from it with
# `POST /admin/reload`; prints each reload's wall time, the gateway's CPU
# time (user + system) over it, and the gateway's peak resident memory
# (VmHWM, reset before each reload).
#
#     benches/config_scale/reload.sh BIN [N]    (SETTLE: seconds idle first, 20)
#
# The file is edited through a hard link in another directory, so the
# gateway's watch of its own directory does not reload it a second time
# while the measured reload runs. Port 18090 (the generated config's).
set -euo pipefail
BIN=$1
N=${2:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
mkdir "$WORK/served" "$WORK/edit"
python3 "$HERE/generate.py" "$WORK/served/scale.toml"
ln "$WORK/served/scale.toml" "$WORK/edit/scale.toml"
export TOLLGATE_ADMIN_TOKEN=bench-admin
"$BIN" serve --config "$WORK/served/scale.toml" 2>"$WORK/serve.log" &
PID=$!
for _ in $(seq 200); do curl -sf http://127.0.0.1:18090/healthz >/dev/null && break; sleep 0.3; done
sleep "${SETTLE:-20}"
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
memory() { grep -E 'VmHWM|VmRSS' "/proc/$PID/status" | tr -s ' \t' ' ' | tr '\n' ' '; }
echo "idle: $(memory)"
tick=$(getconf CLK_TCK)
for i in $(seq "$N"); do
    echo "# reload $i" >>"$WORK/edit/scale.toml"
    echo 5 >"/proc/$PID/clear_refs"
    c0=$(cpu)
    t0=$(date +%s.%N)
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST \
        -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN" http://127.0.0.1:18090/admin/reload)
    t1=$(date +%s.%N)
    c1=$(cpu)
    sleep 0.5
    printf 'reload %s: HTTP %s, wall %.2f s, CPU %.2f s, %s\n' "$i" "$code" \
        "$(echo "$t1 - $t0" | bc)" "$(echo "($c1 - $c0) / $tick" | bc -l)" "$(memory)"
done
