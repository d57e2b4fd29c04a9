package blockif

import (
	"errors"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// forEachKind runs fn as one subtest per LUT kind (xhyve, thin): engine
// tests pass the kind on to the images they create (Params.LUT).
func forEachKind(t *testing.T, fn func(t *testing.T, kind lut.Kind)) {
	t.Helper()
	for _, k := range lut.Kinds {
		t.Run("lut="+string(k), func(t *testing.T) { fn(t, k) })
	}
}

// lutFor is kind for a sparse layout, none for the others.
func lutFor(l format.Layout, kind lut.Kind) lut.Kind {
	if l == format.LayoutSparse && kind != lut.Xhyve {
		return kind
	}
	return ""
}

// testImage creates an image of geometry p (its LUT kind included) in a
// temp dir (or on fsys) and registers a
// cleanup that runs Check on it after the test's own cleanups: any
// corruption fails the test, and so do leaks unless allowLeaks.
func testImage(t testing.TB, p format.Params, fsys vfs.FS, allowLeaks bool) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := Create(path, p, &Options{FS: fsys}); err != nil {
		t.Fatalf("Create(%+v): %v", p, err)
	}
	t.Cleanup(func() { mustCheck(t, path, fsys, allowLeaks) })
	return path
}

func mustCheck(t testing.TB, path string, fsys vfs.FS, allowLeaks bool) *Report {
	t.Helper()
	r, err := Check(path, &Options{FS: fsys})
	if err != nil {
		if errors.Is(err, ErrInUse) {
			t.Errorf("Check(%s): image still open: %v", path, err)
			return nil
		}
		t.Fatalf("Check(%s): %v", path, err)
	}
	for _, f := range r.Findings {
		if f.Kind == Corruption || (f.Kind == Leak && !allowLeaks) {
			t.Errorf("Check(%s): %s", path, f)
		}
	}
	return r
}

// The engine's tests run with slot reuse on (it is off by default until the
// SIGKILL harness passes with it), so the reuse code stays exercised.
func mustOpen(t testing.TB, path string, o *Options) *Disk {
	t.Helper()
	var oo Options
	if o != nil {
		oo = *o
	}
	oo.ReuseSlots = true
	d, err := Open(path, &oo)
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
