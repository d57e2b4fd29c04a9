package format

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/lut"
)

// An xhyve-kind descriptor (no `lut` key) marshals byte-identically to
// what earlier versions wrote; `lut = thin` round-trips; `lut = xhyve`
// is accepted and means the default.
func TestDescriptorLUTKey(t *testing.T) {
	sample, err := os.ReadFile(filepath.Join("..", "testdata", "descriptor.sample"))
	if err != nil {
		t.Fatal(err)
	}
	d, err := ParseDescriptor(sample, "sample")
	if err != nil {
		t.Fatal(err)
	}
	if d.LUT != "" || d.LUTKind() != lut.Xhyve {
		t.Errorf("descriptor without lut key: LUT %q, kind %q; want \"\", xhyve", d.LUT, d.LUTKind())
	}
	if got := d.Marshal(); !bytes.Equal(got, sample) {
		t.Errorf("xhyve descriptor re-marshalled differently:\n%s\nwant\n%s", got, sample)
	}
	thin := append(bytes.Clone(sample), "lut = thin\n"...)
	d, err = ParseDescriptor(thin, "thin")
	if err != nil || d.LUTKind() != lut.Thin {
		t.Fatalf("lut = thin: kind %q, %v", d.LUTKind(), err)
	}
	if !bytes.Contains(d.Marshal(), []byte("\nlut = thin\n")) {
		t.Errorf("thin descriptor marshals without its lut key:\n%s", d.Marshal())
	}
	d, err = ParseDescriptor(append(bytes.Clone(sample), "lut = xhyve\n"...), "explicit")
	if err != nil || d.LUT != "" {
		t.Errorf("lut = xhyve: LUT %q, %v; want the default", d.LUT, err)
	}
	for _, val := range []string{"dense", ""} {
		_, err = ParseDescriptor(append(bytes.Clone(sample), "lut = "+val+"\n"...), "unknown")
		if !errors.Is(err, lut.ErrUnknownKind) {
			t.Fatalf("lut = %q: %v, want ErrUnknownKind", val, err)
		}
		for _, want := range []string{"xhyve", "thin", "line 8"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("lut = %q: error %q does not name %s", val, err, want)
			}
		}
	}
	d, _ = ParseDescriptor(sample, "sample")
	d.Layout = LayoutSplit
	d.LUT = lut.Thin
	if err := d.Validate(); !errors.Is(err, ErrInvalid) {
		t.Errorf("split layout with lut=thin: %v, want ErrInvalid", err)
	}
}
