#!/bin/sh
# fio through its nbd ioengine on cached volumes: 4 jobs, each on its own
# 8 MiB (offset_increment), rw=randrw at queue depth 16 with crc32c verify
# (no verify_backlog: fio's verify_only cannot replay a randrw run that
# used it), on a write-through file volume (4K-multiple block sizes, so
# every block can be cached) and a write-around volume behind a slow nbdkit
# (512-byte pieces among the sizes: partial-block writes). Then verify-only
# passes of the same layout on fresh connections after a clean restart and
# after kill -9: they must pass, and the write-through volume's must come
# from the cache (hit bytes from /metrics). A negative control shows the
# verify-only pass does catch changed data.
set -eu
. "$(dirname "$0")/lib.sh"
ft_setup

VOL_SIZE=32M
truncate -s "$VOL_SIZE" "$T/wt.img"
truncate -s "$VOL_SIZE" "$T/wa.img"
ft_nbdkit slow --filter=delay file "$T/wa.img" rdelay=1ms wdelay=1ms

AGENT_SOCK=$T/nbd.sock
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$T/flashtierd.json" <<EOF
{ "listen": "$AGENT_SOCK",
  "metrics": "127.0.0.1:$PORT",
  "reactors": 2,
  "cache": { "path": "$T/cache.img", "size": "128M" },
  "volumes": {
    "wt": { "backing": "$T/wt.img",
            "cache": { "mode": "write-through", "sequential_cutoff": "0" } },
    "wa": { "backing": "nbd+unix:///?socket=$NBDKIT_SOCK",
            "cache": { "mode": "write-around", "sequential_cutoff": "0" } } } }
EOF
ft_agent_start "$T/flashtierd.json"
FT_FIO_SHOW_JSON=1 # fio's JSON too when a run fails

# metric NAME VOLUME: a cache counter of VOLUME from /metrics.
metric() {
	ft_metric "$PORT" "$1" "$2"
}

bssplit_of() {
	case $1 in
	wt) echo 4k/50:16k/20:64k/20:256k/10 ;;
	*) echo 512/10:4k/40:64k/30:256k/20 ;;
	esac
}

# run_fio VOLUME TAG ARGS...: fio must exit 0 with no error and no verify
# complaint; prints the bytes the 4 jobs wrote (TAG=write) or verified.
run_fio() {
	_vol=$1
	_tag=$2
	shift 2
	ft_fio "$_vol" "$_tag" --name="$_vol" \
		--numjobs=4 --offset_increment=8M --size=8M --iodepth=16 \
		--rw=randrw --rwmixread=40 --bssplit="$(bssplit_of "$_vol")" --randseed=5151 "$@"
	python3 - "$FT_FIO_OUT.json" "$_tag" <<'EOF' || ft_fail "fio $_vol $_tag: bad results"
import json, sys
j = json.load(open(sys.argv[1]))
tag = sys.argv[2]
assert len(j["jobs"]) == 4, len(j["jobs"])
total = 0
for job in j["jobs"]:
    assert job["error"] == 0, job["error"]
    w, r = job["write"]["io_bytes"], job["read"]["io_bytes"]
    if tag == "write":
        assert w > 1 << 20 and r > 1 << 20, f"job wrote {w} and read {r}: not a mix"
        total += w
    else:
        assert r > 0, "nothing verified"
        total += r
print(total)
EOF
}

for vol in wt wa; do
	ft_log "fio randrw + verify on $vol"
	run_fio "$vol" write --do_verify=1 >"$T/written-$vol"
	fills=$(metric flashtier_cache_fills_total "$vol")
	[ "$fills" -gt 0 ] || ft_fail "$vol: nothing was cached during the write pass"
done

# verify_pass TAG: verify-only on both volumes; the write-through volume's
# verify reads must (almost) all be hits.
verify_pass() {
	for vol in wt wa; do
		ft_log "fio verify-only on $vol ($1)"
		h0=$(metric flashtier_cache_hit_bytes_total "$vol")
		run_fio "$vol" "$1" --verify_only=1 >/dev/null
		h1=$(metric flashtier_cache_hit_bytes_total "$vol")
		written=$(cat "$T/written-$vol")
		ft_log "$vol: $((h1 - h0)) bytes from the cache, $written written by fio"
		[ $((h1 - h0)) -gt 0 ] || ft_fail "$vol: the verify-only pass ($1) had no cache hit"
		if [ "$vol" = wt ] && [ $(((h1 - h0) * 10)) -lt $((written * 9)) ]; then
			ft_fail "wt: only $((h1 - h0)) of $written verified bytes came from the cache ($1)"
		fi
	done
}

ft_log "clean restart"
ft_agent_stop
ft_agent_start "$T/flashtierd.json"
grep -q "reattached" "$T/agent.log" || ft_fail "the restarted agent reattached no cached block"
verify_pass clean-restart

ft_log "kill -9 and restart"
kill -KILL "$AGENT_PID"
wait "$AGENT_PID" 2>/dev/null || true
AGENT_PID=""
ft_agent_start "$T/flashtierd.json"
grep -q "reattached" "$T/agent.log" || ft_fail "the agent reattached no cached block after kill -9"
verify_pass kill-restart

# Negative control: data changed through the agent (which drops the cached
# copies) must fail the same verify-only pass.
ft_log "fio negative control"
qemu-io -f raw -c 'write -P 0x5a 1M 256k' "$(ft_uri wt)" >"$T/qemu-io-neg.log" 2>&1 ||
	ft_fail "qemu-io writing to wt"
_rc=0
fio --name=wt --ioengine=nbd --uri="$(ft_uri wt)" --numjobs=4 --offset_increment=8M --size=8M \
	--iodepth=16 --rw=randrw --rwmixread=40 --bssplit="$(bssplit_of wt)" --verify=crc32c \
	--verify_fatal=1 --verify_state_save=0 --randseed=5151 --verify_only=1 \
	>"$T/fio-neg.log" 2>&1 || _rc=$?
[ "$_rc" -ne 0 ] || ft_fail "fio verify passed over changed data"
grep -q -i 'verify' "$T/fio-neg.log" || ft_fail "fio negative control: no verify error reported"

ft_log "stop"
ft_agent_stop
echo "interop-cache-fio: ok"
