# Common helpers for the interop shell tests, sourced by each script:
#
#   . "$(dirname "$0")/lib.sh"
#   ft_setup                     # temp dir in $T, cleanup trap
#   ft_nbdkit NAME ARGS...       # nbdkit on $T/NAME.sock; sets NBDKIT_SOCK, NBDKIT_PID
#   ft_agent_start CONFIG        # flashtierd --config CONFIG; sets AGENT_PID, AGENT_SOCK
#   ft_agent_stop                # SIGTERM, assert exit 0 and that the socket is gone
#   ft_fio VOLUME TAG ARGS...    # fio with crc32c verify on VOLUME; sets FT_FIO_OUT
#
# Every helper fails the script (exit 1, with a message) when a step fails.
# Run on its own (as tests/run-tests.sh does with every *.sh) it only
# defines functions and exits 0.

ft_fail() {
	echo "FAIL: $*" >&2
	exit 1
}

ft_log() {
	echo "== $*"
}

# Temp dir (also the working directory from now on) and cleanup: kills
# everything started through these helpers.
ft_setup() {
	[ -n "${AGENT:-}" ] || ft_fail "AGENT is not set (path to flashtierd)"
	case $AGENT in
	/*) ;;
	*) AGENT=$PWD/$AGENT ;;
	esac
	[ -x "$AGENT" ] || ft_fail "AGENT=$AGENT is not executable"
	T=$(mktemp -d /tmp/ft-test.XXXXXX) || ft_fail "mktemp"
	FT_PIDS=""
	AGENT_PID=""
	trap ft_cleanup EXIT
	trap 'exit 1' INT TERM HUP
	# Tools that drop files in the working directory (fio's verify state) do it here.
	cd "$T" || ft_fail "cd $T"
}

ft_cleanup() {
	rc=$?
	set +e
	for p in $AGENT_PID $FT_PIDS; do
		kill -KILL "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	if [ "$rc" -ne 0 ] && [ -n "${T:-}" ]; then
		for f in "$T"/*.log; do
			[ -f "$f" ] || continue
			echo "---- $f (last 40 lines)" >&2
			tail -n 40 "$f" >&2
		done
	fi
	# FT_KEEP=1 keeps the working directory (for a look after a failure).
	case ${T:-} in
	/tmp/ft-test.*) [ "${FT_KEEP:-0}" = 1 ] && echo "kept $T" >&2 || rm -rf "$T" ;;
	esac
	exit "$rc"
}

# ft_sock_ready PATH: does a unix socket at PATH accept a connection?
ft_sock_ready() {
	python3 - "$1" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(1)
s.connect(sys.argv[1])
s.close()
EOF
}

# ft_wait_sock PATH PID [TIMEOUT_S]: poll until PATH accepts connections;
# fail if PID dies first or the timeout passes.
ft_wait_sock() {
	_path=$1
	_pid=$2
	_n=$((${3:-10} * 20))
	while [ "$_n" -gt 0 ]; do
		if [ -S "$_path" ] && ft_sock_ready "$_path"; then
			return 0
		fi
		kill -0 "$_pid" 2>/dev/null || ft_fail "process $_pid died before $_path was ready"
		sleep 0.05
		_n=$((_n - 1))
	done
	ft_fail "timed out waiting for $_path"
}

# ft_nbdkit NAME ARGS...: nbdkit in the foreground on $T/NAME.sock.
ft_nbdkit() {
	_name=$1
	shift
	NBDKIT_SOCK=$T/$_name.sock
	nbdkit --foreground --exit-with-parent --unix "$NBDKIT_SOCK" "$@" \
		>"$T/nbdkit-$_name.log" 2>&1 &
	NBDKIT_PID=$!
	FT_PIDS="$FT_PIDS $NBDKIT_PID"
	ft_wait_sock "$NBDKIT_SOCK" "$NBDKIT_PID" 10
}

# ft_agent_start CONFIG: start flashtierd and wait for its socket
# (AGENT_SOCK must be set to the config's "listen" path).
ft_agent_start() {
	[ -n "${AGENT_SOCK:-}" ] || ft_fail "AGENT_SOCK is not set"
	"$AGENT" --config "$1" --log-level debug >"$T/agent.log" 2>&1 &
	AGENT_PID=$!
	ft_wait_sock "$AGENT_SOCK" "$AGENT_PID" 10
}

# ft_agent_stop: SIGTERM; the agent must exit 0 within 30 s and remove its socket.
ft_agent_stop() {
	[ -n "$AGENT_PID" ] || ft_fail "no agent running"
	kill -TERM "$AGENT_PID" || ft_fail "cannot signal the agent"
	_n=600
	while kill -0 "$AGENT_PID" 2>/dev/null; do
		# A zombie still answers kill -0; wait reaps it below.
		if [ "$(ps -o stat= -p "$AGENT_PID" 2>/dev/null | cut -c1)" = Z ]; then
			break
		fi
		_n=$((_n - 1))
		[ "$_n" -gt 0 ] || ft_fail "flashtierd did not exit within 30 s of SIGTERM"
		sleep 0.05
	done
	_rc=0
	wait "$AGENT_PID" || _rc=$?
	AGENT_PID=""
	[ "$_rc" -eq 0 ] || ft_fail "flashtierd exited with status $_rc after SIGTERM"
	[ ! -e "$AGENT_SOCK" ] || ft_fail "flashtierd left its socket $AGENT_SOCK behind"
	grep -q "stopped cleanly" "$T/agent.log" || ft_fail "no 'stopped cleanly' in the agent log"
}

# ft_fio VOLUME TAG --name=JOB ARGS...: fio's nbd engine on the agent's
# export VOLUME with crc32c verification (fatal, no state file saved), its
# JSON output in $FT_FIO_OUT.json and its log in $FT_FIO_OUT.log, where
# FT_FIO_OUT=$T/fio-VOLUME-TAG. Fails when fio exits non-zero (showing the
# log, and the JSON too when FT_FIO_SHOW_JSON=1) or its log complains
# (verify errors, bad magic, checksum mismatch, other errors).
ft_fio() {
	_fvol=$1
	_ftag=$2
	shift 2
	FT_FIO_OUT=$T/fio-$_fvol-$_ftag
	_rc=0
	fio "$@" --ioengine=nbd --uri="$(ft_uri "$_fvol")" \
		--verify=crc32c --verify_fatal=1 --verify_state_save=0 \
		--output-format=json --output="$FT_FIO_OUT.json" >"$FT_FIO_OUT.log" 2>&1 || _rc=$?
	if [ "$_rc" -ne 0 ]; then
		if [ "${FT_FIO_SHOW_JSON:-0}" = 1 ]; then
			cat "$FT_FIO_OUT.log" "$FT_FIO_OUT.json" >&2
		else
			cat "$FT_FIO_OUT.log" >&2
		fi
		ft_fail "fio $_fvol $_ftag exited with $_rc"
	fi
	if grep -v 'connected to NBD server' "$FT_FIO_OUT.log" |
		grep -E -i 'verify|bad magic|crc32c|mismatch|error|fio: ' >&2; then
		ft_fail "fio $_fvol $_ftag complained (above)"
	fi
}

# ft_metric PORT NAME VOLUME: a per-volume metric from the agent's /metrics
# on 127.0.0.1:PORT, as an integer; fails if it is not there.
ft_metric() {
	python3 - "$1" "$2" "$3" <<'EOF'
import sys, urllib.request
port, name, vol = sys.argv[1:]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
want = f'{name}{{volume="{vol}",domain=""}} '
for line in text.splitlines():
    if line.startswith(want):
        print(int(float(line[len(want):])))
        break
else:
    sys.exit(f"metric {want} not found")
EOF
}

# ft_uri EXPORT: the agent's URI for EXPORT.
ft_uri() {
	echo "nbd+unix:///$1?socket=$AGENT_SOCK"
}

# ft_random_file PATH SIZE_MIB: random data with zeroed and sparse stretches.
ft_random_file() {
	_f=$1
	_mib=$2
	rm -f "$_f"
	truncate -s "${_mib}M" "$_f" || ft_fail "truncate $_f"
	_i=0
	while [ "$_i" -lt "$_mib" ]; do
		case $((_i % 4)) in
		0 | 1)	# random
			dd if=/dev/urandom of="$_f" bs=1M seek="$_i" count=1 conv=notrunc \
				status=none || ft_fail "dd $_f"
			;;
		2)	# explicit zeroes (allocated)
			dd if=/dev/zero of="$_f" bs=1M seek="$_i" count=1 conv=notrunc \
				status=none || ft_fail "dd $_f"
			;;
		3) ;;	# hole
		esac
		_i=$((_i + 1))
	done
	# A few odd-sized random pieces straddling the boundaries.
	for _off in 3583 9217 20479 40961; do
		[ "$_off" -lt $((_mib * 1024)) ] || continue
		dd if=/dev/urandom of="$_f" bs=1k seek="$_off" count=3 conv=notrunc status=none ||
			ft_fail "dd $_f"
	done
}
