#!/bin/sh
# Fetches the Debian kernel the VM test boots and unpacks it (dpkg -x) into
# DIR (default: $XDG_CACHE_HOME/sparsedisk/vmkernel or ~/.cache/...). The
# test also needs qemu-system-x86 and busybox-static installed.
set -eu
dir=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/sparsedisk/vmkernel}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
apt-get download "$pkg"
rm -rf "$dir"
mkdir -p "$dir"
dpkg -x ./*.deb "$dir"
echo "$dir"
