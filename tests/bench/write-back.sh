#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# flashtierd's write-back mode vs the cache device itself and vs nbdkit's
# cache filter in writeback mode, side by side, in one run.
#
# The "SAN": nbdkit file over a random-data file on tmpfs behind the delay
# filter (rdelay=wdelay=1 ms), with the stats filter outermost so every
# write that reaches it is counted, on a unix socket; a fresh SAN process for
# every measured run (the disk file keeps what earlier runs wrote).
# Systems (one at a time):
#   device-direct       fio straight at a file in BENCH_CACHE_DIR, the file
#                       system flashtierd's cache file lives on: psync
#                       (QD1) or libaio (QD32), direct=1. The file is written
#                       once in full first, like the cache file.
#   flashtierd          backing = the SAN's nbd+unix URI, cache file of
#                       CACHE_MIB in BENCH_CACHE_DIR (written in full once,
#                       then "reformat": true at every start: a fresh cache
#                       on allocated blocks), "log_size": LOG_SIZE, the
#                       volume in write-back mode with its default
#                       dirty_limit (the whole log), 1 reactor
#   nbdkit-memory       nbdkit memory (QD1 only): the NBD round trip with no
#                       I/O behind it, the floor any NBD server starts from
#   nbdkit-cache        nbdkit --filter=cache nbd socket=SAN cache=writeback
#                       cache-min-block-size=4096 (no cache-max-size: nothing
#                       is reclaimed), its cache file in BENCH_CACHE_DIR
# Workloads (4 KiB random writes over the whole disk, fio, BENCH_RUNTIME s):
#   randwrite-qd1       target (a): flashtierd's p50 latency within 1.3x of
#                       the device's own O_DIRECT 4 KiB write (fio's total
#                       latency, "lat"); nbdkit-cache for context
#   randwrite-qd32      target (b): flashtierd's IOPS >= nbdkit cache
#                       filter's; device-direct (libaio) for context
#   verify              (c) write VERIFY_MIB of 4 KiB random writes at QD32,
#                       then read everything back (crc32c, every error
#                       counted: continue_on_error=verify), through
#                       flashtierd-small (log_size VERIFY_LOG_SIZE,
#                       dirty_limit VERIFY_DIRTY_LIMIT: destage and
#                       throttling run all along) and nbdkit-cache-small
#                       (cache-max-size=VERIFY_NBDKIT_CACHE_MIB: it reclaims,
#                       dropping dirty blocks it has not written back);
#                       then flashtierd is drained (SIGUSR1, "drained"
#                       logged) and nbdkit is sent a FLUSH (qemu-io), each is
#                       stopped, and the same data is verified again straight
#                       on the SAN. Each run uses its own fio seed, and fio
#                       checks it (rw=randrw, rwmixread=0), so an earlier
#                       run's blocks never pass for this run's.
# A run whose fio has not finished RUNTIME + 20 s after it started (600 s
# for (c)) is killed and reported as HUNG (the server stopped completing
# requests), with flashtierd's metrics at that moment; the benchmark goes on.
# flashtierd's throttled writes, destaged bytes and dirty bytes come from its
# /metrics (before and after each run). Rounds are outermost; in each round
# every (workload, system) pair gets a fresh start. The report gives medians
# over rounds and per-round ratios, "met/not met" per target, and goes to
# tests/bench/results/write-back-<date>.md (+ .json and a .raw/ folder).
#
# Usage: AGENT=build/h2/flashtierd tests/bench/write-back.sh   (or make bench-writeback)
# Environment (all optional):
#   AGENT                    flashtierd binary (default: build/flashtierd)
#   BENCH_ROUNDS             rounds (default 3)
#   BENCH_RUNTIME            seconds measured per performance run (default 8)
#   BENCH_SIZE_MIB           SAN disk size, the region written (default 1024)
#   BENCH_CACHE_MIB          flashtierd's cache file (default 2048)
#   BENCH_LOG_SIZE           its "log_size" (default "50%")
#   BENCH_DEV_MIB            size of the device-direct file (default 1024)
#   BENCH_VERIFY_MIB         data written and verified in (c) (default 128)
#   BENCH_VERIFY_LOG_SIZE    flashtierd-small's log_size (default 32M)
#   BENCH_VERIFY_DIRTY_LIMIT flashtierd-small's dirty_limit (default 8M)
#   BENCH_VERIFY_NBDKIT_CACHE_MIB  nbdkit-cache-small's cache-max-size (default 32)
#   BENCH_SAN_DELAY          delay filter rdelay/wdelay (default 1ms)
#   BENCH_CACHE_DIR          file system of the cache files and the device-direct
#                            file (default /var/tmp; must support O_DIRECT)
#   BENCH_SERVER_CPU         CPU of the system under test (default 0)
#   BENCH_CLIENT_CPU         CPU of fio and this script (default 1)
#   BENCH_SAN_CPU            CPU(s) of the SAN (default: both)
#   BENCH_WORKLOADS          subset of "randwrite-qd1 randwrite-qd32 verify"
#   BENCH_RESULTS            results directory (default tests/bench/results)
#   BENCH_STRICT             1 = exit 1 when a target is missed
#   BENCH_START_TIMEOUT      seconds to wait for a socket (default 15)
#   BENCH_DRAIN_TIMEOUT      seconds to wait for flashtierd's drain in (c) (default 300)
# shellcheck disable=SC2317 # functions invoked from traps
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PROG=write-back
REPORT=$HERE/writeback_report.py
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

