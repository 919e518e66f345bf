#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# flashtierd's read cache vs nbdkit's cache filter vs the SAN direct, side by
# side, in one run.
#
# The "SAN": nbdkit file over a random-data file on tmpfs behind the delay
# filter (1 ms per read and per write), on a unix socket, with the log and
# stats filters outermost so every request that reaches it is counted.
# Systems (one at a time; every one but nbdkit memory in front of that SAN):
#   flashtierd     backing = nbd+unix URI of the SAN, cache file of CACHE_MIB,
#                  write-through, sequential_cutoff 1M, quota 100%, 1 reactor
#   nbdkit-cache   nbdkit --filter=cache nbd socket=SAN (cache-on-read=true,
#                  cache-min-block-size=4096, cache-max-size=CACHE_MIB), its
#                  cache file in TMPDIR, on the same file system as flashtierd's
#   san-direct     fio straight at the SAN
#   nbdkit-memory  nbdkit memory (no SAN): the latency anchor for warm hits
# Workloads (fio nbd engine, 4 KiB):
#   warm-randread-qd1/qd32  over a working set of WSET_MIB that fits in the cache,
#                           after WARM_PASSES random 64 KiB read passes over it
#   cold-randread-qd32      over the whole disk, every system started with an
#                           empty cache (fio's random map: no block read twice)
#   zipf-randrw-qd32        zipf:1.1, 70 % reads, whole disk, after the same job
#                           once unmeasured (other seed) as the warm-up
# Each (system, group of workloads) gets a fresh SAN and a fresh system, so
# every measured run is preceded by exactly its own warm-up. Rounds are
# outermost and the systems interleave inside each workload group.
# Hit ratio, measured outside the system: 1 - SAN read bytes / fio read bytes
# in fio's measured window (SAN side from the log filter's timestamps; the
# stats filter's lifetime totals cross-check the log).
#
# Usage: AGENT=build/h4/flashtierd tests/bench/cache-read.sh
# Environment (all optional):
#   AGENT               flashtierd binary (default: build/flashtierd)
#   BENCH_ROUNDS        rounds (default 3)
#   BENCH_RUNTIME       seconds measured per workload and round (default 8)
#   BENCH_RAMP          fio ramp_time (default 0: the warm-ups do that job; with a ramp
#                       the hit ratio window is approximate)
#   BENCH_SIZE_MIB      SAN disk size (default 2048)
#   BENCH_CACHE_MIB     cache size, both caches (default 256)
#   BENCH_WSET_MIB      working set of the warm workloads (default 128)
#   BENCH_WARM_PASSES   random 64 KiB read passes over the working set (default 2)
#   BENCH_SAN_DELAY     delay filter rdelay/wdelay (default 1ms)
#   BENCH_ZIPF_THETA    zipf exponent of the zipf workload (default 1.1)
#   BENCH_ZIPF_READ_PCT rwmixread of the zipf workload (default 70)
#   BENCH_CACHE_DIR     directory for both cache files (default: the scratch dir on /dev/shm)
#   BENCH_SERVER_CPU    CPU for the system under test (default 0)
#   BENCH_SAN_CPU       CPU(s) for the SAN, taskset -c syntax (default: server and
#                       client CPU, i.e. not pinned on a 2-CPU machine)
#   BENCH_NBDKIT_CACHE_MODE  cache= of nbdkit's cache filter (default: its own default,
#                       writeback; writethrough matches flashtierd's mode)
#   BENCH_CLIENT_CPU    CPU for fio and this script (default 1)
#   BENCH_SYSTEMS       subset/order of "flashtierd nbdkit-cache san-direct nbdkit-memory"
#   BENCH_WORKLOADS     subset of "warm-randread-qd1 warm-randread-qd32 cold-randread-qd32 zipf-randrw-qd32"
#   BENCH_RESULTS       results directory (default tests/bench/results)
#   BENCH_STRICT        1 = exit 1 when a target is missed
#   BENCH_START_TIMEOUT seconds to wait for a socket (default 15)
#   BENCH_KEEP_SANLOG   1 = keep the SAN's log-filter output (gzip) in the raw folder
# See tests/bench/README.md.
# shellcheck disable=SC2317 # functions invoked from traps
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PROG=cache-read
REPORT=$HERE/cache_report.py
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

