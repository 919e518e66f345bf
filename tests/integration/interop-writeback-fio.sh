#!/bin/sh
# kill -9 of flashtierd under fio's crc32c verify on write-back volumes:
# no acknowledged write may be lost.
#
# Writes run at iodepth=1 per job (6 jobs, so 6 writes in flight): fio
# 3.33's verify state is only sound when a job's writes complete in the
# order they were issued. It records how many writes were issued and the
# offsets of the last iodepth completions, and at verify time checks only
# the last iodepth *issued* writes against that list; an older write still
# in flight at the kill (a slow partial-block write waiting for its merge
# read, while 15 later ones completed) is outside that window and verified
# as if acknowledged. (Newer fio saves the in-flight writes themselves.)
# Replay a run with FT_SEED=N.
#
# Two write-back volumes: "wbf" on a file backing store, "wbn" on an NBD
# backing store (nbdkit file behind --filter=delay wdelay=1ms, with a 4 MiB
# dirty_limit, so its writes are throttled and the destager is always behind).
# One fio process drives both through its nbd ioengine: random writes
# (rw=randrw, rwmixread=0: see COMMON below), 2 jobs on wbf and 4 on wbn, crc32c
# verify headers (do_verify=0), a FLUSH every 16/32 writes (fio's fsync=N:
# the nbd engine sends NBD_CMD_FLUSH), 512-byte and unaligned pieces on wbn
# (partial-block writes). Each round:
#   1. at a random moment (seeded; the seed is printed, FT_SEED=N replays it)
#      kill -9 flashtierd; until then /metrics is sampled every 50 ms and
#      flashtier_cache_dirty_bytes must have been > 0 on both volumes.
#      fio then fails (connection lost): expected. fio saves its verify
#      state (--verify_state_save, written to --aux-path as
#      local-JOB-INDEX-verify.state: how many writes each job issued and
#      which of the last ones completed without error) when its jobs exit,
#      or when the script touches its --trigger-file right after the kill
#      (fio 3.33's nbd engine can loop forever once its connection died: fio
#      is killed after a grace period, its log capped with ulimit -f).
#   2. flashtierd restarts with the same config (log replay: it must find
#      dirty data in the log), then fio --verify_only --verify_state_load
#      checks every write that had completed before the kill, on fresh
#      connections: must pass, and must have verified something on every job.
# Negative control (round 2): the backing stores and the cache device are
# snapshotted (agent stopped cleanly, dirty data left in the log) before the
# round's writes; after the kill the snapshot is put back, as if the agent
# had lost every write of the round: the same verify-only pass must fail on
# every job. Then the real post-crash files go back and the round goes on.
# The last round: right after the restart SIGUSR1 drains both volumes
# ("drained" logged, dirty bytes 0, at least as many bytes destaged as the
# restart found dirty), then the verify; a copy of each volume read through
# the agent must equal its backing store byte for byte once the agent is
# stopped; the last round's verify-only pass is run again straight against
# the backing stores (nbdkit file, no agent): must pass; and again against
# copies of them with 4 KiB scribbled every 256 KiB: must fail (second
# negative control).
#
# Environment: FT_SEED (default: time), FT_SOAK=1 (many rounds, wider kill
# window), FT_WB_ROUNDS (rounds; default 3, 40 with FT_SOAK=1),
# FT_WB_MODE=write-through (the same against write-through: skips the
# write-back only checks).
set -eu
. "$(dirname "$0")/lib.sh"
ft_setup

SOAK=${FT_SOAK:-0}
MODE=${FT_WB_MODE:-write-back}
SEED=${FT_SEED:-$(date +%s)}
if [ "$SOAK" = 1 ]; then
	ROUNDS=${FT_WB_ROUNDS:-40}
	KILL_MIN=0.2
	KILL_MAX=4.0
else
	ROUNDS=${FT_WB_ROUNDS:-3}
	KILL_MIN=0.5
	KILL_MAX=2.5
fi
[ "$ROUNDS" -ge 2 ] || ft_fail "FT_WB_ROUNDS must be at least 2 (round 2 has the negative control)"
WB=0
[ "$MODE" = write-back ] && WB=1
ft_log "seed $SEED (FT_SEED=$SEED replays it), $ROUNDS rounds, mode $MODE, soak $SOAK"

