package vfs

import (
	"bytes"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// Every crash test of the engine trusts MemFS to keep exactly what a real
// disk may keep after power loss. These tests pin that model down.

func mustOpen(t *testing.T, fsys FS, name string, flag int) File {
	t.Helper()
	f, err := fsys.OpenFile(name, flag, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func mustWrite(t *testing.T, f File, p []byte, off int64) {
	t.Helper()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

func readAll(t *testing.T, fsys FS, name string) []byte {
	t.Helper()
	f := mustOpen(t, fsys, name, os.O_RDONLY)
	defer f.Close()
	n, err := f.Size()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, n)
	if _, err := f.ReadAt(b, 0); err != nil && n > 0 {
		t.Fatal(err)
	}
	return b
}

func TestMemFSSyncedDataSurvivesEveryCrash(t *testing.T) {
	m := NewMemFS()
	f := mustOpen(t, m, "/d/a", os.O_RDWR|os.O_CREATE)
	synced := bytes.Repeat([]byte{7}, 3000)
	mustWrite(t, f, synced, 0)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := m.SyncDir("/d"); err != nil {
		t.Fatal(err)
	}
	for seed := range uint64(200) {
		c := m.Crash(rand.New(rand.NewPCG(seed, 1)))
		if got := readAll(t, c, "/d/a"); !bytes.Equal(got, synced) {
			t.Fatalf("seed %d: synced content changed by a crash", seed)
		}
	}
}

// An unsynced overwrite survives chunk by chunk: each 512-byte chunk holds
// its old or its new content, never anything else, and over many crashes
// both outcomes (and torn mixtures) occur.
func TestMemFSUnsyncedWritesTearAtChunks(t *testing.T) {
	m := NewMemFS()
	f := mustOpen(t, m, "/d/a", os.O_RDWR|os.O_CREATE)
	old := bytes.Repeat([]byte{1}, 4096)
	mustWrite(t, f, old, 0)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	m.SyncDir("/d")
	neu := bytes.Repeat([]byte{2}, 4096)
	mustWrite(t, f, neu, 0)
	var allOld, allNew, torn int
	for seed := range uint64(300) {
		got := readAll(t, m.Crash(rand.New(rand.NewPCG(seed, 2))), "/d/a")
		if len(got) != 4096 {
			t.Fatalf("seed %d: length %d", seed, len(got))
		}
		nOld, nNew := 0, 0
		for c := 0; c < 4096; c += crashChunk {
			switch ch := got[c : c+crashChunk]; {
			case bytes.Equal(ch, old[:crashChunk]):
				nOld++
			case bytes.Equal(ch, neu[:crashChunk]):
				nNew++
			default:
				t.Fatalf("seed %d: chunk at %d holds neither old nor new data", seed, c)
			}
		}
		switch {
		case nNew == 0:
			allOld++
		case nOld == 0:
			allNew++
		default:
			torn++
		}
	}
	if allOld == 0 || allNew == 0 || torn == 0 {
		t.Errorf("crash outcomes not all explored: all old %d, all new %d, torn %d", allOld, allNew, torn)
	}
}

func TestMemFSNamespaceNeedsSyncDir(t *testing.T) {
	m := NewMemFS()
	f := mustOpen(t, m, "/d/new", os.O_RDWR|os.O_CREATE)
	mustWrite(t, f, []byte("data"), 0)
	f.Sync() // data durable, but the entry is not
	if _, err := m.Crash(rand.New(rand.NewPCG(1, 1))).Stat("/d/new"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("file without SyncDir survived a crash: %v", err)
	}
	m.SyncDir("/d")
	if got := readAll(t, m.Crash(rand.New(rand.NewPCG(1, 1))), "/d/new"); string(got) != "data" {
		t.Errorf("after SyncDir: %q", got)
	}

	// Rename: the old name stays until the directory is synced.
	g := mustOpen(t, m, "/d/tmp", os.O_RDWR|os.O_CREATE)
	mustWrite(t, g, []byte("replacement"), 0)
	g.Sync()
	if err := m.Rename("/d/tmp", "/d/new"); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, m.Crash(rand.New(rand.NewPCG(1, 1))), "/d/new"); string(got) != "data" {
		t.Errorf("rename without SyncDir: %q", got)
	}
	m.SyncDir("/d")
	c := m.Crash(rand.New(rand.NewPCG(1, 1)))
	if got := readAll(t, c, "/d/new"); string(got) != "replacement" {
		t.Errorf("rename after SyncDir: %q", got)
	}
	if _, err := c.Stat("/d/tmp"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("renamed-away name survived: %v", err)
	}
}

func TestMemFSCrashAfter(t *testing.T) {
	m := NewMemFS()
	f := mustOpen(t, m, "/a", os.O_RDWR|os.O_CREATE)
	m.SetCrashAfter(2)
	mustWrite(t, f, []byte("1"), 0)
	mustWrite(t, f, []byte("2"), 1)
	if _, err := f.WriteAt([]byte("3"), 2); !errors.Is(err, ErrCrashed) {
		t.Errorf("third write after SetCrashAfter(2): %v", err)
	}
	if err := f.Sync(); !errors.Is(err, ErrCrashed) {
		t.Errorf("sync after the crash point: %v", err)
	}
}

func TestMemFSPunchAndTruncate(t *testing.T) {
	m := NewMemFS()
	f := mustOpen(t, m, "/a", os.O_RDWR|os.O_CREATE)
	mustWrite(t, f, bytes.Repeat([]byte{9}, 8192), 0)
	if err := f.PunchHole(1024, 2048); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, m, "/a")
	if len(got) != 8192 || !bytes.Equal(got[1024:3072], make([]byte, 2048)) || got[1023] != 9 || got[3072] != 9 {
		t.Error("punch hole: wrong content or length")
	}
	if err := f.Truncate(100); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Size(); n != 100 {
		t.Errorf("size after truncate = %d", n)
	}
	if err := f.Truncate(5000); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, m, "/a"); !bytes.Equal(got[100:], make([]byte, 4900)) {
		t.Error("growing truncate exposed old bytes")
	}
}

