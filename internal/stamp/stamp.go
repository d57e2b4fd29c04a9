// Package stamp gives tests sector contents that identify themselves, and
// a ledger that tells, after a fault or a crash, whether a disk still holds
// what it must and nothing it must not.
//
// # Design
//
// [Sector] derives a 4 KiB sector's content from the sector number and a
// write id, so a sector that holds another sector's data, or data of a
// write never sent to it, is told apart from every legitimate content. A
// [Ledger] records every write id sent to each sector and the content the
// disk must hold now (after an acknowledged write, or zeros after an
// acknowledged trim); [Ledger.Verify] then accepts, for each sector, the
// required content, or for sectors with no requirement, zeros or any stamp
// once sent to that very sector (a failed write may have landed in part).
//
// # Concurrency
//
// A Ledger is not safe for concurrent use; Sector is.
package stamp

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// Size is the stamped unit: one 4 KiB sector.
const Size = 4096

// Sector returns the content of sector s for write id.
func Sector(s int64, id int) []byte {
	r := rand.New(rand.NewPCG(uint64(s), uint64(id)))
	b := make([]byte, Size)
	for i := 0; i < len(b); i += 8 {
		v := r.Uint64() | 1 // never an all-zero word
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	return b
}

// Ledger remembers, per sector, every write id ever sent to it and the one
// the disk must hold now (-1: zeros).
type Ledger struct {
	sent map[int64][]int
	want map[int64]int
}

// NewLedger returns an empty ledger: nothing sent, nothing required.
func NewLedger() *Ledger {
	return &Ledger{sent: map[int64][]int{}, want: map[int64]int{}}
}

// Data returns the stamped payload of write id for n sectors at sector s,
// recording the write as sent.
func (l *Ledger) Data(s int64, n int, id int) []byte {
	var b []byte
	for k := range int64(n) {
		l.sent[s+k] = append(l.sent[s+k], id)
		b = append(b, Sector(s+k, id)...)
	}
	return b
}

// Acked records that write id of n sectors at s was acknowledged: the disk
// must hold it now.
func (l *Ledger) Acked(s int64, n int, id int) {
	for k := range int64(n) {
		l.want[s+k] = id
	}
}

// Zeroed records that n sectors at s were trimmed or zeroed.
func (l *Ledger) Zeroed(s int64, n int) {
	for k := range int64(n) {
		l.want[s+k] = -1
	}
}

// Verify checks the sectors held in data, the first of which is sector
// first, reporting each violation through t with where in front, and
// returns how many sectors it checked (zeros nobody asked for are not
// counted).
func (l *Ledger) Verify(t testing.TB, data []byte, first int64, where string) (checked int) {
	t.Helper()
	zero := make([]byte, Size)
	for k := int64(0); k < int64(len(data))/Size; k++ {
		s := first + k
		got := data[k*Size : (k+1)*Size]
		if id, ok := l.want[s]; ok {
			if id < 0 && !bytes.Equal(got, zero) {
				t.Errorf("%s: sector %d should read zeros", where, s)
			} else if id >= 0 && !bytes.Equal(got, Sector(s, id)) {
				t.Errorf("%s: sector %d lost acknowledged write %d", where, s, id)
			}
			checked++
			continue
		}
		if bytes.Equal(got, zero) {
			continue
		}
		ok := false
		for _, id := range l.sent[s] {
			ok = ok || bytes.Equal(got, Sector(s, id))
		}
		if !ok {
			t.Errorf("%s: sector %d holds data never written to it", where, s)
		}
		checked++
	}
	return checked
}