AGENT=${AGENT:-$ROOT/build/flashtierd}
ROUNDS=${BENCH_ROUNDS:-3}
RUNTIME=${BENCH_RUNTIME:-8}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
CACHE_MIB=${BENCH_CACHE_MIB:-2048}
LOG_SIZE=${BENCH_LOG_SIZE:-50%}
DEV_MIB=${BENCH_DEV_MIB:-1024}
VERIFY_MIB=${BENCH_VERIFY_MIB:-128}
VERIFY_LOG_SIZE=${BENCH_VERIFY_LOG_SIZE:-32M}
VERIFY_DIRTY_LIMIT=${BENCH_VERIFY_DIRTY_LIMIT:-8M}
VERIFY_NBDKIT_CACHE_MIB=${BENCH_VERIFY_NBDKIT_CACHE_MIB:-32}
SAN_DELAY=${BENCH_SAN_DELAY:-1ms}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
SAN_CPU=${BENCH_SAN_CPU:-$SERVER_CPU,$CLIENT_CPU}
ALL_WORKLOADS="randwrite-qd1 randwrite-qd32 verify"
WORKLOADS=${BENCH_WORKLOADS:-$ALL_WORKLOADS}
RESULTS=${BENCH_RESULTS:-$HERE/results}
STRICT=${BENCH_STRICT:-0}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}
DRAIN_TIMEOUT=${BENCH_DRAIN_TIMEOUT:-300}
CACHE_BASE=${BENCH_CACHE_DIR:-/var/tmp}

CACHE_DIR=
SAN_PID=
SYSTEM=
WORKLOAD=
ROUND=

cleanup_hook() {
	if [ -n "$SERVER_PID" ]; then
		log "stopping $SYSTEM (pid $SERVER_PID)"
		kill_and_reap "$SERVER_PID" 5
	fi
	[ -n "$SAN_PID" ] && kill_and_reap "$SAN_PID" 5
	if [ -n "$CACHE_DIR" ] && [ -d "$CACHE_DIR" ]; then rm -rf -- "$CACHE_DIR"; fi
	return 0
}

# ---------------------------------------------------------------- checks
check_tools
command -v qemu-io >/dev/null || die "'qemu-io' (qemu-utils) not found in PATH"
for v in ROUNDS RUNTIME SIZE_MIB CACHE_MIB DEV_MIB VERIFY_MIB VERIFY_NBDKIT_CACHE_MIB DRAIN_TIMEOUT; do
	case ${!v} in '' | *[!0-9]*) die "BENCH_$v must be a whole number, got '${!v}'" ;; esac
done
[ "$ROUNDS" -ge 1 ] || die "BENCH_ROUNDS must be >= 1"
[ "$RUNTIME" -ge 1 ] || die "BENCH_RUNTIME must be >= 1"
[ "$VERIFY_MIB" -le "$SIZE_MIB" ] || die "BENCH_VERIFY_MIB must not exceed BENCH_SIZE_MIB"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"
for p in file nbd; do
	nbdkit "$p" --version >/dev/null 2>&1 || die "nbdkit $p plugin not available"
