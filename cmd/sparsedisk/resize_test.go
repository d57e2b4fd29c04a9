package main

import (
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
)

func TestResizeCommand(t *testing.T) {
	path := makeImage(t) // 64M, data at 0, 20M and 63M
	size := func() int64 {
		d, err := blockif.Open(path, &blockif.Options{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		return d.Size()
	}
	if out, errs, code := sdRun(t, "resize", path, "+16M"); code != 0 || size() != 80<<20 {
		t.Fatalf("grow: exit %d size %d\n%s%s", code, size(), out, errs)
	}
	if _, errs, code := sdRun(t, "resize", path, "-16M"); code == 0 || !strings.Contains(errs, "--shrink") {
		t.Fatalf("shrink without --shrink: exit %d\n%s", code, errs)
	}
	if _, errs, code := sdRun(t, "resize", path, "-32M", "--shrink"); code == 0 || !strings.Contains(errs, "sector 16128 ") {
		t.Fatalf("shrink over data: exit %d, want the first sector (16128) named\n%s", code, errs)
	}
	if size() != 80<<20 {
		t.Fatal("refused shrink changed the size")
	}
	if out, errs, code := sdRun(t, "resize", "--shrink", path, "-32M", "--force"); code != 0 || size() != 48<<20 || !strings.Contains(out, "dropped") {
		t.Fatalf("forced shrink: exit %d size %d\n%s%s", code, size(), out, errs)
	}
	if r, err := blockif.Check(path, nil); err != nil || !r.Clean() {
		t.Fatalf("check after resize: %v %v", err, r)
	}
	if _, _, code := sdRun(t, "resize", path, "1.5G"); code == 0 {
		t.Error("fractional size accepted")
	}
}