# ---------------------------------------------------------------- setup
truncate -s 64M "$T/wbf.img"
truncate -s 192M "$T/wbn.img"
ft_nbdkit slow --filter=delay file "$T/wbn.img" wdelay=1ms
SLOW_SOCK=$NBDKIT_SOCK
SLOW_PID=$NBDKIT_PID
SAN_RESTARTS=0

AGENT_SOCK=$T/nbd.sock
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if [ "$WB" = 1 ]; then
	WBF_EXTRA=', "dirty_limit": "8M", "dirty_max_age": 600'
	WBN_EXTRA=', "dirty_limit": "4M", "dirty_max_age": 600'
	LOG_SIZE='"log_size": "32M",'
else
	WBF_EXTRA=
	WBN_EXTRA=
	LOG_SIZE=
fi
cat >"$T/flashtierd.json" <<EOF
{ "listen": "$AGENT_SOCK",
  "metrics": "127.0.0.1:$PORT",
  "reactors": 2,
  "cache": { "path": "$T/cache.img", "size": "160M", $LOG_SIZE
             "state_file": "$T/cache.state" },
  "volumes": {
    "wbf": { "backing": "$T/wbf.img",
             "cache": { "mode": "$MODE", "sequential_cutoff": "0"$WBF_EXTRA } },
    "wbn": { "backing": "nbd+unix:///?socket=$SLOW_SOCK",
             "cache": { "mode": "$MODE", "sequential_cutoff": "0"$WBN_EXTRA } } } }
EOF

# ---------------------------------------------------------------- helpers

# metric NAME VOLUME: a per-volume metric from /metrics, as an integer.
metric() {
	ft_metric "$PORT" "$1" "$2"
}

# rnd ROUND LO HI: a seeded random number in [LO, HI] (two decimals).
rnd() {
	python3 -c 'import random, sys; r = random.Random(int(sys.argv[1]) * 1000 + int(sys.argv[2])); print("%.2f" % r.uniform(float(sys.argv[3]), float(sys.argv[4])))' \
		"$SEED" "$1" "$2" "$3"
}

# The job layout: identical in the write run and every verify run (fio
# replays the write sequence from randseed, job names and indices).
# jobs URI_WBF URI_WBN: the job sections. wbf is rate-limited in the write
# run (the global --rate_iops), wbn runs flat out into its dirty_limit.
jobs() {
	echo --name=wbf --uri="$1" --numjobs=2 --size=24M --offset_increment=24M \
		--bssplit=4k/70:16k/20:64k/10 --fsync=32
	echo --name=wbn --uri="$2" --numjobs=4 --size=48M --offset_increment=48M \
		--bssplit=512/10:4k/50:16k/20:64k/20 --fsync=16 --rate_iops=0
}
# rw=randrw with rwmixread=0, not randwrite: the same random writes, but for
# a job that is not read-write fio 3.33 takes the expected rand_seed of each
# block from the header it reads (verify.c), so a block still holding an
# earlier round's fio data at the same offset and length would pass for a
# lost write. As a read-write job it checks the seed: a round's verify
# accepts only that round's data.
COMMON="--ioengine=nbd --rw=randrw --rwmixread=0 --verify=crc32c"

# write_start ROUND: the write run of ROUND in the background (FIO_PID); its
# verify state goes to $T/state-ROUND.
write_start() {
	_r=$1
	_sd=$T/state-$_r
	rm -rf "$_sd"
	mkdir -p "$_sd"
	echo $((SEED * 100 + _r)) >"$_sd/seed"
	# Log capped (ulimit -f, 512-byte blocks): fio 3.33's nbd engine may
	# loop on "nbd_poll: ... DEAD" once the agent died.
	# shellcheck disable=SC2046
	(
		set -f # the URIs hold '?'
		ulimit -f 8192 2>/dev/null || true
		exec fio --aux-path="$_sd" --trigger-file="$_sd/trigger" \
			$COMMON --iodepth=1 --randseed="$(cat "$_sd/seed")" --do_verify=0 \
			--verify_state_save=1 --rate_iops=800 $(jobs "$(ft_uri wbf)" "$(ft_uri wbn)")
	) >"$T/fio-write-$_r.txt" 2>&1 &
	FIO_PID=$!
	FT_PIDS_SAVED=$FT_PIDS
	FT_PIDS="$FT_PIDS $FIO_PID"
}

