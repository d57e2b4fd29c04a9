package nbd

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/lut"
)

// libnbdAlignScript drives the export with byte-granular requests of every
// kind, in libnbd's strict mode (the default, which checks requests
// against the advertised minimum block size) and with strict mode off,
// against a bytearray model. It prints one "round" line per mode.
const libnbdAlignScript = `
import sys, random, nbd
uri, sector, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = 8 << 20
for strict in (True, False):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1, h.get_block_size(nbd.SIZE_MINIMUM)
    assert h.get_block_size(nbd.SIZE_PREFERRED) == sector, h.get_block_size(nbd.SIZE_PREFERRED)
    # A 3-byte write at offset 100, as libnbd's default (strict) mode sends it.
    h.pwrite(b"abc", 100)
    assert h.pread(200, 0) == bytes(100) + b"abc" + bytes(97)
    h.trim(3, 100)
    model = bytearray(size)
    rng = random.Random(seed + strict)
    for i in range(300):
        off = rng.randrange(0, size - 70000)
        n = rng.choice([1, 3, 511, 513, 1000, 4095, 4097, 9000, 65537])
        op = rng.choice(["write", "write", "trim", "zero", "zero-nohole", "cache", "read", "status"])
        if op == "write":
            data = bytes([rng.randrange(1, 256)]) * n
            h.pwrite(data, off)
            model[off:off+n] = data
        elif op == "trim":
            h.trim(n, off)
            model[off:off+n] = bytes(n)
        elif op == "zero":
            h.zero(n, off)
            model[off:off+n] = bytes(n)
        elif op == "zero-nohole":
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
            model[off:off+n] = bytes(n)
        elif op == "cache":
            h.cache(n, off)
        elif op == "read":
            got = h.pread(n, off)
            assert got == model[off:off+n], "op %d: read of %d at %d differs (seed %d)" % (i, n, off, seed)
        else:
            ents = []
            def cb(meta, o, entries, err):
                ents.extend(zip(entries[0::2], entries[1::2]))
            h.block_status(n, off, cb)
            pos = off
            for k, (l, fl) in enumerate(ents):
                pos += l
                # Every boundary inside the query falls on a sector.
                if pos < off + n and k < len(ents) - 1:
                    assert pos % sector == 0, "op %d: status boundary at %d (sector %d): %s" % (i, pos, sector, ents)
                if fl & nbd.STATE_ZERO:
                    lo, hi = max(pos - l, off), min(pos, off + n)
                    assert model[lo:hi] == bytes(hi - lo), "op %d: %d..%d reported zero, model differs" % (i, lo, hi)
    h.flush()
    for off in range(0, size, 1 << 20):
        assert h.pread(1 << 20, off) == model[off:off + (1 << 20)], "final compare at %d (seed %d)" % (off, seed)
    h.trim(size, 0)
    h.shutdown()
    print("round strict=%s ok" % strict)
print("ok")
`

