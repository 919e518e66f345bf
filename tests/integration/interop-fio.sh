#!/bin/sh
# fio through its nbd ioengine (libnbd): random writes of mixed block sizes at
# queue depth 16, then a crc32c verify pass, on both backends: a file volume
# and an nbd volume backed by nbdkit's memory plugin. A second verify-only
# pass, on fresh connections, checks the data stayed put.
set -eu
. "$(dirname "$0")/lib.sh"
ft_setup

truncate -s 64M "$T/disk.img"
ft_nbdkit mem memory 256M
MEM_SOCK=$NBDKIT_SOCK

AGENT_SOCK=$T/nbd.sock
cat >"$T/flashtierd.json" <<EOF
{ "listen": "$AGENT_SOCK",
  "volumes": {
    "file0": { "backing": "$T/disk.img" },
    "mem0":  { "backing": "nbd+unix:///?socket=$MEM_SOCK" } } }
EOF
ft_agent_start "$T/flashtierd.json"

SIZE=$((32 * 1024 * 1024))

# run_fio VOLUME TAG ARGS...: fio must exit 0, report no error, no verify
# complaint, and have written and read back (verified) all SIZE bytes.
run_fio() {
	_vol=$1
	_tag=$2
	shift 2
	ft_fio "$_vol" "$_tag" --name="$_vol-$_tag" \
		--size="$SIZE" --iodepth=16 --bssplit=512/10:4k/40:64k/30:256k/20 --randseed=4242 "$@"
	python3 - "$FT_FIO_OUT.json" "$_tag" "$SIZE" <<'EOF' || ft_fail "fio $_vol $_tag: bad results"
import json, sys
j = json.load(open(sys.argv[1]))
tag, size = sys.argv[2], int(sys.argv[3])
assert len(j["jobs"]) == 1, j["jobs"]
job = j["jobs"][0]
assert job["error"] == 0, job["error"]
w, r = job["write"]["io_bytes"], job["read"]["io_bytes"]
if tag == "write":
    assert w == size, f"wrote {w} of {size}"
# Every written byte was read back and checked (verify reads count as reads).
assert r == size, f"verified {r} of {size}"
EOF
}

for vol in file0 mem0; do
	ft_log "fio randwrite + verify on $vol"
	run_fio "$vol" write --rw=randwrite --do_verify=1
	ft_log "fio verify-only on $vol"
	run_fio "$vol" reverify --rw=randwrite --verify_only=1
done

# Negative control: after a block is overwritten behind fio's back, the same
# verify-only pass must fail, so the passes above really checked the data.
ft_log "fio negative control"
qemu-io -f raw -c 'write -P 0x5a 1M 64k' "$(ft_uri mem0)" >"$T/qemu-io-neg.log" 2>&1 ||
	ft_fail "qemu-io corrupting mem0"
_rc=0
fio --name=neg --ioengine=nbd --uri="$(ft_uri mem0)" --size="$SIZE" --iodepth=16 \
	--bssplit=512/10:4k/40:64k/30:256k/20 --verify=crc32c --verify_fatal=1 \
	--verify_state_save=0 --randseed=4242 --rw=randwrite --verify_only=1 >"$T/fio-neg.log" 2>&1 || _rc=$?
[ "$_rc" -ne 0 ] || ft_fail "fio verify passed over corrupted data"
grep -q -i 'verify' "$T/fio-neg.log" || ft_fail "fio negative control: no verify error reported"

ft_log "stop"
ft_agent_stop
echo "interop-fio: ok"
