package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/lut"
)

// newImage creates a sparse blockif image (LUT kind kind) in a temporary directory, opens
// it, and registers cleanups that close it and then fail the test on any
// corruption blockif.Check finds. Register the server after this, so that
// it is stopped before the image is closed.
func newImage(t testing.TB, size, split, sector int64, ro bool, kind lut.Kind) *blockif.Disk {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := blockif.Create(path, format.Params{Layout: format.LayoutSparse, Size: size, Split: split, SectorSize: sector, LUT: kind}, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r, err := blockif.Check(path, nil)
		if err != nil {
			t.Errorf("check %s: %v", path, err)
			return
		}
		for _, f := range r.Findings {
			if f.Kind == blockif.Corruption {
				t.Errorf("check %s: %s", path, f)
			}
		}
	})
	d, err := blockif.Open(path, &blockif.Options{ReadOnly: ro})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil && !errors.Is(err, blockif.ErrClosed) {
			t.Errorf("close %s: %v", path, err)
		}
	})
	return d
}

// run runs a peer tool and returns its combined output; a non-zero exit
// fails the test.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := runErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"), "LIBNBD_DEBUG=0")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func uri(addr, name string) string { return "nbd://" + addr + "/" + name }

const (
	mib = int64(1) << 20
	gib = int64(1) << 30
)

// TestQemuIO drives qemu-io's pattern writes and reads against an image
// whose 1 MiB segments make I/O straddle segment boundaries.
func TestQemuIO(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		qio := testutil.NeedTool(t, "qemu-io")
		for _, sector := range []int64{512, 4096} {
			t.Run(fmt.Sprintf("sector%d", sector), func(t *testing.T) {
				d := newImage(t, 64*mib, mib, sector, false, kind)
				_, addr := startServer(t, Config{}, Export{Name: "disk", Backend: d})
				cmds := []string{
					"write -P 0xab 1048000 10000", // unaligned, straddles segment 0/1
					"read -P 0xab 1048000 10000",
					"write -P 0x11 3 5", // tiny, unaligned
					"read -P 0x11 3 5",
					"read -P 0 0 3",
					"read -P 0 8 4088",
					"write -P 0x5a 3145216 2097664", // 2 MiB + 512 across two boundaries
					"read -P 0x5a 3145216 2097664",
					"discard 3145728 1048576", // punch segment 3
					"read -P 0 3145728 1048576",
					"read -P 0x5a 4194304 1048576",
					"write -z 1048576 65536",
					"read -P 0 1048576 65536",
					"read -P 0xab 1048000 576",
					"write -z -u 4194304 1048576",
					"read -P 0 4194304 1048576",
					"aio_write -P 0x21 10485760 65536",
					"aio_write -P 0x22 10551296 65536",
					"aio_write -P 0x23 10616832 65536",
					"aio_write -P 0x24 10682368 65536",
					"aio_write -P 0x25 10747904 65536",
					"aio_write -P 0x26 10813440 65536",
					"aio_write -P 0x27 10878976 65536",
					"aio_write -P 0x28 10944512 65536",
					"aio_flush",
					"read -P 0x21 10485760 65536",
					"read -P 0x24 10682368 65536",
					"read -P 0x28 10944512 65536",
					"flush",
					"write -f -P 0x77 67104768 1024", // FUA, last KiB of the disk
					"read -P 0x77 67104768 1024",
				}
				args := []string{"-f", "raw"}
				for _, c := range cmds {
					args = append(args, "-c", c)
				}
				for _, cache := range [][]string{nil, {"-t", "writeback"}} {
					a := append(append([]string{}, cache...), append(args, uri(addr, "disk"))...)
					out := run(t, qio, a...)
					if strings.Contains(out, "fail") || strings.Contains(out, "error") {
						t.Fatalf("qemu-io %v:\n%s", cache, out)
					}
				}
				// Out of range is an error, not a dropped connection.
				out, _ := runErr(qio, "-f", "raw", "-c", "read 67108864 512", "-c", "read -P 0x77 67104768 1024", uri(addr, "disk"))
				if !strings.Contains(out, "read 1024/1024") {
					t.Fatalf("qemu-io after out-of-range read:\n%s", out)
				}
			})
		}
	})
}

