#!/usr/bin/env bash
# The release binary the container image ships: cargo's release build, its
# machine code then laid out by BOLT for the traffic of
# benches/workload.rs, so that the code a request runs sits together
# rather than spread over 18 MB. Same source, same compiler output, same
# behaviour; docs/performance.md#the-shipped-build says what it changes.
#
#   deploy/release/build.sh            # writes target/release-bolt/tollgate
#
# Needs Debian's bolt-19 and libbolt-19-dev (`apt-get install bolt-19
# libbolt-19-dev`), or LLVM_BOLT naming another llvm-bolt with its
# instrumentation runtime beside it. OUT_DIR [target/release-bolt] is where
# the binary goes; WORKLOAD_ROUNDS and WORKLOAD_CONCURRENCY size the
# training traffic (benches/workload.rs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT_DIR=${OUT_DIR:-$ROOT/target/release-bolt}
if [ -n "${LLVM_BOLT:-}" ]; then
    BOLT=$(command -v "$LLVM_BOLT" || true)
else
    BOLT=$(command -v llvm-bolt-19 || command -v llvm-bolt || true)
fi
[ -n "$BOLT" ] || { echo "needs llvm-bolt: apt-get install bolt-19 libbolt-19-dev" >&2; exit 1; }
# By its real path: llvm-bolt finds its instrumentation runtime in ../lib
# from where it is, and Debian's /usr/bin/llvm-bolt-19 is a link.
BOLT=$(readlink -f "$BOLT")
[ -f "$(dirname "$BOLT")/../lib/libbolt_rt_instr.a" ] ||
    { echo "needs BOLT's instrumentation runtime beside $BOLT: apt-get install libbolt-19-dev" >&2; exit 1; }

WORK=$(mktemp -d /tmp/tollgate-release.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# BOLT moves code, so it needs the linker's relocations kept in the
# binary. A target directory of its own: other RUSTFLAGS would otherwise
# rebuild everything in target/release.
echo "== the release build, with its relocations" >&2
(cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,--emit-relocs" \
    cargo build --locked --release --bin tollgate --target-dir "$ROOT/target/bolt-input")
INPUT=$ROOT/target/bolt-input/release/tollgate

echo "== counting what the workload runs" >&2
"$BOLT" "$INPUT" -o "$WORK/tollgate-counting" -instrument \
    -instrumentation-file="$WORK/profile.fdata" >"$WORK/instrument.log" 2>&1 ||
    { cat "$WORK/instrument.log" >&2; exit 1; }
(cd "$ROOT" && TOLLGATE_TEST_BIN="$WORK/tollgate-counting" cargo bench --locked --profile dev --bench workload)
[ -s "$WORK/profile.fdata" ] || { echo "the workload left no profile" >&2; exit 1; }

# Blocks in the order the workload runs them, so the common path falls
# through (ext-tsp); callers beside their callees (cdsort); the blocks it
# never ran moved out of each function, to the end of the binary. No
# folding of identical functions: C in the binary (SQLite) compares
# function pointers.
echo "== laying out the code" >&2
"$BOLT" "$INPUT" -o "$WORK/tollgate" -data="$WORK/profile.fdata" \
    -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions \
    -split-all-cold -split-eh -use-gnu-stack -dyno-stats \
    >"$WORK/optimise.log" 2>&1 || { cat "$WORK/optimise.log" >&2; exit 1; }
grep -E 'splitting separates|taken branches' "$WORK/optimise.log" >&2 || true

# The laid-out binary answers every kind of request before it is kept.
# `TOLLGATE_TEST_BIN=target/release-bolt/tollgate cargo test` runs the
# suite's tests that start the binary (kills, restarts, drains, reloads)
# against it too.
echo "== checking the laid-out binary" >&2
(cd "$ROOT" && TOLLGATE_TEST_BIN="$WORK/tollgate" WORKLOAD_ROUNDS=3 cargo bench --locked --profile dev --bench workload)
mkdir -p "$OUT_DIR"
mv "$WORK/tollgate" "$OUT_DIR/tollgate"
echo "$OUT_DIR/tollgate" >&2
