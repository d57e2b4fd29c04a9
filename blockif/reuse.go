package blockif

import (
	"slices"
	"sort"
	"sync/atomic"

	"github.com/sparsedisk/sparsedisk/lut"
)

// This file holds the slot state machine of the sparse layout (see the
// package documentation, "Slot reuse"): the per-segment set of reusable
// slots, the queue of freed slots waiting to become reusable, and the
// reader generations that tell when no read can still use a freed slot.

// slotRun is a run [start, end) of slot numbers.
type slotRun struct{ start, end int64 }

// freeRuns is a set of slot numbers kept as sorted, disjoint, non-adjacent
// runs: memory follows the number of runs, not the segment's size. It is
// not safe for concurrent use (segState.mu protects it).
type freeRuns struct {
	runs  []slotRun // runs[head:] are live, sorted by start
	head  int
	count int64 // slots in the set
}

func (f *freeRuns) live() []slotRun { return f.runs[f.head:] }

// len is the number of slots in the set.
func (f *freeRuns) len() int64 { return f.count }

// lowest returns the smallest slot of the set.
func (f *freeRuns) lowest() (int64, bool) {
	if f.head == len(f.runs) {
		return 0, false
	}
	return f.runs[f.head].start, true
}

// pop removes and returns the smallest slot of the set.
func (f *freeRuns) pop() (int64, bool) {
	if f.head == len(f.runs) {
		return 0, false
	}
	r := &f.runs[f.head]
	v := r.start
	r.start++
	if r.start == r.end {
		f.head++
		if f.head == len(f.runs) {
			f.runs, f.head = f.runs[:0], 0
		} else if f.head > 64 && f.head > len(f.runs)/2 {
			f.runs = append(f.runs[:0], f.runs[f.head:]...)
			f.head = 0
		}
	}
	f.count--
	return v, true
}

// add merges slots (any order, no duplicates, none already in the set)
// into the set in one pass.
func (f *freeRuns) add(slots []int64) {
	if len(slots) == 0 {
		return
	}
	slices.Sort(slots)
	var in []slotRun
	for a := 0; a < len(slots); {
		b := a + 1
		for b < len(slots) && slots[b] == slots[b-1]+1 {
			b++
		}
		in = append(in, slotRun{slots[a], slots[b-1] + 1})
		a = b
	}
	f.addRuns(in)
	f.count += int64(len(slots))
}

// addRuns merges sorted, disjoint runs into the set (count not updated).
func (f *freeRuns) addRuns(in []slotRun) {
	old := f.live()
	out := make([]slotRun, 0, len(old)+len(in))
	push := func(r slotRun) {
		if k := len(out) - 1; k >= 0 && out[k].end >= r.start {
			out[k].end = max(out[k].end, r.end)
			return
		}
		out = append(out, r)
	}
	i, j := 0, 0
	for i < len(old) || j < len(in) {
		if j == len(in) || (i < len(old) && old[i].start < in[j].start) {
			push(old[i])
			i++
		} else {
			push(in[j])
			j++
		}
	}
	f.runs, f.head = out, 0
}

// trimTail removes the runs that end at end, repeatedly, and returns the
// new end: the set's part that is the file's tail goes away.
func (f *freeRuns) trimTail(end int64) int64 {
	for len(f.runs) > f.head {
		r := f.runs[len(f.runs)-1]
		if r.end != end {
			break
		}
		f.count -= r.end - r.start
		end = r.start
		f.runs = f.runs[:len(f.runs)-1]
	}
	if f.head == len(f.runs) {
		f.runs, f.head = f.runs[:0], 0
	}
	return end
}

// freeRunsFrom returns the slots of [0, fileSlots) that no entry of e
// references.
func freeRunsFrom(e []uint32, fileSlots int64) freeRuns {
	used := make([]int64, 0, len(e))
	for _, v := range e {
		if v != lut.Unallocated && int64(v) < fileSlots {
			used = append(used, int64(v))
		}
	}
	sort.Slice(used, func(a, b int) bool { return used[a] < used[b] })
	var f freeRuns
	next := int64(0)
	for _, u := range used {
		if u > next {
			f.runs = append(f.runs, slotRun{next, u})
			f.count += u - next
		}
		next = max(next, u+1)
	}
	if fileSlots > next {
		f.runs = append(f.runs, slotRun{next, fileSlots})
		f.count += fileSlots - next
	}
	return f
}

// pendSlot is a freed slot that is not reusable yet.
type pendSlot struct {
	slot   int64
	sector int64  // in the segment: the sector it was freed from
	epoch  uint64 // the LUT snapshot of its segment that records the free
	gen    uint64 // reader generation at the free
	punch  bool   // punch it when it becomes reusable (compaction keeps the old copy until then)
	taken  bool   // reused by the same sector before it became reusable
}

