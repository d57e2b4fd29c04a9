package blockif

import (
	"math/rand/v2"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
)

// BenchmarkReadAt4K measures the read path (LUT lookup, reader
// registration, pread) on 64 MiB of allocated 4 KiB sectors in the page
// cache: serial and from parallel goroutines.
func BenchmarkReadAt4K(b *testing.B) {
	const ss = 4096
	const size = 64 << 20
	path := testImage(b, format.Params{Layout: format.LayoutSparse, Size: size, Split: 16 << 20, SectorSize: ss}, nil, false)
	d := mustOpen(b, path, nil)
	defer d.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	buf := randBytes(rng, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := d.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("serial", func(b *testing.B) {
		p := make([]byte, ss)
		b.SetBytes(ss)
		for i := 0; i < b.N; i++ {
			if _, err := d.ReadAt(p, rng.Int64N(size/ss)*ss); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.SetBytes(ss)
		b.RunParallel(func(pb *testing.PB) {
			p := make([]byte, ss)
			r := rand.New(rand.NewPCG(rand.Uint64(), 3))
			for pb.Next() {
				if _, err := d.ReadAt(p, r.Int64N(size/ss)*ss); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}
