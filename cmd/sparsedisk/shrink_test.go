package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/offline"
)

func TestShrinkCommand(t *testing.T) {
	path := makeImage(t)
	d, err := blockif.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(9); i >= 0; i-- { // backwards: slots out of order
		d.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 4096), 30<<20+i*4096)
	}
	d.Trim(0, 4096)
	d.WriteAt(make([]byte, 4096), 63<<20) // zero overwrite of an allocated sector
	want := make([]byte, d.Size())
	d.ReadAt(want, 0)
	d.Close()
	before := imageDigest(t, path)
	out, errs, code := sdRun(t, "shrink", path, "--dry-run")
	if code != 0 || !strings.Contains(out, "would reclaim") || errs != "" {
		t.Fatalf("dry run: exit %d\n%s%s", code, out, errs)
	}
	if imageDigest(t, path) != before {
		t.Fatal("dry run changed the image")
	}
	out, _, code = sdRun(t, "shrink", "--output=json", path)
	var rep offline.ShrinkReport
	if code != 0 || json.Unmarshal([]byte(out), &rep) != nil || rep.Compacted == 0 || rep.ZeroSectors != 1 {
		t.Fatalf("shrink: exit %d\n%s", code, out)
	}
	d, err = blockif.Open(path, &blockif.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, d.Size())
	d.ReadAt(got, 0)
	st, _ := d.Stats()
	d.Close()
	if !bytes.Equal(got, want) || st.Fragments != 0 || st.LeakedSlots != 0 {
		t.Fatalf("after shrink: content equal %v, fragments %d, leaks %d", bytes.Equal(got, want), st.Fragments, st.LeakedSlots)
	}
	if out, _, code := sdRun(t, "shrink", "-q", path); code != 0 || out != "" {
		t.Errorf("shrink -q: exit %d, output %q", code, out)
	}
}
