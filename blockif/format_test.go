package blockif

import (
	"bytes"
	"encoding/binary"
	"os"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
)

// TestGoldenFormat writes a fixed sequence and compares the segment, LUT
// and descriptor bytes with what FORMAT.md predicts (its example in
// section 6 is this test).
func TestGoldenFormat(t *testing.T) {
	const ss = 4096
	path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 16 * ss, Split: 4 * ss, SectorSize: ss}, nil, false)
	d := mustOpen(t, path, nil)
	fill := func(b byte) []byte { return bytes.Repeat([]byte{b}, ss) }
	writes := []struct {
		sector int64
		data   []byte
	}{
		{5, fill(0xAA)},       // segment 1, first slot
		{1, fill(0xBB)},       // segment 0, first slot
		{4, fill(0xCC)},       // segment 1, second slot: out of logical order
		{0, make([]byte, ss)}, // zeros: allocates nothing
		{5, fill(0xDD)},       // in place, slot 0 of segment 1
		{15, fill(0xEE)},      // last sector, segment 3
	}
	for _, w := range writes {
		if _, err := d.WriteAt(w.data, w.sector*ss); err != nil {
			t.Fatal(err)
		}
	}
	// Sectors 8..9 written then trimmed: slots allocated, then punched.
	if _, err := d.WriteAt(append(fill(0x11), fill(0x22)...), 8*ss); err != nil {
		t.Fatal(err)
	}
	if err := d.Trim(8*ss, 2*ss); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}

	wantLUT := make([]uint32, 16)
	for i := range wantLUT {
		wantLUT[i] = 0xFFFFFFFF
	}
	wantLUT[1], wantLUT[5], wantLUT[4], wantLUT[15] = 0, 0, 1, 0
	lutBytes, err := os.ReadFile(path + ".lut")
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 16*4)
	for i, v := range wantLUT {
		binary.LittleEndian.PutUint32(want[4*i:], v)
	}
	if !bytes.Equal(lutBytes, want) {
		t.Errorf("LUT bytes\n got %x\nwant %x", lutBytes, want)
	}
	segs := map[string][]byte{
		".0000": fill(0xBB),
		".0001": append(fill(0xDD), fill(0xCC)...),
		".0002": make([]byte, 2*ss), // two punched slots: zeros, length kept
		".0003": fill(0xEE),
	}
	for suffix, w := range segs {
		got, err := os.ReadFile(path + suffix)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, w) {
			t.Errorf("segment %s: %d bytes, want %d (first bytes %x)", suffix, len(got), len(w), got[:min(len(got), 8)])
		}
	}
	desc, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	wantDesc := "# sparsedisk image\nformat = sparsedisk/1\nlayout = sparse\n" +
		"size = 65536               # 64 KiB\nsplit = 16384              # 16 KiB\nsectorsize = 4096\nstate = clean\n"
	if string(desc) != wantDesc {
		t.Errorf("descriptor\n%s\nwant\n%s", desc, wantDesc)
	}
}
