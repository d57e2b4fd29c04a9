package stamp

import (
	"bytes"
	"testing"
)

// recorder counts the errors Verify reports.
type recorder struct {
	testing.TB
	errs []string
}

func (r *recorder) Helper() {}
func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, format)
}

func TestStampsDiffer(t *testing.T) {
	if bytes.Equal(Sector(1, 1), Sector(2, 1)) || bytes.Equal(Sector(1, 1), Sector(1, 2)) {
		t.Error("stamps of different sectors or writes are equal")
	}
	if !bytes.Equal(Sector(7, 3), Sector(7, 3)) {
		t.Error("a stamp is not reproducible")
	}
}

func TestVerify(t *testing.T) {
	l := NewLedger()
	disk := make([]byte, 6*Size)
	copy(disk, l.Data(0, 2, 1)) // sectors 0-1: write 1, acknowledged
	l.Acked(0, 2, 1)
	l.Data(2, 1, 2) // sector 2: write 2 sent, not acknowledged, did not land
	copy(disk[3*Size:], l.Data(3, 1, 3))
	copy(disk[4*Size:], Sector(5, 9)) // sector 4 holds another sector's data
	l.Zeroed(5, 1)                    // sector 5 must read zeros
	copy(disk[5*Size:], Sector(5, 9))

	r := &recorder{TB: t}
	if n := l.Verify(r, disk, 0, "disk"); n != 5 {
		t.Errorf("checked %d sectors, want 5 (sector 2 is zeros nobody required)", n)
	}
	if len(r.errs) != 2 {
		t.Errorf("%d violations reported, want 2 (sectors 4 and 5): %v", len(r.errs), r.errs)
	}
}
