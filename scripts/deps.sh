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
	[mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [debugfs]=e2fsprogs
	[losetup]=mount [fallocate]=util-linux
	[qemu-system-x86_64]=qemu-system-x86
)
# `deps.sh bench` also installs what the benchmark harness uses to profile
# and to count system calls per request.
if [ "${1:-}" = bench ]; then need[perf]=linux-perf; need[strace]=strace; fi
missing=()
for cmd in "${!need[@]}"; do
	PATH=/usr/sbin:/sbin:/usr/bin:$PATH command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# The libnbd Python binding is used by some protocol tests. Run the probe
# from / and touch nbd.NBD: from the repo root, the repo's own nbd/ folder
# would import as an empty namespace package and hide a missing binding.
(cd / && /usr/bin/python3 -c 'import nbd; nbd.NBD' >/dev/null 2>&1) || missing+=(python3-libnbd)
# The VM test (nbd/vm_test.go) packs a static busybox into its initramfs.
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
	missing+=(busybox-static)
fi

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
# The Debian kernel the VM test boots, unpacked once into the user cache.
kdir=${SPARSEDISK_VM_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sparsedisk/vmkernel}
if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
	echo "deps: fetching the Debian kernel for the VM test into $kdir"
	SUDO=
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	# apt-cache needs package lists; a machine that installed nothing above
	# may never have fetched them.
	apt-cache show linux-image-amd64 >/dev/null 2>&1 || $SUDO apt-get update -qq
	"$(dirname "$0")/../nbd/testdata/vm/fetch-kernel.sh" "$kdir" >/dev/null
fi
go mod download
echo "deps: ok"
