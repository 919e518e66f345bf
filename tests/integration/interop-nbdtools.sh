#!/bin/sh
# Interop with libnbd's tools: nbdinfo (export details and listing), nbdcopy
# (in and out, one and several connections) and nbdsh (scripted commands).
set -eu
. "$(dirname "$0")/lib.sh"
ft_setup

SIZE_MIB=64
SIZE=$((SIZE_MIB * 1024 * 1024))
RO_SIZE=$((1024 * 1024))

truncate -s "${SIZE_MIB}M" "$T/disk.img"
dd if=/dev/urandom of="$T/ro.img" bs=1M count=1 status=none

AGENT_SOCK=$T/nbd.sock
cat >"$T/flashtierd.json" <<EOF
{ "listen": "$AGENT_SOCK",
  "volumes": {
    "disk0": { "backing": "$T/disk.img", "description": "nbdtools disk", "domain": "vm-a" },
    "ro0":   { "backing": "$T/ro.img", "readonly": true, "description": "read-only disk" } } }
EOF
ft_agent_start "$T/flashtierd.json"
U=$(ft_uri disk0)
URO=$(ft_uri ro0)

# nbdsh needs the system python3 (with the nbd module), not a pyenv shim.
nbdsh_() {
	PATH=/usr/bin:/bin:$PATH nbdsh "$@"
}

ft_log "nbdinfo --json"
nbdinfo --json "$U" >"$T/info.json" || ft_fail "nbdinfo --json disk0"
nbdinfo --json "$URO" >"$T/info-ro.json" || ft_fail "nbdinfo --json ro0"
python3 - "$T/info.json" "$T/info-ro.json" "$SIZE" "$RO_SIZE" <<'EOF' || ft_fail "nbdinfo --json: wrong answer"
import json, sys
rw = json.load(open(sys.argv[1]))
ro = json.load(open(sys.argv[2]))
size, ro_size = int(sys.argv[3]), int(sys.argv[4])

for info in (rw, ro):
    assert info["protocol"] == "newstyle-fixed", info["protocol"]
    assert info["TLS"] is False
    assert info["structured"] is True
    assert len(info["exports"]) == 1, info["exports"]

e = rw["exports"][0]
assert e["export-name"] == "disk0", e["export-name"]
assert e["export-size"] == size, e["export-size"]
assert e["block_size_minimum"] == 512, e["block_size_minimum"]
assert e["block_size_preferred"] == 4096, e["block_size_preferred"]
assert e["block_size_maximum"] == 33554432, e["block_size_maximum"]
for k in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache",
          "can_df"):
    assert e[k] is True, (k, e[k])
assert e["is_read_only"] is False
assert e["is_rotational"] is False

# NBD_INFO_DESCRIPTION, from the config.
assert e.get("description") == "nbdtools disk", e.get("description")

e = ro["exports"][0]
assert e.get("description") == "read-only disk", e.get("description")
assert e["export-name"] == "ro0", e["export-name"]
assert e["export-size"] == ro_size, e["export-size"]
assert e["is_read_only"] is True
assert e["can_trim"] is False and e["can_zero"] is False, e
assert e["can_flush"] is True
assert e["block_size_minimum"] == 512
EOF

ft_log "nbdinfo --list"
nbdinfo --list "nbd+unix:///?socket=$AGENT_SOCK" >"$T/list.txt" || ft_fail "nbdinfo --list"
grep -q 'export="disk0"' "$T/list.txt" || ft_fail "nbdinfo --list: no disk0"
grep -q 'export="ro0"' "$T/list.txt" || ft_fail "nbdinfo --list: no ro0"
nbdinfo --list --json "nbd+unix:///?socket=$AGENT_SOCK" >"$T/list.json" ||
	ft_fail "nbdinfo --list --json"
python3 - "$T/list.json" "$SIZE" <<'EOF' || ft_fail "nbdinfo --list --json: wrong answer"
import json, sys
info = json.load(open(sys.argv[1]))
ex = {e["export-name"]: e for e in info["exports"]}
assert sorted(ex) == ["disk0", "ro0"], sorted(ex)
assert ex["disk0"]["export-size"] == int(sys.argv[2])
assert ex["ro0"]["is_read_only"] is True
EOF
# An export that does not exist is refused.
if nbdinfo "$(ft_uri nosuch)" >"$T/nosuch.txt" 2>&1; then
	ft_fail "nbdinfo succeeded on an unknown export"
