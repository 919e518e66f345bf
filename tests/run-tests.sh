#!/bin/sh
# Run every test: Criterion unit and integration binaries, then the interop
# scripts. Prints one closing line "N passed, N failed" and exits non-zero on
# any failure. Environment: BUILD (build tree), AGENT (flashtierd to test).
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
AGENT=${AGENT:-$PWD/$BUILD/flashtierd}
export AGENT
# ASan: fail on leaks too, and keep reports readable.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}

passed=0
failed=0
failures=""
log_dir=$BUILD/test-logs
mkdir -p "$log_dir"

run_criterion() {
	bin=$1
	name=$(basename "$bin")
	log=$log_dir/$name.log
	echo "== $name"
	timeout 600 "$bin" --jobs=2 --short-filename >"$log" 2>&1
	rc=$?
	# Criterion's synthesis line: "Tested: N | Passing: N | Failing: N | Crashing: N"
	line=$(grep -a 'Synthesis:' "$log" | tail -n 1)
	p=$(echo "$line" | sed -n 's/.*Passing: \([0-9]*\).*/\1/p')
	f=$(echo "$line" | sed -n 's/.*Failing: \([0-9]*\).*/\1/p')
	p=${p:-0}
	f=${f:-0}
	if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
		f=1 # crashed, timed out or exited without a synthesis
	fi
	passed=$((passed + p))
	failed=$((failed + f))
	if [ "$f" -ne 0 ]; then
		failures="$failures $name"
		grep -a -E '\[(FAIL|----)\]|ERROR|Assertion|runtime error|Sanitizer' "$log" | head -n 40
		echo "   (full log: $log)"
	fi
	echo "   $line"
}

for bin in "$BUILD"/tests/unit/* "$BUILD"/tests/integration/*; do
	[ -f "$bin" ] && [ -x "$bin" ] || continue
	run_criterion "$bin"
done

for script in tests/integration/*.sh; do
	[ "$(basename "$script")" = lib.sh ] && continue # helpers, not a test
	[ -f "$script" ] || continue
	name=$(basename "$script" .sh)
	log=$log_dir/$name.log
	echo "== $name"
	if timeout 600 sh "$script" >"$log" 2>&1; then
		passed=$((passed + 1))
		echo "   ok"
	else
		failed=$((failed + 1))
		failures="$failures $name"
		tail -n 30 "$log"
		echo "   FAILED (full log: $log)"
	fi
done

echo
[ -n "$failures" ] && echo "failed:$failures"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
