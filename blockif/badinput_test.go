package blockif

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// TestBadInput: each broken image gives a clear error naming the file,
// never a panic.
func TestBadInput(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 8 * 4096, Split: 4 * 4096, SectorSize: 4096, LUT: kind}
		mk := func(t *testing.T) string {
			path := testImageNoCheck(t, p)
			d := mustOpen(t, path, nil)
			for s := int64(0); s < 8; s++ {
				if _, err := d.WriteAt([]byte{byte(s + 1)}, s*4096); err != nil {
					t.Fatal(err)
				}
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			return path
		}
		cases := []struct {
			name   string
			break_ func(path string) error
			is     error
			names  string // suffix of the file the message must name
		}{
			{"missing segment", func(path string) error { return os.Remove(path + ".0001") }, ErrCorrupt, ".0001"},
			{"truncated LUT", func(path string) error { return os.Truncate(path+".lut", 17) }, ErrCorrupt, ".lut"},
			{"entry past segment end", func(path string) error {
				f, err := os.OpenFile(path+".lut", os.O_RDWR, 0)
				if err != nil {
					return err
				}
				defer f.Close()
				var b [4]byte
				binary.LittleEndian.PutUint32(b[:], 99)
				_, err = f.WriteAt(b[:], 4*5) // sector 5, segment 1
				return err
			}, ErrCorrupt, ".0001"},
			{"descriptor garbage", func(path string) error {
				return os.WriteFile(path, []byte("# sparsedisk image\nformat = sparsedisk/1\n\x00\x01garbage here\n"), 0o644)
			}, ErrInvalid, ""},
			{"descriptor unknown key", func(path string) error {
				return appendTo(path, "colour = blue\n")
			}, ErrInvalid, ""},
			{"size not multiple of sectorsize", func(path string) error {
				return replaceIn(path, "size = 32768", "size = 32769")
			}, ErrInvalid, ""},
			{"split not multiple of sectorsize", func(path string) error {
				return replaceIn(path, "split = 16384", "split = 16385")
			}, ErrInvalid, ""},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				path := mk(t)
				if err := c.break_(path); err != nil {
					t.Fatal(err)
				}
				d, err := Open(path, nil)
				if err == nil {
					// Lazily detected: the first access to the segment fails.
					buf := make([]byte, 8*4096)
					_, err = d.ReadAt(buf, 0)
					d.Close()
				}
				if !errors.Is(err, c.is) {
					t.Fatalf("got %v, want %v", err, c.is)
				}
				want := path + c.names
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not name %s", err, want)
				}
			})
		}
	})
}

func TestSecondWriter(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 1 << 20, Split: 1 << 20, SectorSize: 4096, LUT: kind}, nil, false)
		d := mustOpen(t, path, nil)
		defer d.Close()
		if _, err := Open(path, nil); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), path) {
			t.Errorf("second writer: %v, want ErrInUse naming %s", err, path)
		}
		if _, err := Open(path, &Options{ReadOnly: true}); !errors.Is(err, ErrInUse) {
			t.Errorf("reader while writing: %v, want ErrInUse", err)
		}
	})
}

func TestDirtyState(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 1 << 20, Split: 1 << 20, SectorSize: 4096, LUT: kind}, nil, false)
		d := mustOpen(t, path, nil)
		desc, err := format.ReadDescriptor(nil, path)
		if err != nil || desc.State != format.StateDirty {
			t.Errorf("while open for writing: state %q (%v), want dirty", desc.State, err)
		}
		d.Close()
		desc, _ = format.ReadDescriptor(nil, path)
		if desc.State != format.StateClean {
			t.Errorf("after close: state %q, want clean", desc.State)
		}
		r := mustOpen(t, path, &Options{ReadOnly: true})
		defer r.Close()
		desc, _ = format.ReadDescriptor(nil, path)
		if desc.State != format.StateClean {
			t.Errorf("read-only open changed state to %q", desc.State)
		}
		if _, err := r.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
			t.Errorf("write to read-only disk: %v", err)
		}
	})
}

func TestOutOfRange(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 1 << 20, Split: 1 << 19, SectorSize: 4096, LUT: kind}, nil, false)
		d := mustOpen(t, path, nil)
		defer d.Close()
		for _, c := range []struct{ off, n int64 }{{-1, 1}, {1 << 20, 1}, {1<<20 - 1, 2}, {0, 1<<20 + 1}} {
			if _, err := d.WriteAt(make([]byte, c.n), c.off); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("WriteAt(%d,%d): %v", c.off, c.n, err)
			}
			if _, err := d.ReadAt(make([]byte, c.n), c.off); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("ReadAt(%d,%d): %v", c.off, c.n, err)
			}
			if err := d.Trim(c.off, c.n); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("Trim(%d,%d): %v", c.off, c.n, err)
			}
		}
	})
}

