package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
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
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/vfs"
	"golang.org/x/sys/unix"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// binary builds the sparsedisk command once per test run.
func binary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sparsedisk-bin")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "sparsedisk")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = errors.New(string(out))
		}
	})
	if binErr != nil {
		t.Fatalf("go build: %v", binErr)
	}
	return binPath
}

// runBinary runs the built command with a deadline and returns its
// combined output; an exit past the deadline is an error that says so.
func runBinary(t *testing.T, limit time.Duration, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	out, err := exec.CommandContext(ctx, binary(t), args...).CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("still running after %v: %w", limit, ctx.Err())
	}
	return string(out), err
}

// childSparsedisk is the role of a test binary re-executed as the
// sparsedisk command (testutil.ChildCommand), for tests that need a real
// process they can signal.
const childSparsedisk = "sparsedisk"

func TestMain(m *testing.M) {
	if testutil.ChildRole() == childSparsedisk {
		if os.Getenv("SPARSEDISK_HELPER_SETPID") == "1" {
			// Socket activation: systemd sets LISTEN_PID after fork; do it here.
			os.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
		}
		os.Exit(run(append([]string{"sparsedisk"}, testutil.ChildArgs()...), os.Stdout, os.Stderr))
	}
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// testImage creates a 16 MiB sparse image with 1 MiB segments and checks
// it for corruption when the test ends.
func testImage(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	p := format.Params{Layout: format.LayoutSparse, Size: 16 << 20, Split: 1 << 20, SectorSize: 4096}
	if err := blockif.Create(path, p, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r, err := blockif.Check(path, nil)
		if err != nil || r.Corruptions > 0 {
			t.Errorf("check %s: %v %+v", path, err, r)
		}
	})
	return path
}

type mountProc struct {
	cmd    *exec.Cmd
	stderr *testutil.SyncBuffer
	dir    string
	file   string
	done   chan error
}

// startMount runs `sparsedisk mount` as a child process and waits for the
// file to appear. The test's cleanup stops it and unmounts if needed.
func startMount(t *testing.T, image string, args ...string) *mountProc {
	t.Helper()
	testutil.NeedFUSE(t)
	dir := t.TempDir()
	name := filepath.Base(image)
	for i, a := range args {
		if a == "--name" && i+1 < len(args) {
			name = args[i+1]
		}
	}
	p := &mountProc{dir: dir, file: filepath.Join(dir, name), stderr: &testutil.SyncBuffer{}, done: make(chan error, 1)}
	p.cmd = exec.Command(binary(t), append([]string{"mount", image, dir}, args...)...)
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(10 * time.Second):
				p.cmd.Process.Kill()
				<-p.done
			}
		}
		if _, _, ok := findMount(dir); ok {
			unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
	for i := 0; ; i++ {
		if st, err := os.Stat(p.file); err == nil && st.Size() > 0 {
			return p
		}
		select {
		case err := <-p.done:
			p.done <- err
			t.Fatalf("mount exited early: %v\n%s", err, p.stderr)
		case <-time.After(20 * time.Millisecond):
		}
		if i > 500 {
			t.Fatalf("mount did not come up\n%s", p.stderr)
		}
	}
}

// wait waits for the mount process to exit and returns its exit code.
func (p *mountProc) wait(t *testing.T) int {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err
	case <-time.After(30 * time.Second):
		t.Fatalf("mount process still running\n%s", p.stderr)
	}
	return p.cmd.ProcessState.ExitCode()
}

func descriptorState(t *testing.T, image string) string {
	t.Helper()
	d, err := format.ReadDescriptor(vfs.OS{}, image)
	if err != nil {
		t.Fatal(err)
	}
	return d.State
}