AGENT=${AGENT:-$ROOT/build/flashtierd}
ROUNDS=${BENCH_ROUNDS:-3}
RUNTIME=${BENCH_RUNTIME:-8}
RAMP=${BENCH_RAMP:-0}
SIZE_MIB=${BENCH_SIZE_MIB:-2048}
CACHE_MIB=${BENCH_CACHE_MIB:-256}
WSET_MIB=${BENCH_WSET_MIB:-128}
WARM_PASSES=${BENCH_WARM_PASSES:-2}
SAN_DELAY=${BENCH_SAN_DELAY:-1ms}
ZIPF_THETA=${BENCH_ZIPF_THETA:-1.1}
ZIPF_READ_PCT=${BENCH_ZIPF_READ_PCT:-70}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
SAN_CPU=${BENCH_SAN_CPU:-$SERVER_CPU,$CLIENT_CPU}
NBDKIT_CACHE_MODE=${BENCH_NBDKIT_CACHE_MODE:-}
SYSTEMS=${BENCH_SYSTEMS:-flashtierd nbdkit-cache san-direct nbdkit-memory}
ALL_WORKLOADS="warm-randread-qd1 warm-randread-qd32 cold-randread-qd32 zipf-randrw-qd32"
WORKLOADS=${BENCH_WORKLOADS:-$ALL_WORKLOADS}
RESULTS=${BENCH_RESULTS:-$HERE/results}
STRICT=${BENCH_STRICT:-0}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}

CACHE_DIR=
SAN_PID=
SYSTEM=
QUIET_LOGS='*/san.log'

cleanup_hook() {
	if [ -n "$SERVER_PID" ] && [ "$SERVER_PID" != "$SAN_PID" ]; then
		log "stopping $SYSTEM (pid $SERVER_PID)"
		kill_and_reap "$SERVER_PID" 5
	fi
	[ -n "$SAN_PID" ] && kill_and_reap "$SAN_PID" 5
	if [ -n "$CACHE_DIR" ] && [ -d "$CACHE_DIR" ]; then rm -rf -- "$CACHE_DIR"; fi
	return 0
}

# ---------------------------------------------------------------- checks
check_tools
for v in ROUNDS RUNTIME RAMP SIZE_MIB CACHE_MIB WSET_MIB WARM_PASSES ZIPF_READ_PCT; do
	case ${!v} in '' | *[!0-9]*) die "BENCH_$v must be a whole number, got '${!v}'" ;; esac
done
[ "$ROUNDS" -ge 1 ] || die "BENCH_ROUNDS must be >= 1"
[ "$RUNTIME" -ge 1 ] || die "BENCH_RUNTIME must be >= 1"
[ "$WSET_MIB" -lt "$CACHE_MIB" ] || die "BENCH_WSET_MIB ($WSET_MIB) must be smaller than BENCH_CACHE_MIB ($CACHE_MIB)"
[ "$CACHE_MIB" -lt "$SIZE_MIB" ] || die "BENCH_CACHE_MIB must be smaller than BENCH_SIZE_MIB"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"
for p in file memory nbd; do
	nbdkit "$p" --version >/dev/null 2>&1 || die "nbdkit $p plugin not available"
done
for f in delay stats log cache; do
	nbdkit --filter="$f" null --version >/dev/null 2>&1 || die "nbdkit $f filter not available"
done

for c in "$SERVER_CPU" "$CLIENT_CPU" ${SAN_CPU//[,-]/ }; do
	cpu_ok "$c" || die "CPU $c not in this process's CPU set ($(taskset -cp $$ | sed 's/.*: //'))"
done
[ "$SERVER_CPU" != "$CLIENT_CPU" ] || log "WARNING: server and client share CPU $SERVER_CPU"

selected=()
for w in $WORKLOADS; do
	[[ " $ALL_WORKLOADS " == *" $w "* ]] || die "unknown workload '$w' in BENCH_WORKLOADS"
	selected+=("$w")
done
for s in $SYSTEMS; do
	case $s in flashtierd | nbdkit-cache | san-direct | nbdkit-memory) ;; *) die "unknown system '$s' in BENCH_SYSTEMS" ;; esac
done
want() { [[ " ${selected[*]} " == *" $1 "* ]]; }
groups=()
{ want warm-randread-qd1 || want warm-randread-qd32; } && groups+=(warm)
want cold-randread-qd32 && groups+=(cold)
want zipf-randrw-qd32 && groups+=(zipf)

