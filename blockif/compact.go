package blockif

import (
	"container/heap"
	"fmt"
	"sync"
	"time"

	"github.com/sparsedisk/sparsedisk/lut"
)

// compactor is the background compaction of one writable sparse Disk (see
// the package documentation, "Online compaction"). One goroutine runs it;
// kick and stop are safe for concurrent use.
type compactor struct {
	d        *Disk
	interval time.Duration
	kickCh   chan struct{} // buffered 1: a pass is due
	stopCh   chan struct{} // closed by stop
	done     chan struct{} // closed when the goroutine has returned
	once     sync.Once

	// minSlack, if not 0, replaces compactSlack's floor (tests force
	// compaction of tiny images with 1).
	minSlack int64

	// active holds the segments being compacted (hysteresis: compaction
	// starts above the slack and goes on until the file is dense). Only
	// the compactor goroutine touches it.
	active map[int]bool
}

// compactScanChunk is how many LUT entries the compactor scans per hold
// of a segment's read lock when it looks for the slots to move.
const compactScanChunk = 1 << 16

func startCompactor(d *Disk, interval time.Duration) *compactor {
	if interval <= 0 {
		interval = time.Second
	}
	c := &compactor{d: d, interval: interval, kickCh: make(chan struct{}, 1),
		stopCh: make(chan struct{}), done: make(chan struct{}), active: map[int]bool{}}
	go c.run()
	return c
}

// kick asks for a pass soon (a Flush made slots reusable).
func (c *compactor) kick() {
	select {
	case c.kickCh <- struct{}{}:
	default:
	}
}

// stop ends the goroutine and waits for it; the batch in progress
// finishes first.
func (c *compactor) stop() {
	c.once.Do(func() { close(c.stopCh) })
	<-c.done
}

func (c *compactor) run() {
	defer close(c.done)
	t := time.NewTicker(c.interval)
	defer t.Stop()
	for {
		select {
		case <-c.stopCh:
			return
		case <-c.kickCh:
		case <-t.C:
		}
		for i := range c.d.segs {
			for {
				start := time.Now()
				more, err := c.step(i)
				if err != nil {
					if err != ErrClosed {
						c.d.log.Warn("compactor: giving up on the segment until the next pass", "image", c.d.path, "segment", i, "err", err)
					}
					break
				}
				if !more {
					break
				}
				// Throttle: at most a quarter of the time moving data, so
				// client I/O keeps most of the disk's bandwidth.
				pause := time.NewTimer(max(3*time.Since(start), time.Millisecond))
				select {
				case <-c.stopCh:
					pause.Stop()
					return
				case <-pause.C:
				}
			}
		}
	}
}

// step does one unit of work on segment i inside enter/leave: make freed
// slots reusable, cut the reusable tail off the file, and move one batch
// of slots from the tail into the lowest holes. It tells whether more
// batches are due.
func (c *compactor) step(i int) (bool, error) {
	d := c.d
	if err := d.enter(); err != nil {
		return false, err
	}
	defer d.leave()
	s := d.segs[i]
	s.mu.RLock()
	loaded, failed := s.part != nil, s.err != nil
	s.mu.RUnlock()
	if failed {
		return false, nil
	}
	if !loaded {
		// A segment nobody touched since open is left alone (its LUT
		// stays unloaded), unless its file is longer than all its
		// sectors could need: an old version's bloat.
		size, err := s.Size()
		if err != nil {
			return false, err
		}
		if slots := size / d.desc.SectorSize; slots <= s.sectors+compactSlack(s.sectors, d.desc.SectorSize) {
			return false, nil
		}
		if err := d.withTable(s, func(*lut.Part) {}); err != nil {
			return false, err
		}
	}
	if err := d.reclaim(s); err != nil {
		return false, err
	}
	if err := d.truncateTail(s); err != nil {
		return false, err
	}
	ss := d.desc.SectorSize
	s.mu.RLock()
	holes, live := s.free.len(), s.live
	low, ok := s.free.lowest()
	s.mu.RUnlock()
	if !ok {
		delete(c.active, i)
		return false, nil
	}
	slack := compactSlack(live, ss)
	if c.minSlack > 0 {
		slack = max(live/16, c.minSlack)
	}
	if !c.active[i] && holes <= slack {
		return false, nil
	}
	c.active[i] = true
	batch := int(min(1024, max(16, (1<<20)/ss)))
	cands := d.highestSlots(s, low, batch)
	moved := 0
	for k := len(cands) - 1; k >= 0; k-- { // highest slot first
		ok, err := d.moveSlot(s, cands[k].j, cands[k].slot)
		if err != nil {
			return false, err
		}
		if ok {
			moved++
		}
	}
	if moved == 0 {
		delete(c.active, i) // dense: nothing live above a hole
		return false, nil
	}
	// Make the moves durable, so the slots moved out become reusable and
	// the tail can go.
	if err := d.flush(); err != nil {
		return false, err
	}
	if err := d.reclaim(s); err != nil {
		return false, err
	}
	if err := d.truncateTail(s); err != nil {
		return false, err
	}
	d.log.Info("compactor moved slots into holes", "image", d.path, "segment", i, "moved", moved)
	return true, nil
}