done
for f in delay stats cache; do
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
[ -d "$CACHE_BASE" ] || die "BENCH_CACHE_DIR=$CACHE_BASE is not a directory"
shm_avail_kib=$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')
[ "$shm_avail_kib" -gt $(((SIZE_MIB + 256) * 1024)) ] ||
	die "/dev/shm has $((shm_avail_kib / 1024)) MiB free, need ~$((SIZE_MIB + 256)) MiB"
cache_avail_kib=$(df -Pk "$CACHE_BASE" | awk 'NR == 2 { print $4 }')
need_kib=$(((CACHE_MIB + DEV_MIB + 2 * SIZE_MIB + 512) * 1024))
[ "$cache_avail_kib" -gt "$need_kib" ] ||
	die "$CACHE_BASE has $((cache_avail_kib / 1024)) MiB free, need ~$((need_kib / 1024)) MiB"

taskset -cp "$CLIENT_CPU" $$ >/dev/null
collect_meta
T_START=$(date +%s)
# shellcheck disable=SC2034 # print_smoke_note (lib.sh) reads it
RAMP=0

# ---------------------------------------------------------------- setup
WORK=$(mktemp -d /dev/shm/flashtier-wbbench.XXXXXX)
CACHE_DIR=$(mktemp -d "$CACHE_BASE/flashtier-wbbench-cache.XXXXXX")
CACHE_FS=$(df -P "$CACHE_DIR" | awk 'NR == 2 { print $1 " on " $6 }')
CACHE_FSTYPE=$(stat -f -c %T "$CACHE_DIR")
DISK=$WORK/san.img
RUNS=$WORK/runs
mkdir -p "$RUNS"
cd "$WORK" # fio may drop files in the working directory
SAN_SOCK=$WORK/san.sock
SAN_URI="nbd+unix:///?socket=$SAN_SOCK"
METRICS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CACHE_FILE=$CACHE_DIR/flashtierd.cache
DEV_FILE=$CACHE_DIR/device-direct.img

echo "== flashtier write-back benchmark ($DATE)"
print_versions
echo "   CPU:        $CPU_MODEL, $NCPU CPUs; system on CPU $SERVER_CPU, SAN on CPU $SAN_CPU, fio on CPU $CLIENT_CPU"
echo "   SAN:        nbdkit file, ${SIZE_MIB} MiB on tmpfs, delay rdelay=$SAN_DELAY wdelay=$SAN_DELAY"
echo "   cache dir:  $CACHE_DIR ($CACHE_FSTYPE, $CACHE_FS)"
echo "   flashtierd: cache ${CACHE_MIB} MiB, log_size $LOG_SIZE; (c): log_size $VERIFY_LOG_SIZE, dirty_limit $VERIFY_DIRTY_LIMIT"
echo "   rounds:     $ROUNDS; workloads: ${selected[*]}; ${RUNTIME}s per performance run"
print_smoke_note

fio --name=odirect-check --filename="$CACHE_DIR/odirect-check" --size=1M --rw=write --bs=4k \
	--direct=1 --ioengine=psync --output-format=terse >"$WORK/odirect-check.log" 2>&1 ||
	die "O_DIRECT writes fail on $CACHE_DIR ($CACHE_FSTYPE); set BENCH_CACHE_DIR: $(tail -n 3 "$WORK/odirect-check.log")"
rm -f "$CACHE_DIR/odirect-check"

log "filling $DISK with $SIZE_MIB MiB of random data"
dd if=/dev/urandom of="$DISK" bs=1M count="$SIZE_MIB" iflag=fullblock status=none ||
	die "cannot create $DISK"
log "writing the cache file ($CACHE_MIB MiB) and the device-direct file ($DEV_MIB MiB) in full"
dd if=/dev/zero of="$CACHE_FILE" bs=1M count="$CACHE_MIB" oflag=direct status=none ||
	die "cannot create $CACHE_FILE"
dd if=/dev/zero of="$DEV_FILE" bs=1M count="$DEV_MIB" oflag=direct status=none ||
	die "cannot create $DEV_FILE"

