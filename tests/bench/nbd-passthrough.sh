#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# flashtierd pass-through vs nbdkit, side by side, in one run.
#
# Servers (one at a time, each on a unix socket, pinned to BENCH_SERVER_CPU):
#   flashtierd     pass-through over a 1 GiB file on tmpfs, "reactors": 1
#   nbdkit-file    nbdkit file plugin over the SAME file (nbdkit defaults)
#   nbdkit-memory  nbdkit memory plugin (transport ceiling), pre-filled
# Client: fio's nbd ioengine, pinned to BENCH_CLIENT_CPU, one job per workload.
# Rounds: BENCH_ROUNDS rounds; in each round every server is started, measured
# on every workload and stopped, in turn, so the servers are interleaved in
# time and slow drift of the machine hits all of them alike. The report gives
# per-metric medians across rounds and the min-max of the per-round ratios.
# Server CPU: utime+stime of the server process (all threads) over fio's
# measured window, divided by the I/Os fio completed.
#
# Usage: AGENT=build/flashtierd tests/bench/nbd-passthrough.sh   (or: make bench)
# Environment (all optional):
#   AGENT               flashtierd binary (default: build/flashtierd)
#   BENCH_ROUNDS        rounds over all servers and workloads (default 3)
#   BENCH_RUNTIME       seconds measured per workload and round (default 8; 2 = smoke run)
#   BENCH_RAMP          seconds of ramp before measuring (default 2, 1 if RUNTIME < 10)
#   BENCH_SIZE_MIB      size of the backing file and memory disk (default 1024)
#   BENCH_SERVER_CPU    CPU for the server (default 0)
#   BENCH_CLIENT_CPU    CPU for fio and this script (default 1)
#   BENCH_SERVERS       subset/order of "flashtierd nbdkit-file nbdkit-memory"
#   BENCH_WORKLOADS     subset of workload names (default: all, see WORKLOADS below)
#   BENCH_RESULTS       results directory (default tests/bench/results)
#   BENCH_STRICT        1 = exit 1 when a target is missed (default 0: report only)
#   BENCH_START_TIMEOUT seconds to wait for a server socket (default 15)
# See tests/bench/README.md.
# shellcheck disable=SC2317 # functions invoked from traps
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PROG=nbd-passthrough
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

AGENT=${AGENT:-$ROOT/build/flashtierd}
ROUNDS=${BENCH_ROUNDS:-3}
RUNTIME=${BENCH_RUNTIME:-8}
if [ -z "${BENCH_RAMP:-}" ]; then
	if [ "$RUNTIME" -ge 10 ] 2>/dev/null; then RAMP=2; else RAMP=1; fi
else
	RAMP=$BENCH_RAMP
fi
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
SERVERS=${BENCH_SERVERS:-flashtierd nbdkit-file nbdkit-memory}
RESULTS=${BENCH_RESULTS:-$HERE/results}
STRICT=${BENCH_STRICT:-0}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}

# name rw bs iodepth
WORKLOADS=(
	"randread-4k-qd1 randread 4k 1"
	"randread-4k-qd32 randread 4k 32"
	"randwrite-4k-qd1 randwrite 4k 1"
	"randwrite-4k-qd32 randwrite 4k 32"
	"seqread-64k-qd8 read 64k 8"
)

SERVER_NAME=

cleanup_hook() {
	if [ -n "$SERVER_PID" ]; then
		log "stopping $SERVER_NAME (pid $SERVER_PID)"
		kill_and_reap "$SERVER_PID" 5
	fi
}

# ---------------------------------------------------------------- checks
check_tools
case $ROUNDS in '' | *[!0-9]*) die "BENCH_ROUNDS must be a whole number, got '$ROUNDS'" ;; esac
[ "$ROUNDS" -ge 1 ] || die "BENCH_ROUNDS must be >= 1"
case $RUNTIME in '' | *[!0-9]*) die "BENCH_RUNTIME must be whole seconds, got '$RUNTIME'" ;; esac
case $RAMP in '' | *[!0-9]*) die "BENCH_RAMP must be whole seconds, got '$RAMP'" ;; esac
case $SIZE_MIB in '' | *[!0-9]*) die "BENCH_SIZE_MIB must be a number, got '$SIZE_MIB'" ;; esac
[ "$RUNTIME" -ge 1 ] || die "BENCH_RUNTIME must be >= 1"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"
nbdkit file --version >/dev/null 2>&1 || die "nbdkit file plugin not available"
nbdkit memory --version >/dev/null 2>&1 || die "nbdkit memory plugin not available"

allowed=$(taskset -cp $$ | sed 's/.*: //')
cpu_ok "$SERVER_CPU" || die "server CPU $SERVER_CPU not in this process's CPU set ($allowed)"
cpu_ok "$CLIENT_CPU" || die "client CPU $CLIENT_CPU not in this process's CPU set ($allowed)"
[ "$SERVER_CPU" != "$CLIENT_CPU" ] || log "WARNING: server and client share CPU $SERVER_CPU"