// TestAnyAlignmentClients serves 512-byte and 4 KiB-sector images with the
// default minimum block size (1) and drives them with the real clients
// that failed on unaligned requests when the minimum was the sector size:
// libnbd in strict and non-strict mode, nbdfuse with dd bs=512, a loop
// device with 512-byte blocks over the nbdfuse file with mkfs.ext4 -b 1024
// (no kernel I/O errors), and qemu-io byte-granular writes.
func TestAnyAlignmentClients(t *testing.T) {
	py := testutil.NeedPython(t)
	nbdfuse := testutil.NeedTool(t, "nbdfuse")
	qio := testutil.NeedTool(t, "qemu-io")
	mkfs := testutil.NeedTool(t, "mkfs.ext4")
	e2fsck := testutil.NeedTool(t, "e2fsck")
	losetup := testutil.NeedTool(t, "losetup")
	fusermount := testutil.NeedTool(t, "fusermount3")
	script := filepath.Join(t.TempDir(), "align.py")
	if err := os.WriteFile(script, []byte(libnbdAlignScript), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, sector := range []int64{512, 4096} {
		t.Run(fmt.Sprintf("sector%d", sector), func(t *testing.T) {
			d := newImage(t, 64*mib, 16*mib, sector, false, lut.Xhyve)
			_, addr := startServer(t, Config{}, Export{Name: "disk", Backend: d})
			u := uri(addr, "disk")

			seed := rand.Int64N(1 << 30)
			t.Logf("libnbd model seed %d", seed)
			if out := run(t, py, script, u, fmt.Sprint(sector), fmt.Sprint(seed)); !strings.Contains(out, "round strict=True ok") || !strings.Contains(out, "round strict=False ok") {
				t.Fatalf("libnbd: %s", out)
			}

			// qemu-io: byte-granular writes and reads across sectors.
			out := run(t, qio, "-f", "raw", u,
				"-c", "write -P 0x41 10000001 7", "-c", "read -P 0x41 10000001 7", "-c", "read -P 0 10000000 1",
				"-c", "write -z 10000002 3", "-c", "read -P 0 10000002 3", "-c", "read -P 0x41 10000005 3")
			if strings.Contains(out, "error") || strings.Contains(out, "failed") || strings.Count(out, "read ") != 4 {
				t.Fatalf("qemu-io:\n%s", out)
			}

			// nbdfuse: the export as a file; dd with 512-byte blocks.
			mnt := t.TempDir()
			fuse := exec.Command(nbdfuse, mnt, u)
			var fuseOut testutil.SyncBuffer
			fuse.Stdout, fuse.Stderr = &fuseOut, &fuseOut
			if err := fuse.Start(); err != nil {
				t.Fatal(err)
			}
			file := filepath.Join(mnt, "nbd")
			unmounted := false
			unmount := func() {
				if unmounted {
					return
				}
				unmounted = true
				if out, err := exec.Command(fusermount, "-u", mnt).CombinedOutput(); err != nil {
					t.Errorf("fusermount3 -u: %v %s", err, out)
					fuse.Process.Kill()
				}
				if err := fuse.Wait(); err != nil {
					t.Errorf("nbdfuse: %v\n%s", err, &fuseOut)
				}
			}
			t.Cleanup(unmount)
			if err := testutil.Await(testutil.WaitTimeout, func() bool {
				st, err := os.Stat(file)
				return err == nil && st.Size() == 64*mib
			}); err != nil {
				t.Fatalf("nbdfuse did not show %s: %v\n%s", file, err, &fuseOut)
			}
			src := filepath.Join(t.TempDir(), "src")
			os.WriteFile(src, pattern(512, 7), 0o644)
			run(t, "dd", "if="+src, "of="+file, "bs=512", "seek=1", "conv=notrunc")
			got := make([]byte, 512)
			if _, err := d.ReadAt(got, 512); err != nil || !bytes.Equal(got, pattern(512, 7)) {
				t.Fatalf("dd bs=512 through nbdfuse did not land at 512: %v", err)
			}

			// A loop device with 512-byte blocks over that file, direct
			// I/O of 512 bytes, then mkfs.ext4 -b 1024 (which discards
			// and zeroes): no I/O error in the kernel log.
			before := kernelLog(t)
			loop := strings.TrimSpace(run(t, losetup, "-f", "--show", "-b", "512", file))
			detached := false
			detach := func() {
				if !detached {
					detached = true
					run(t, losetup, "-d", loop)
				}
			}
			t.Cleanup(detach)
			run(t, "dd", "if="+src, "of="+loop, "bs=512", "seek=3", "count=1", "oflag=direct")
			run(t, mkfs, "-q", "-F", "-b", "1024", loop)
			run(t, e2fsck, "-fn", loop)
			detach()
			unmount()
			var errs []string
			name := filepath.Base(loop)
			for _, line := range newLines(before, kernelLog(t)) {
				if strings.Contains(line, name) && strings.Contains(strings.ToLower(line), "error") {
					errs = append(errs, line)
				}
			}
			if len(errs) > 0 {
				t.Fatalf("kernel I/O errors on %s:\n%s", loop, strings.Join(errs, "\n"))
			}
		})
	}
}

// kernelLog returns the kernel's log lines (dmesg), or fails the test.
func kernelLog(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("dmesg").Output()
	if err != nil {
		t.Fatalf("dmesg: %v", err)
	}
	return strings.Split(string(out), "\n")
}

// newLines returns the lines of after that before does not have.
func newLines(before, after []string) []string {
	seen := make(map[string]bool, len(before))
	for _, l := range before {
		seen[l] = true
	}
	var out []string
	for _, l := range after {
		if !seen[l] {
			out = append(out, l)
		}
	}
	return out
}

// TestConcurrentUnalignedWriters: several connections to one export
// (multi-conn) write short, unaligned, overlapping ranges at once, and
// the final image is checked against the serial semantics the engine
// promises: writes sharing a sector are serialized by the range lock, so
// within a sector no two writes interleave. Every byte a write puts down
// is a function of the write's id and the byte's offset, so the write
// that last set each byte can be identified. The image fails the check
// if a byte comes from no write covering it (garbage, or zero where a
// write landed), if it comes from a write that was acknowledged before
// another covering write was sent (a lost write), or if inside one
// sector write A lies on top of write B in one byte and B on top of A in
// another (a torn sector: no serial order explains it).
func TestConcurrentUnalignedWriters(t *testing.T) {
	for _, sector := range []int64{512, 4096} {
		t.Run(fmt.Sprintf("sector%d", sector), func(t *testing.T) {
			seed := rand.Int64N(1 << 30)
			t.Logf("seed %d", seed)
			const size = 256 << 10
			d := newImage(t, size, 64<<10, sector, false, lut.Thin)
			_, addr := startServer(t, Config{}, Export{Name: "d", Backend: d})
			const writers, perWriter = 6, 150
			ws := make([]idWrite, writers*perWriter)
			var clock sync.Mutex // orders the sent/acked stamps
			var tick int64
			stamp := func() int64 {
				clock.Lock()
				defer clock.Unlock()
				tick++
				return tick
			}
			var wg sync.WaitGroup
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					c := dial(t, addr)
					c.connect("d", connectOpts{blockSize: true})
					rng := rand.New(rand.NewPCG(uint64(seed), uint64(w)))
					for i := range perWriter {
						id := w*perWriter + i
						// Clustered in four 16 KiB areas so that writes
						// overlap and share sectors often.
						off := int64(rng.IntN(4))*size/4 + rng.Int64N(16<<10)
						n := min(1+rng.Int64N(3*sector), size-off)
						wr := &ws[id]
						wr.off, wr.n = off, n
						payload := make([]byte, n)
						for k := range payload {
							payload[k] = idByte(id, off+int64(k))
						}
						wr.sent = stamp()
						c.request(cmdWrite, 0, uint64(i), uint64(off), uint32(n), payload)
						if errno, _, _ := c.simpleReply(0); errno != 0 {
							t.Errorf("writer %d: errno %d", w, errno)
							return
						}
						wr.acked = stamp()
					}
					c.request(cmdDisc, 0, 0, 0, 0, nil)
					c.expectClosed()
				}()
			}
			wg.Wait()
			if t.Failed() {
				return
			}
			got := make([]byte, size)
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if problems := checkSerial(got, ws, sector); len(problems) > 0 {
				t.Fatalf("seed %d: %d problems, first: %s", seed, len(problems), strings.Join(problems[:min(len(problems), 5)], "; "))
			}
		})
	}
}

