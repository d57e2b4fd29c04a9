package fusefs

import (
	"bytes"
	"fmt"
	"sync"

	"github.com/sparsedisk/sparsedisk/blockif"
)

// memBackend is an in-memory Backend with 4 KiB allocation granularity. It
// records which blocks hold data so Extents and SEEK_DATA are meaningful.
type memBackend struct {
	mu      sync.RWMutex // protects data, alloc and flushes
	data    []byte
	alloc   []bool // per memBlock
	ro      bool
	flushes int
}

const memBlock = 4096

func newMemBackend(size int64) *memBackend {
	return &memBackend{data: make([]byte, size), alloc: make([]bool, (size+memBlock-1)/memBlock)}
}

func (m *memBackend) Size() int64       { return int64(len(m.data)) }
func (m *memBackend) SectorSize() int64 { return memBlock }
func (m *memBackend) ReadOnly() bool    { return m.ro }

func (m *memBackend) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > int64(len(m.data)) {
		return fmt.Errorf("mem [%d,+%d): %w", off, n, blockif.ErrOutOfRange)
	}
	return nil
}

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return copy(p, m.data[off:]), nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	if m.ro {
		return 0, blockif.ErrReadOnly
	}
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	for b := off / memBlock; b*memBlock < off+int64(len(p)); b++ {
		m.alloc[b] = true
	}
	return len(p), nil
}

func (m *memBackend) Flush() error {
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}

func (m *memBackend) Trim(off, n int64) error {
	if m.ro {
		return blockif.ErrReadOnly
	}
	if err := m.check(off, n); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	for b := (off + memBlock - 1) / memBlock; (b+1)*memBlock <= off+n; b++ {
		m.alloc[b] = false
	}
	return nil
}

func (m *memBackend) WriteZeroes(off, n int64) error { return m.Trim(off, n) }

func (m *memBackend) Extents(off, n int64) ([]blockif.Extent, error) {
	if err := m.check(off, n); err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []blockif.Extent
	for pos := off; pos < off+n; {
		b := pos / memBlock
		end := min((b+1)*memBlock, off+n)
		a := m.alloc[b]
		if k := len(out) - 1; k >= 0 && out[k].Allocated == a {
			out[k].Length += end - pos
		} else {
			out = append(out, blockif.Extent{Offset: pos, Length: end - pos, Allocated: a})
		}
		pos = end
	}
	return out, nil
}

// snapshot copies the disk content.
func (m *memBackend) snapshot() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return bytes.Clone(m.data)
}