// TestQemuImg: info, convert in and out, compare and map against nbd://.
func TestQemuImg(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")
	d := newImage(t, 32*mib, mib, 4096, false, lut.Xhyve)
	_, addr := startServer(t, Config{}, Export{Name: "disk", Backend: d})
	u := uri(addr, "disk")

	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	if err := json.Unmarshal([]byte(run(t, qimg, "info", "--output=json", "-f", "raw", u)), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != 32*mib || info.Format != "raw" {
		t.Fatalf("qemu-img info: %+v", info)
	}

	// A local raw file with data in two ranges, the rest a hole.
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(32 * mib)
	f.WriteAt(pattern(int(3*mib/2), 1), mib/2) // 0.5 .. 2 MiB, across a boundary
	f.WriteAt(pattern(int(mib), 2), 20*mib)    // 20 .. 21 MiB
	f.Close()
	run(t, qimg, "convert", "-n", "-f", "raw", "-O", "raw", src, u)
	run(t, qimg, "compare", "-f", "raw", "-F", "raw", src, u)

	var m []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
		Zero   bool  `json:"zero"`
	}
	if err := json.Unmarshal([]byte(run(t, qimg, "map", "--output=json", "-f", "raw", u)), &m); err != nil {
		t.Fatal(err)
	}
	var data [][2]int64
	for _, e := range m {
		if e.Data {
			data = append(data, [2]int64{e.Start, e.Length})
		}
	}
	want := [][2]int64{{mib / 2, 3 * mib / 2}, {20 * mib, mib}}
	if fmt.Sprint(data) != fmt.Sprint(want) {
		t.Fatalf("qemu-img map data extents %v, want %v\n%+v", data, want, m)
	}

	dst := filepath.Join(dir, "dst.raw")
	run(t, qimg, "convert", "-f", "raw", "-O", "raw", u, dst)
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Fatal("converted copy differs")
	}
	// A difference is found.
	d.WriteAt([]byte{0xff}, 25*mib)
	if out, err := runErr(qimg, "compare", "-f", "raw", "-F", "raw", src, u); err == nil {
		t.Fatalf("compare missed a difference:\n%s", out)
	}
}

// TestNbdinfo: --list, --map of a 20 GiB image with three written ranges,
// and --can/--is for every advertised flag.
func TestNbdinfo(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		ni := testutil.NeedTool(t, "nbdinfo")
		big := newImage(t, 20*gib, gib, 4096, false, kind)
		ro := newImage(t, 16*mib, mib, 4096, true, kind)
		_, addr := startServer(t, Config{},
			Export{Name: "big", Description: "twenty gigs", Backend: big},
			Export{Name: "ro", Backend: ro})

		out := run(t, ni, "--list", "--json", "nbd://"+addr)
		var list struct {
			Exports []struct {
				Name string `json:"export-name"`
				Desc string `json:"description"`
				Size int64  `json:"export-size"`
				RO   bool   `json:"is_read_only"`
				Min  int64  `json:"block_size_minimum"`
				Pref int64  `json:"block_size_preferred"`
				Max  int64  `json:"block_size_maximum"`
			} `json:"exports"`
		}
		if err := json.Unmarshal([]byte(out), &list); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if len(list.Exports) != 2 || list.Exports[0].Name != "big" || list.Exports[0].Size != 20*gib ||
			list.Exports[0].Desc != "twenty gigs" || list.Exports[0].Min != 1 || list.Exports[0].Pref != 4096 || list.Exports[0].Max != 32*mib ||
			list.Exports[1].Name != "ro" || !list.Exports[1].RO {
			t.Fatalf("nbdinfo --list:\n%s", out)
		}

		ranges := [][2]int64{{0, 64 << 10}, {5*gib - 8192, 16384}, {20*gib - mib, mib}}
		for i, r := range ranges {
			if _, err := big.WriteAt(pattern(int(r[1]), byte(i+1)), r[0]); err != nil {
				t.Fatal(err)
			}
		}
		out = run(t, ni, "--map", "--json", uri(addr, "big"))
		var m []struct {
			Offset int64  `json:"offset"`
			Length int64  `json:"length"`
			Type   uint32 `json:"type"`
		}
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		var data [][2]int64
		next := int64(0)
		for _, e := range m {
			if e.Offset != next {
				t.Fatalf("map not contiguous at %d:\n%s", e.Offset, out)
			}
			next = e.Offset + e.Length
			if e.Type == 0 {
				data = append(data, [2]int64{e.Offset, e.Length})
			} else if e.Type != 3 {
				t.Fatalf("unexpected type %d:\n%s", e.Type, out)
			}
		}
		if next != 20*gib || fmt.Sprint(data) != fmt.Sprint(ranges) {
			t.Fatalf("nbdinfo --map data %v (end %d), want %v", data, next, ranges)
		}

		can := func(u, what string) int {
			_, err := runErr(ni, "--can", what, u)
			var ee *exec.ExitError
			switch {
			case err == nil:
				return 0
			case errors.As(err, &ee):
				return ee.ExitCode()
			}
			t.Fatalf("nbdinfo --can %s: %v", what, err)
			return -1
		}
		for _, what := range []string{"connect", "read", "write", "flush", "fua", "trim", "zero", "fast-zero", "cache", "df", "multi-conn"} {
			if got := can(uri(addr, "big"), what); got != 0 {
				t.Errorf("nbdinfo --can %s on rw export: exit %d", what, got)
			}
		}
		for what, want := range map[string]int{"write": 2, "trim": 2, "zero": 2, "fua": 2, "fast-zero": 2, "flush": 0, "multi-conn": 0, "cache": 0} {
			if got := can(uri(addr, "ro"), what); got != want {
				t.Errorf("nbdinfo --can %s on ro export: exit %d, want %d", what, got, want)
			}
		}
		if _, err := runErr(ni, "--is", "read-only", uri(addr, "ro")); err != nil {
			t.Errorf("nbdinfo --is read-only on ro export: %v", err)
		}
	})
}

