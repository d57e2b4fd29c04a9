package main

import (
	"bufio"
	"bytes"
	"context"
	be "encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/internal/nbdclient"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"golang.org/x/sys/unix"
)

// serveChild starts `sparsedisk ARGS...` as a child process and returns it
// with the first URI it printed. The test kills it if it is still running
// at the end.
func serveChild(t *testing.T, extra []*os.File, env []string, args ...string) (*exec.Cmd, string, *testutil.SyncBuffer) {
	t.Helper()
	cmd := testutil.ChildCommand(childSparsedisk, env, args...)
	cmd.ExtraFiles = extra
	stderr := &testutil.SyncBuffer{}
	cmd.Stderr = stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		first := true
		for sc.Scan() {
			if first && strings.HasPrefix(sc.Text(), "nbd") {
				lines <- sc.Text()
				first = false
			}
		}
		close(lines)
	}()
	select {
	case u, ok := <-lines:
		if !ok {
			cmd.Wait()
			t.Fatalf("serve printed no URI; stderr:\n%s", stderr)
		}
		return cmd, u, stderr
	case <-time.After(30 * time.Second):
		t.Fatalf("serve printed no URI in 30s; stderr:\n%s", stderr)
	}
	return nil, "", nil
}

// newTestImage creates a sparse image with 1 MiB segments and registers a
// cleanup that fails the test on any corruption blockif.Check reports.
func newTestImage(t *testing.T, name string, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := blockif.Create(path, format.Params{Layout: format.LayoutSparse, Size: size, Split: 1 << 20, SectorSize: 4096}, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { requireClean(t, path, false) })
	return path
}

// requireClean fails the test on corruption (and on leaks too if strict).
func requireClean(t *testing.T, path string, strict bool) {
	t.Helper()
	r, err := blockif.Check(path, nil)
	if err != nil {
		t.Errorf("check %s: %v", path, err)
		return
	}
	for _, f := range r.Findings {
		if (strict && f.Kind != blockif.Advice) || f.Kind == blockif.Corruption {
			t.Errorf("check %s: %s", path, f)
		}
	}
}

func TestServeArgs(t *testing.T) {
	img := newTestImage(t, "a.img", 1<<20)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"serve"}, "at least one IMAGE"},
		{[]string{"serve", "--tls", "maybe", img}, "tls mode"},
		{[]string{"serve", "--tls", "on", img}, "--tls-cert"},
		{[]string{"serve", "--tls-cert", "x.pem", img}, "need --tls on"},
		{[]string{"serve", "--tls", "require", "--tls-cert", "/nonexistent", "--tls-key", "/nonexistent", img}, "TLS certificate"},
		{[]string{"serve", filepath.Join(t.TempDir(), "missing.img")}, "open"},
		{[]string{"serve", "--listen", "256.0.0.1:1", img}, "listen"},
	}
	for _, tc := range cases {
		_, stderr, code := sdRun(t, tc.args...)
		if code == 0 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q, want it to mention %q", tc.args, code, stderr, tc.want)
		}
	}
}

func TestImageArg(t *testing.T) {
	dir := t.TempDir()
	colon := filepath.Join(dir, "odd:name.img")
	os.WriteFile(colon, nil, 0o644)
	plain := filepath.Join(dir, "plain.img")
	os.WriteFile(plain, nil, 0o644)
	for _, tc := range []struct{ arg, path, name string }{
		{plain + ":vms/web", plain, "vms/web"}, // export names may hold "/"
		{"disk.img", "disk.img", "disk.img"},
		{"vm/disk.img:vm1", "vm/disk.img", "vm1"},
		{colon, colon, "odd:name.img"},
		{"/a:b/c.img", "/a:b/c.img", "c.img"},
	} {
		p, n := imageArg(tc.arg)
		if p != tc.path || n != tc.name {
			t.Errorf("imageArg(%q) = %q, %q; want %q, %q", tc.arg, p, n, tc.path, tc.name)
		}
	}
}