fi
nbdinfo --size "$U" | grep -qx "$SIZE" || ft_fail "nbdinfo --size"

ft_log "nbdcopy in and out"
ft_random_file "$T/src.raw" "$SIZE_MIB"
nbdcopy "$T/src.raw" "$U" || ft_fail "nbdcopy file -> export"
nbdcopy "$U" "$T/out1.raw" || ft_fail "nbdcopy export -> file"
cmp "$T/src.raw" "$T/out1.raw" || ft_fail "nbdcopy round trip differs"

# Again with several connections (the export advertises multi-conn), after
# scribbling on the export so the copy has to overwrite it.
nbdsh_ -u "$U" -c 'h.pwrite(b"\xee" * 1048576, 5 * 1048576)' || ft_fail "nbdsh scribble"
nbdcopy --connections=4 --requests=16 --flush "$T/src.raw" "$U" || ft_fail "nbdcopy -C 4 in"
nbdcopy --connections=4 "$U" "$T/out2.raw" || ft_fail "nbdcopy -C 4 out"
cmp "$T/src.raw" "$T/out2.raw" || ft_fail "nbdcopy multi-conn round trip differs"
# Copy export to export (ro0 -> disk0 at the start) and compare with the source file.
nbdcopy "$URO" "$T/ro-out.raw" || ft_fail "nbdcopy ro0 out"
cmp "$T/ro.img" "$T/ro-out.raw" || ft_fail "nbdcopy ro0 differs"

ft_log "nbdsh"
nbdsh_ -u "$U" \
	-c 'import errno' \
	-c 'assert h.get_size() == 64 * 1048576, h.get_size()' \
	-c 'assert h.get_block_size(nbd.SIZE_MINIMUM) == 512' \
	-c 'assert h.can_flush() and h.can_fua() and h.can_zero() and h.can_trim()' \
	-c 'buf = bytes(range(256)) * 16' \
	-c 'h.pwrite(buf, 12288)' \
	-c 'assert h.pread(4096, 12288) == buf' \
	-c 'h.pwrite(b"\x5a" * 512, 12288 + 512, nbd.CMD_FLAG_FUA)' \
	-c 'assert h.pread(1024, 12288) == buf[:512] + b"\x5a" * 512' \
	-c 'h.zero(1024, 12288)' \
	-c 'assert h.pread(4096, 12288) == bytes(1024) + buf[1024:]' \
	-c 'h.flush()' \
	-c 'h.trim(65536, 1048576)' \
	-c 'h.cache(65536, 0)' \
	-c 'last = h.get_size() - 512' \
	-c 'h.pwrite(b"\x77" * 512, last)' \
	-c 'assert h.pread(512, last) == b"\x77" * 512' \
	-c 'h.shutdown()' ||
	ft_fail "nbdsh commands on disk0"

# The read-only export refuses writes with EPERM, serves reads.
nbdsh_ -u "$URO" \
	-c 'import errno' \
	-c 'assert h.is_read_only()' \
	-c 'data = h.pread(4096, 0)' \
	-c 'assert data == open("'"$T/ro.img"'", "rb").read(4096)' \
	-c 'h.set_strict_mode(0)' \
	-c '
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write to a read-only export succeeded")
except nbd.Error as e:
    assert e.errno == "EPERM", (e.errno, e)
' \
	-c 'h.shutdown()' ||
	ft_fail "nbdsh commands on ro0"

ft_log "stop"
ft_agent_stop
# The last nbdsh writes reached the backing file.
python3 - "$T/disk.img" <<'EOF' || ft_fail "backing file does not hold what nbdsh wrote"
import sys
d = open(sys.argv[1], "rb").read()
buf = bytes(range(256)) * 16
assert d[12288:12288 + 4096] == bytes(1024) + buf[1024:]
assert d[-512:] == b"\x77" * 512
EOF
cmp "$T/ro.img" "$T/ro-out.raw" || ft_fail "read-only backing file changed"
echo "interop-nbdtools: ok"