# ---------------------------------------------------------------- servers
start_san() {
	rm -f "$SAN_SOCK"
	taskset -c "$SAN_CPU" nbdkit --foreground --unix "$SAN_SOCK" --exit-with-parent \
		--filter=stats --filter=delay file file="$DISK" rdelay="$SAN_DELAY" wdelay="$SAN_DELAY" \
		statsfile="$RUNS/$SYSTEM.$WORKLOAD.r$ROUND.san-stats" \
		>"$WORK/san.log" 2>&1 &
	SAN_PID=$!
	wait_socket "$SAN_PID" "$SAN_SOCK" SAN
}

stop_san() {
	terminate SAN "$SAN_PID"
	SAN_PID=
}

# flashtierd_config LOG_SIZE [DIRTY_LIMIT]
flashtierd_config() {
	local extra=''
	[ -n "${2:-}" ] && extra=", \"dirty_limit\": \"$2\""
	cat >"$WORK/flashtierd.json" <<-EOF
		{
		  "listen": "unix:$SOCK",
		  "metrics": "127.0.0.1:$METRICS_PORT",
		  "reactors": 1,
		  "cache": { "path": "$CACHE_FILE", "size": "${CACHE_MIB}M", "reformat": true,
		             "log_size": "$1", "state_file": "$WORK/flashtierd.state" },
		  "volumes": {
		    "bench": {
		      "backing": "$SAN_URI",
		      "cache": { "mode": "write-back"$extra }
		    }
		  }
		}
	EOF
}

# start_system: SYSTEM (not device-direct) on a fresh SAN; sets URI.
start_system() {
	local export_name=''
	SOCK=$WORK/$SYSTEM.sock
	rm -f "$SOCK"
	start_san
	case $SYSTEM in
	flashtierd | flashtierd-small)
		export_name=bench
		if [ "$SYSTEM" = flashtierd ]; then
			flashtierd_config "$LOG_SIZE"
		else
			flashtierd_config "$VERIFY_LOG_SIZE" "$VERIFY_DIRTY_LIMIT"
		fi
		taskset -c "$SERVER_CPU" "$AGENT" --config "$WORK/flashtierd.json" >"$WORK/$SYSTEM.log" 2>&1 &
		SERVER_PID=$!
		wait_socket "$SERVER_PID" "$SOCK" "$SYSTEM"
		;;
	nbdkit-memory)
		taskset -c "$SERVER_CPU" nbdkit --foreground --unix "$SOCK" --exit-with-parent \
			memory "${SIZE_MIB}M" >"$WORK/$SYSTEM.log" 2>&1 &
		SERVER_PID=$!
		wait_socket "$SERVER_PID" "$SOCK" "$SYSTEM"
		;;
	nbdkit-cache | nbdkit-cache-small)
		rm -rf "${CACHE_DIR:?}/nbdkit-tmp"
		mkdir -p "$CACHE_DIR/nbdkit-tmp"
		local max=()
		[ "$SYSTEM" = nbdkit-cache-small ] && max=(cache-max-size="${VERIFY_NBDKIT_CACHE_MIB}M")
		TMPDIR=$CACHE_DIR/nbdkit-tmp taskset -c "$SERVER_CPU" nbdkit --foreground --unix "$SOCK" \
			--exit-with-parent --filter=cache nbd socket="$SAN_SOCK" \
			cache=writeback cache-min-block-size=4096 "${max[@]}" >"$WORK/$SYSTEM.log" 2>&1 &
		SERVER_PID=$!
		wait_socket "$SERVER_PID" "$SOCK" "$SYSTEM"
		;;
	esac
	URI="nbd+unix:///$export_name?socket=$SOCK"
	check_size "$URI" "$SYSTEM"
}

stop_system() {
	terminate "$SYSTEM" "$SERVER_PID"
	SERVER_PID=
	check_log "$SYSTEM" "$WORK/$SYSTEM.log"
	cp "$WORK/$SYSTEM.log" "$RUNS/$SYSTEM.$WORKLOAD.r$ROUND.server.log"
	stop_san
}

scrape() { # OUT
	case $SYSTEM in flashtierd*) ;; *) return 0 ;; esac
	python3 "$REPORT" scrape "http://127.0.0.1:$METRICS_PORT/metrics" "$1" ||
		log "WARNING: cannot read flashtierd's metrics"
}