// idWrite is one write of TestConcurrentUnalignedWriters with its
// logical send and acknowledgement times.
type idWrite struct {
	off, n      int64
	sent, acked int64
}

// idByte is the byte write id puts at offset p: never zero, and unlikely
// to be equal for two writes at the same offset.
func idByte(id int, p int64) byte {
	h := uint32(id)*2654435761 ^ uint32(p)*2246822519
	h ^= h >> 15
	h *= 2246822519
	h ^= h >> 13
	return byte(1 + h%255)
}

// checkSerial checks got against the writes ws as described in
// TestConcurrentUnalignedWriters and returns the problems found.
func checkSerial(got []byte, ws []idWrite, sector int64) []string {
	covering := make([][]int, len(got))
	for id, w := range ws {
		for p := w.off; p < w.off+w.n; p++ {
			covering[p] = append(covering[p], id)
		}
	}
	var problems []string
	last := make([]int, len(got)) // identified writer of each byte, -1 unknown
	for p := range got {
		last[p] = -1
		if len(covering[p]) == 0 {
			if got[p] != 0 {
				problems = append(problems, fmt.Sprintf("byte %d written by no write", p))
			}
			continue
		}
		var match []int
		for _, id := range covering[p] {
			if idByte(id, int64(p)) == got[p] {
				match = append(match, id)
			}
		}
		switch len(match) {
		case 0:
			problems = append(problems, fmt.Sprintf("byte %d = %#x from none of the %d writes covering it", p, got[p], len(covering[p])))
			continue
		case 1:
			last[p] = match[0]
		default:
			continue // two writes agree on this byte: no evidence
		}
		top := ws[last[p]]
		for _, id := range covering[p] {
			if id != last[p] && ws[id].sent > top.acked {
				problems = append(problems, fmt.Sprintf("byte %d: write %d, sent after write %d was acknowledged, is lost", p, id, last[p]))
				break
			}
		}
	}
	for s := int64(0); s < int64(len(got)); s += sector {
		above := map[[2]int]bool{} // {a, b}: a's byte seen where b also wrote
		for p := s; p < s+sector; p++ {
			a := last[p]
			if a < 0 {
				continue
			}
			for _, b := range covering[p] {
				if b != a {
					above[[2]int{a, b}] = true
				}
			}
		}
		for k := range above {
			if above[[2]int{k[1], k[0]}] {
				problems = append(problems, fmt.Sprintf("sector at %d torn between writes %d and %d", s, k[0], k[1]))
				break
			}
		}
	}
	return problems
}

