package main

import (
	"bytes"
	encbin "encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"golang.org/x/sys/unix"
)

// The churn test: rounds of "write 8 MiB at a random offset, flush, trim
// the same 8 MiB" in a 16 MiB single-segment image, served over NBD and
// mounted through FUSE, with the compactor on. Without slot reuse every
// round appends 8 MiB to the segment file; with it the file must stay
// within the live data plus a bounded slack.
const (
	churnSector = 64 << 10
	churnSize   = 16 << 20
	churnChunk  = 8 << 20
	// churnSlack is the apparent size a segment may carry beyond the data
	// live at a sample right after a flush: the previous round's trimmed
	// 8 MiB (it becomes reusable only with this flush) plus the
	// compactor's tolerance (1/16 of live data, at least 256 KiB).
	churnSlack = churnChunk + 1<<20
	// churnAllocSlack is what allocated blocks may exceed the live data
	// by: trimmed slots are punched at once, so only the slots the
	// compactor copied out of and has not punched yet remain (punched
	// once the next flush is durable and no read uses them: at most two
	// batches of 16 slots).
	churnAllocSlack = 2*16*churnSector + churnSector
)

func churnRounds() int {
	if n, err := strconv.Atoi(os.Getenv("SPARSEDISK_CHURN_ROUNDS")); err == nil && n > 0 {
		return n
	}
	if testing.Short() {
		return 200
	}
	return 2000
}

// churnDir is where churn images live: tmpfs when there is one (the
// rounds write 16 GB; fsync on tmpfs costs nothing), else the test's
// temporary directory.
func churnDir(t *testing.T) string {
	var st unix.Statfs_t
	if unix.Statfs("/dev/shm", &st) == nil && st.Type == unix.TMPFS_MAGIC {
		dir, err := os.MkdirTemp("/dev/shm", "sparsedisk-churn")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(dir) })
			return dir
		}
	}
	return t.TempDir()
}

func churnImage(t *testing.T) string {
	t.Helper()
	path := filepath.Join(churnDir(t), "churn.img")
	p := format.Params{Layout: format.LayoutSparse, Size: churnSize, Split: churnSize, SectorSize: churnSector}
	if err := blockif.Create(path, p, nil); err != nil {
		t.Fatal(err)
	}
	return path
}