# metric NAME: flashtierd's value of NAME for the volume
metric() {
	python3 - "$METRICS_PORT" "$1" <<-'EOF'
		import sys, urllib.request
		port, name = sys.argv[1:]
		text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
		for line in text.splitlines():
		    if line.startswith(name + "{") and 'volume="bench"' in line:
		        print(int(float(line.rsplit(" ", 1)[1])))
		        break
		else:
		    sys.exit(f"metric {name} not found")
	EOF
}

print_run() { # OUT-PREFIX
	python3 - "$1.fio.json" >&2 <<-'EOF'
		import json, sys
		t = open(sys.argv[1]).read(); j = json.loads(t[t.index("{"):])["jobs"][0]
		w = j["write"]; p = w["lat_ns"].get("percentile", {})
		print(f"{w['iops']:>10,.0f} IOPS  write lat p50 {p.get('50.000000', 0)/1000:8.1f} us"
		      f"  p99 {p.get('99.000000', 0)/1000:8.1f} us  ({w['io_bytes'] >> 20} MiB)")
	EOF
}

# ---------------------------------------------------------------- measuring
# fio_limited OUT LIMIT fio-args...: fio on CLIENT_CPU, killed after LIMIT
# seconds. Returns 0 when it finished (any status; its status goes to
# OUT.status), 1 when it had to be killed: the server stopped completing
# requests (fio's nbd engine waits for them forever).
fio_limited() {
	local out=$1 limit=$2 rc=0
	shift 2
	timeout -k 5 "$limit" taskset -c "$CLIENT_CPU" fio --output-format=json \
		--output="$out.fio.json" "$@" >"$out.fio.log" 2>&1 &
	FIO_PID=$!
	# 2>/dev/null: bash reports a job that died of SIGKILL (timeout -k) there.
	wait "$FIO_PID" 2>/dev/null || rc=$?
	FIO_PID=
	echo "$rc" >"$out.status"
	case $rc in 124 | 137) return 1 ;; esac
	return 0
}

# hung OUT WHAT: record that SYSTEM stopped completing requests during WHAT.
hung() {
	scrape "$1.metrics-hung"
	echo "$2: fio had not finished after $3 s; $SYSTEM stopped completing requests" >"$1.hang"
	if [ -f "$1.metrics-hung" ]; then
		grep -E '^flashtier_(cache_(dirty_bytes|log_used_bytes|log_limit_bytes|throttled_writes_total|destaged_bytes_total)|requests_total.*"write")' \
			"$1.metrics-hung" >>"$1.hang" || true
	fi
	echo "HUNG: fio killed after $3 s (see $(basename "$1").hang)" >&2
	log "WARNING: $SYSTEM stopped completing requests during $2 (round $ROUND): $(tr '\n' ' ' <"$1.hang")"
}

measure() { # QD
	local qd=$1 out=$RUNS/$SYSTEM.$WORKLOAD.r$ROUND limit=$((RUNTIME + 20))
	local common=(--name="$WORKLOAD" --rw=randwrite --bs=4k --iodepth="$qd" --time_based=1
		--runtime="${RUNTIME}s" --lat_percentiles=1 --percentile_list=50:90:99:99.9 --numjobs=1)
	printf '   r%-3s %-20s %-16s ' "$ROUND" "$SYSTEM" "$WORKLOAD" >&2
	if [ "$SYSTEM" = device-direct ]; then
		local engine=psync
		[ "$qd" -gt 1 ] && engine=libaio
		run_fio "$SYSTEM" "$out" "${common[@]}" --filename="$DEV_FILE" --size="${DEV_MIB}M" \
			--ioengine="$engine" --direct=1
	else
		scrape "$out.metrics-before"
		if ! fio_limited "$out" "$limit" "${common[@]}" --ioengine=nbd --uri="$URI" --size="${SIZE_MIB}M"; then
			hung "$out" "$WORKLOAD" "$limit"
			return 0
		fi
		if [ "$(cat "$out.status")" -ne 0 ] || grep -q '"error" : [1-9]' "$out.fio.json" 2>/dev/null; then
			cat "$out.fio.log" >&2 || true
			die "fio failed (status $(cat "$out.status")) against $SYSTEM"
		fi
		scrape "$out.metrics-after"
		kill -0 "$SERVER_PID" 2>/dev/null || die "$SYSTEM died during $WORKLOAD (round $ROUND)"
	fi
	print_run "$out"
}