shm_avail_kib=$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')
need_kib=$(((SIZE_MIB + 2 * CACHE_MIB + 256) * 1024))
[ "$shm_avail_kib" -gt "$need_kib" ] ||
	die "/dev/shm has $((shm_avail_kib / 1024)) MiB free, need ~$((need_kib / 1024)) MiB"

taskset -cp "$CLIENT_CPU" $$ >/dev/null
# how the kernel spells the SAN's CPU list (for the affinity check)
SAN_CPU_LIST=$(taskset -c "$SAN_CPU" sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)

collect_meta
T_START=$(date +%s)

echo "== flashtier read-cache benchmark ($DATE)"
print_versions
echo "   CPU:        $CPU_MODEL, $NCPU CPUs; system on CPU $SERVER_CPU, SAN on CPU $SAN_CPU, fio on CPU $CLIENT_CPU"
echo "   SAN:        nbdkit file, ${SIZE_MIB} MiB on tmpfs, delay rdelay=$SAN_DELAY wdelay=$SAN_DELAY"
echo "   caches:     ${CACHE_MIB} MiB; warm working set ${WSET_MIB} MiB"
echo "   rounds:     $ROUNDS; systems: $SYSTEMS; workloads: ${selected[*]}"
echo "   runtime:    ${RUNTIME}s + ${RAMP}s ramp per measured run; load average: $LOADAVG_START"
print_smoke_note

# ---------------------------------------------------------------- setup
WORK=$(mktemp -d /dev/shm/flashtier-cbench.XXXXXX)
if [ -n "${BENCH_CACHE_DIR:-}" ]; then
	mkdir -p "$BENCH_CACHE_DIR"
	CACHE_DIR=$(mktemp -d "$BENCH_CACHE_DIR/flashtier-cbench-cache.XXXXXX")
else
	CACHE_DIR=$WORK/cache
	mkdir -p "$CACHE_DIR"
fi
CACHE_FS=$(df -P "$CACHE_DIR" | awk 'NR == 2 { print $1 " on " $6 }')
CACHE_FSTYPE=$(stat -f -c %T "$CACHE_DIR")
DISK=$WORK/san.img
RUNS=$WORK/runs
mkdir -p "$RUNS"
SAN_SOCK=$WORK/san.sock
SAN_URI="nbd+unix:///?socket=$SAN_SOCK"
METRICS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

log "filling $DISK with $SIZE_MIB MiB of random data"
dd if=/dev/urandom of="$DISK" bs=1M count="$SIZE_MIB" iflag=fullblock status=none ||
	die "cannot create $DISK"

ROUND=
GROUP=
GROUP_THREADS=()
SOCK=
URI=

# A fresh SAN per (system, group): its log and stats cover exactly that server start.
start_san() {
	rm -f "$SAN_SOCK" "$WORK/san.log"
	TZ=UTC taskset -c "$SAN_CPU" nbdkit --foreground --unix "$SAN_SOCK" --exit-with-parent \
		--filter=log --filter=stats --filter=delay \
		file file="$DISK" rdelay="$SAN_DELAY" wdelay="$SAN_DELAY" \
		logfile="$WORK/san.log" statsfile="$RUNS/$SYSTEM.$GROUP.r$ROUND.san-stats" statsappend=true \
		>"$WORK/san-stderr.log" 2>&1 &
	SAN_PID=$!
	wait_socket "$SAN_PID" "$SAN_SOCK" SAN
}

stop_san() {
	local rc=0 i
	kill -TERM "$SAN_PID" 2>/dev/null || die "the SAN (pid $SAN_PID) died during the run"
	for ((i = 0; i < 100; i++)); do
		kill -0 "$SAN_PID" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$SAN_PID" 2>/dev/null || true
	wait "$SAN_PID" || rc=$?
	SAN_PID=
	[ "$rc" -eq 0 ] || log "WARNING: the SAN exited with status $rc"
	python3 "$REPORT" sanlog "$WORK/san.log" "$RUNS/$SYSTEM.$GROUP.r$ROUND.san-bins" ||
		die "cannot digest the SAN log"
	if [ "${BENCH_KEEP_SANLOG:-0}" = 1 ]; then
		gzip -c "$WORK/san.log" >"$RUNS/$SYSTEM.$GROUP.r$ROUND.san.log.gz"
	fi
	rm -f "$WORK/san.log"
}

