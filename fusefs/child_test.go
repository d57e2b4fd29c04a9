package fusefs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sparsedisk/sparsedisk/internal/testutil"
)

// A test binary that serves a FUSE mount must never itself touch that mount
// in a way that needs the server while the Go runtime cannot run it. The
// case that bit us: a page fault on a shared mapping of the mounted file.
// The faulting goroutine is in user code, not in a system call, so the
// runtime counts it as running; its thread sleeps uninterruptibly in the
// kernel until the FUSE READ for the page is answered. If a garbage
// collection reaches a point where every P must stop (mark termination's
// forEachP, or a stop-the-world), it waits for that P forever, the server
// goroutines park in GC assist or behind the stop, the READ is never
// answered: the whole binary hangs, its -timeout included (see
// TestSharedMmap). Plain system calls (read, write, fsync, fallocate) are
// safe: a goroutine in a system call is at a safe point for the runtime.
// So everything that faults on mounted memory runs in a child process, the
// test binary re-executed by testutil.ChildCommand, against the mount served by
// the parent, under a deadline.

func TestMain(m *testing.M) {
	if role := testutil.ChildRole(); role != "" {
		if err := childMain(role); err != nil {
			fmt.Fprintf(os.Stderr, "child %s: %v\n", role, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// childMain runs one child role. Arguments come in the environment:
// CHILD_PATH (the file), CHILD_OFF (an offset), CHILD_DATA (bytes to write).
func childMain(role string) error {
	path := os.Getenv("CHILD_PATH")
	off, _ := strconv.ParseInt(os.Getenv("CHILD_OFF"), 10, 64)
	switch role {
	case "mmap":
		// Write CHILD_DATA at CHILD_OFF through a shared writable mapping
		// of the whole file, msync, unmap.
		data := []byte(os.Getenv("CHILD_DATA"))
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return fmt.Errorf("shared mmap: %w", err)
		}
		copy(mem[off:], data)
		if err := unix.Msync(mem, unix.MS_SYNC); err != nil {
			return fmt.Errorf("msync: %w", err)
		}
		if !bytes.Equal(mem[off:off+int64(len(data))], data) {
			return errors.New("mapping does not hold the write")
		}
		return unix.Munmap(mem)
	case "read":
		// Read one block at CHILD_OFF (used with a backend that blocks).
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.ReadAt(make([]byte, 4096), off)
		return err
	}
	return fmt.Errorf("unknown role %q", role)
}

// errChildDeadline reports a child that did not finish in time.
var errChildDeadline = errors.New("child missed its deadline")

// runChild re-executes the test binary as role against m, with env added,
// and waits at most timeout. A child past its deadline is killed; one that
// cannot die because it sleeps uninterruptibly on a FUSE request (a request
// the server already took cannot be abandoned, even on SIGKILL) is released
// by aborting the mount's FUSE connection and detaching the mount, after
// which m is gone. It returns the child's combined output and its error,
// wrapping errChildDeadline when the deadline passed.
func runChild(t testing.TB, m *Mount, timeout time.Duration, role string, env ...string) ([]byte, error) {
	t.Helper()
	var out bytes.Buffer
	cmd := testutil.ChildCommand(role, append([]string{"CHILD_PATH=" + m.Path()}, env...))
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		t.Fatalf("start child: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.Bytes(), err
	case <-time.After(timeout):
	}
	_ = cmd.Process.Kill()
	select {
	case <-done:
		return out.Bytes(), fmt.Errorf("%w (%v), killed", errChildDeadline, timeout)
	case <-time.After(3 * time.Second):
	}
	aerr := abortMount(m.Dir())
	select {
	case <-done:
		return out.Bytes(), fmt.Errorf("%w (%v); it survived SIGKILL, so the FUSE connection was aborted (%v)", errChildDeadline, timeout, aerr)
	case <-time.After(10 * time.Second):
	}
	t.Fatalf("child pid %d still alive after kill and connection abort (%v)", cmd.Process.Pid, aerr)
	return nil, nil
}

// fuseConnections is where the kernel's fusectl file system lists FUSE
// connections, each a directory named by the device number of its mount.
const fuseConnections = "/sys/fs/fuse/connections"

// mountDev returns the device number (major:minor from mountinfo) of the
// mount at dir, or ok=false when dir is not a mount point. It reads
// /proc/self/mountinfo and never touches dir, which may hang.
func mountDev(dir string) (major, minor uint32, ok bool, err error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return 0, 0, false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint options ...
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || unescapeMountinfo(fields[4]) != dir {
			continue
		}
		a, b, found := strings.Cut(fields[2], ":")
		ma, err1 := strconv.ParseUint(a, 10, 32)
		mi, err2 := strconv.ParseUint(b, 10, 32)
		if !found || err1 != nil || err2 != nil {
			return 0, 0, false, fmt.Errorf("mountinfo: bad device %q", fields[2])
		}
		major, minor, ok = uint32(ma), uint32(mi), true // the last match is the top mount
	}
	return major, minor, ok, sc.Err()
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of
// /proc/self/mountinfo paths.
func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// abortMount forcibly ends the FUSE mount at dir: it aborts the connection
// through fusectl (mounting fusectl for the duration if it is not mounted),
// which fails every pending and future request so that no process stays
// stuck on it, then detaches the mount. It does not wait for the server.
// A dir that is not a mount point is left alone.
func abortMount(dir string) error {
	major, minor, ok, err := mountDev(dir)
	if err != nil || !ok {
		return err
	}
	var errs []error
	ctl := fmt.Sprintf("%s/%d/abort", fuseConnections, unix.Mkdev(major, minor))
	if _, err := os.Stat(ctl); errors.Is(err, os.ErrNotExist) {
		if err := unix.Mount("fusectl", fuseConnections, "fusectl", 0, ""); err == nil {
			defer unix.Unmount(fuseConnections, 0)
		} else if !errors.Is(err, syscall.EBUSY) {
			errs = append(errs, fmt.Errorf("mount fusectl: %w", err))
		}
	}
	if err := os.WriteFile(ctl, []byte("1"), 0); err != nil {
		errs = append(errs, fmt.Errorf("abort connection: %w", err))
	}
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		errs = append(errs, fmt.Errorf("lazy unmount %s: %w", dir, err))
	}
	return errors.Join(errs...)
}

// within runs f and reports whether it returned within d (f keeps running
// in the background otherwise).
func within(d time.Duration, f func()) bool {
	done := make(chan struct{})
	go func() { f(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// blockingBackend is a memBackend whose reads, once armed, wait until
// release is closed: a server that never answers.
type blockingBackend struct {
	*memBackend
	armed   chan struct{} // closed to make reads block
	entered chan struct{} // receives once per blocked read
	release chan struct{} // closed to let blocked reads finish
}

func (b *blockingBackend) ReadAt(p []byte, off int64) (int, error) {
	select {
	case <-b.armed:
		select {
		case b.entered <- struct{}{}:
		default:
		}
		<-b.release
	default:
	}
	return b.memBackend.ReadAt(p, off)
}

// TestStuckChildReleased: a child stuck on a request the server never
// answers survives SIGKILL; runChild must still return after its deadline,
// having aborted the connection and detached the mount, and the server must
// then finish. Without the abort the child, and the test, would wait for
// ever.
func TestStuckChildReleased(t *testing.T) {
	testutil.NeedFUSE(t)
	b := &blockingBackend{
		memBackend: newMemBackend(1 << 20),
		armed:      make(chan struct{}),
		entered:    make(chan struct{}, 1),
		release:    make(chan struct{}),
	}
	dir := t.TempDir()
	m, err := New(dir, b, &Options{Name: "disk"})
	if err != nil {
		t.Fatalf("mount: %v", err)
	}
	released := false
	t.Cleanup(func() {
		if !released {
			close(b.release)
			if err := abortMount(dir); err != nil {
				t.Errorf("cleanup abort: %v", err)
			}
		}
	})
	close(b.armed)
	start := time.Now()
	out, err := runChild(t, m, 2*time.Second, "read")
	elapsed := time.Since(start)
	t.Logf("runChild returned after %v: %v (%s)", elapsed.Round(time.Millisecond), err, bytes.TrimSpace(out))
	select {
	case <-b.entered:
	default:
		t.Error("the child's read never reached the backend")
	}
	if !errors.Is(err, errChildDeadline) || !strings.Contains(err.Error(), "aborted") {
		t.Errorf("runChild: %v, want a deadline error after aborting the connection", err)
	}
	if elapsed > 20*time.Second {
		t.Errorf("runChild took %v", elapsed)
	}
	if _, _, ok, err := mountDev(dir); ok || err != nil {
		t.Errorf("mount still present after the abort (err %v)", err)
	}
	released = true
	close(b.release)
	if !within(10*time.Second, m.Wait) {
		t.Error("server did not finish after the abort")
	}
}