# state_summary DIR: one line about the 6 verify state files fio saved in
# DIR; fails if they are not all there and complete.
state_summary() {
	python3 - "$1" <<'EOF'
# fio 3.33 verify state file (verify-state.h, VSTATE_HDR_VERSION 3), one per
# job: u64 version, u64 size, u64 crc; then the job's thread_io_list:
#   u64 no_comps, u32 depth, u32 nofiles, u64 numberio, u64 index,
#   56 bytes rand state, 64 bytes name, depth * nofiles * (u64 fileno, u64 offset)
import glob, os, struct, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], "local-*-verify.state")))
if len(files) != 6:
    sys.exit(f"expected 6 state files (2 jobs on wbf, 4 on wbn), found {[os.path.basename(f) for f in files]}")
out = []
for f in files:
    b = open(f, "rb").read()
    if len(b) < 24:
        sys.exit(f"{f}: {len(b)} bytes")
    ver, size, _crc = struct.unpack_from("<QQQ", b, 0)
    if ver != 3:
        sys.exit(f"{f}: verify state version {ver}, this parser knows 3 (fio 3.33)")
    if len(b) != 24 + size:
        sys.exit(f"{f}: {len(b)} bytes, header says 24 + {size}")
    no_comps, depth, nofiles, numberio = struct.unpack_from("<QIIQ", b, 24)
    name = b[24 + 32 + 56:24 + 32 + 56 + 64].split(b"\0")[0].decode()
    out.append(f"{name}#{os.path.basename(f).split('-')[2]}: {numberio} writes issued, "
               f"{no_comps} recent completions")
print("fio state: " + "; ".join(out))
EOF
}

# kill_round ROUND: at the round's random moment (the dirty bytes sampled
# until then) freeze the agent (SIGSTOP), touch fio's trigger file so that
# fio saves its verify state, and only then kill -9 the agent: a state
# saved after the kill would also count writes fio issued, and saw fail,
# after it. The copy taken while the agent was frozen is put back after fio
# exits (it may save again on its way out).
kill_round() {
	_r=$1
	_sd=$T/state-$_r
	_delay=$(rnd "$_r" "$KILL_MIN" "$KILL_MAX")
	# Until the kill: sample the dirty bytes of both volumes every 50 ms;
	# prints "MAX_WBF MAX_WBN LAST_WBF LAST_WBN FLUSHES_WBF FLUSHES_WBN".
	_m=$(python3 - "$PORT" "$_delay" <<'EOF'
import sys, time, urllib.request
port, delay = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + delay
mx = {"wbf": -1, "wbn": -1}
last = dict(mx)
fl = {}
def scrape():
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        for v in mx:
            if line.startswith(f'flashtier_cache_dirty_bytes{{volume="{v}",'):
                last[v] = int(float(line.rsplit(" ", 1)[1]))
                mx[v] = max(mx[v], last[v])
            if line.startswith(f'flashtier_requests_total{{volume="{v}",domain="",op="flush"}}'):
                fl[v] = int(float(line.rsplit(" ", 1)[1]))
while True:
    scrape()
    left = end - time.monotonic()
    if left <= 0:
        break
    time.sleep(min(0.05, left))
print(mx["wbf"], mx["wbn"], last["wbf"], last["wbn"], fl.get("wbf", 0), fl.get("wbn", 0))
EOF
	) || ft_fail "round $_r: cannot read /metrics"
	# shellcheck disable=SC2086
	set -- $_m
	kill -0 "$FIO_PID" 2>/dev/null && _fio_state="fio running" || _fio_state="fio had finished"
	# Freeze the agent, have fio save its state, and only then kill -9.
	kill -STOP "$AGENT_PID"
	touch "$_sd/trigger"
	_n=200
	until state_summary "$_sd" >/dev/null 2>&1; do
		_n=$((_n - 1))
		[ "$_n" -gt 0 ] || ft_fail "round $_r: fio saved no verify state within 10 s of its trigger"
		sleep 0.05
	done
	mkdir "$_sd/frozen"
	cp "$_sd"/local-*-verify.state "$_sd/frozen/"
	kill -KILL "$AGENT_PID"
	wait "$AGENT_PID" 2>/dev/null || true
	AGENT_PID=""
	ft_log "round $_r: kill -9 at ${_delay}s ($_fio_state); dirty bytes at the kill wbf $3, wbn $4 (most seen: $1, $2); flushes wbf $5, wbn $6"
	if [ "$WB" = 1 ]; then
		[ "$1" -ge 0 ] && [ "$2" -ge 0 ] || ft_fail "no flashtier_cache_dirty_bytes in /metrics"
		[ "$1" -gt 0 ] || ft_fail "round $_r: wbf never had dirty data before the kill"
		[ "$2" -gt 0 ] || ft_fail "round $_r: wbn never had dirty data before the kill"
	fi
	[ "$5" -gt 0 ] && [ "$6" -gt 0 ] || ft_fail "round $_r: fio sent no FLUSH before the kill"
	# fio exits within 5 s (its nbd engine may loop once the connection died).
	_n=100
	while kill -0 "$FIO_PID" 2>/dev/null &&
		[ "$(ps -o stat= -p "$FIO_PID" 2>/dev/null | cut -c1)" != Z ]; do
		if [ "$_n" -le 0 ]; then
			echo "(fio still running 5 s after the kill: killed)" >>"$T/fio-write-$_r.txt"
			kill -KILL "$FIO_PID" 2>/dev/null || true
			break
		fi
		sleep 0.05
		_n=$((_n - 1))
	done
	_rc=0
	wait "$FIO_PID" 2>/dev/null || _rc=$?
	FIO_PID=""
	FT_PIDS=$FT_PIDS_SAVED
	# Not what fio may have saved again on its way out (see kill_round's comment).
	cp "$_sd"/frozen/local-*-verify.state "$_sd/"
	_st=$(state_summary "$_sd" 2>&1) || ft_fail "round $_r: bad fio verify state in $_sd: $_st"
	ft_log "round $_r: fio exited with status $_rc (connection lost); $_st"
}