// Lock semantics are the same for MemFS and the OS (flock): a second
// exclusive lock, or an exclusive one over a shared one, is refused.
func TestLocks(t *testing.T) {
	for _, tc := range []struct {
		name string
		fsys FS
		path string
	}{
		{"mem", NewMemFS(), "/img"},
		{"os", OS{}, filepath.Join(t.TempDir(), "img")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mustOpen(t, tc.fsys, tc.path, os.O_RDWR|os.O_CREATE).Close()
			s1, err := tc.fsys.Lock(tc.path, false)
			if err != nil {
				t.Fatal(err)
			}
			s2, err := tc.fsys.Lock(tc.path, false)
			if err != nil {
				t.Fatalf("second shared lock: %v", err)
			}
			if _, err := tc.fsys.Lock(tc.path, true); !errors.Is(err, ErrLocked) {
				t.Errorf("exclusive over shared: %v, want ErrLocked", err)
			}
			s1.Close()
			s2.Close()
			x, err := tc.fsys.Lock(tc.path, true)
			if err != nil {
				t.Fatalf("exclusive after release: %v", err)
			}
			defer x.Close()
			if _, err := tc.fsys.Lock(tc.path, false); !errors.Is(err, ErrLocked) {
				t.Errorf("shared over exclusive: %v, want ErrLocked", err)
			}
			if ok, err := x.Current(tc.path); err != nil || !ok {
				t.Errorf("Current = %v, %v", ok, err)
			}
		})
	}
}

func TestOSPunchHoleReadsZeros(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f := mustOpen(t, OS{}, path, os.O_RDWR|os.O_CREATE)
	defer f.Close()
	mustWrite(t, f, bytes.Repeat([]byte{5}, 1<<20), 0)
	if err := f.PunchHole(64<<10, 512<<10); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, OS{}, path)
	if len(got) != 1<<20 || !bytes.Equal(got[64<<10:576<<10], make([]byte, 512<<10)) || got[(64<<10)-1] != 5 || got[576<<10] != 5 {
		t.Error("punched range does not read as zeros, or its neighbours changed")
	}
}

// OS files split long writes into maxWriteChunk pieces (see its comment);
// the split must be invisible: every length and offset stores exactly p.
func TestOSWriteAtSplitsLongWrites(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f := mustOpen(t, OS{}, path, os.O_RDWR|os.O_CREATE)
	defer f.Close()
	rng := rand.New(rand.NewPCG(7, 7))
	want := make([]byte, 0, 1<<20)
	for _, n := range []int{1, maxWriteChunk - 1, maxWriteChunk, maxWriteChunk + 1, 3*maxWriteChunk + 4097, 5} {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.IntN(255) + 1)
		}
		got, err := f.WriteAt(p, int64(len(want)))
		if err != nil || got != n {
			t.Fatalf("WriteAt(%d bytes) = %d, %v", n, got, err)
		}
		want = append(want, p...)
	}
	if got := readAll(t, OS{}, path); !bytes.Equal(got, want) {
		t.Fatalf("file holds %d bytes that differ from the %d written", len(got), len(want))
	}
	// A failing write reports the error and how much it stored (nothing,
	// here: the file is open read-only).
	ro := mustOpen(t, OS{}, path, os.O_RDONLY)
	defer ro.Close()
	if n, err := ro.WriteAt(make([]byte, 3*maxWriteChunk), 0); err == nil || n != 0 {
		t.Fatalf("write to a read-only file = %d, %v; want 0 and an error", n, err)
	}
}
