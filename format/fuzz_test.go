package format

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/sparsedisk/sparsedisk/lut"
)

// FuzzParseDescriptor: the parser never panics, and what it accepts
// survives a Marshal/Parse round trip unchanged.
func FuzzParseDescriptor(f *testing.F) {
	f.Add([]byte("# sparsedisk image\nformat = sparsedisk/1\nlayout = sparse\nsize = 21474836480 # 20 GiB\nsplit = 1073741824\nsectorsize = 4096\nstate = dirty\n"))
	f.Add([]byte("format=sparsedisk/1\nlayout=split\nsize=20G\nsplit=1g\nsectorsize=512\n"))
	f.Add([]byte("format = sparsedisk/1\nlayout = sparse\nsize = 1\n"))
	f.Add([]byte("\x00\xff = =\n#"))
	f.Add([]byte("format=sparsedisk/1\nlayout=sparse\nsize=1t\nsplit=1g\nsectorsize=4096\nlut = thin\n"))
	f.Add([]byte("format=sparsedisk/1\nlayout=sparse\nsize=1t\nsplit=1g\nsectorsize=4096\nlut = dense\n"))
	// testdata/descriptor.sample is what `sparsedisk create disk.img
	// size=20G split=1G` writes, byte for byte.
	data, err := os.ReadFile(filepath.Join("..", "testdata", "descriptor.sample"))
	if err != nil {
		f.Fatalf("seed: %v", err)
	}
	f.Add(data)
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := ParseDescriptor(data, "fuzz")
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, lut.ErrUnknownKind) {
				t.Fatalf("error outside ErrInvalid: %v", err)
			}
			return
		}
		d2, err := ParseDescriptor(d.Marshal(), "fuzz2")
		if err != nil {
			t.Fatalf("re-parse of marshalled descriptor: %v\n%s", err, d.Marshal())
		}
		if d2 != d {
			t.Fatalf("round trip: %+v != %+v", d2, d)
		}
	})
}