# verify_run TAG STATE_DIR URI_WBF URI_WBN: fio verify-only, loading the
# write run's state; fio's JSON in $T/fio-TAG.json, log in $T/fio-TAG.txt;
# returns fio's exit status. verify_state_save=0: it defaults to 1, and a
# verify-only run of a write job would replace the state it loaded with its
# own (no writes issued), so that the next pass loading it would verify
# everything, written or not. iodepth=1: fio 3.33 decides whether a verify
# read falls in the last-iodepth-writes window (where only the writes its
# state lists as completed may be verified) from the count of reads
# *completed*, not issued; at a higher depth it verifies up to that many
# writes that were still in flight at the kill, and fails on them.
verify_run() {
	_rc=0
	set -f # the URIs hold '?'
	# shellcheck disable=SC2046
	fio --aux-path="$2" $COMMON --iodepth=1 --randseed="$(cat "$2/seed")" --verify_only=1 \
		--verify_state_load=1 --verify_state_save=0 --verify_fatal=1 --output-format=json \
		--output="$T/fio-$1.json" $(jobs "$3" "$4") >"$T/fio-$1.txt" 2>&1 || _rc=$?
	set +f
	return "$_rc"
}

# verify_ok TAG STATE_DIR URI_WBF URI_WBN: the verify-only pass must pass
# and must have verified data on each of the 6 jobs.
verify_ok() {
	_rc=0
	verify_run "$@" || _rc=$?
	if [ "$_rc" -ne 0 ] ||
		grep -v -E 'connected to NBD server|^Stop verify' "$T/fio-$1.txt" |
		grep -E -i 'verify|bad magic|crc32c|mismatch|error|fio: ' >&2; then
		cat "$T/fio-$1.txt" >&2
		ft_fail "verify-only pass $1 failed (fio status $_rc): acknowledged writes were lost"
	fi
	python3 - "$T/fio-$1.json" "$1" <<'EOF' || ft_fail "verify-only pass $1: bad results"
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])
assert len(j["jobs"]) == 6, len(j["jobs"])
parts = []
for job in j["jobs"]:
    assert job["error"] == 0, (job["jobname"], job["error"])
    r = job["read"]["io_bytes"]
    assert r > 0, f"{job['jobname']}: nothing verified"
    parts.append(f"{job['jobname']} {r >> 10} KiB")
print(f"   {sys.argv[2]}: verified " + ", ".join(parts))
EOF
}

# verify_fails TAG STATE_DIR URI_WBF URI_WBN: the negative controls: fio must
# report a verify failure on every job.
verify_fails() {
	_rc=0
	verify_run "$@" || _rc=$?
	[ "$_rc" -ne 0 ] || ft_fail "negative control $1: verify passed over lost/changed data"
	python3 - "$T/fio-$1.json" "$T/fio-$1.txt" "$1" <<'EOF' || ft_fail "negative control $1: not every job caught it"
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])
log = open(sys.argv[2], errors="replace").read()
bad = [job["jobname"] for job in j["jobs"] if job["error"] == 0]
assert len(j["jobs"]) == 6 and not bad, f"jobs without a verify error: {bad}"
first = [l for l in log.splitlines() if l.startswith("verify:")][:1]
print(f"   negative control {sys.argv[3]}: all 6 jobs failed verification, e.g. {first[0] if first else '?'}")
EOF
}