start_system() {
	local export_name=''
	SOCK=$WORK/$SYSTEM.sock
	rm -f "$SOCK"
	case $SYSTEM in
	flashtierd)
		export_name=bench
		rm -f "$CACHE_DIR/flashtierd.cache" # a new, empty cache for every start
		cat >"$WORK/flashtierd.json" <<-EOF
			{
			  "listen": "unix:$SOCK",
			  "metrics": "127.0.0.1:$METRICS_PORT",
			  "reactors": 1,
			  "cache": { "path": "$CACHE_DIR/flashtierd.cache", "size": "${CACHE_MIB}M" },
			  "volumes": {
			    "$export_name": {
			      "backing": "$SAN_URI",
			      "cache": { "mode": "write-through", "sequential_cutoff": "1M", "quota": "100%" }
			    }
			  }
			}
		EOF
		taskset -c "$SERVER_CPU" "$AGENT" --config "$WORK/flashtierd.json" >"$WORK/$SYSTEM.log" 2>&1 &
		SERVER_PID=$!
		wait_socket "$SERVER_PID" "$SOCK" "$SYSTEM"
		;;
	nbdkit-cache)
		rm -rf "${CACHE_DIR:?}/nbdkit-tmp"
		mkdir -p "$CACHE_DIR/nbdkit-tmp"
		TMPDIR=$CACHE_DIR/nbdkit-tmp taskset -c "$SERVER_CPU" nbdkit --foreground --unix "$SOCK" \
			--exit-with-parent --filter=cache nbd socket="$SAN_SOCK" \
			cache-on-read=true cache-min-block-size=4096 cache-max-size="${CACHE_MIB}M" \
			${NBDKIT_CACHE_MODE:+cache="$NBDKIT_CACHE_MODE"} >"$WORK/$SYSTEM.log" 2>&1 &
		SERVER_PID=$!
		wait_socket "$SERVER_PID" "$SOCK" "$SYSTEM"
		;;
	san-direct)
		SOCK=$SAN_SOCK
		SERVER_PID=$SAN_PID
		: >"$WORK/$SYSTEM.log"
		;;
	nbdkit-memory)
		taskset -c "$SERVER_CPU" nbdkit --foreground --unix "$SOCK" --exit-with-parent \
			memory size="${SIZE_MIB}M" >"$WORK/$SYSTEM.log" 2>&1 &
		SERVER_PID=$!
		wait_socket "$SERVER_PID" "$SOCK" "$SYSTEM"
		;;
	esac
	URI="nbd+unix:///$export_name?socket=$SOCK"
	check_size "$URI" "$SYSTEM"
	log "$SYSTEM ready (pid $SERVER_PID, $(taskset -cp "$SERVER_PID" | sed 's/.*: /CPU /'))"
}

stop_system() {
	[ "$SYSTEM" = san-direct ] || terminate "$SYSTEM" "$SERVER_PID"
	SERVER_PID=
	check_log "$SYSTEM" "$WORK/$SYSTEM.log"
	cp "$WORK/$SYSTEM.log" "$RUNS/$SYSTEM.$GROUP.r$ROUND.server.log"
}

# Also writes OUT-PREFIX.window: wall-clock ms just before fio starts and just
# after it exited. Nothing but fio talks to the system meanwhile, so every SAN
# request that arrives in that window is on behalf of this fio job.
run_timed_fio() { # OUT-PREFIX fio-args...
	local t0
	t0=$(date +%s%3N)
	run_fio "$SYSTEM" "$@"
	echo "$t0 $(date +%s%3N)" >"$1.window"
}

print_run() { # OUT-PREFIX
	python3 - "$1.fio.json" >&2 <<-'EOF'
		import json, sys
		t = open(sys.argv[1]).read(); j = json.loads(t[t.index("{"):])["jobs"][0]
		r, w = j["read"], j["write"]
		p = r["clat_ns"].get("percentile", {})
		print(f"{r['iops'] + w['iops']:>10,.0f} IOPS  read p50 {p.get('50.000000', 0)/1000:8.1f} us"
		      f"  p99 {p.get('99.000000', 0)/1000:8.1f} us  ({(r['io_bytes'] + w['io_bytes']) >> 20} MiB)")
	EOF
}

scrape() { # OUT
	[ "$SYSTEM" = flashtierd ] || return 0
	python3 "$REPORT" scrape "http://127.0.0.1:$METRICS_PORT/metrics" "$1" ||
		log "WARNING: cannot read flashtierd's metrics"
}