// segmentSizes returns the apparent size and allocated bytes of segment 0.
func segmentSizes(t *testing.T, image string) (apparent, allocated int64) {
	t.Helper()
	fi, err := os.Stat(format.SegmentName(image, 0))
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size(), fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// churnTarget is what the churn test drives: the NBD client or the
// mounted file.
type churnTarget struct {
	write func(p []byte, off int64) error
	flush func() error
	trim  func(off, n int64) error
	read  func(p []byte, off int64) error
}

// churnRun runs the rounds against tg, sampling the segment after every
// flush and checking content against the model now and then; at the end
// it waits for the compactor to cut the trimmed tail off, writes 8 MiB
// once more and returns apparent size / live data once it settles.
func churnRun(t *testing.T, image string, tg churnTarget, serverLog func() string) float64 {
	rounds := churnRounds()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d, %d rounds", seed, rounds)
	rng := rand.New(rand.NewPCG(seed, 0xc4))
	base := make([]byte, churnChunk)
	for i := range base {
		base[i] = byte(rng.UintN(255) + 1)
	}
	buf := make([]byte, churnChunk)
	var maxApparent, maxAlloc int64
	start := time.Now()
	stamp := func(round int, off int64) {
		copy(buf, base)
		for s := int64(0); s < churnChunk; s += 4096 {
			encbin.LittleEndian.PutUint64(buf[s:], uint64(round)<<32|uint64(off+s))
		}
	}
	for round := 0; round < rounds; round++ {
		off := rng.Int64N((churnSize-churnChunk)/churnSector+1) * churnSector
		stamp(round, off)
		if err := tg.write(buf, off); err != nil {
			t.Fatalf("round %d: write: %v\n%s", round, err, serverLog())
		}
		if err := tg.flush(); err != nil {
			t.Fatalf("round %d: flush: %v", round, err)
		}
		apparent, alloc := segmentSizes(t, image)
		maxApparent, maxAlloc = max(maxApparent, apparent), max(maxAlloc, alloc)
		if apparent > churnChunk+churnSlack || alloc > churnChunk+churnAllocSlack {
			t.Fatalf("round %d: segment apparent %d allocated %d bytes with %d live; bounds %d and %d",
				round, apparent, alloc, churnChunk, churnChunk+churnSlack, churnChunk+churnAllocSlack)
		}
		if round%100 == 0 || round == rounds-1 {
			want := make([]byte, churnSize)
			copy(want[off:], buf)
			full := make([]byte, churnSize)
			if err := tg.read(full, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(full, want) {
				t.Fatalf("round %d: content differs from the model", round)
			}
		}
		if err := tg.trim(off, churnChunk); err != nil {
			t.Fatalf("round %d: trim: %v", round, err)
		}
	}
	elapsed := time.Since(start)
	if err := tg.flush(); err != nil {
		t.Fatal(err)
	}
	// Everything is trimmed: the compactor truncates the file.
	waitFor(t, 30*time.Second, func() bool { a, _ := segmentSizes(t, image); return a <= churnSector }, "segment truncated after the last trim", serverLog)
	full := make([]byte, churnSize)
	if err := tg.read(full, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(full, make([]byte, churnSize)) {
		t.Fatal("disk not all zeros after the last trim")
	}
	// 8 MiB live again: the ratio to check: apparent size at most 1.1 × live data.
	off := int64(3 * churnSector)
	stamp(rounds, off)
	if err := tg.write(buf, off); err != nil {
		t.Fatal(err)
	}
	if err := tg.flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, func() bool { a, _ := segmentSizes(t, image); return a <= churnChunk*11/10 }, "apparent size within 1.1× live data", serverLog)
	apparent, alloc := segmentSizes(t, image)
	ratio := float64(apparent) / churnChunk
	t.Logf("%d rounds of write/flush/trim of 8 MiB in %v (%.1f ms/round); max apparent %d, max allocated %d; at the end with 8 MiB live: apparent %d, allocated %d, apparent/live %.3f",
		rounds, elapsed.Round(time.Millisecond), float64(elapsed.Microseconds())/1000/float64(rounds), maxApparent, maxAlloc, apparent, alloc, ratio)
	return ratio
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, limit time.Duration, cond func() bool, what string, serverLog func() string) {
	t.Helper()
	for deadline := time.Now().Add(limit); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached within %v; server log:\n%s", what, limit, serverLog())
		}
		time.Sleep(5 * time.Millisecond) // polling a condition, with a deadline
	}
}

func TestChurnNBD(t *testing.T) {
	image := churnImage(t)
	srv := kcServe(t, image, "--experimental-compact", "--compact-interval", "20ms")
	c := srv.dial(t)
	churnRun(t, image, churnTarget{
		write: func(p []byte, off int64) error { _, err := c.WriteAt(p, off); return err },
		flush: c.Flush,
		trim:  c.Trim,
		read:  func(p []byte, off int64) error { _, err := c.ReadAt(p, off); return err },
	}, srv.stderr.String)
	c.Close()
	if err := srv.stop(t); err != nil {
		t.Fatalf("serve: %v\n%s", err, srv.stderr)
	}
	if !strings.Contains(srv.stderr.String(), "compactor truncated segment file") {
		t.Errorf("the compactor did not log a truncation:\n%s", srv.stderr)
	}
	churnCheck(t, image)
}

func TestChurnFUSE(t *testing.T) {
	image := churnImage(t)
	p := startMount(t, image, "--experimental-compact", "--compact-interval", "20ms")
	f, err := os.OpenFile(p.file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	churnRun(t, image, churnTarget{
		write: func(b []byte, off int64) error { _, err := f.WriteAt(b, off); return err },
		flush: f.Sync,
		trim: func(off, n int64) error {
			return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		},
		read: func(b []byte, off int64) error { _, err := f.ReadAt(b, off); return err },
	}, p.stderr.String)
	f.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t); code != 0 {
		t.Fatalf("mount exited %d\n%s", code, p.stderr)
	}
	churnCheck(t, image)
}

func churnCheck(t *testing.T, image string) {
	t.Helper()
	r, err := blockif.Check(image, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Clean() {
		t.Errorf("check after churn: %v", r.Findings)
	}
}
