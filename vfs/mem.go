package vfs

import (
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"
)

// ErrCrashed is returned by every operation of a [MemFS] after its crash
// point (see [MemFS.SetCrashAfter]).
var ErrCrashed = errors.New("sparsedisk/vfs: simulated crash")

// MemFS is an in-memory file system that simulates power loss.
//
// Every file keeps two states: the durable bytes (as of its last Sync) and
// the list of changes made since (writes, truncations, punched holes).
// Directory entries likewise become durable only through SyncDir. [MemFS.Crash]
// returns the file system a reboot would find: the durable namespace, each
// file's durable bytes, plus a random subset of its unsynced changes, some
// of them torn at a 512-byte boundary.
//
// MemFS is safe for concurrent use; one mutex protects all of its state.
type MemFS struct {
	mu      sync.Mutex
	files   map[string]*memNode // the namespace as seen now
	durable map[string]*memNode // the namespace as a crash would leave it
	locks   map[*memNode]*memLock
	ops     int64 // mutating operations so far
	crashAt int64 // ops count at which everything starts failing; <0: never
	crashed bool
}

type memNode struct {
	data    []byte  // current content
	durable []byte  // content as of the last Sync
	pending []memOp // changes since the last Sync
}

type memOp struct {
	kind byte // 'w' write, 't' truncate, 'p' punch
	off  int64
	n    int64
	data []byte
}

type memLock struct {
	shared    int
	exclusive bool
}

// NewMemFS returns an empty MemFS.
func NewMemFS() *MemFS {
	return &MemFS{files: map[string]*memNode{}, durable: map[string]*memNode{}, locks: map[*memNode]*memLock{}, crashAt: -1}
}

var _ FS = (*MemFS)(nil)

// SetCrashAfter makes every operation after the next n mutating ones fail
// with ErrCrashed, as if power had been cut; n < 0 disables it.
func (m *MemFS) SetCrashAfter(n int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if n < 0 {
		m.crashAt = -1
	} else {
		m.crashAt = m.ops + n
	}
}

// Ops is the number of mutating operations (writes, truncations, punches,
// syncs, renames, removals, creations) performed so far.
func (m *MemFS) Ops() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ops
}

// step counts one mutating operation; it returns ErrCrashed past the crash
// point. Called with m.mu held.
func (m *MemFS) step() error {
	if m.crashed {
		return ErrCrashed
	}
	if m.crashAt >= 0 && m.ops >= m.crashAt {
		m.crashed = true
		return ErrCrashed
	}
	m.ops++
	return nil
}

// Crash returns what a reboot after power loss now would find. The receiver
// stays usable (and crashed, if a crash point was reached).
func (m *MemFS) Crash(rng *rand.Rand) *MemFS {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := NewMemFS()
	names := make([]string, 0, len(m.durable))
	for name := range m.durable {
		names = append(names, name)
	}
	sort.Strings(names) // deterministic for a given rng
	done := map[*memNode]*memNode{}
	for _, name := range names {
		old := m.durable[name]
		if nn, ok := done[old]; ok {
			n.files[name], n.durable[name] = nn, nn
			continue
		}
		data := crashImage(old, rng)
		nn := &memNode{data: data, durable: append([]byte(nil), data...)}
		done[old] = nn
		n.files[name], n.durable[name] = nn, nn
	}
	return n
}

// crashChunk is the unit of atomicity in a crash: each 512-byte chunk of
// a file survives as it was at one moment since the last Sync.
const crashChunk = 512

// crashImage returns a file's bytes after power loss: its length is its
// length at a random moment since its last Sync, and each chunk holds
// its content at an independently chosen random moment of that time, as
// page-cache writeback could leave it.
func crashImage(node *memNode, rng *rand.Rand) []byte {
	if len(node.pending) == 0 {
		return append([]byte(nil), node.durable...)
	}
	nops := len(node.pending)
	work := append([]byte(nil), node.durable...)
	var maxLen int64 = int64(len(work))
	for _, op := range node.pending { // longest length ever reached
		switch op.kind {
		case 'w':
			maxLen = max(maxLen, op.off+int64(len(op.data)))
		case 't':
			maxLen = max(maxLen, op.n)
		}
	}
	nchunks := (maxLen + crashChunk - 1) / crashChunk
	when := make([]int, nchunks) // chunk c takes its content after when[c] ops
	for c := range when {
		when[c] = rng.IntN(nops + 1)
	}
	lenAt := rng.IntN(nops + 1)
	out := make([]byte, nchunks*crashChunk)
	var outLen int64
	take := func(k int) {
		for c := range when {
			if when[c] == k {
				lo := int64(c) * crashChunk
				if lo < int64(len(work)) {
					copy(out[lo:lo+crashChunk], work[lo:min(lo+crashChunk, int64(len(work)))])
				}
			}
		}
		if lenAt == k {
			outLen = int64(len(work))
		}
	}
	for k, op := range node.pending {
		take(k)
		switch op.kind {
		case 'w':
			work = memWrite(work, op.data, op.off)
		case 't':
			work = memTruncate(work, op.n)
		case 'p':
			memPunch(work, op.off, op.n)
		}
	}
	take(nops)
	return out[:outLen:outLen]
}