// TestServeInProcess serves two images (TCP and a Unix socket), drives them
// with peer tools, stops through the context and checks the images.
func TestServeInProcess(t *testing.T) {
	qio := testutil.NeedTool(t, "qemu-io")
	ni := testutil.NeedTool(t, "nbdinfo")
	a := newTestImage(t, "a.img", 64<<20)
	b := newTestImage(t, "b.img", 16<<20)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stdout, stderr := &testutil.SyncBuffer{}, &testutil.SyncBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- newApp(stdout, stderr).RunContext(ctx, []string{"sparsedisk", "serve",
			"--listen", "127.0.0.1:0", "--socket", sock, a, b + ":second"})
	}()
	var uris []string
	if err := testutil.Await(testutil.WaitTimeout, func() bool { uris = strings.Fields(stdout.String()); return len(uris) >= 4 }); err != nil {
		t.Fatalf("URIs printed: %v; stdout %q stderr %q", err, stdout, stderr)
	}
	want := []string{"nbd+unix:///a.img?socket=", "nbd+unix:///second?socket=", "nbd://127.0.0.1:", "nbd://127.0.0.1:"}
	for i, w := range want {
		if !strings.HasPrefix(uris[i], w) {
			t.Fatalf("URI %d = %q, want prefix %q", i, uris[i], w)
		}
	}
	if !strings.HasSuffix(uris[2], "/a.img") || !strings.HasSuffix(uris[3], "/second") {
		t.Fatalf("TCP URIs %q", uris[2:])
	}
	out, err := exec.Command(qio, "-f", "raw", "-c", "write -P 0x42 1048000 100000", "-c", "read -P 0x42 1048000 100000", uris[2]).CombinedOutput()
	if err != nil || strings.Contains(string(out), "fail") {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	out, err = exec.Command(ni, "--size", uris[1]).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != strconv.Itoa(16<<20) {
		t.Fatalf("nbdinfo --size over unix socket: %v %q", err, out)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve returned %v; stderr:\n%s", err, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	if !strings.Contains(stderr.String(), "image closed clean") {
		t.Errorf("no clean close logged:\n%s", stderr)
	}
	// The images are closed clean (writable open succeeds: lock released)
	// and hold the data.
	requireClean(t, a, true)
	d, err := blockif.Open(a, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, 100000)
	d.ReadAt(buf, 1048000)
	if !bytes.Equal(buf, bytes.Repeat([]byte{0x42}, len(buf))) {
		t.Fatal("data written over NBD not in the image")
	}
}

// burstScript writes 64 KiB blocks in bursts of 8 parallel writes, flushes
// after each burst and reports the number of blocks acknowledged and
// flushed, until the server goes away.
const burstScript = `
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
bs, limit = 65536, int(sys.argv[2])
i = 0
try:
    while i < limit:
        cs = [h.aio_pwrite(bytes([(i + j) % 251 + 1]) * bs, (i + j) * bs) for j in range(8)]
        for c in cs:
            while not h.aio_command_completed(c):
                h.poll(-1)
        h.flush()
        i += 8
        print("flushed", i, flush=True)
except nbd.Error as e:
    print("ended:", e, flush=True)
`

// TestServeSIGTERM sends SIGTERM to a serving process during a write burst:
// it must exit 0, leave the image clean, and keep every write that was
// acknowledged and flushed.
func TestServeSIGTERM(t *testing.T) {
	testutil.NeedPython(t)
	const blocks = 4096 // 256 MiB
	img := newTestImage(t, "burst.img", blocks*65536)
	cmd, uri, stderr := serveChild(t, nil, nil, "serve", "--listen", "127.0.0.1:0", img)
	script := filepath.Join(t.TempDir(), "burst.py")
	os.WriteFile(script, []byte(burstScript), 0o644)
	py := exec.Command("/usr/bin/python3", script, uri, strconv.Itoa(blocks))
	pout, _ := py.StdoutPipe()
	py.Stderr = os.Stderr
	if err := py.Start(); err != nil {
		t.Fatal(err)
	}
	flushed := 0
	sc := bufio.NewScanner(pout)
	signalled := false
	for sc.Scan() {
		var n int
		if _, err := fmt.Sscanf(sc.Text(), "flushed %d", &n); err == nil {
			flushed = n
		}
		if !signalled && flushed >= 64 {
			cmd.Process.Signal(syscall.SIGTERM)
			signalled = true
		}
	}
	py.Wait()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve after SIGTERM: %v\n%s", err, stderr)
	}
	if !signalled || flushed < 64 {
		t.Fatalf("burst flushed only %d blocks", flushed)
	}
	t.Logf("%d blocks acknowledged and flushed before shutdown", flushed)
	requireClean(t, img, true)
	d, err := blockif.Open(img, &blockif.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, 65536)
	for i := 0; i < flushed; i++ {
		d.ReadAt(buf, int64(i)*65536)
		if want := bytes.Repeat([]byte{byte(i%251 + 1)}, 65536); !bytes.Equal(buf, want) {
			t.Fatalf("block %d lost after graceful shutdown", i)
		}
	}
}