func writeSync(t *testing.T, file string, data []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func readImage(t *testing.T, image string, off, n int64) []byte {
	t.Helper()
	d, err := blockif.Open(image, &blockif.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	return readDisk(t, d, off, n)
}

func readDisk(t *testing.T, d *blockif.Disk, off, n int64) []byte {
	t.Helper()
	buf := make([]byte, n)
	if _, err := d.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	return buf
}

func TestMountUmountCommand(t *testing.T) {
	image := testImage(t)
	p := startMount(t, image)
	if st := descriptorState(t, image); st != format.StateDirty {
		t.Errorf("state while mounted = %q", st)
	}
	data := bytes.Repeat([]byte("umount"), 50000)
	writeSync(t, p.file, data, 12345)

	// A second mount of the same image is refused: image in use. Run as a
	// child with a deadline, so a regression fails instead of hanging.
	second := t.TempDir()
	t.Cleanup(func() { unix.Unmount(second, unix.MNT_DETACH) })
	if out, err := runBinary(t, 10*time.Second, "mount", image, second); err == nil || !strings.Contains(out, "in use") {
		t.Errorf("second mount: %v, %q", err, out)
	}
	// A mount point that already carries a live FUSE mount is refused
	// too, instead of stacking a second mount on it.
	other := testImage(t)
	if out, err := runBinary(t, 10*time.Second, "mount", other, p.dir); err == nil || !strings.Contains(out, "already has a FUSE") {
		t.Errorf("mount over a live mount: %v, %q", err, out)
	}

	if _, errOut, code := sdRun(t, "umount", p.dir); code != 0 {
		t.Fatalf("umount: exit %d: %s", code, errOut)
	}
	if code := p.wait(t); code != 0 {
		t.Errorf("mount exit code %d\n%s", code, p.stderr)
	}
	if st := descriptorState(t, image); st != format.StateClean {
		t.Errorf("state after umount = %q\n%s", st, p.stderr)
	}
	if !strings.Contains(p.stderr.String(), "image closed clean") {
		t.Errorf("log lacks the clean close:\n%s", p.stderr)
	}
	if got := readImage(t, image, 12345, int64(len(data))); !bytes.Equal(got, data) {
		t.Error("data written through the mount is not in the image")
	}
	if _, errOut, code := sdRun(t, "umount", p.dir); code == 0 || !strings.Contains(errOut, "not a mount point") {
		t.Errorf("umount of a plain directory: exit %d %q", code, errOut)
	}
}

func TestMountSignals(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			image := testImage(t)
			p := startMount(t, image)
			data := []byte("signalled")
			f, err := os.OpenFile(p.file, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt(data, 4096) // no fsync: the clean shutdown flushes
			f.Close()
			p.cmd.Process.Signal(sig)
			if code := p.wait(t); code != 0 {
				t.Errorf("exit code %d\n%s", code, p.stderr)
			}
			if st := descriptorState(t, image); st != format.StateClean {
				t.Errorf("state = %q", st)
			}
			if got := readImage(t, image, 4096, int64(len(data))); !bytes.Equal(got, data) {
				t.Errorf("read %q", got)
			}
		})
	}
}