# fio_verify OUT LIMIT fio-args...: verify errors are results, not failures
# (fio exits non-zero when it found any); 1 if fio had to be killed.
fio_verify() {
	local out=$1 limit=$2
	shift 2
	fio_limited "$out" "$limit" "$@" || return 1
	python3 - "$out.fio.json" "$(cat "$out.status")" >&2 <<-'EOF' || die "fio failed (status $(cat "$out.status")) without a result: fio $*"
		import json, sys
		t = open(sys.argv[1]).read(); j = json.loads(t[t.index("{"):])["jobs"][0]
		print(f"written {j['write']['io_bytes'] >> 20} MiB, verified {j['read']['io_bytes'] >> 20} MiB, "
		      f"verify errors {j.get('total_err', 0)}, fio status {sys.argv[2]}")
	EOF
}

# (c): write then verify through the system; drain/flush; verify on the SAN.
verify_run() {
	local out=$RUNS/$SYSTEM.$WORKLOAD.r$ROUND seed limit=600
	case $SYSTEM in flashtierd-small) seed=$((ROUND * 1000 + 1)) ;; *) seed=$((ROUND * 1000 + 2)) ;; esac
	# rw=randrw, rwmixread=0: random writes, but fio 3.33 checks each block's
	# rand_seed only for read-write jobs; with randwrite a lost block that
	# still holds an earlier run's fio data (same offset and size) passes.
	local job=(--name=verify --rw=randrw --rwmixread=0 --bs=4k --iodepth=32 --size="${VERIFY_MIB}M"
		--verify=crc32c --verify_fatal=0 --continue_on_error=verify --verify_state_save=0
		--randseed="$seed" --ioengine=nbd)
	printf '   r%-3s %-20s %-16s ' "$ROUND" "$SYSTEM" "write+verify" >&2
	scrape "$out.metrics-before"
	if ! fio_verify "$out" "$limit" "${job[@]}" --uri="$URI" --do_verify=1; then
		hung "$out" "write+verify" "$limit"
	else
		scrape "$out.metrics-after"
		kill -0 "$SERVER_PID" 2>/dev/null || die "$SYSTEM died during $WORKLOAD (round $ROUND)"
		case $SYSTEM in
		flashtierd-small)
			local t0 dirty
			t0=$(date +%s)
			dirty=$(metric flashtier_cache_dirty_bytes)
			kill -USR1 "$SERVER_PID"
			while ! grep -q "volume 'bench': drained" "$WORK/$SYSTEM.log" ||
				[ "$(metric flashtier_cache_dirty_bytes)" -ne 0 ]; do
				if [ $(($(date +%s) - t0)) -ge "$DRAIN_TIMEOUT" ]; then
					echo "drain (SIGUSR1) not finished after ${DRAIN_TIMEOUT}s, $(metric flashtier_cache_dirty_bytes) dirty bytes left" >"$out.note"
					log "WARNING: $(cat "$out.note")"
					break
				fi
				kill -0 "$SERVER_PID" 2>/dev/null || die "flashtierd died while draining"
				sleep 0.1
			done
			[ -f "$out.note" ] ||
				echo "drain (SIGUSR1) of $dirty dirty bytes took $(($(date +%s) - t0)) s" >"$out.note"
			scrape "$out.metrics-drained"
			;;
		nbdkit-cache-small)
			timeout 300 qemu-io -f raw -c flush "$URI" >"$out.flush.log" 2>&1 ||
				echo "FLUSH failed: $(tail -n 2 "$out.flush.log")" >"$out.note"
			;;
		esac
	fi
	terminate "$SYSTEM" "$SERVER_PID"
	SERVER_PID=
	check_log "$SYSTEM" "$WORK/$SYSTEM.log"
	cp "$WORK/$SYSTEM.log" "$RUNS/$SYSTEM.$WORKLOAD.r$ROUND.server.log"
	printf '   r%-3s %-20s %-16s ' "$ROUND" "$SYSTEM" "verify on SAN" >&2
	fio_verify "$out-san" "$limit" "${job[@]}" --uri="$SAN_URI" --verify_only=1 ||
		die "the verify pass straight on the SAN did not finish"
	stop_san
}

