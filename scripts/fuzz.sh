#!/usr/bin/env bash
# Long fuzzing runs on stable Rust: every property-based target in src/fuzz/ with CASES cases
# (default 10 million), built in release, JOBS targets at a time (default 2), and how long each
# took. The test command runs the same targets with a thousand cases each.
#
#   scripts/fuzz.sh [CASES]
#   ONLY=frame scripts/fuzz.sh 1000000      # the targets whose name matches a grep pattern
#   SKIP=config scripts/fuzz.sh             # all but those
#
# A failure prints proptest's minimal failing input; turn it into a named regression test next
# to the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${1:-10000000}
JOBS=${JOBS:-2}
LOGS=$(mktemp -d)
export LOGS

cargo test --release --lib --no-run
mapfile -t targets < <(cargo test --release --lib fuzz:: -- --list 2>/dev/null | sed -n 's/: test$//p' |
    grep -e "${ONLY:-.}" | { if [ -n "${SKIP:-}" ]; then grep -v -e "$SKIP"; else cat; fi; })
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz.sh: no target matches ONLY='${ONLY:-}' SKIP='${SKIP:-}'" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, $CASES cases each, $JOBS at a time" >&2

run_target() {
    local target=$1 cases=$2 start end
    start=$(date +%s)
    if PROPTEST_CASES=$cases cargo test --release --lib --quiet "$target" -- --exact >"$LOGS/${target//:/_}.log" 2>&1; then
        end=$(date +%s)
        echo "ok    $target: $cases cases in $((end - start)) s"
    else
        echo "FAIL  $target (see $LOGS/${target//:/_}.log)"
        return 1
    fi
}
export -f run_target

printf '%s\n' "${targets[@]}" | xargs -P "$JOBS" -I{} bash -c "run_target {} $CASES"
