package blockif

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// crashRounds is the number of crash points TestCrash checks; raise it with
// SPARSEDISK_CRASH_ROUNDS (make crashtest).
func crashRounds() int {
	if n, err := strconv.Atoi(os.Getenv("SPARSEDISK_CRASH_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return 1200
}

// TestCrash cuts power at random points of random workloads (writes,
// partial-sector writes, zero writes, trims, flushes, close and reopen)
// on the in-memory file system that keeps only synced data plus a random,
// possibly torn, subset of the rest. After each crash the image must open
// for writing, every 512-byte chunk of every sector must hold either what
// the last completed Flush left there or something written to it since,
// and Check must find no corruption.
func TestCrash(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rounds := crashRounds()
	geoms := []format.Params{
		{Layout: format.LayoutSparse, Size: 16 * 4096, Split: 4 * 4096, SectorSize: 4096},
		{Layout: format.LayoutSparse, Size: 16 * 4096, Split: 4 * 4096, SectorSize: 4096, LUT: lut.Thin},
		{Layout: format.LayoutSparse, Size: 40 * 512, Split: 8 * 512, SectorSize: 512},
		{Layout: format.LayoutSparse, Size: 40 * 512, Split: 8 * 512, SectorSize: 512, LUT: lut.Thin},
		{Layout: format.LayoutSplit, Size: 16 * 4096, Split: 4 * 4096, SectorSize: 4096},
	}
	var crashes, leaks int
	for r := 0; r < rounds; r++ {
		p := geoms[r%len(geoms)]
		rs := seed + uint64(r)
		crashed, leaked := crashRound(t, p, rs)
		if t.Failed() {
			t.Fatalf("round %d (seed %d, %+v) failed", r, rs, p)
		}
		if crashed {
			crashes++
		}
		leaked += 0
		leaks += leaked
	}
	t.Logf("checked %d crash points (%d rounds, %d with the crash inside the workload); %d leaked slots found, 0 violations", rounds, rounds, crashes, leaks)
	fmt.Printf("crash simulation: %d crash points checked, 0 violations\n", rounds)
}

func crashRound(t *testing.T, p format.Params, seed uint64) (crashedInside bool, leaked int) {
	rng := rand.New(rand.NewPCG(seed, 2))
	mem := vfs.NewMemFS()
	path := "/img/disk.img"
	if err := Create(path, p, &Options{FS: mem}); err != nil {
		t.Fatal(err)
	}
	if err := mem.SyncDir("/img"); err != nil {
		t.Fatal(err)
	}
	nsec := p.Size / p.SectorSize
	ss := p.SectorSize
	// allowed[s] lists the contents sector s may hold after a crash.
	cur := make([][]byte, nsec)
	allowed := make([][][]byte, nsec)
	for s := range cur {
		cur[s] = make([]byte, ss)
		allowed[s] = [][]byte{cur[s]}
	}
	flushed := func() {
		for s := range cur {
			allowed[s] = [][]byte{cur[s]}
		}
	}
	mem.SetCrashAfter(int64(rng.IntN(120)))
	d, err := Open(path, &Options{FS: mem})
	stamp := 0
	if err == nil {
		for op := 0; op < 60; op++ {
			k := rng.IntN(10)
			off := rng.Int64N(nsec) * ss
			n := (1 + rng.Int64N(3)) * ss
			if rng.IntN(3) == 0 { // unaligned
				off += rng.Int64N(ss)
				n = 1 + rng.Int64N(2*ss)
			}
			n = min(n, p.Size-off)
			var err error
			switch {
			case k < 6:
				stamp++
				buf := make([]byte, n)
				if rng.IntN(6) > 0 {
					for i := range buf {
						buf[i] = byte(stamp*7 + i/512 + 1)
					}
				}
				applyModel(cur, allowed, off, buf, ss)
				_, err = d.WriteAt(buf, off)
			case k < 8:
				applyModel(cur, allowed, off, make([]byte, n), ss)
				err = d.Trim(off, n)
			default:
				err = d.Flush()
				if err == nil {
					flushed()
				}
			}
			if err != nil {
				if !errors.Is(err, vfs.ErrCrashed) {
					t.Errorf("seed %d op %d: %v", seed, op, err)
				}
				crashedInside = true
				break
			}
		}
		if !crashedInside {
			if err := d.Close(); err == nil {
				flushed()
			} else if !errors.Is(err, vfs.ErrCrashed) {
				t.Errorf("seed %d: Close: %v", seed, err)
			}
		}
	} else if !errors.Is(err, vfs.ErrCrashed) {
		t.Errorf("seed %d: Open: %v", seed, err)
	}

	after := mem.Crash(rng)
	d2, err := Open(path, &Options{FS: after})
	if err != nil {
		t.Errorf("seed %d: open after crash: %v", seed, err)
		return
	}
	got := make([]byte, ss)
	for s := int64(0); s < nsec; s++ {
		if _, err := d2.ReadAt(got, s*ss); err != nil {
			t.Errorf("seed %d: read sector %d after crash: %v", seed, s, err)
			return
		}
		for c := int64(0); c < ss; c += 512 {
			ok := false
			for _, a := range allowed[s] {
				if bytes.Equal(got[c:c+512], a[c:c+512]) {
					ok = true
					break
				}
			}
			if !ok {
				t.Errorf("seed %d: sector %d bytes %d..%d after crash hold %x…, which was never written there since the last flush (%d candidates)",
					seed, s, c, c+512, got[c:c+8], len(allowed[s]))
				return
			}
		}
	}
	if err := d2.Close(); err != nil {
		t.Errorf("seed %d: close after crash: %v", seed, err)
	}
	r, err := Check(path, &Options{FS: after})
	if err != nil {
		t.Errorf("seed %d: check after crash: %v", seed, err)
		return
	}
	for _, f := range r.Findings {
		if f.Kind == Corruption {
			t.Errorf("seed %d: after crash: %s", seed, f)
		}
	}
	return crashedInside, int(r.LeakedSlots)
}

// applyModel records a write of buf at off in the model: the sectors'
// new contents become current and allowed.
func applyModel(cur [][]byte, allowed [][][]byte, off int64, buf []byte, ss int64) {
	for pos := int64(0); pos < int64(len(buf)); {
		s := (off + pos) / ss
		in := (off + pos) % ss
		c := min(ss-in, int64(len(buf))-pos)
		nv := append([]byte(nil), cur[s]...)
		copy(nv[in:], buf[pos:pos+c])
		cur[s] = nv
		allowed[s] = append(allowed[s], nv)
		pos += c
	}
}