// TestNbdcopy copies 256 MiB of random data into an export and back out,
// with one and with four connections (multi-conn).
func TestNbdcopy(t *testing.T) {
	nc := testutil.NeedTool(t, "nbdcopy")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	buf := make([]byte, 256*mib)
	rand.Read(buf)
	clear(buf[64*mib : 80*mib]) // a hole in the middle
	if err := os.WriteFile(src, buf, 0o644); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(buf)
	buf = nil
	for _, conns := range []string{"1", "4"} {
		t.Run("connections"+conns, func(t *testing.T) {
			d := newImage(t, 256*mib, 4*mib, 4096, false, lut.Xhyve)
			_, addr := startServer(t, Config{}, Export{Name: "disk", Backend: d})
			u := uri(addr, "disk")
			run(t, nc, "--connections="+conns, "--request-size=1048576", src, u)
			dst := filepath.Join(dir, "dst"+conns)
			run(t, nc, "--connections="+conns, "--request-size=1048576", u, dst)
			f, err := os.Open(dst)
			if err != nil {
				t.Fatal(err)
			}
			h := sha256.New()
			io.Copy(h, f)
			f.Close()
			os.Remove(dst)
			if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
				t.Fatalf("sha256 after round trip %x, want %x", got, want)
			}
		})
	}
}

// libnbdScript checks the protocol through libnbd's Python bindings.
const libnbdScript = `
import sys, nbd, errno

uri, ro_uri, size = sys.argv[1], sys.argv[2], int(sys.argv[3])

def must_fail(code, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        if e.errno not in (code, errno.errorcode[code]):
            raise SystemExit("%s: errno %s, want %s (%s)" % (f.__name__, e.errno, code, e))
        return
    raise SystemExit("%s: succeeded, want errno %d" % (f.__name__, code))

h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.get_size() == size
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.get_structured_replies_negotiated()

def status(off, n):
    out = []
    def cb(metacontext, offset, entries, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        out.extend(zip(entries[0::2], entries[1::2]))
    h.block_status(n, off, cb)
    return out

# Write, FUA write, flush.
h.pwrite(b"\x5a" * 8192, 1 << 20)
h.pwrite(b"\x6b" * 4096, 2 << 20, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(8192, 1 << 20) == b"\x5a" * 8192
assert status(1 << 20, 8192)[0] == (8192, 0), status(1 << 20, 8192)

# Trim, then zeros and a hole.
h.trim(8192, 1 << 20)
assert h.pread(8192, 1 << 20) == bytes(8192)
st = status(1 << 20, 8192)
assert st[0][1] == nbd.STATE_HOLE | nbd.STATE_ZERO and st[0][0] >= 8192, st

# Zeroing, fast and not.
h.pwrite(b"\x01" * 4096, 3 << 20)
h.zero(4096, 3 << 20, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 3 << 20) == bytes(4096)
h.pwrite(b"\x02" * 4096, 3 << 20)
h.zero(4096, 3 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 3 << 20) == bytes(4096)
must_fail(errno.ENOTSUP, h.zero, 4096, 3 << 20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)

# Out of range: errors, and the connection stays usable.
h.set_strict_mode(0)
must_fail(errno.EINVAL, h.pread, 4096, size)
must_fail(errno.ENOSPC, h.pwrite, b"x" * 4096, size)
must_fail(errno.EINVAL, h.trim, 8192, size - 4096)
assert h.pread(4096, 2 << 20) == b"\x6b" * 4096
h.cache(4096, 0)
h.shutdown()

# Read-only export.
r = nbd.NBD()
r.connect_uri(ro_uri)
assert r.is_read_only()
r.set_strict_mode(0)
must_fail(errno.EPERM, r.pwrite, b"x" * 4096, 0)
assert r.pread(4096, 0) == bytes(4096)
r.shutdown()
print("ok")
`