// TestServeSocketActivation hands the server a listening socket as fd 3
// with LISTEN_FDS, as systemd does.
func TestServeSocketActivation(t *testing.T) {
	ni := testutil.NeedTool(t, "nbdinfo")
	img := newTestImage(t, "act.img", 8<<20)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	defer f.Close()
	cmd, uri, stderr := serveChild(t, []*os.File{f}, []string{"LISTEN_FDS=1", "SPARSEDISK_HELPER_SETPID=1"},
		"serve", "--listen", "127.0.0.1:1", img+":act")
	f.Close()
	if uri != "nbd://"+addr+"/act" {
		t.Fatalf("URI %q, want the activated socket %s", uri, addr)
	}
	out, err := exec.Command(ni, "--size", uri).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != strconv.Itoa(8<<20) {
		t.Fatalf("nbdinfo: %v %q", err, out)
	}
	cmd.Process.Signal(syscall.SIGINT)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve after SIGINT: %v\n%s", err, stderr)
	}
	if !strings.Contains(stderr.String(), "socket activation") {
		t.Errorf("activation not logged:\n%s", stderr)
	}
}

// startServeInProcess runs `sparsedisk serve ARGS...` in this process and
// returns the printed URIs and a function that stops it and returns its
// error.
func startServeInProcess(t *testing.T, nURIs int, args ...string) ([]string, func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stdout, stderr := &testutil.SyncBuffer{}, &testutil.SyncBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- newApp(stdout, stderr).RunContext(ctx, append([]string{"sparsedisk", "serve"}, args...))
	}()
	var once sync.Once
	var stopErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case stopErr = <-done:
			case <-time.After(30 * time.Second):
				stopErr = errors.New("serve did not stop")
			}
		})
		return stopErr
	}
	var uris []string
	if err := testutil.Await(testutil.WaitTimeout, func() bool { uris = strings.Fields(stdout.String()); return len(uris) >= nURIs }); err != nil {
		stop()
		t.Fatalf("URIs printed: %v; stdout %q stderr %q", err, stdout, stderr)
	}
	t.Cleanup(func() { stop() })
	return uris, stop
}

// TestServeLimits: the limit flags reach the server. With
// --max-handshakes 1 a second connection evicts the first pending one at
// once, a client that does not negotiate is dropped at
// --handshake-timeout, with --max-connections 1 a second session is
// refused until the first ends; bad values are refused.
func TestServeLimits(t *testing.T) {
	img := newTestImage(t, "a.img", 1<<20)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--max-in-flight", "0"}, "--max-in-flight"},
		{[]string{"--min-block", "3"}, "--min-block"},
		{[]string{"--min-block", "131072"}, "--min-block"},
		{[]string{"--handshake-timeout", "0s"}, "--handshake-timeout"},
		{[]string{"--idle-timeout", "-1s"}, "--idle-timeout"},
		{[]string{"--socket", filepath.Join(t.TempDir(), "s"), "--socket-mode", "0999"}, "--socket-mode"},
		// Client certificates in "on" mode would be skipped by plain clients.
		{[]string{"--tls", "on", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"}, "--tls-ca needs --tls require"},
	} {
		_, stderr, code := sdRun(t, append(append([]string{"serve"}, tc.args...), img)...)
		if code == 0 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q, want it to mention %q", tc.args, code, stderr, tc.want)
		}
	}
	help, _, _ := sdRun(t, "serve", "--help")
	for _, want := range []string{`(default: "127.0.0.1:10809")`, "--max-connections N", "(default: 128)", "--max-handshakes N", "--min-block N", "(default: 1)", "--max-in-flight N", "(default: 16)", "--handshake-timeout", "(default: 10s)", "--idle-timeout", "--socket-mode MODE", `(default: "0600")`} {
		if !strings.Contains(help, want) {
			t.Errorf("serve --help does not mention %q:\n%s", want, help)
		}
	}

	// Long enough that the first client is evicted before its own
	// timeout however loaded the machine; the eviction is told from a
	// timeout by the reset, not by timing.
	const handshake = 2 * time.Second
	uris, stop := startServeInProcess(t, 1, "--listen", "127.0.0.1:0", "--max-connections", "1", "--max-handshakes", "1",
		"--max-in-flight", "2", "--idle-timeout", "1m", "--handshake-timeout", handshake.String(), img)
	addr := strings.TrimPrefix(strings.TrimSuffix(uris[0], "/a.img"), "nbd://")
	first, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	start := time.Now()
	first.SetDeadline(start.Add(10 * time.Second))
	greeting := make([]byte, 18)
	if _, err := io.ReadFull(first, greeting); err != nil || !bytes.HasPrefix(greeting, []byte("NBDMAGIC")) {
		t.Fatalf("first client: greeting %q, %v", greeting, err)
	}
	// The only pending slot is taken: a second connection evicts the
	// first at once, with a reset (the handshake timeout closes in
	// order).
	secondStart := time.Now()
	second, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	second.SetDeadline(time.Now().Add(testutil.WaitTimeout))
	if _, err := io.ReadFull(second, greeting); err != nil {
		t.Fatalf("second client: greeting %v", err)
	}
	if n, err := io.Copy(io.Discard, first); n != 0 || !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("first client: %d more bytes, %v after %v; want evicted (reset)", n, err, time.Since(start))
	}
	// The silent second client is dropped at the handshake timeout: an
	// orderly close, not before the timeout (the upper bound only tells
	// "at the timeout" from "never").
	if n, err := io.Copy(io.Discard, second); n != 0 || err != nil {
		t.Fatalf("second client: %d more bytes, %v", n, err)
	}
	if took := time.Since(secondStart); took < handshake*9/10 || took > handshake+15*time.Second {
		t.Fatalf("second client dropped after %v, want about %v", took, handshake)
	}
	// One negotiated session: a second one is refused with a message
	// until the first disconnects.
	c1, err := nbdclient.Dial("tcp", addr, "a.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	if c2, err := nbdclient.Dial("tcp", addr, "a.img", nil); err == nil || !strings.Contains(err.Error(), "too many connections") {
		if c2 != nil {
			c2.Close()
		}
		t.Fatalf("second session: %v, want refused for too many connections", err)
	}
	c1.Close()
	c3, err := nbdclient.Dial("tcp", addr, "a.img", nil)
	if err != nil {
		t.Fatalf("session after the first closed: %v", err)
	}
	c3.Close()
	if err := stop(); err != nil {
		t.Fatalf("serve: %v", err)
	}
}