// compactSlack is how many reusable holes a segment with live slots may
// keep before the compactor starts moving slots: 1/16 of its live data,
// at least 256 KiB (and 16 slots).
func compactSlack(live, ss int64) int64 {
	return max(live/16, (256<<10)/ss, 16)
}

type slotOf struct {
	slot int64
	j    int64 // sector in the segment
}

// slotHeap is a min-heap by slot.
type slotHeap []slotOf

func (h slotHeap) Len() int           { return len(h) }
func (h slotHeap) Less(a, b int) bool { return h[a].slot < h[b].slot }
func (h slotHeap) Swap(a, b int)      { h[a], h[b] = h[b], h[a] }
func (h *slotHeap) Push(x any)        { *h = append(*h, x.(slotOf)) }
func (h *slotHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// highestSlots returns up to n sectors of s whose slots are the highest
// above low, in ascending slot order. It scans the segment's entries a
// chunk at a time, so no writer waits long for the segment's lock.
func (d *Disk) highestSlots(s *segState, low int64, n int) []slotOf {
	h := make(slotHeap, 0, n)
	for j0 := int64(0); j0 < s.sectors; j0 += compactScanChunk {
		s.mu.RLock()
		e := s.part.Entries
		for j := j0; j < min(j0+compactScanChunk, int64(len(e))); j++ {
			v := e[j]
			if v == lut.Unallocated || int64(v) <= low {
				continue
			}
			if len(h) < n {
				heap.Push(&h, slotOf{int64(v), j})
			} else if int64(v) > h[0].slot {
				h[0] = slotOf{int64(v), j}
				heap.Fix(&h, 0)
			}
		}
		s.mu.RUnlock()
	}
	out := make([]slotOf, 0, len(h))
	for h.Len() > 0 {
		out = append(out, heap.Pop(&h).(slotOf))
	}
	return out
}

// moveSlot copies sector j of s from slot from into the lowest reusable
// slot, if that is lower, under the sector's range lock: copy, then point
// the entry at the copy, then free the old slot without punching it (the
// durable LUT still names it until the next Flush; it is punched when it
// becomes reusable). It tells whether it moved.
func (d *Disk) moveSlot(s *segState, j, from int64) (bool, error) {
	g := d.sectorOf(s, j)
	d.ranges.lock(g, g)
	defer d.ranges.unlock(g, g)
	s.mu.Lock()
	to, ok := s.free.lowest()
	if s.part.Entries[j] != uint32(from) || !ok || to >= from {
		s.mu.Unlock()
		return false, nil
	}
	s.free.pop()
	s.mu.Unlock()
	ss := d.desc.SectorSize
	buf := make([]byte, ss)
	err := s.ReadSlotsStrict(buf, from*ss)
	if err != nil {
		err = fmt.Errorf("%w: segment %d: %w", ErrCorrupt, s.Index(), err)
	} else {
		err = s.WriteAt(buf, to*ss)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.free.add([]int64{to})
		return false, err
	}
	s.part.Set(j, uint32(to))
	s.freeSlot(j, from, true)
	stats.count(transMoved)
	return true, nil
}

// truncateTail cuts the reusable slots at the end of s's file off it and
// lowers the append cursor. The slots are reusable, so no durable LUT
// entry names them and no read uses them; s.mu is write-held across the
// truncation, so no allocation appends meanwhile.
func (d *Disk) truncateTail(s *segState) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.part == nil {
		return nil
	}
	old := s.Next()
	end := s.free.trimTail(old)
	if end == old {
		return nil
	}
	ss := d.desc.SectorSize
	size, err := s.Size()
	if err != nil {
		return err
	}
	s.SetNext(end)
	stats.countN(transTruncated, old-end)
	if size <= end*ss {
		return nil
	}
	if err := s.Truncate(end * ss); err != nil {
		return err // the slots stay unreferenced; appends reuse them
	}
	d.log.Info("compactor truncated segment file", "image", d.path, "segment", s.Index(), "file", s.Path(), "from", size, "to", end*ss)
	return nil
}