selected=()
for w in "${WORKLOADS[@]}"; do
	read -r name _ <<<"$w"
	if [ -z "${BENCH_WORKLOADS:-}" ] || [[ " $BENCH_WORKLOADS " == *" $name "* ]]; then
		selected+=("$w")
	fi
done
[ ${#selected[@]} -gt 0 ] || die "BENCH_WORKLOADS='${BENCH_WORKLOADS:-}' selects nothing"
for s in $SERVERS; do
	case $s in flashtierd | nbdkit-file | nbdkit-memory) ;; *) die "unknown server '$s' in BENCH_SERVERS" ;; esac
done

shm_avail_kib=$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')
mem_avail_kib=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
[ "$shm_avail_kib" -gt $((SIZE_MIB * 1024 + 65536)) ] ||
	die "/dev/shm has $((shm_avail_kib / 1024)) MiB free, need $SIZE_MIB MiB + slack"
[ "$mem_avail_kib" -gt $((SIZE_MIB * 1024 * 2 + 262144)) ] ||
	die "only $((mem_avail_kib / 1024)) MiB RAM available, need ~$((SIZE_MIB * 2 + 256)) MiB (tmpfs file + nbdkit memory)"

# This script, the CPU sampler and fio run on the client CPU; the servers are
# started with an explicit "taskset -c SERVER_CPU" (inherited by all their threads).
taskset -cp "$CLIENT_CPU" $$ >/dev/null

collect_meta

echo "== flashtier nbd pass-through benchmark ($DATE)"
print_versions
echo "   CPU:        $CPU_MODEL, $NCPU CPUs; server on CPU $SERVER_CPU, fio on CPU $CLIENT_CPU"
echo "   rounds:     $ROUNDS (each round: every server started, measured, stopped in turn: $SERVERS)"
echo "   runtime:    ${RUNTIME}s + ${RAMP}s ramp per workload and round; load average: $LOADAVG_START"
print_smoke_note

# ---------------------------------------------------------------- setup
WORK=$(mktemp -d /dev/shm/flashtier-bench.XXXXXX)
DISK=$WORK/disk.img
RUNS=$WORK/runs
mkdir -p "$RUNS"

log "filling $DISK with $SIZE_MIB MiB of random data"
dd if=/dev/urandom of="$DISK" bs=1M count="$SIZE_MIB" iflag=fullblock conv=fsync status=none ||
	die "cannot create $DISK"
alloc_kib=$(du -k "$DISK" | cut -f1)
[ "$alloc_kib" -ge $((SIZE_MIB * 1024)) ] || die "$DISK is sparse ($alloc_kib KiB allocated)"

SOCK=
URI=
AGENT_IO_MODE=
ROUND=

start_server() { # NAME
	local name=$1 export_name=''
	SOCK=$WORK/$name.sock
	SERVER_NAME=$name
	rm -f "$SOCK"
	case $name in
	flashtierd)
		export_name=bench
		cat >"$WORK/flashtierd.json" <<-EOF
			{
			  "listen": "unix:$SOCK",
			  "reactors": 1,
			  "volumes": { "$export_name": { "backing": "$DISK" } }
			}
		EOF
		"$AGENT" --config "$WORK/flashtierd.json" --check-config >/dev/null ||
			die "flashtierd rejects the generated config: $(cat "$WORK/flashtierd.json")"
		taskset -c "$SERVER_CPU" "$AGENT" --config "$WORK/flashtierd.json" \
			>"$WORK/$name.log" 2>&1 &
		SERVER_PID=$!
		;;
	nbdkit-file)
		taskset -c "$SERVER_CPU" nbdkit --foreground --unix "$SOCK" --exit-with-parent \
			file file="$DISK" >"$WORK/$name.log" 2>&1 &
		SERVER_PID=$!
		;;
	nbdkit-memory)
		taskset -c "$SERVER_CPU" nbdkit --foreground --unix "$SOCK" --exit-with-parent \
			memory size="${SIZE_MIB}M" >"$WORK/$name.log" 2>&1 &
		SERVER_PID=$!
		;;
	esac
	URI="nbd+unix:///$export_name?socket=$SOCK"

	wait_socket "$SERVER_PID" "$SOCK" "$name"
	# The socket exists; check that the export answers and has the right size.
	check_size "$URI" "$name"
	log "$name ready (pid $SERVER_PID, $(taskset -cp "$SERVER_PID" | sed 's/.*: /CPU /'))"
}

# Every thread of the server must be on SERVER_CPU (io_uring workers and
# nbdkit's per-connection threads included). The sampler records the threads
# it sees while fio runs; summarise them here (for this server start).
check_server_affinity() {
	local summary
	if summary=$(python3 "$HERE/report.py" threads --cpu "$SERVER_CPU" "$RUNS/$SERVER_NAME".*".r$ROUND.threads"); then
		log "$SERVER_NAME: $summary; all pinned to CPU $SERVER_CPU"
	else
		log "WARNING: $SERVER_NAME: $summary"
	fi
	echo "$summary" >"$RUNS/$SERVER_NAME.r$ROUND.threads-summary"
}