# ensure_san: nbdkit 1.32 sometimes aborts when a client dies with replies
# in flight ("raw_send_socket: Assertion `sock >= 0' failed", after the
# kill -9 of the agent). What it acknowledged is in wbn.img already (the
# file plugin answers after pwrite); restart it on the same socket.
ensure_san() {
	if kill -0 "$SLOW_PID" 2>/dev/null &&
		[ "$(ps -o stat= -p "$SLOW_PID" 2>/dev/null | cut -c1)" != Z ]; then
		return 0
	fi
	_rc=0
	wait "$SLOW_PID" 2>/dev/null || _rc=$?
	SAN_RESTARTS=$((SAN_RESTARTS + 1))
	mv "$T/nbdkit-slow.log" "$T/nbdkit-slow-died-$SAN_RESTARTS.txt"
	ft_log "the SAN's nbdkit died (status $_rc: $(tail -n 1 "$T/nbdkit-slow-died-$SAN_RESTARTS.txt")); restarting it"
	FT_PIDS=$(echo " $FT_PIDS " | sed "s/ $SLOW_PID / /")
	rm -f "$SLOW_SOCK"
	ft_nbdkit slow --filter=delay file "$T/wbn.img" wdelay=1ms
	SLOW_PID=$NBDKIT_PID
}

restart_agent() {
	[ -f "$T/agent.log" ] && mv "$T/agent.log" "$T/agent-before.log"
	ensure_san
	ft_agent_start "$T/flashtierd.json"
}

# found_dirty VOLUME: the dirty bytes the (re)started agent found in the
# log for VOLUME ("volume 'V': N dirty bytes found in the write-back log").
found_dirty() {
	sed -n "s/.*volume '$1': \([0-9][0-9]*\) dirty bytes found in the write-back log.*/\1/p" \
		"$T/agent.log" | tail -n 1 | grep . || echo 0
}

# drain: SIGUSR1; both volumes must log "drained" and reach 0 dirty bytes,
# and everything the restart found in the log must have been destaged.
drain() {
	_ff=$(found_dirty wbf)
	_fn=$(found_dirty wbn)
	_df=$(metric flashtier_cache_dirty_bytes wbf)
	_dn=$(metric flashtier_cache_dirty_bytes wbn)
	kill -USR1 "$AGENT_PID"
	_n=600
	while :; do
		if grep -q "volume 'wbf': drained" "$T/agent.log" &&
			grep -q "volume 'wbn': drained" "$T/agent.log" &&
			[ "$(metric flashtier_cache_dirty_bytes wbf)" -eq 0 ] &&
			[ "$(metric flashtier_cache_dirty_bytes wbn)" -eq 0 ]; then
			break
		fi
		_n=$((_n - 1))
		[ "$_n" -gt 0 ] || ft_fail "not drained 30 s after SIGUSR1 (dirty bytes wbf $(metric flashtier_cache_dirty_bytes wbf), wbn $(metric flashtier_cache_dirty_bytes wbn))"
		sleep 0.05
	done
	_sf=$(metric flashtier_cache_destaged_bytes_total wbf)
	_sn=$(metric flashtier_cache_destaged_bytes_total wbn)
	ft_log "drained (SIGUSR1): dirty bytes found at the restart wbf $_ff, wbn $_fn; at SIGUSR1 wbf $_df, wbn $_dn; now 0; destaged since the restart wbf $_sf, wbn $_sn"
	grep "draining [0-9]* dirty bytes" "$T/agent.log" | sed 's/^/   /'
	[ "$_sf" -ge "$_ff" ] && [ "$_sn" -ge "$_fn" ] ||
		ft_fail "fewer bytes destaged than the restart found dirty"
	[ "$(metric flashtier_cache_draining wbf)" -eq 0 ] && [ "$(metric flashtier_cache_draining wbn)" -eq 0 ] ||
		ft_fail "flashtier_cache_draining still 1 after the drain"
}

