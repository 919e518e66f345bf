#!/bin/sh
# Interop with QEMU's NBD client: qemu-img info/convert/compare and two
# simultaneous qemu-io connections writing and reading each other's data.
set -eu
. "$(dirname "$0")/lib.sh"
ft_setup

SIZE_MIB=64
SIZE=$((SIZE_MIB * 1024 * 1024))

# Source image: random, zeroed and sparse stretches, plus qemu-io patterns.
ft_random_file "$T/src.raw" "$SIZE_MIB"
qemu-io -f raw -c 'write -P 0xcd 20M 1M' -c 'write -z 24M 512k' -c 'write -P 0x01 63M 4k' \
	"$T/src.raw" >"$T/qemu-io-src.log" 2>&1 || ft_fail "qemu-io on the source image"

# The export's backing file starts as garbage, so holes in the source must be
# written as zeroes through the agent for the comparison to pass.
dd if=/dev/urandom of="$T/disk.img" bs=1M count="$SIZE_MIB" status=none

AGENT_SOCK=$T/nbd.sock
cat >"$T/flashtierd.json" <<EOF
{ "listen": "$AGENT_SOCK",
  "volumes": { "disk0": { "backing": "$T/disk.img", "description": "qemu interop" } } }
EOF
ft_agent_start "$T/flashtierd.json"
U=$(ft_uri disk0)

ft_log "qemu-img info"
qemu-img info --output=json "$U" >"$T/info.json" || ft_fail "qemu-img info"
python3 - "$T/info.json" "$SIZE" <<'EOF' || ft_fail "qemu-img info: wrong answer"
import json, sys
info = json.load(open(sys.argv[1]))
want = int(sys.argv[2])
assert info["virtual-size"] == want, f"virtual-size {info['virtual-size']} != {want}"
assert info["format"] == "raw", info["format"]
EOF

# ---- two simultaneous qemu-io connections ----
# Each qemu-io reads commands from a FIFO and stays connected in between.
qio_start() { # NAME FD
	mkfifo "$T/qio-$1.in"
	(
		rc=0
		qemu-io -f raw "$U" <"$T/qio-$1.in" >"$T/qio-$1.out" 2>&1 || rc=$?
		echo "QEMU-IO-EXIT $rc" >>"$T/qio-$1.out"
	) &
	FT_PIDS="$FT_PIDS $!"
	eval "QIO_PID_$1=\$!"
}

# qemu-io prints (and flushes) a fresh prompt whenever it is ready for the
# next command; the count of prompts says how many commands it finished.
# Commands go one at a time: qemu-io reads its input with stdio, and a second
# line that arrives with the first would sit unread in its buffer.
qio_prompts() {
	grep -o 'qemu-io> ' "$T/qio-$1.out" 2>/dev/null | wc -l
}

# qio_wait NAME COUNT: wait (up to 10 s) until NAME has printed COUNT prompts.
qio_wait() {
	_n=200
	while [ "$(qio_prompts "$1")" -lt "$2" ]; do
		_n=$((_n - 1))
		[ "$_n" -gt 0 ] || ft_fail "qemu-io $1: no prompt #$2 within 10 s"
		eval "kill -0 \$QIO_PID_$1" 2>/dev/null || ft_fail "qemu-io $1 exited"
		sleep 0.05
	done
}

# qio_cmd NAME FD COMMAND: run COMMAND on the live connection NAME, wait for
# it to finish, and fail unless it succeeded.
qio_cmd() {
	_before=$(qio_prompts "$1")
	echo "$3" >&"$2" || ft_fail "qemu-io $1 is gone"
	qio_wait "$1" $((_before + 1))
	if grep -q -E -i 'verification failed|failed|error' "$T/qio-$1.out"; then
		cat "$T/qio-$1.out" >&2
		ft_fail "qemu-io $1: '$3' failed"
	fi
}

ft_log "two qemu-io connections"
qio_start A
exec 3>"$T/qio-A.in"
qio_start B
exec 4>"$T/qio-B.in"
qio_wait A 1
qio_wait B 1

qio_cmd A 3 "write -P 0x11 0 64k"
qio_cmd B 4 "read -P 0x11 0 64k"
qio_cmd B 4 "write -P 0x22 64k 64k"
qio_cmd A 3 "read -P 0x22 64k 64k"
qio_cmd A 3 "read -P 0x11 0 64k"
# Unaligned-to-4k, 512-aligned I/O and larger requests, crossing over.
qio_cmd A 3 "write -P 0x33 1M 1536k"
qio_cmd B 4 "write -P 0x44 3M 512"
qio_cmd B 4 "read -P 0x33 1M 1536k"
qio_cmd A 3 "read -P 0x44 3M 512"
qio_cmd A 3 "flush"
qio_cmd B 4 "write -z 1M 512k"
qio_cmd A 3 "read -P 0 1M 512k"
qio_cmd A 3 "read -P 0x33 1536k 1M"
# Both still connected at this point.
kill -0 "$QIO_PID_A" || ft_fail "qemu-io A disconnected early"
kill -0 "$QIO_PID_B" || ft_fail "qemu-io B disconnected early"
echo quit >&3
echo quit >&4
exec 3>&- 4>&-
for q in A B; do
	_n=200
	until grep -q 'QEMU-IO-EXIT' "$T/qio-$q.out"; do
		_n=$((_n - 1))
		[ "$_n" -gt 0 ] || ft_fail "qemu-io $q did not quit"
		sleep 0.05
	done
	grep -q 'QEMU-IO-EXIT 0' "$T/qio-$q.out" || ft_fail "qemu-io $q exited non-zero"
done

# ---- convert and compare ----
ft_log "qemu-img convert into the export"
qemu-img convert -n -W -m 16 -f raw -O raw "$T/src.raw" "$U" || ft_fail "qemu-img convert"
ft_log "qemu-img compare"
qemu-img compare -f raw -F raw "$T/src.raw" "$U" || ft_fail "qemu-img compare: export differs"

# Negative control: a change through the export must make compare fail.
qemu-io -f raw -c 'write -P 0x5a 5M 4k' "$U" >/dev/null || ft_fail "qemu-io write"
rc=0
qemu-img compare -q -f raw -F raw "$T/src.raw" "$U" || rc=$?
[ "$rc" -eq 1 ] || ft_fail "qemu-img compare did not notice a changed block (rc=$rc)"

# Again, with the default in-order convert.
qemu-img convert -n -f raw -O raw "$T/src.raw" "$U" || ft_fail "qemu-img convert (2)"
qemu-img compare -f raw -F raw "$T/src.raw" "$U" || ft_fail "qemu-img compare (2)"

ft_log "stop"
ft_agent_stop
cmp "$T/src.raw" "$T/disk.img" || ft_fail "backing file differs from the source after stop"
echo "interop-qemu: ok"