stop_server() {
	terminate "$SERVER_NAME" "$SERVER_PID"
	SERVER_PID=
	check_log "$SERVER_NAME" "$WORK/$SERVER_NAME.log"
	cp "$WORK/$SERVER_NAME.log" "$RUNS/$SERVER_NAME.r$ROUND.server.log"
	if [ "$SERVER_NAME" = flashtierd ]; then
		# e.g. "...: file, 1073741824 bytes, buffered I/O" (tmpfs has no STATX_DIOALIGN)
		AGENT_IO_MODE=$(sed -n 's/.*: file, [0-9]* bytes, //p' "$WORK/$SERVER_NAME.log" | head -n 1)
	fi
}

prefill() {
	log "$SERVER_NAME: pre-filling with one sequential write pass"
	run_fio "$SERVER_NAME" "$WORK/prefill" --name=prefill --ioengine=nbd --uri="$URI" \
		--rw=write --bs=1M --iodepth=8 --size=100%
}

measure() { # WORKLOAD-NAME RW BS IODEPTH
	local name=$1 rw=$2 bs=$3 qd=$4
	local out=$RUNS/$SERVER_NAME.$name.r$ROUND
	printf '   r%-3s %-14s %-18s ' "$ROUND" "$SERVER_NAME" "$name" >&2
	start_sampler "$SERVER_PID" "$out"
	run_fio "$SERVER_NAME" "$out" --name="$name" --ioengine=nbd --uri="$URI" \
		--rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
		--time_based=1 --runtime="${RUNTIME}s" --ramp_time="${RAMP}s" \
		--percentile_list=50:90:99:99.9
	stop_sampler
	python3 - "$out.fio.json" "$rw" >&2 <<-'EOF'
		import json, sys
		t = open(sys.argv[1]).read(); j = json.loads(t[t.index("{"):])["jobs"][0]
		s = j["write"] if "write" in sys.argv[2] else j["read"]
		p = s["clat_ns"]["percentile"]
		print(f"{s['iops']:>10,.0f} IOPS  p50 {p['50.000000']/1000:8.1f} us  p99 {p['99.000000']/1000:8.1f} us")
	EOF
}

# ---------------------------------------------------------------- run
FIO_PARAMS="ioengine=nbd, ${RUNTIME}s time_based after ${RAMP}s ramp_time, numjobs=1, default randrepeat"
# Rounds outermost: every server gets one start/measure/stop per round, so
# the servers alternate in time and drift of the (shared) machine is spread
# over all of them instead of landing on whichever server ran last.
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
	for s in $SERVERS; do
		echo "== round $ROUND/$ROUNDS: $s"
		start_server "$s"
		if [ "$s" = nbdkit-memory ]; then prefill; fi
		for w in "${selected[@]}"; do
			read -r name rw bs qd <<<"$w"
			measure "$name" "$rw" "$bs" "$qd"
			kill -0 "$SERVER_PID" 2>/dev/null || die "$s died during $name (round $ROUND)"
		done
		check_server_affinity
		stop_server
	done
done

# ---------------------------------------------------------------- report
mkdir -p "$RESULTS"
base=$RESULTS/passthrough-$DATE
wl_specs=$(for w in "${selected[@]}"; do read -r n r b q <<<"$w"; printf '%s:%s:%s:%s,' "$n" "$r" "$b" "$q"; done)
read -r -a server_list <<<"$SERVERS"
servers_csv=$(IFS=,; echo "${server_list[*]}")
echo
python3 "$HERE/report.py" summarize --runs "$RUNS" --servers "$servers_csv" \
	--workloads "${wl_specs%,}" --rounds "$ROUNDS" --clk-tck "$CLK_TCK" \
	--md "$base.md" --json "$base.json" --verdict-file "$WORK/verdict" \
	--meta "date=$DATE" \
	--meta "flashtierd=$AGENT_VERSION, git $GIT_REV ($AGENT), config \"reactors\": 1${AGENT_IO_MODE:+, backing file: $AGENT_IO_MODE}" \
	--meta "nbdkit=$NBDKIT_VERSION (file: defaults; memory: size=${SIZE_MIB}M, pre-filled)" \
	--meta "fio=$FIO_VERSION" \
	--meta "kernel=$KERNEL" \
	--meta "cpu_model=$CPU_MODEL, $NCPU CPUs, CLK_TCK $CLK_TCK" \
	--meta "setup=$SIZE_MIB MiB random-data file on tmpfs (/dev/shm); unix sockets; server pinned to CPU $SERVER_CPU (taskset -c, all threads), fio to CPU $CLIENT_CPU" \
	--meta "fio_params=$FIO_PARAMS" \
	--meta "loadavg_start=$LOADAVG_START" \
	--meta "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" \
	--meta "rounds=$ROUNDS" --meta "runtime_s=$RUNTIME" --meta "ramp_s=$RAMP" --meta "size_mib=$SIZE_MIB" \
	--meta "server_cpu=$SERVER_CPU" --meta "client_cpu=$CLIENT_CPU" ||
	die "report generation failed"
# Keep the raw fio output and server logs next to the report.
save_raw "$base" "per round: fio JSON, CPU samples, threads, server logs"
finish
