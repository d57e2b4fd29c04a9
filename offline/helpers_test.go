package offline

import (
	"errors"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// forEachKind runs fn as one subtest per LUT kind (xhyve, thin): the
// tests pass the kind on to the images they create (Params.LUT).
func forEachKind(t *testing.T, fn func(t *testing.T, kind lut.Kind)) {
	t.Helper()
	for _, k := range lut.Kinds {
		t.Run("lut="+string(k), func(t *testing.T) { fn(t, k) })
	}
}

// kindOf is the LUT kind of the image at path.
func kindOf(t testing.TB, path string) lut.Kind {
	t.Helper()
	desc, err := format.ReadDescriptor(nil, path)
	if err != nil {
		t.Fatal(err)
	}
	return desc.LUTKind()
}

// testImage creates an image in a temp dir (or on fsys) and registers a
// cleanup that runs blockif.Check on it after the test's own cleanups: any
// corruption fails the test, and so do leaks unless allowLeaks.
func testImage(t testing.TB, p format.Params, fsys vfs.FS, allowLeaks bool) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := blockif.Create(path, p, &blockif.Options{FS: fsys}); err != nil {
		t.Fatalf("Create(%+v): %v", p, err)
	}
	t.Cleanup(func() { mustCheck(t, path, fsys, allowLeaks) })
	return path
}

func mustCheck(t testing.TB, path string, fsys vfs.FS, allowLeaks bool) *blockif.Report {
	t.Helper()
	r, err := blockif.Check(path, &blockif.Options{FS: fsys})
	if err != nil {
		if errors.Is(err, blockif.ErrInUse) {
			t.Errorf("Check(%s): image still open: %v", path, err)
			return nil
		}
		t.Fatalf("Check(%s): %v", path, err)
	}
	for _, f := range r.Findings {
		if f.Kind == blockif.Corruption || (f.Kind == blockif.Leak && !allowLeaks) {
			t.Errorf("Check(%s): %s", path, f)
		}
	}
	return r
}

func mustOpen(t testing.TB, path string, o *blockif.Options) *blockif.Disk {
	t.Helper()
	d, err := blockif.Open(path, o)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	return d
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.UintN(256))
	}
	return b
}

// firstDiff is the first index where a and b differ, -1 if none.
func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// testImageNoCheck creates an image that the test will deliberately break.
func testImageNoCheck(t *testing.T, p format.Params) string {
	t.Helper()
	path := t.TempDir() + "/disk.img"
	if err := blockif.Create(path, p, nil); err != nil {
		t.Fatal(err)
	}
	return path
}

// finishIntent finishes the offline operation the descriptor at path
// records, under the image's exclusive lock, as Open for writing would.
func finishIntent(t *testing.T, path string) {
	t.Helper()
	l, err := format.LockImage(vfs.OS{}, path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	desc, err := format.ReadDescriptor(nil, path)
	if err != nil {
		t.Fatal(err)
	}
	if err := format.FinishIntent(vfs.OS{}, path, desc, l.Write); err != nil {
		t.Fatal(err)
	}
}

// lutFor is kind for a sparse layout, none for the others.
func lutFor(l format.Layout, kind lut.Kind) lut.Kind {
	if l == format.LayoutSparse && kind != lut.Xhyve {
		return kind
	}
	return ""
}
