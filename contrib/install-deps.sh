#!/bin/sh
# Install every Debian 12 package flashtier needs to build, run and test.
# Idempotent and non-interactive; run as root.
# (nbdfuse, which the cache tests use for a failing cache device, is in
# libnbd-bin; fuse3 brings fusermount3 for mounting it without root.)
set -eu

PACKAGES="
build-essential pkg-config clang-format
liburing-dev libnbd-dev libjansson-dev libmicrohttpd-dev
libcriterion-dev
nbdkit libnbd-bin python3-libnbd qemu-utils fio prometheus
fuse3
iproute2 procps util-linux python3
"

missing=""
for p in $PACKAGES; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing="$missing $p"
	fi
done

if [ -z "$missing" ]; then
	echo "install-deps: all packages present"
	exit 0
fi

if [ "$(id -u)" != 0 ]; then
	echo "install-deps: missing packages:$missing" >&2
	echo "install-deps: run as root (or: sudo $0)" >&2
	exit 1
fi

echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