func memWrite(data, p []byte, off int64) []byte {
	if end := off + int64(len(p)); end > int64(len(data)) {
		data = memTruncate(data, end)
	}
	copy(data[off:], p)
	return data
}

func memTruncate(data []byte, n int64) []byte {
	if n <= int64(len(data)) {
		return data[:n:n]
	}
	if n <= int64(cap(data)) {
		old := len(data)
		data = data[:n]
		clear(data[old:])
		return data
	}
	nd := make([]byte, n, n+n/4)
	copy(nd, data)
	return nd
}

func memPunch(data []byte, off, n int64) {
	if off >= int64(len(data)) {
		return
	}
	end := min(off+n, int64(len(data)))
	clear(data[off:end])
}

func clean(name string) string { return filepath.Clean(name) }

// OpenFile opens a file.
func (m *MemFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	name = clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.crashed {
		return nil, ErrCrashed
	}
	node, ok := m.files[name]
	switch {
	case ok && flag&os.O_CREATE != 0 && flag&os.O_EXCL != 0:
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrExist}
	case !ok && flag&os.O_CREATE == 0:
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	case !ok:
		if err := m.step(); err != nil {
			return nil, err
		}
		node = &memNode{}
		m.files[name] = node
	}
	writable := flag&(os.O_WRONLY|os.O_RDWR) != 0
	if ok && flag&os.O_TRUNC != 0 && writable {
		if err := m.step(); err != nil {
			return nil, err
		}
		node.data = node.data[:0:0]
		node.pending = append(node.pending, memOp{kind: 't', n: 0})
	}
	return &memFile{m: m, node: node, name: name, writable: writable}, nil
}

// Remove removes a file.
func (m *MemFS) Remove(name string) error {
	name = clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.step(); err != nil {
		return err
	}
	if _, ok := m.files[name]; !ok {
		return &fs.PathError{Op: "remove", Path: name, Err: fs.ErrNotExist}
	}
	delete(m.files, name)
	return nil
}

// Rename renames a file.
func (m *MemFS) Rename(oldname, newname string) error {
	oldname, newname = clean(oldname), clean(newname)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.step(); err != nil {
		return err
	}
	node, ok := m.files[oldname]
	if !ok {
		return &fs.PathError{Op: "rename", Path: oldname, Err: fs.ErrNotExist}
	}
	delete(m.files, oldname)
	m.files[newname] = node
	return nil
}

// Stat describes a file.
func (m *MemFS) Stat(name string) (os.FileInfo, error) {
	name = clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.crashed {
		return nil, ErrCrashed
	}
	node, ok := m.files[name]
	if !ok {
		return nil, &fs.PathError{Op: "stat", Path: name, Err: fs.ErrNotExist}
	}
	return memInfo{name: filepath.Base(name), size: int64(len(node.data))}, nil
}

// SyncDir makes the entries of dir durable.
func (m *MemFS) SyncDir(dir string) error {
	dir = clean(dir)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.step(); err != nil {
		return err
	}
	for name := range m.durable {
		if filepath.Dir(name) == dir {
			if _, ok := m.files[name]; !ok {
				delete(m.durable, name)
			}
		}
	}
	for name, node := range m.files {
		if filepath.Dir(name) == dir {
			m.durable[name] = node
		}
	}
	return nil
}

// Lock takes an in-memory advisory lock.
func (m *MemFS) Lock(name string, exclusive bool) (Lock, error) {
	name = clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	node, ok := m.files[name]
	if !ok {
		return nil, &fs.PathError{Op: "lock", Path: name, Err: fs.ErrNotExist}
	}
	l := m.locks[node]
	if l == nil {
		l = &memLock{}
		m.locks[node] = l
	}
	if l.exclusive || (exclusive && l.shared > 0) {
		return nil, ErrLocked
	}
	if exclusive {
		l.exclusive = true
	} else {
		l.shared++
	}
	return &memUnlock{m: m, l: l, node: node, exclusive: exclusive}, nil
}

type memUnlock struct {
	m         *MemFS
	l         *memLock
	node      *memNode
	exclusive bool
	once      sync.Once
}

func (u *memUnlock) Current(name string) (bool, error) {
	u.m.mu.Lock()
	defer u.m.mu.Unlock()
	return u.m.files[clean(name)] == u.node, nil
}

