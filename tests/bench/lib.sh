# SPDX-License-Identifier: MIT
# shellcheck shell=bash
#
# Helpers shared by the benchmark scripts (nbd-passthrough.sh, cache-read.sh),
# sourced right after they set HERE, ROOT and PROG:
#
#   . "$HERE/lib.sh"
#
# Sourcing it defines WORK, SERVER_PID, SAMPLER_PID and FIO_PID (empty), and
# installs the EXIT/INT/TERM/HUP traps: on exit, cleanup stops fio, the CPU
# sampler and (through the script's cleanup_hook) the servers, shows the last
# lines of WORK/*.log on failure (but those matching QUIET_LOGS, a pattern)
# and removes WORK.
# Other globals the helpers read: HERE, ROOT, AGENT, ROUNDS, RUNTIME,
# SIZE_MIB, START_TIMEOUT, CLIENT_CPU, RUNS and STRICT.
# shellcheck disable=SC2317 # functions invoked from traps
# shellcheck disable=SC2034 # globals set here for the sourcing script

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	printf '\n%s: FATAL: %s\n' "$PROG" "$*" >&2
	exit 1
}

# ---------------------------------------------------------------- cleanup
WORK=
SERVER_PID=
SAMPLER_PID=
FIO_PID=
QUIET_LOGS=