# ---------------------------------------------------------------- rounds
ft_agent_start "$T/flashtierd.json"
grep -q "cache $MODE" "$T/agent.log" || ft_fail "the agent did not report 'cache $MODE' for the volumes"
r=1
while [ "$r" -le "$ROUNDS" ]; do
	if [ "$r" = 2 ]; then
		# Negative control: the stores and the cache as they are now, agent
		# stopped cleanly (SIGTERM leaves the dirty data in the log).
		if [ "$WB" = 1 ]; then
			d0=$(($(metric flashtier_cache_dirty_bytes wbf) + $(metric flashtier_cache_dirty_bytes wbn)))
		fi
		ft_agent_stop
		for f in wbf.img wbn.img cache.img; do
			cp --sparse=always "$T/$f" "$T/snap-$f"
		done
		restart_agent
		if [ "$WB" = 1 ]; then
			d1=$(($(found_dirty wbf) + $(found_dirty wbn)))
			ft_log "clean restart: $d0 dirty bytes at SIGTERM, $d1 found in the log at the restart"
			[ "$d1" -ge "$d0" ] || ft_fail "dirty data lost across a clean restart"
		fi
	fi
	write_start "$r"
	kill_round "$r"
	if [ "$r" = 2 ]; then
		ft_log "negative control: the round's writes lost (stores and cache device from before it)"
		for f in wbf.img wbn.img cache.img; do
			cp --sparse=always "$T/$f" "$T/post-$f"
			cp --sparse=always "$T/snap-$f" "$T/$f"
		done
		restart_agent
		verify_fails "neg-lost-r$r" "$T/state-$r" "$(ft_uri wbf)" "$(ft_uri wbn)"
		kill -KILL "$AGENT_PID"
		wait "$AGENT_PID" 2>/dev/null || true
		AGENT_PID=""
		for f in wbf.img wbn.img cache.img; do
			cp --sparse=always "$T/post-$f" "$T/$f"
			rm -f "$T/post-$f" "$T/snap-$f"
		done
	fi
	restart_agent
	if [ "$WB" = 1 ]; then
		_f=$(found_dirty wbf)
		_n=$(found_dirty wbn)
		ft_log "round $r: restarted; dirty bytes found in the log: wbf $_f, wbn $_n"
		[ $((_f + _n)) -gt 0 ] || ft_fail "round $r: no dirty data in the log after the kill"
		# The last round: drain first, so the verify reads the drained state.
		[ "$r" -lt "$ROUNDS" ] || drain
	fi
	verify_ok "verify-r$r" "$T/state-$r" "$(ft_uri wbf)" "$(ft_uri wbn)"
	r=$((r + 1))
done
LAST=$T/state-$ROUNDS

# ---------------------------------------------------------------- stores
ft_log "backing stores vs the agent's view"
for v in wbf wbn; do
	nbdcopy "$(ft_uri "$v")" "$T/ref-$v.img" || ft_fail "nbdcopy $v"
done
ft_agent_stop
for v in wbf wbn; do
	cmp "$T/ref-$v.img" "$T/$v.img" >&2 ||
		ft_fail "$v: the backing store differs from what the agent served after the drain"
	rm -f "$T/ref-$v.img"
done
ft_nbdkit direct-wbf file "$T/wbf.img"
D1=$NBDKIT_SOCK
ft_nbdkit direct-wbn file "$T/wbn.img"
D2=$NBDKIT_SOCK
ft_log "verify-only of round $ROUNDS straight against the backing stores"
verify_ok "verify-stores" "$LAST" "nbd+unix:///?socket=$D1" "nbd+unix:///?socket=$D2"

ft_log "negative control: scribbled copies of the stores"
for v in wbf wbn; do
	cp --sparse=always "$T/$v.img" "$T/neg-$v.img"
	python3 - "$T/neg-$v.img" <<'EOF' || ft_fail "scribbling on neg-$v.img"
import os, sys
with open(sys.argv[1], "r+b") as f:
    size = os.fstat(f.fileno()).st_size
    for off in range(12288, size, 262144):
        f.seek(off)
        f.write(os.urandom(4096))
EOF
done
ft_nbdkit neg-wbf file "$T/neg-wbf.img"
N1=$NBDKIT_SOCK
ft_nbdkit neg-wbn file "$T/neg-wbn.img"
N2=$NBDKIT_SOCK
verify_fails "neg-scribbled" "$LAST" "nbd+unix:///?socket=$N1" "nbd+unix:///?socket=$N2"

[ "$SAN_RESTARTS" -eq 0 ] || ft_log "note: the SAN's nbdkit died $SAN_RESTARTS time(s) after a kill and was restarted"
echo "writeback-fio: ok (seed $SEED, $ROUNDS rounds, $MODE)"