# Unmeasured: warm-up passes and pre-fills.
warmup() { # NAME fio-args...
	local name=$1 out
	shift
	out=$RUNS/$SYSTEM.$name.r$ROUND
	printf '   r%-3s %-14s %-22s ' "$ROUND" "$SYSTEM" "($name)" >&2
	run_timed_fio "$out" --name="$name" --ioengine=nbd --uri="$URI" --numjobs=1 "$@"
	print_run "$out"
}

measure() { # WORKLOAD fio-args...
	local name=$1 out
	shift
	out=$RUNS/$SYSTEM.$name.r$ROUND
	printf '   r%-3s %-14s %-22s ' "$ROUND" "$SYSTEM" "$name" >&2
	GROUP_THREADS+=("$out.threads")
	start_sampler "$SERVER_PID" "$out"
	scrape "$out.metrics-before"
	run_timed_fio "$out" --name="$name" --ioengine=nbd --uri="$URI" --numjobs=1 \
		--time_based=1 --runtime="${RUNTIME}s" --ramp_time="${RAMP}s" \
		--percentile_list=50:90:99:99.9 "$@"
	scrape "$out.metrics-after"
	stop_sampler
	print_run "$out"
	kill -0 "$SERVER_PID" 2>/dev/null || die "$SYSTEM died during $name (round $ROUND)"
}

WARM_ARGS=(--rw=randread --bs=4k --size="${WSET_MIB}M")
ZIPF_ARGS=(--rw=randrw --rwmixread="$ZIPF_READ_PCT" --random_distribution=zipf:"$ZIPF_THETA" --bs=4k --iodepth=32)

run_group() {
	case $GROUP in
	warm)
		if [ "$SYSTEM" = nbdkit-memory ]; then
			warmup warm-prefill --rw=write --bs=1M --iodepth=8 --size="${WSET_MIB}M"
		else
			for ((k = 1; k <= WARM_PASSES; k++)); do
				warmup "warm-warmup$k" --rw=randread --bs=64k --iodepth=32 --size="${WSET_MIB}M"
			done
		fi
		want warm-randread-qd1 && measure warm-randread-qd1 "${WARM_ARGS[@]}" --iodepth=1
		want warm-randread-qd32 && measure warm-randread-qd32 "${WARM_ARGS[@]}" --iodepth=32
		;;
	cold)
		measure cold-randread-qd32 --rw=randread --bs=4k --iodepth=32
		;;
	zipf)
		# The same job once, unmeasured, as the warm-up: under another job name
		# and seed (fio derives zipf offsets from the job's file name, JOB.0.0),
		# so the measured run does not replay the warm-up's offsets.
		warmup zipf-warmup "${ZIPF_ARGS[@]}" --randseed=4242 \
			--time_based=1 --runtime="$((RUNTIME + RAMP))s"
		measure zipf-randrw-qd32 "${ZIPF_ARGS[@]}"
		;;
	esac
	return 0
}

# ---------------------------------------------------------------- run
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
	for GROUP in "${groups[@]}"; do
		for SYSTEM in $SYSTEMS; do
			# nbdkit memory is only the latency anchor of the warm workloads
			[ "$SYSTEM" = nbdkit-memory ] && [ "$GROUP" != warm ] && continue
			echo "== round $ROUND/$ROUNDS: $GROUP: $SYSTEM"
			[ "$SYSTEM" = nbdkit-memory ] || start_san
			start_system
			GROUP_THREADS=()
			run_group
			cpu=$SERVER_CPU
			[ "$SYSTEM" = san-direct ] && cpu=$SAN_CPU_LIST
			python3 "$HERE/report.py" threads --cpu "$cpu" "${GROUP_THREADS[@]}" \
				>"$RUNS/$SYSTEM.$GROUP.r$ROUND.threads-summary" ||
				log "WARNING: $SYSTEM: $(tail -n 1 "$RUNS/$SYSTEM.$GROUP.r$ROUND.threads-summary")"
			stop_system
			[ -z "$SAN_PID" ] || stop_san
		done
	done
done

