#!/bin/bash
# bench/fuse.sh — FUSE frontend throughput: `sparsedisk mount` against the
# peer stack `nbdfuse` over `nbdkit file` (libnbd-bin, nbdkit), same run,
# same host file system, same fio jobs.
#
# Usage: bench/fuse.sh [WORKDIR]    (root; needs fio, fuse3, nbdkit, nbdfuse)
# Env:   SIZE=1G (file size and sequential amount), RUNTIME=15 (seconds per
#        random job), SPLIT=256M (sparsedisk segment size), REPS=3
#        (repetitions on fresh disks; the table shows medians).
#
# Jobs (fio, direct=1 on both sides so the page cache is not measured):
#   seq-write  bs=1M rw=write     ioengine=psync  iodepth=1  size=SIZE end_fsync=1
#   seq-read   bs=1M rw=read      ioengine=psync  iodepth=1  size=SIZE
#   rand-read  bs=4k rw=randread  ioengine=psync  iodepth=1  time_based RUNTIME
#   rand-write bs=4k rw=randwrite ioengine=psync  iodepth=1  time_based RUNTIME
#   rand-read  bs=4k rw=randread  ioengine=libaio iodepth=16 time_based RUNTIME
#   rand-write bs=4k rw=randwrite ioengine=libaio iodepth=16 time_based RUNTIME
# Each target gets a fresh, empty disk; the sequential write fills it first,
# so the reads and random writes hit allocated data.
set -euo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d /var/tmp/sparsedisk-bench.XXXXXX)}
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-15}
SPLIT=${SPLIT:-256M}
REPS=${REPS:-3}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
BIN=$WORK/sparsedisk
PIDS=()

cleanup() {
	set +e
	for m in "$WORK/mnt-sd" "$WORK/mnt-nbd"; do
		mountpoint -q "$m" && fusermount3 -u "$m" 2>/dev/null
	done
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	rm -rf "$WORK/sd.img"* "$WORK/peer.raw" "$WORK/nbd.sock"
}
trap cleanup EXIT

(cd "$ROOT" && go build -o "$BIN" ./cmd/sparsedisk)

waitfile() { for _ in $(seq 200); do [ -s "$1" ] && return 0; sleep 0.05; done; echo "no $1" >&2; return 1; }

jobs=(
	"seq-write  --rw=write     --bs=1M --ioengine=psync  --iodepth=1  --size=$SIZE --end_fsync=1"
	"seq-read   --rw=read      --bs=1M --ioengine=psync  --iodepth=1  --size=$SIZE"
	"rr-qd1     --rw=randread  --bs=4k --ioengine=psync  --iodepth=1  --size=$SIZE --time_based --runtime=$RUNTIME"
	"rw-qd1     --rw=randwrite --bs=4k --ioengine=psync  --iodepth=1  --size=$SIZE --time_based --runtime=$RUNTIME"
	"rr-qd16    --rw=randread  --bs=4k --ioengine=libaio --iodepth=16 --size=$SIZE --time_based --runtime=$RUNTIME"
	"rw-qd16    --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --size=$SIZE --time_based --runtime=$RUNTIME"
)

# runjob TARGET FILE JOB: run JOB on FILE, append "target job MB/s IOPS".
runjob() {
	local target=$1 file=$2 name args out
	read -r name args <<<"$3"
	{
		echo "+ fio --name=$name --filename=$file --direct=1 $args" >&2
		# shellcheck disable=SC2086
		out=$(fio --name="$name" --filename="$file" --direct=1 --group_reporting \
			--output-format=json $args)
		python3 -c '
import json, sys
j = json.loads(sys.stdin.read())["jobs"][0]
r, w = j["read"], j["write"]
bw = (r["bw_bytes"] + w["bw_bytes"]) / 1e6
iops = r["iops"] + w["iops"]
print(f"{sys.argv[1]} {sys.argv[2]} {bw:.1f} {iops:.0f}")' "$target" "$name" <<<"$out" >>"$WORK/results"
	}
}

: >"$WORK/results"

# setup: a fresh, empty disk for each target, both mounted at once.
setup() {
	rm -rf "$WORK/sd.img"* "$WORK/peer.raw" "$WORK/nbd.sock"
	"$BIN" create "$WORK/sd.img" size="$SIZE" split="$SPLIT" sectorsize=4096 >/dev/null
	mkdir -p "$WORK/mnt-sd" "$WORK/mnt-nbd"
	"$BIN" mount "$WORK/sd.img" "$WORK/mnt-sd" 2>>"$WORK/mount.log" &
	PIDS+=($!)
	waitfile "$WORK/mnt-sd/sd.img"
	# peer: nbdkit file plugin on a sparse raw file, nbdfuse over a Unix
	# socket (multi-conn: nbdfuse's default connections).
	truncate -s "$SIZE" "$WORK/peer.raw"
	nbdkit -f -U "$WORK/nbd.sock" file "$WORK/peer.raw" &
	PIDS+=($!)
	for _ in $(seq 200); do [ -S "$WORK/nbd.sock" ] && break; sleep 0.05; done
	nbdfuse "$WORK/mnt-nbd/disk" "nbd+unix:///?socket=$WORK/nbd.sock" &
	PIDS+=($!)
	waitfile "$WORK/mnt-nbd/disk"
}

teardown() {
	"$BIN" umount "$WORK/mnt-sd"
	fusermount3 -u "$WORK/mnt-nbd"
	for p in "${PIDS[@]}"; do
		kill "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	PIDS=()
}

# Each job runs on both targets back to back (alternating which goes
# first), REPS times on fresh disks; the table shows medians. Interleaving
# keeps background load on the host from favouring one side.
for rep in $(seq "$REPS"); do
	setup
	for j in "${jobs[@]}"; do
		if [ $((rep % 2)) = 1 ]; then
			runjob sparsedisk "$WORK/mnt-sd/sd.img" "$j"
			runjob nbdfuse "$WORK/mnt-nbd/disk" "$j"
		else
			runjob nbdfuse "$WORK/mnt-nbd/disk" "$j"
			runjob sparsedisk "$WORK/mnt-sd/sd.img" "$j"
		fi
	done
	teardown
done

echo
echo "kernel $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $REPS reps, work dir $WORK on $(df --output=fstype "$WORK" | tail -1)"
python3 - "$WORK/results" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    t, job, bw, iops = line.split()
    rows.setdefault(job, {}).setdefault(t, []).append((float(bw), float(iops)))
med = lambda xs: sorted(xs)[len(xs) // 2]
rows = {j: {t: (med([x[0] for x in v]), med([x[1] for x in v])) for t, v in r.items()} for j, r in rows.items()}
print(f"{'job':10} {'sparsedisk MB/s':>16} {'IOPS':>8} {'nbdfuse MB/s':>13} {'IOPS':>8} {'ratio':>6}")
for job, r in rows.items():
    s, n = r.get("sparsedisk", (0, 0)), r.get("nbdfuse", (0, 0))
    ratio = s[0] / n[0] if n[0] else float("nan")
    print(f"{job:10} {s[0]:16.1f} {s[1]:8.0f} {n[0]:13.1f} {n[1]:8.0f} {ratio:6.2f}")
PY