// TestCheckSerialDetects: the checker of TestConcurrentUnalignedWriters
// finds a torn sector, a lost write and garbage.
func TestCheckSerialDetects(t *testing.T) {
	ws := []idWrite{{off: 0, n: 10, sent: 1, acked: 4}, {off: 0, n: 10, sent: 2, acked: 3}}
	img := func(from func(p int) int) []byte {
		b := make([]byte, 512)
		for p := range 10 {
			b[p] = idByte(from(p), int64(p))
		}
		return b
	}
	if p := checkSerial(img(func(int) int { return 1 }), ws, 512); len(p) != 0 {
		t.Fatalf("a serial result reported: %v", p)
	}
	torn := img(func(p int) int { return p / 5 })
	if p := checkSerial(torn, ws, 512); len(p) == 0 || !strings.Contains(strings.Join(p, " "), "torn") {
		t.Fatalf("torn sector not found: %v", p)
	}
	ws[1].sent = 5 // write 1 sent after write 0 was acknowledged
	if p := checkSerial(img(func(int) int { return 0 }), ws, 512); len(p) == 0 || !strings.Contains(p[0], "lost") {
		t.Fatalf("lost write not found: %v", p)
	}
	ws[1].sent = 2
	garbage := img(func(int) int { return 1 })
	garbage[100] = 7
	if p := checkSerial(garbage, ws, 512); len(p) == 0 || !strings.Contains(p[0], "no write") {
		t.Fatalf("garbage not found: %v", p)
	}
}

// TestPartialTrimFreesWholeSectors: TRIM and WRITE_ZEROES of a range with
// partial sectors at both ends, on the engine: the partial edges read as
// zeros and keep the rest of their sector's data; only the whole sectors
// inside are deallocated.
func TestPartialTrimFreesWholeSectors(t *testing.T) {
	for _, typ := range []uint16{cmdTrim, cmdWriteZeroes} {
		const ss = 4096
		d := newImage(t, 1*mib, 256<<10, ss, false, lut.Thin)
		_, addr := startServer(t, Config{}, Export{Name: "d", Backend: d})
		c := dial(t, addr)
		c.connect("d", connectOpts{})
		data := pattern(4*ss, 9)
		c.request(cmdWrite, 0, 1, 0, 4*ss, data)
		if errno, _, _ := c.simpleReply(0); errno != 0 {
			t.Fatalf("write errno %d", errno)
		}
		// [100, 3*ss-100): partial sector 0, whole sector 1, partial sector 2.
		c.request(typ, 0, 2, 100, 3*ss-200, nil)
		if errno, _, _ := c.simpleReply(0); errno != 0 {
			t.Fatalf("%s errno %d", cmdName(typ), errno)
		}
		want := append([]byte(nil), data...)
		clear(want[100 : 3*ss-100])
		got := make([]byte, 4*ss)
		if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: content differs from the model (%v)", cmdName(typ), err)
		}
		exts, err := d.Extents(0, 4*ss)
		if err != nil {
			t.Fatal(err)
		}
		wantExts := fmt.Sprint([]any{[3]any{0, ss, true}, [3]any{ss, ss, false}, [3]any{2 * ss, 2 * ss, true}})
		var gotExts []any
		for _, e := range exts {
			gotExts = append(gotExts, [3]any{int(e.Offset), int(e.Length), e.Allocated})
		}
		if fmt.Sprint(gotExts) != wantExts {
			t.Fatalf("%s: extents %v, want %v", cmdName(typ), gotExts, wantExts)
		}
		c.request(cmdDisc, 0, 3, 0, 0, nil)
		c.expectClosed()
	}
}
