package format

import "testing"

func TestSegmentName(t *testing.T) {
	for i, want := range map[int]string{0: "d.img.0000", 7: "d.img.0007", 9999: "d.img.9999", 10000: "d.img.10000"} {
		if got := SegmentName("d.img", i); got != want {
			t.Errorf("SegmentName(%d) = %q, want %q", i, got, want)
		}
	}
}

func TestPartOf(t *testing.T) {
	for _, c := range []struct {
		file, img string
		want      bool
	}{
		{"d.img.lut", "d.img", true},
		{"d.img.0000", "d.img", true},
		{"d.img.10000", "d.img", true},
		{"d.img.000", "d.img", false},
		{"d.img.tmp", "d.img", false},
		{"d.img", "d.img", false},
		{"other.0000", "d.img", false},
	} {
		if got := PartOf(c.file, c.img); got != c.want {
			t.Errorf("PartOf(%q, %q) = %v, want %v", c.file, c.img, got, c.want)
		}
	}
}