// slotState is the slot bookkeeping of one writable sparse segment. Every
// field except active is protected by segState.mu.
type slotState struct {
	live int64    // LUT entries that reference a slot
	free freeRuns // reusable slots

	// pend holds the freed, not yet reusable slots in the order they
	// were freed, so epoch and gen never decrease along it; pend[0] has
	// absolute index pendBase. pendIdx maps a sector (in the segment) to
	// the absolute index of its latest entry.
	pend     []pendSlot
	pendBase int64
	pendIdx  map[int64]int64

	// epoch counts the LUT snapshots Flush took of this segment; synced
	// is the latest of them known durable (its LUT fdatasync returned).
	epoch, synced uint64

	// gen is the reader generation; active counts reads in flight that
	// looked their slots up in a generation of each parity. A reader
	// increments active[gen&1] with mu read-held (so gen cannot move
	// under it) and decrements it when its preads are done. gen moves
	// only with mu write-held, and only while active[(gen+1)&1] is zero;
	// so active[(gen+1)&1] only counts readers of generation gen-1, and
	// once gen reaches g+2 every read that looked up in generation g or
	// before has finished.
	gen    uint64
	active [2]atomicCounter

	warned bool // the 90% warning was logged
}

// pendLen is the number of freed slots waiting to become reusable.
func (st *slotState) pendLen() int64 {
	var n int64
	for _, p := range st.pend {
		if !p.taken {
			n++
		}
	}
	return n
}

// tryAdvance moves the reader generation on if the previous one has
// drained. Called with mu write-held.
func (st *slotState) tryAdvance() {
	if st.active[(st.gen+1)&1].Load() == 0 {
		st.gen++
	}
}

// freeSlot records that sector j (in the segment) no longer uses slot v.
// Called with mu write-held.
func (st *slotState) freeSlot(j, v int64, punchLater bool) {
	if st.pendIdx == nil {
		st.pendIdx = map[int64]int64{}
	}
	st.pend = append(st.pend, pendSlot{slot: v, sector: j, epoch: st.epoch + 1, gen: st.gen, punch: punchLater})
	st.pendIdx[j] = st.pendBase + int64(len(st.pend)) - 1
	stats.count(transFreed)
}

// takePending returns the latest slot sector j freed, if it is not
// reusable yet: rewriting the sector into its own old slot is safe at any
// time, since no other sector's entry, in memory or on disk, can name it.
// Called with mu write-held.
func (st *slotState) takePending(j int64) (int64, bool) {
	idx, ok := st.pendIdx[j]
	if !ok {
		return 0, false
	}
	delete(st.pendIdx, j)
	p := &st.pend[idx-st.pendBase]
	p.taken = true
	stats.count(transSameSector)
	return p.slot, true
}

// promotable pops the pending slots that have become reusable: their free
// is in a durable LUT snapshot and every read that may have looked them up
// has finished. Slots to punch are returned in toPunch (the caller punches
// them, then adds them to free); the others go to free at once. Called
// with mu write-held.
func (st *slotState) promotable() (toPunch []int64) {
	var ready []int64
	for tries := 0; ; tries++ {
		for len(st.pend) > 0 {
			p := st.pend[0]
			if !p.taken {
				if p.epoch > st.synced {
					break
				}
				if p.gen+2 > st.gen {
					if tries == 2 {
						stats.count(transDrainWait)
					}
					break
				}
				if p.punch {
					toPunch = append(toPunch, p.slot)
				} else {
					ready = append(ready, p.slot)
				}
				stats.count(transReusable)
			}
			if idx, ok := st.pendIdx[p.sector]; ok && idx == st.pendBase {
				delete(st.pendIdx, p.sector)
			}
			st.pend[0] = pendSlot{}
			st.pend = st.pend[1:]
			st.pendBase++
		}
		if tries == 2 || len(st.pend) == 0 || st.pend[0].epoch > st.synced {
			break
		}
		st.tryAdvance() // at most twice: g+2 drains generation g
	}
	if len(st.pend) == 0 {
		st.pend = nil // let the backing array go
	}
	st.free.add(ready)
	return toPunch
}

type atomicCounter = atomic.Int64

// Slot state transitions, counted for the tests (the crash simulation
// asserts it hits each of them).
const (
	transAppended   = iota // new slot at the end of the file → live
	transFreed             // live → freed (TRIM, WRITE_ZEROES, zero overwrite, compaction move)
	transSameSector        // freed → live again for the sector that freed it
	transDrainWait         // freed, LUT synced, held back by a read in flight
	transReusable          // freed → reusable
	transReused            // reusable → live
	transMoved             // live slot copied into a lower hole by the compactor
	transTruncated         // reusable → gone (the compactor truncated the file)
	numTrans
)

var transNames = [numTrans]string{"appended", "freed", "same-sector", "drain-wait", "reusable", "reused", "moved", "truncated"}

// transStats counts slot state transitions of every Disk of the process.
type transStats struct{ n [numTrans]atomic.Int64 }

func (s *transStats) count(t int)           { s.n[t].Add(1) }
func (s *transStats) countN(t int, n int64) { s.n[t].Add(n) }

func (s *transStats) snapshot() (out [numTrans]int64) {
	for i := range out {
		out[i] = s.n[i].Load()
	}
	return out
}

var stats transStats
