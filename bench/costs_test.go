package bench

import (
	"path/filepath"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// The costs that must follow the data, not the virtual size (issue 14):
// create, and the walks behind info (Stats), check (Check) and map, NBD
// BLOCK_STATUS and FUSE SEEK_DATA (Extents) on an empty 1 TiB image, per
// LUT kind. Targets (CLI, same machine): thin create < 0.1 s, each walk <
// 0.5 s (thin) and < 2 s (xhyve). Run with
// `go test -run '^$' -bench Empty1T -benchtime 3x ./bench/`.

func emptyImage(b *testing.B, kind lut.Kind) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), "disk.img")
	if err := blockif.Create(path, format.Params{Layout: format.LayoutSparse, Size: 1 << 40, SectorSize: 4096, LUT: kind}, nil); err != nil {
		b.Fatal(err)
	}
	return path
}

func BenchmarkEmpty1TCreate(b *testing.B) {
	for _, kind := range lut.Kinds {
		b.Run(string(kind), func(b *testing.B) {
			dir := b.TempDir()
			for i := 0; i < b.N; i++ {
				path := filepath.Join(dir, "disk"+string(rune('a'+i%26))+string(rune('a'+i/26%26))+".img")
				if err := blockif.Create(path, format.Params{Layout: format.LayoutSparse, Size: 1 << 40, SectorSize: 4096, LUT: kind}, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkEmpty1TWalks(b *testing.B) {
	for _, kind := range lut.Kinds {
		path := emptyImage(b, kind)
		b.Run(string(kind)+"/info", func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				d, err := blockif.Open(path, &blockif.Options{ReadOnly: true})
				if err != nil {
					b.Fatal(err)
				}
				if st, err := d.Stats(); err != nil || st.AllocatedBytes != 0 {
					b.Fatal(st, err)
				}
				d.Close()
			}
		})
		b.Run(string(kind)+"/check", func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if r, err := blockif.Check(path, nil); err != nil || !r.Clean() {
					b.Fatal(r, err)
				}
			}
		})
		b.Run(string(kind)+"/extents", func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				d, err := blockif.Open(path, &blockif.Options{ReadOnly: true})
				if err != nil {
					b.Fatal(err)
				}
				for off := int64(0); off < d.Size(); off += 4 << 30 { // as a BLOCK_STATUS client asks
					if e, err := d.Extents(off, 4<<30); err != nil || len(e) != 1 || e[0].Allocated {
						b.Fatal(e, err)
					}
				}
				d.Close()
			}
		})
	}
}