// testImageNoCheck creates an image that the test will deliberately break.
func testImageNoCheck(t *testing.T, p format.Params) string {
	t.Helper()
	path := t.TempDir() + "/disk.img"
	if err := Create(path, p, nil); err != nil {
		t.Fatal(err)
	}
	return path
}

func appendTo(path, s string) error {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteString(s)
	return err
}

func replaceIn(path, old, new string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if !strings.Contains(string(data), old) {
		return errors.New("pattern not found: " + old)
	}
	return os.WriteFile(path, []byte(strings.Replace(string(data), old, new, 1)), 0o644)
}

// TestDirtyCorruptRefused: an image left dirty (not closed cleanly) is
// checked on open; corruption found then refuses a writer (which would
// build on it) and only warns a reader, naming the first problem.
func TestDirtyCorruptRefused(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 1 << 20, Split: 1 << 20, SectorSize: 4096, LUT: kind}
		path := testImageNoCheck(t, p)
		d := mustOpen(t, path, nil)
		if _, err := d.WriteAt(bytes.Repeat([]byte{9}, 8192), 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		desc, err := format.ReadDescriptor(nil, path)
		if err != nil {
			t.Fatal(err)
		}
		desc.State = format.StateDirty
		if err := format.WriteDescriptor(nil, path, desc); err != nil {
			t.Fatal(err)
		}
		// Sector 7's entry points far past the end of the 2-slot segment.
		f, err := os.OpenFile(path+lut.Suffix, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte{0xe8, 0x03, 0, 0}, 7*lut.EntrySize); err != nil {
			t.Fatal(err)
		}
		f.Close()

		if _, err := Open(path, nil); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "check -r all") {
			t.Fatalf("writable open of a dirty, corrupt image: %v, want ErrCorrupt with the repair command", err)
		}
		var logs bytes.Buffer
		r, err := Open(path, &Options{ReadOnly: true, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		if err != nil {
			t.Fatalf("read-only open of a dirty, corrupt image: %v, want it to open with a warning", err)
		}
		r.Close()
		if !strings.Contains(logs.String(), "not closed cleanly") || !strings.Contains(logs.String(), "corruptions=1") {
			t.Fatalf("read-only open logged %q, want the dirty-image warning with 1 corruption", logs.String())
		}
		if desc, _ := format.ReadDescriptor(nil, path); desc.State != format.StateDirty {
			t.Fatalf("refused opens changed the state to %q", desc.State)
		}
	})
}

// TestReadOnlySalvage: a read-only open of an image with a LUT entry past
// its segment's end fails only the reads that touch that sector; the other
// sectors of the segment read back (a writer is still refused: it would
// build on the corruption).
func TestReadOnlySalvage(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 8 * 4096, Split: 4 * 4096, SectorSize: 4096, LUT: kind}
		path := testImageNoCheck(t, p)
		d := mustOpen(t, path, nil)
		for s := int64(0); s < 8; s++ {
			if _, err := d.WriteAt(bytes.Repeat([]byte{byte(s + 1)}, 4096), s*4096); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(path+lut.Suffix, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte{99, 0, 0, 0}, 5*lut.EntrySize); err != nil { // sector 5, segment 1
			t.Fatal(err)
		}
		f.Close()

		var logs bytes.Buffer
		r, err := Open(path, &Options{ReadOnly: true, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		for s := int64(0); s < 8; s++ {
			_, err := r.ReadAt(buf, s*4096)
			if s == 5 {
				if !errors.Is(err, ErrCorrupt) {
					t.Errorf("read of the sector with the bad entry: %v, want ErrCorrupt", err)
				}
				continue
			}
			if err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{byte(s + 1)}, 4096)) {
				t.Errorf("sector %d beside the bad entry: %v (first byte %d)", s, err, buf[0])
			}
		}
		if !strings.Contains(logs.String(), "first_sector=5") {
			t.Errorf("no warning naming the bad sector: %q", logs.String())
		}
		r.Close()
		w, err := Open(path, nil)
		if err == nil {
			_, err = w.ReadAt(buf, 4*4096)
			w.Close()
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("writer on the corrupt segment: %v, want ErrCorrupt", err)
		}
	})
}
