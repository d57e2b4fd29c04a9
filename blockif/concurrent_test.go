package blockif

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// TestConcurrentSameSector: many writers racing for the same unallocated
// sectors allocate exactly one slot per sector.
func TestConcurrentSameSector(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		const ss = 4096
		path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 64 * ss, Split: 16 * ss, SectorSize: ss, LUT: kind}, nil, false)
		d := mustOpen(t, path, nil)
		var wg sync.WaitGroup
		for g := 0; g < 16; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				for s := 0; s < 64; s += 3 {
					buf := bytes.Repeat([]byte{byte(g + 1)}, ss)
					if _, err := d.WriteAt(buf[:ss/2+g], int64(s)*ss+int64(g%3)); err != nil {
						t.Error(err)
					}
				}
			}(g)
		}
		wg.Wait()
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		r := mustCheck(t, path, nil, false)
		want := int64((64 + 2) / 3)
		if r.AllocatedSectors != want || r.Slots != want {
			t.Errorf("%d sectors written by 16 racing writers: %d allocated, %d slots; want %d each", want, r.AllocatedSectors, r.Slots, want)
		}
	})
}

// TestConcurrentModel: goroutines own disjoint byte ranges (unaligned,
// sharing sectors at their edges) and write, trim and read them at random
// while others flush; at the end every range holds its owner's last data.
// A lost update from a racing read-modify-write would show here.
func TestConcurrentModel(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		for _, ss := range []int64{512, 4096} {
			t.Run(fmt.Sprint(ss), func(t *testing.T) {
				seed := uint64(time.Now().UnixNano())
				t.Logf("seed %d", seed)
				const workers = 8
				size := 64 * ss
				path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: size, Split: 8 * ss, SectorSize: ss, LUT: kind}, nil, false)
				d := mustOpen(t, path, nil)
				defer d.Close()
				model := make([]byte, size)
				part := size / workers
				var wg sync.WaitGroup
				for w := 0; w < workers; w++ {
					wg.Add(1)
					go func(w int) {
						defer wg.Done()
						rng := rand.New(rand.NewPCG(seed, uint64(w)))
						lo := int64(w)*part + 7 // unaligned ownership
						hi := min(lo+part, size)
						for i := 0; i < 300; i++ {
							off := lo + rng.Int64N(hi-lo)
							n := 1 + rng.Int64N(min(hi-off, 3*ss))
							switch rng.IntN(6) {
							case 0:
								if err := d.Trim(off, n); err != nil {
									t.Error(err)
									return
								}
								clear(model[off : off+n])
							case 1:
								if err := d.Flush(); err != nil {
									t.Error(err)
									return
								}
							case 2:
								got := make([]byte, n)
								if _, err := d.ReadAt(got, off); err != nil {
									t.Error(err)
									return
								}
								if !bytes.Equal(got, model[off:off+n]) {
									t.Errorf("seed %d worker %d: read (%d,%d) differs", seed, w, off, n)
									return
								}
							default:
								p := randBytes(rng, int(n))
								if _, err := d.WriteAt(p, off); err != nil {
									t.Error(err)
									return
								}
								copy(model[off:], p)
							}
						}
					}(w)
				}
				wg.Wait()
				got := make([]byte, size)
				if _, err := d.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(got, model); i >= 0 {
					t.Fatalf("seed %d: byte %d differs after concurrent I/O", seed, i)
				}
			})
		}
	})
}

// TestSyncCloseDuringIO: with Options.Sync every write and zeroing ends in
// a flush; a Close arriving meanwhile must wait for them and then close,
// not deadlock (the flush must not take the close lock a second time).
func TestSyncCloseDuringIO(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		for _, op := range []string{"write", "zero"} {
			t.Run(op, func(t *testing.T) {
				p := format.Params{Layout: format.LayoutSparse, Size: 256 << 20, Split: 64 << 20, SectorSize: 4096, LUT: kind}
				path := testImage(t, p, nil, false)
				d := mustOpen(t, path, &Options{Sync: true})
				buf := bytes.Repeat([]byte{0xA5}, 1<<20)
				done := make(chan error, 1)
				started := make(chan struct{})
				go func() {
					var err error
					for i := int64(0); i < 128 && err == nil; i++ {
						if i == 2 {
							close(started)
						}
						if op == "write" {
							_, err = d.WriteAt(buf, i<<20)
						} else {
							_, err = d.WriteAt(buf, i<<20)
							if err == nil {
								err = d.WriteZeroes(i<<20, 1<<20)
							}
						}
					}
					done <- err
				}()
				<-started
				closed := make(chan error, 1)
				go func() { closed <- d.Close() }()
				select {
				case err := <-closed:
					if err != nil {
						t.Errorf("Close: %v", err)
					}
				case <-time.After(30 * time.Second):
					t.Fatal("Close during a sync write did not return in 30 s (deadlock)")
				}
				if err := <-done; err != nil && !errors.Is(err, ErrClosed) {
					t.Errorf("writer: %v, want nil or ErrClosed", err)
				}
			})
		}
	})
}