kill_and_reap() { # PID [grace-seconds]
	local pid=$1 grace=${2:-5} i
	[ -n "$pid" ] || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < grace * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

# Redefined by the script: stop its servers (kill_and_reap) and remove what
# it keeps outside WORK.
cleanup_hook() { :; }

cleanup() {
	local rc=$?
	trap - EXIT INT TERM HUP
	[ -n "$FIO_PID" ] && kill_and_reap "$FIO_PID" 2
	[ -n "$SAMPLER_PID" ] && kill_and_reap "$SAMPLER_PID" 1
	cleanup_hook
	if [ -n "$WORK" ] && [ -d "$WORK" ]; then
		if [ "$rc" -ne 0 ] && [ -n "$(ls "$WORK"/*.log 2>/dev/null)" ]; then
			for f in "$WORK"/*.log; do
				# shellcheck disable=SC2254 # QUIET_LOGS is a pattern
				case $f in $QUIET_LOGS) continue ;; esac
				printf '\n--- last lines of %s\n' "$(basename "$f")" >&2
				tail -n 15 "$f" >&2 || true
			done
		fi
		rm -rf -- "$WORK"
	fi
	[ "$rc" -ne 0 ] && log "exit status $rc"
	exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM
trap 'log "hangup"; exit 129' HUP

# ---------------------------------------------------------------- checks
check_tools() { # the tools both benchmarks need, and AGENT
	local tool
	for tool in fio nbdkit taskset python3 getconf; do
		command -v "$tool" >/dev/null || die "'$tool' not found in PATH"
	done
	[ -x "$AGENT" ] || die "AGENT=$AGENT is not an executable (build it first: make)"
}

cpu_ok() { python3 -c 'import os,sys; sys.exit(0 if int(sys.argv[1]) in os.sched_getaffinity(0) else 1)' "$1"; }

# Sets CLK_TCK, FIO_VERSION, NBDKIT_VERSION, KERNEL, AGENT_VERSION, GIT_REV,
# CPU_MODEL, NCPU, DATE and LOADAVG_START.
collect_meta() {
	CLK_TCK=$(getconf CLK_TCK)
	FIO_VERSION=$(fio --version)
	NBDKIT_VERSION=$(nbdkit --version | head -n 1)
	KERNEL="$(uname -r) ($(uname -m))"
	AGENT_VERSION=$("$AGENT" --version 2>&1 | head -n 1 || true)
	GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
	if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then GIT_REV="$GIT_REV+dirty"; fi
	CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
	[ -n "$CPU_MODEL" ] || CPU_MODEL=$(uname -m)
	NCPU=$(nproc --all)
	DATE=$(date +%Y-%m-%d-%H%M%S)
	LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
}

print_versions() {
	echo "   fio:        $FIO_VERSION"
	echo "   nbdkit:     $NBDKIT_VERSION"
	echo "   kernel:     $KERNEL"
	echo "   flashtierd: $AGENT_VERSION, git $GIT_REV ($AGENT)"
}

print_smoke_note() {
	if [ "$RUNTIME" -lt 5 ] || [ "$ROUNDS" -lt 3 ]; then
		echo "   (short runtime or fewer than 3 rounds: smoke run, numbers are indicative only)"
	fi
}

# ---------------------------------------------------------------- servers
wait_socket() { # PID SOCK NAME
	local pid=$1 sock=$2 name=$3 i
	for ((i = 0; i < START_TIMEOUT * 20; i++)); do
		kill -0 "$pid" 2>/dev/null || die "$name exited during start-up"
		[ -S "$sock" ] && return 0
		sleep 0.05
	done
	die "$name did not create $sock within ${START_TIMEOUT}s"
}

check_size() { # URI NAME: the export answers and is SIZE_MIB big
	command -v nbdinfo >/dev/null || return 0
	local size
	size=$(timeout 10 nbdinfo --size "$1" 2>"$WORK/nbdinfo.err") ||
		die "$2 does not answer on $1: $(cat "$WORK/nbdinfo.err")"
	[ "$size" -eq $((SIZE_MIB * 1024 * 1024)) ] ||
		die "$2 exports $size bytes, expected $((SIZE_MIB * 1024 * 1024))"
}

terminate() { # NAME PID: SIGTERM, SIGKILL after 10 s, warn on either or on a bad status
	local name=$1 pid=$2 rc=0 i
	kill -TERM "$pid" 2>/dev/null || die "$name (pid $pid) died during the run"
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "WARNING: $name did not exit within 10 s of SIGTERM; killing it"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" || rc=$?
	[ "$rc" -eq 0 ] || log "WARNING: $name exited with status $rc after SIGTERM"
}

check_log() { # NAME LOG: show the errors and warnings a server logged
	if grep -Eiq 'error|warn|assert|sanitizer|abort' "$2"; then
		log "WARNING: $1 logged errors/warnings:"
		grep -Ei 'error|warn|assert|sanitizer|abort' "$2" | sort | uniq -c | sort -rn | head -n 10 >&2
	fi
}

# ---------------------------------------------------------------- measuring
run_fio() { # NAME OUT-PREFIX fio-args...: fio on CLIENT_CPU against server NAME
	local name=$1 out=$2 rc=0
	shift 2
	taskset -c "$CLIENT_CPU" fio --output-format=json --output="$out.fio.json" "$@" \
		>"$out.fio.log" 2>&1 &
	FIO_PID=$!
	wait "$FIO_PID" || rc=$?
	FIO_PID=
	if [ "$rc" -ne 0 ] || grep -q '"error" : [1-9]' "$out.fio.json" 2>/dev/null; then
		cat "$out.fio.log" >&2 || true
		die "fio failed (status $rc) against $name: fio $*"
	fi
}

start_sampler() { # PID OUT-PREFIX: CPU ticks to OUT.cpu, threads to OUT.threads
	local pid=$1 out=$2 i
	python3 "$HERE/report.py" sample --threads "$out.threads" "$pid" "$out.cpu" &
	SAMPLER_PID=$!
	for ((i = 0; i < 200; i++)); do
		[ -s "$out.cpu" ] && break
		sleep 0.01
	done
	[ -s "$out.cpu" ] || die "CPU sampler did not start"
}

stop_sampler() {
	kill -TERM "$SAMPLER_PID" 2>/dev/null || true
	wait "$SAMPLER_PID" || true
	SAMPLER_PID=
}

# ---------------------------------------------------------------- report
save_raw() { # BASE DESCRIPTION: copy RUNS to BASE.raw, list what was saved
	mkdir -p "$1.raw"
	cp "$RUNS"/* "$1.raw/"
	echo
	echo "saved: $1.md"
	echo "       $1.json"
	echo "       $1.raw/ ($2)"
}

finish() { # exit 1 when BENCH_STRICT=1 and the report's verdict is not PASS
	if [ "$STRICT" = 1 ] && [ "$(cat "$WORK/verdict")" != PASS ]; then
		log "targets not met (BENCH_STRICT=1)"
		exit 1
	fi
	exit 0
}
