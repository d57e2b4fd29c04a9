#!/usr/bin/env bash
# Installs what sparsedisk's tests and benchmarks need on a Debian machine:
# peer tools from Debian packages (apt-get) and Go modules (go mod download).
# Safe to run again: it installs only what is missing.
set -euo pipefail

# command -> Debian package
declare -A need=(
	[qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
	[nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdsh]=libnbd-bin [nbdfuse]=libnbd-bin
	[nbdkit]=nbdkit [fio]=fio [fusermount3]=fuse3
	[mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [losetup]=mount [fallocate]=util-linux
)
missing=()
for cmd in "${!need[@]}"; do
	PATH=/usr/sbin:/sbin:/usr/bin:$PATH command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# The libnbd Python binding is used by some protocol tests.
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing+=(python3-libnbd)

if [ ${#missing[@]} -gt 0 ]; then
	pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
	echo "deps: installing Debian packages: $pkgs"
	SUDO=
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq
	# shellcheck disable=SC2086
	$SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
go mod download
echo "deps: ok"