# ---------------------------------------------------------------- report
# The zipf I/O sequences (warm-up seed and default seed), regenerated with
# fio's null engine, for the report's "ideal" hit ratio.
trace_args=()
if [[ " ${groups[*]} " == *" zipf "* ]]; then
	nios=$(python3 - "$RUNS" <<-'EOF'
		import glob, json, sys
		n = 0
		for p in glob.glob(sys.argv[1] + "/*.zipf-*.fio.json"):
		    t = open(p).read(); j = json.loads(t[t.index("{"):])["jobs"][0]
		    n = max(n, j["read"]["total_ios"] + j["write"]["total_ios"])
		print(n + 1000)
	EOF
	)
	# Same job names as the real runs: fio seeds zipf offsets from the file
	# name (JOB.0.0). iodepth 1: the null engine logs requeued I/Os twice.
	for seed in warmup measured; do
		if [ $seed = warmup ]; then sa=(--name=zipf-warmup --randseed=4242); else sa=(--name=zipf-randrw-qd32); fi
		fio "${sa[@]}" --ioengine=null --size="${SIZE_MIB}M" "${ZIPF_ARGS[@]}" --iodepth=1 \
			--number_ios="$nios" --write_iolog="$WORK/zipf-$seed.iolog" --output-format=terse \
			>/dev/null 2>"$WORK/trace.err" || die "cannot generate the zipf trace: $(cat "$WORK/trace.err")"
	done
	trace_args=(--zipf-trace-warmup "$WORK/zipf-warmup.iolog" --zipf-trace "$WORK/zipf-measured.iolog"
		--cache-blocks $((CACHE_MIB * 256)))
fi
mkdir -p "$RESULTS"
base=$RESULTS/cache-read-$DATE
read -r -a sys_list <<<"$SYSTEMS"
systems_csv=$(IFS=,; echo "${sys_list[*]}")
workloads_csv=$(IFS=,; echo "${selected[*]}")
echo
python3 "$REPORT" summarize --runs "$RUNS" --rounds "$ROUNDS" --clk-tck "$CLK_TCK" \
	--systems "$systems_csv" --workloads "$workloads_csv" \
	--md "$base.md" --json "$base.json" --verdict-file "$WORK/verdict" "${trace_args[@]}" \
	--meta "date=$DATE" \
	--meta "flashtierd=$AGENT_VERSION, git $GIT_REV ($AGENT); \"reactors\": 1, cache ${CACHE_MIB}M, write-through, sequential_cutoff 1M, quota 100%" \
	--meta "nbdkit=$NBDKIT_VERSION; cache filter: nbd plugin, cache-on-read=true cache-min-block-size=4096 cache-max-size=${CACHE_MIB}M cache=${NBDKIT_CACHE_MODE:-writeback (default)}" \
	--meta "fio=$FIO_VERSION, nbd engine, ${RUNTIME}s measured after ${RAMP}s ramp, default randrepeat" \
	--meta "kernel=$KERNEL" \
	--meta "cpu_model=$CPU_MODEL, $NCPU CPUs; system on CPU $SERVER_CPU, SAN on CPU $SAN_CPU, fio on CPU $CLIENT_CPU" \
	--meta "san=nbdkit file over a ${SIZE_MIB} MiB random-data file on tmpfs, --filter=delay rdelay=$SAN_DELAY wdelay=$SAN_DELAY (outermost: log and stats filters), unix socket" \
	--meta "cache=both cache files in $CACHE_DIR ($CACHE_FSTYPE, $CACHE_FS), empty at every system start" \
	--meta "workloads=warm: ${WSET_MIB} MiB working set, warmed by $WARM_PASSES random 64 KiB read passes (nbdkit memory: one write pass); cold: whole disk, fresh system; zipf:$ZIPF_THETA, rwmixread=$ZIPF_READ_PCT, whole disk, warmed by the same job once (other seed, $((RUNTIME + RAMP)) s)" \
	--meta "rounds_desc=$ROUNDS; in each round and workload group every system gets a fresh SAN and a fresh start, in turn ($SYSTEMS)" \
	--meta "loadavg_start=$LOADAVG_START" \
	--meta "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" \
	--meta "elapsed_s=$(($(date +%s) - T_START))" \
	--meta "runtime_s=$RUNTIME" --meta "ramp_s=$RAMP" --meta "size_mib=$SIZE_MIB" \
	--meta "cache_mib=$CACHE_MIB" --meta "wset_mib=$WSET_MIB" ||
	die "report generation failed"
save_raw "$base" "fio JSON, CPU samples, SAN bins and stats, server logs, flashtierd metrics"
echo "elapsed: $(($(date +%s) - T_START)) s"
finish