# ---------------------------------------------------------------- run
systems_for() {
	case $1 in
	randwrite-qd1) echo device-direct flashtierd nbdkit-cache nbdkit-memory ;;
	randwrite-qd32) echo device-direct flashtierd nbdkit-cache ;;
	verify) echo flashtierd-small nbdkit-cache-small ;;
	esac
}
all_systems="device-direct flashtierd nbdkit-cache nbdkit-memory flashtierd-small nbdkit-cache-small"
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
	for WORKLOAD in "${selected[@]}"; do
		echo "== round $ROUND/$ROUNDS: $WORKLOAD"
		for SYSTEM in $(systems_for "$WORKLOAD"); do
			if [ "$SYSTEM" = device-direct ]; then
				measure "${WORKLOAD#randwrite-qd}"
				continue
			fi
			start_system
			if [ "$WORKLOAD" = verify ]; then
				verify_run
			else
				measure "${WORKLOAD#randwrite-qd}"
				stop_system
			fi
		done
	done
done

# ---------------------------------------------------------------- report
mkdir -p "$RESULTS"
base=$RESULTS/write-back-$DATE
systems_csv=${all_systems// /,}
workloads_csv=$(IFS=,; echo "${selected[*]}")
echo
python3 "$REPORT" summarize --runs "$RUNS" --rounds "$ROUNDS" --clk-tck "$CLK_TCK" \
	--systems "$systems_csv" --workloads "$workloads_csv" \
	--md "$base.md" --json "$base.json" --verdict-file "$WORK/verdict" \
	--meta "date=$DATE" \
	--meta "flashtierd=$AGENT_VERSION, git $GIT_REV ($AGENT); \"reactors\": 1, cache ${CACHE_MIB}M (reformatted at every start), log_size $LOG_SIZE, write-back, default dirty_limit/watermarks" \
	--meta "nbdkit=$NBDKIT_VERSION; cache filter: nbd plugin, cache=writeback cache-min-block-size=4096, no cache-max-size (perf) / cache-max-size=${VERIFY_NBDKIT_CACHE_MIB}M (verify)" \
	--meta "fio=$FIO_VERSION; nbd engine for the NBD servers, psync (QD1) / libaio (QD32) direct=1 on a ${DEV_MIB} MiB file for the device; ${RUNTIME}s per run, 4 KiB randwrite over ${SIZE_MIB} MiB" \
	--meta "kernel=$KERNEL" \
	--meta "cpu_model=$CPU_MODEL, $NCPU CPUs; system on CPU $SERVER_CPU, SAN on CPU $SAN_CPU, fio on CPU $CLIENT_CPU" \
	--meta "san=nbdkit file over a ${SIZE_MIB} MiB random-data file on tmpfs, --filter=delay rdelay=$SAN_DELAY wdelay=$SAN_DELAY (stats filter outermost), unix socket, fresh process per run" \
	--meta "cache=$CACHE_DIR ($CACHE_FSTYPE, $CACHE_FS): flashtierd's cache file and the device-direct file, both written in full first; nbdkit's cache file (TMPDIR)" \
	--meta "workloads=${selected[*]}" \
	--meta "verify_desc=Each run writes ${VERIFY_MIB} MiB of 4 KiB random writes at QD32 (fio crc32c headers), then reads all of it back through the same server, counting every block that reads back wrong (continue_on_error=verify). flashtierd-small: log_size $VERIFY_LOG_SIZE, dirty_limit $VERIFY_DIRTY_LIMIT (destage and throttling all along), then SIGUSR1 drain; nbdkit-cache-small: cache-max-size=${VERIFY_NBDKIT_CACHE_MIB}M (it reclaims), then one FLUSH (qemu-io). Then each server is stopped and the same data verified straight on the SAN." \
	--meta "rounds_desc=$ROUNDS; in each round and workload every system gets a fresh SAN process and a fresh start" \
	--meta "loadavg_start=$LOADAVG_START" \
	--meta "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" \
	--meta "elapsed_s=$(($(date +%s) - T_START))" ||
	die "report generation failed"
save_raw "$base" "fio JSON and logs, SAN stats, server logs, flashtierd metrics"
echo "elapsed: $(($(date +%s) - T_START)) s"
finish