// TestMountSignalWhileOpen: SIGTERM while the file is still open (a loop
// device, a VM) cannot unmount, but it flushes: a service manager's
// SIGKILL that follows loses no write acknowledged before the SIGTERM.
func TestMountSignalWhileOpen(t *testing.T) {
	image := testImage(t)
	p := startMount(t, image)
	f, err := os.OpenFile(p.file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := bytes.Repeat([]byte("acknowledged, never fsynced "), 1000)
	if _, err := f.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := testutil.Await(testutil.WaitTimeout, func() bool { return strings.Contains(p.stderr.String(), "unmount failed") }); err != nil {
		t.Fatalf("SIGTERM with the file open did not report the failed unmount: %v\n%s", err, p.stderr)
	}
	p.cmd.Process.Kill()
	p.wait(t)
	unix.Unmount(p.dir, unix.MNT_DETACH)
	if got := readImage(t, image, 1<<20, int64(len(data))); !bytes.Equal(got, data) {
		t.Fatalf("a write acknowledged before SIGTERM was lost to the SIGKILL that followed\n%s", p.stderr)
	}
}

func TestMountReadOnly(t *testing.T) {
	image := testImage(t)
	p := startMount(t, image, "--read-only", "--name", "ro.raw")
	if filepath.Base(p.file) != "ro.raw" {
		t.Fatalf("--name not honoured: %s", p.file)
	}
	_, err := os.OpenFile(p.file, os.O_RDWR, 0)
	if !errors.Is(err, syscall.EROFS) {
		t.Errorf("open for writing: %v, want EROFS", err)
	}
}

func TestMountErrors(t *testing.T) {
	testutil.NeedFUSE(t)
	image := testImage(t)
	_, errOut, code := sdRun(t, "mount", image, filepath.Join(t.TempDir(), "missing"))
	if code == 0 || !strings.Contains(errOut, "mount point") {
		t.Errorf("missing mount point: exit %d %q", code, errOut)
	}
	d, err := blockif.Open(image, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, errOut, code = sdRun(t, "mount", image, t.TempDir())
	d.Close()
	if code == 0 || !strings.Contains(errOut, "in use") {
		t.Errorf("image in use: exit %d %q", code, errOut)
	}
	if st := descriptorState(t, image); st != format.StateClean {
		t.Errorf("failed mounts left state %q", st)
	}
	_, errOut, code = sdRun(t, "mount", image)
	if code == 0 {
		t.Errorf("mount without a mount point succeeded: %q", errOut)
	}
}

// TestMountKill9 kills the mount process while writes are in flight: the
// image must check free of corruption and hold every fsynced write; a
// sector written but not fsynced holds either its old or its new content.
func TestMountKill9(t *testing.T) {
	image := testImage(t)
	p := startMount(t, image)
	f, err := os.OpenFile(p.file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	const chunk, sector = 64 << 10, 4096
	rng := rand.New(rand.NewPCG(7, 8))
	var synced, unsynced [][2]int64 // [offset, seed] of each chunk
	content := func(seed int64) []byte {
		r := rand.New(rand.NewPCG(uint64(seed), 9))
		b := make([]byte, chunk)
		for i := range b {
			b[i] = byte(r.Uint32() | 1)
		}
		return b
	}
	slots := rng.Perm(16 << 20 / chunk)
	for i, s := range slots[:200] {
		off := int64(s) * chunk
		if _, err := f.WriteAt(content(int64(i)), off); err != nil {
			t.Fatal(err)
		}
		unsynced = append(unsynced, [2]int64{off, int64(i)})
		if i%10 == 9 && i < 150 {
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			synced, unsynced = append(synced, unsynced...), nil
		}
	}
	p.cmd.Process.Kill()
	p.wait(t)
	f.Close()
	// The dead mount is stale: mount refuses it clearly (run as a child
	// with a deadline: a mount that wrongly succeeds would block), umount
	// clears it.
	if out, err := runBinary(t, 10*time.Second, "mount", image, p.dir); err == nil || !strings.Contains(out, "stale") {
		t.Errorf("mount on a stale mount point: %v %q", err, out)
	}
	if _, errOut, code := sdRun(t, "umount", p.dir); code != 0 {
		t.Errorf("umount of a stale mount: exit %d %q", code, errOut)
	}

	if st := descriptorState(t, image); st != format.StateDirty {
		t.Errorf("state after kill -9 = %q, want dirty", st)
	}
	r, err := blockif.Check(image, nil)
	if err != nil || r.Corruptions > 0 {
		t.Fatalf("check after kill -9: %v %+v", err, r)
	}
	t.Logf("after kill -9: %d leaks, %d fsynced chunks, %d not fsynced", r.Leaks, len(synced), len(unsynced))
	d, err := blockif.Open(image, &blockif.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, c := range synced {
		if got := readDisk(t, d, c[0], chunk); !bytes.Equal(got, content(c[1])) {
			t.Errorf("fsynced chunk at %d lost", c[0])
		}
	}
	for _, c := range unsynced {
		got, want := readDisk(t, d, c[0], chunk), content(c[1])
		for s := 0; s < chunk; s += sector {
			g := got[s : s+sector]
			if !bytes.Equal(g, want[s:s+sector]) && !bytes.Equal(g, make([]byte, sector)) {
				t.Errorf("unsynced sector at %d holds data never written there", c[0]+int64(s))
			}
		}
	}
}

// TestMountSyncKill9: with --sync every acknowledged write survives kill -9
// without any fsync.
func TestMountSyncKill9(t *testing.T) {
	image := testImage(t)
	p := startMount(t, image, "--sync")
	f, err := os.OpenFile(p.file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("sync!"), 30000)
	for i := range 5 {
		if _, err := f.WriteAt(data, int64(i)<<20+int64(i)); err != nil {
			t.Fatal(err)
		}
	}
	p.cmd.Process.Kill()
	p.wait(t)
	f.Close()
	unix.Unmount(p.dir, unix.MNT_DETACH)
	for i := range 5 {
		if got := readImage(t, image, int64(i)<<20+int64(i), int64(len(data))); !bytes.Equal(got, data) {
			t.Errorf("write %d lost despite --sync", i)
		}
	}
}
