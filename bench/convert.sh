#!/usr/bin/env bash
# bench/convert.sh — convert a 4 GiB raw image holding 10% random data to
# sparsedisk's sparse layout and back, against qemu-img convert -O qcow2
# and -O raw on the same input in the same run; then shrink throughput.
#
# Usage: bench/convert.sh [WORKDIR]   (default: a fresh temp dir; needs ~6 GiB)
# Prints times (best of $RUNS runs, page cache warm for everyone) and
# on-disk bytes (du --block-size=1, all of an image's files).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-4096}
WORK=${1:-$(mktemp -d /var/tmp/sparsedisk-bench.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
command -v qemu-img >/dev/null || { echo "qemu-img missing: apt-get install qemu-utils" >&2; exit 1; }
go build -o "$WORK/sparsedisk" ./cmd/sparsedisk
SD="$WORK/sparsedisk"

echo "# input: $SIZE_MIB MiB raw, 10% random data in 64 KiB blocks at random places (seed 1)"
python3 - "$WORK/in.raw" "$SIZE_MIB" <<'PY'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
size = mib << 20
blk = 64 << 10
rnd = random.Random(1)
blocks = sorted(rnd.sample(range(size // blk), size // blk // 10))
pool = os.urandom(8 << 20)
with open(path, "wb") as f:
    f.truncate(size)
    for b in blocks:
        o = rnd.randrange(0, len(pool) - blk, 4096)
        f.seek(b * blk)
        f.write(pool[o:o + blk])
PY
sync
cat "$WORK/in.raw" > /dev/null    # warm the page cache for every tool alike

ondisk() { du --block-size=1 -c "$@" | tail -1 | cut -f1; }
best() { # "wall cpu": best wall time (s) of RUNS runs of "$@", and that run's user+sys CPU time
  local b=999999 bc=0 t c
  for _ in $(seq "$RUNS"); do
    eval "$CLEAN"
    sync
    local s=$(date +%s.%N)
    /usr/bin/time -f '%U %S' -o "$WORK/cpu" "$@" >/dev/null
    sync
    t=$(echo "$(date +%s.%N) - $s" | bc)
    c=$(awk '{print $1 + $2}' "$WORK/cpu")
    if [ "$(echo "$t < $b" | bc)" = 1 ]; then b=$t; bc=$c; fi
  done
  printf '%.2f %.2f' "$b" "$bc"
}
row() { set -- "$1" $2 "$3"; printf '%-42s %7s s wall %7s s cpu %12s bytes on disk\n' "$1" "$2" "$3" "$4"; }

echo "# wall time includes a final sync (every tool's output durable); cpu = user+sys of that run; load: $(cut -d" " -f1-3 /proc/loadavg)"
CLEAN='rm -f "$WORK/q.qcow2"'
t=$(best qemu-img convert -O qcow2 "$WORK/in.raw" "$WORK/q.qcow2")
row "qemu-img convert -O qcow2" "$t" "$(ondisk "$WORK/q.qcow2")"
CLEAN='rm -f "$WORK/q.raw"'
t=$(best qemu-img convert -O raw "$WORK/in.raw" "$WORK/q.raw")
row "qemu-img convert -O raw (raw → raw)" "$t" "$(ondisk "$WORK/q.raw")"
CLEAN='rm -f "$WORK/q2.raw"'
t=$(best qemu-img convert -O raw "$WORK/q.qcow2" "$WORK/q2.raw")
row "qemu-img convert -O raw (qcow2 → raw)" "$t" "$(ondisk "$WORK/q2.raw")"
CLEAN='rm -f "$WORK"/s.img*'
t=$(best "$SD" convert -q "$WORK/in.raw" "$WORK/s.img")
row "sparsedisk convert raw → sparse (4096)" "$t" "$(ondisk "$WORK"/s.img*)"
CLEAN='rm -f "$WORK"/s64.img*'
t=$(best "$SD" convert -q "$WORK/in.raw" "$WORK/s64.img" sectorsize=64k)
row "sparsedisk convert raw → sparse (65536)" "$t" "$(ondisk "$WORK"/s64.img*)"
CLEAN='rm -f "$WORK/s.raw"'
t=$(best "$SD" convert -q "$WORK/s.img" "$WORK/s.raw" layout=raw)
row "sparsedisk convert sparse → raw" "$t" "$(ondisk "$WORK/s.raw")"
cmp "$WORK/in.raw" "$WORK/s.raw" && echo "# round trip raw → sparse → raw: byte-identical"
cmp "$WORK/in.raw" "$WORK/q2.raw" && echo "# round trip raw → qcow2 → raw: byte-identical"
"$SD" check "$WORK/s.img"
echo "# sparse (4096) image files:"; du --block-size=1 "$WORK"/s.img* | sed 's/^/#   /'
rm -f "$WORK"/q* "$WORK"/s.* "$WORK"/s64.*

echo "# shrink: 4 GiB sparse image, 400 MiB live data written one 4 KiB sector at a time in random order"
go test -run XXX -bench BenchmarkShrink -benchtime 1x ./blockif/ | grep Benchmark