func (u *memUnlock) Close() error {
	u.once.Do(func() {
		u.m.mu.Lock()
		defer u.m.mu.Unlock()
		if u.exclusive {
			u.l.exclusive = false
		} else {
			u.l.shared--
		}
	})
	return nil
}

type memFile struct {
	m        *MemFS
	node     *memNode
	name     string
	writable bool
	closed   bool
}

func (f *memFile) Name() string { return f.name }

func (f *memFile) check(write bool) error {
	if f.m.crashed {
		return ErrCrashed
	}
	if f.closed {
		return fs.ErrClosed
	}
	if write && !f.writable {
		return &fs.PathError{Op: "write", Path: f.name, Err: fs.ErrPermission}
	}
	return nil
}

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.check(false); err != nil {
		return 0, err
	}
	if off >= int64(len(f.node.data)) {
		return 0, io.EOF
	}
	n := copy(p, f.node.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.check(true); err != nil {
		return 0, err
	}
	if err := f.m.step(); err != nil {
		return 0, err
	}
	f.node.data = memWrite(f.node.data, p, off)
	f.node.pending = append(f.node.pending, memOp{kind: 'w', off: off, data: append([]byte(nil), p...)})
	return len(p), nil
}

func (f *memFile) Close() error {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	f.closed = true
	return nil
}

func (f *memFile) Size() (int64, error) {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.check(false); err != nil {
		return 0, err
	}
	return int64(len(f.node.data)), nil
}

func (f *memFile) Truncate(size int64) error {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.check(true); err != nil {
		return err
	}
	if err := f.m.step(); err != nil {
		return err
	}
	f.node.data = memTruncate(f.node.data, size)
	f.node.pending = append(f.node.pending, memOp{kind: 't', n: size})
	return nil
}

func (f *memFile) Sync() error {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.check(false); err != nil {
		return err
	}
	if err := f.m.step(); err != nil {
		return err
	}
	f.node.durable = append(f.node.durable[:0:0], f.node.data...)
	f.node.pending = nil
	return nil
}

func (f *memFile) PunchHole(off, n int64) error {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.check(true); err != nil {
		return err
	}
	if err := f.m.step(); err != nil {
		return err
	}
	memPunch(f.node.data, off, n)
	f.node.pending = append(f.node.pending, memOp{kind: 'p', off: off, n: n})
	return nil
}

// Allocated counts the 4 KiB blocks of the file that hold a non-zero byte.
func (f *memFile) Allocated() (int64, error) {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.check(false); err != nil {
		return 0, err
	}
	var a int64
	d := f.node.data
	for i := 0; i < len(d); i += 4096 {
		for _, b := range d[i:min(i+4096, len(d))] {
			if b != 0 {
				a += 4096
				break
			}
		}
	}
	return a, nil
}

// memBlock is the granularity of a MemFS file's data regions: a 4 KiB
// block is data if it holds a non-zero byte, a hole otherwise (as
// [memFile.Allocated] counts them).
const memBlock = 4096

func memBlockIsData(d []byte, b int64) bool {
	for _, c := range d[b*memBlock : min((b+1)*memBlock, int64(len(d)))] {
		if c != 0 {
			return true
		}
	}
	return false
}

// SeekData finds the first 4 KiB block at or after off holding a
// non-zero byte.
func (f *memFile) SeekData(off int64) (int64, error) {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.check(false); err != nil {
		return 0, err
	}
	d := f.node.data
	if off < 0 || off >= int64(len(d)) {
		return 0, io.EOF
	}
	for b := off / memBlock; b*memBlock < int64(len(d)); b++ {
		if memBlockIsData(d, b) {
			return max(off, b*memBlock), nil
		}
	}
	return 0, io.EOF
}

// SeekHole finds the first 4 KiB block at or after off holding only
// zeros, or the end of the file.
func (f *memFile) SeekHole(off int64) (int64, error) {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.check(false); err != nil {
		return 0, err
	}
	d := f.node.data
	if off < 0 || off >= int64(len(d)) {
		return 0, io.EOF
	}
	for b := off / memBlock; b*memBlock < int64(len(d)); b++ {
		if !memBlockIsData(d, b) {
			return max(off, b*memBlock), nil
		}
	}
	return int64(len(d)), nil
}

type memInfo struct {
	name string
	size int64
}

func (i memInfo) Name() string       { return i.name }
func (i memInfo) Size() int64        { return i.size }
func (i memInfo) Mode() os.FileMode  { return 0o644 }
func (i memInfo) ModTime() time.Time { return time.Time{} }
func (i memInfo) IsDir() bool        { return false }
func (i memInfo) Sys() any           { return nil }