// TestServeSocketMode: the Unix socket gets exactly --socket-mode (0600
// by default), even under a umask of 0 that would make it world-writable.
func TestServeSocketMode(t *testing.T) {
	img := newTestImage(t, "a.img", 1<<20)
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	for _, tc := range []struct {
		args []string
		want os.FileMode
	}{
		{nil, 0o600},
		{[]string{"--socket-mode", "0660"}, 0o660},
	} {
		sock := filepath.Join(t.TempDir(), "nbd.sock")
		_, stop := startServeInProcess(t, 1, append(append([]string{"--socket", sock}, tc.args...), img)...)
		st, err := os.Stat(sock)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != tc.want {
			t.Errorf("%q: socket mode %v, want %v", tc.args, st.Mode(), tc.want)
		}
		nc, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		greeting := make([]byte, 18)
		if _, err := io.ReadFull(nc, greeting); err != nil || !bytes.HasPrefix(greeting, []byte("NBDMAGIC")) {
			t.Fatalf("greeting over the socket %q: %v", greeting, err)
		}
		nc.Close()
		if err := stop(); err != nil {
			t.Fatalf("serve: %v", err)
		}
	}
}

// TestServeSocketInUse: a second server on a socket path that a running
// server listens on is refused and leaves it alone; a stale socket (no
// listener) is replaced; when a server stops, its socket goes.
func TestServeSocketInUse(t *testing.T) {
	a := newTestImage(t, "a.img", 1<<20)
	b := newTestImage(t, "b.img", 1<<20)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	_, stop := startServeInProcess(t, 1, "--socket", sock, a)
	var out, errb testutil.SyncBuffer
	// Bounded: a server that wrongly takes the socket over runs until
	// its context ends, and then returns nil.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := newApp(&out, &errb).RunContext(ctx, []string{"sparsedisk", "serve", "--socket", sock, b})
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second server on a live socket: %v, want an in-use error", err)
	}
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("the first server lost its socket to the refused one: %v", err)
	}
	nc.Close()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind after stop: %v", err)
	}

	// A socket file whose server is gone is taken over.
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	_, stop = startServeInProcess(t, 1, "--socket", sock, b)
	if nc, err := net.Dial("unix", sock); err != nil {
		t.Fatalf("server on a stale socket is not reachable: %v", err)
	} else {
		nc.Close()
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// TestServeExportDescription: the description clients see names the image
// file but not the server's directories; an image given twice is refused
// with a message that says so (not "in use by another process").
func TestServeExportDescription(t *testing.T) {
	ni := testutil.NeedTool(t, "nbdinfo")
	img := newTestImage(t, "secret-dir-image.img", 1<<20)
	uris, _ := startServeInProcess(t, 1, "--listen", "127.0.0.1:0", img)
	out, err := exec.Command(ni, "--list", uris[0]).CombinedOutput()
	if err != nil {
		t.Fatalf("nbdinfo --list: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "secret-dir-image.img") || strings.Contains(string(out), filepath.Dir(img)) {
		t.Errorf("description should name the file but not its directory %s:\n%s", filepath.Dir(img), out)
	}
	other := newTestImage(t, "twice.img", 1<<20)
	_, errs, code := sdRun(t, "serve", "--listen", "127.0.0.1:0", other+":a", other+":b")
	if code == 0 || !strings.Contains(errs, "given twice") || strings.Contains(errs, "another process") {
		t.Errorf("same image twice: exit %d, want a 'given twice' error\n%s", code, errs)
	}
}

// unreadBytes returns the bytes received on nc and not read yet.
func unreadBytes(t *testing.T, nc net.Conn) int {
	t.Helper()
	raw, err := nc.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var ierr error
	if err := raw.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil || ierr != nil {
		t.Fatalf("SIOCINQ: %v %v", err, ierr)
	}
	return n
}

// TestServeSecondSignal: a client that sends reads and never reads the
// replies holds the first SIGTERM's graceful shutdown; a second SIGTERM
// stops waiting, and the image is still flushed and closed clean.
func TestServeSecondSignal(t *testing.T) {
	img := newTestImage(t, "stuck.img", 64<<20)
	cmd, uri, stderr := serveChild(t, nil, nil, "serve", "--listen", "127.0.0.1:0", "--shutdown-timeout", "2m", img)
	host := strings.TrimPrefix(uri, "nbd://")
	host = host[:strings.IndexByte(host, '/')]
	nc, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	// Fixed newstyle handshake, EXPORT_NAME "stuck.img", no zero padding.
	hello := make([]byte, 18)
	if _, err := io.ReadFull(nc, hello); err != nil {
		t.Fatal(err)
	}
	name := []byte("stuck.img")
	opt := be.BigEndian.AppendUint32(nil, 3) // FIXED_NEWSTYLE | NO_ZEROES
	opt = be.BigEndian.AppendUint64(opt, 0x49484156454F5054)
	opt = be.BigEndian.AppendUint32(opt, 1) // NBD_OPT_EXPORT_NAME
	opt = be.BigEndian.AppendUint32(opt, uint32(len(name)))
	opt = append(opt, name...)
	if _, err := nc.Write(opt); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(nc, make([]byte, 10)); err != nil {
		t.Fatalf("export info: %v", err)
	}
	// 64 reads of 1 MiB whose replies are never read.
	var reqs []byte
	for i := 0; i < 64; i++ {
		reqs = be.BigEndian.AppendUint32(reqs, 0x25609513)
		reqs = be.BigEndian.AppendUint16(reqs, 0) // flags
		reqs = be.BigEndian.AppendUint16(reqs, 0) // NBD_CMD_READ
		reqs = be.BigEndian.AppendUint64(reqs, uint64(i+1))
		reqs = be.BigEndian.AppendUint64(reqs, uint64(i)<<20)
		reqs = be.BigEndian.AppendUint32(reqs, 1<<20)
	}
	if _, err := nc.Write(reqs); err != nil {
		t.Fatal(err)
	}
	// Signal once the server works on them: the first reply has arrived
	// (so the requests, written at once, are in the server's reader; a
	// graceful stop answers what it has read, and 64 MiB of replies
	// cannot be delivered to a client that does not read).
	testutil.WaitFor(t, "the first reply", func() bool { return unreadBytes(t, nc) >= 16 })
	exited := make(chan error, 1)
	cmd.Process.Signal(syscall.SIGTERM)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		t.Fatalf("serve exited on the first SIGTERM (%v) although replies were still queued; the test did not hold it\n%s", err, stderr)
	case <-time.After(time.Second):
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		t.Fatalf("serve still running 20 s after a second SIGTERM\n%s", stderr)
	}
	if !strings.Contains(stderr.String(), "second signal") || !strings.Contains(stderr.String(), "image closed clean") {
		t.Errorf("log lacks the second-signal notice or the clean close:\n%s", stderr)
	}
	requireClean(t, img, true)
}
