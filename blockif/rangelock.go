package blockif

import "sync"

// rangeLock grants exclusive access to ranges of sectors; holders of
// disjoint ranges do not wait for each other. It is safe for concurrent use.
type rangeLock struct {
	mu     sync.Mutex // protects active
	cond   *sync.Cond
	active [][2]int64 // held ranges, [first, last] inclusive
}

func (r *rangeLock) lock(first, last int64) {
	r.mu.Lock()
	if r.cond == nil {
		r.cond = sync.NewCond(&r.mu)
	}
	for r.overlaps(first, last) {
		r.cond.Wait()
	}
	r.active = append(r.active, [2]int64{first, last})
	r.mu.Unlock()
}

func (r *rangeLock) overlaps(first, last int64) bool {
	for _, a := range r.active {
		if first <= a[1] && a[0] <= last {
			return true
		}
	}
	return false
}

func (r *rangeLock) unlock(first, last int64) {
	r.mu.Lock()
	for i, a := range r.active {
		if a[0] == first && a[1] == last {
			r.active[i] = r.active[len(r.active)-1]
			r.active = r.active[:len(r.active)-1]
			break
		}
	}
	r.cond.Broadcast()
	r.mu.Unlock()
}