// libnbdTLSScript connects with TLS required on the client side, using
// a certificate directory (ca-cert.pem, client-cert.pem, client-key.pem).
const libnbdTLSScript = `
import sys, nbd
uri, certs = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(certs)
h.set_tls_verify_peer(True)
h.connect_uri(uri)
assert h.get_tls_negotiated()
h.pwrite(b"tls!" * 1024, 0, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == b"tls!" * 1024
h.shutdown()
# A plain client learns nothing from a TLS-required server.
if len(sys.argv) > 3:
    p = nbd.NBD()
    p.set_tls(nbd.TLS_DISABLE)
    try:
        p.connect_uri(uri.replace("nbds://", "nbd://"))
    except nbd.Error as e:
        pass
    else:
        raise SystemExit("plain connection accepted by a TLS-required server")
print("ok")
`

func TestLibnbd(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		py := testutil.NeedPython(t)
		d := newImage(t, 64*mib, mib, 4096, false, kind)
		ro := newImage(t, 16*mib, mib, 4096, true, kind)
		_, addr := startServer(t, Config{}, Export{Name: "disk", Backend: d}, Export{Name: "ro", Backend: ro})
		script := filepath.Join(t.TempDir(), "check.py")
		os.WriteFile(script, []byte(libnbdScript), 0o644)
		out := run(t, py, script, uri(addr, "disk"), uri(addr, "ro"), fmt.Sprint(64*mib))
		if !strings.Contains(out, "ok") {
			t.Fatal(out)
		}
	})
}

// TestLibnbdTLS: libnbd (GnuTLS) with a client certificate, ECDSA and
// RSA (the common case, which Go's TLS 1.3 certificate request made GnuTLS
// withhold; see ServerTLSConfig).
func TestLibnbdTLS(t *testing.T) {
	py := testutil.NeedPython(t)
	script := filepath.Join(t.TempDir(), "tls.py")
	os.WriteFile(script, []byte(libnbdTLSScript), 0o644)
	for _, c := range []struct {
		keys string
		mode TLSMode
	}{{"ecdsa", TLSOn}, {"ecdsa", TLSRequire}, {"rsa", TLSRequire}} {
		mode := c.mode
		p := newTestPKIKeys(t, c.keys == "rsa")
		t.Run(c.keys+"-"+mode.String(), func(t *testing.T) {
			d := newImage(t, 16*mib, mib, 4096, false, lut.Xhyve)
			_, addr := startServer(t, Config{TLS: mode, TLSConfig: p.serverConfig(true)}, Export{Name: "disk", Backend: d})
			args := []string{script, "nbds://" + addr + "/disk", p.dir}
			if mode == TLSRequire {
				args = append(args, "check-plain")
			}
			if out := run(t, py, args...); !strings.Contains(out, "ok") {
				t.Fatal(out)
			}
		})
	}
}

// forEachKind runs fn as one subtest per LUT kind (xhyve, thin), for the
// tests that serve images of both kinds.
func forEachKind(t *testing.T, fn func(t *testing.T, kind lut.Kind)) {
	t.Helper()
	for _, k := range lut.Kinds {
		t.Run("lut="+string(k), func(t *testing.T) { fn(t, k) })
	}
}
