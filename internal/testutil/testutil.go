package testutil

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// InCI reports whether the tests run under CI (CI=true), where every
// prerequisite must be present.
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips the test because a prerequisite is missing, or fails
// it under CI=true: a skip there would hide an untested feature.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI=true but "+format, args...)
		return
	}
	t.Skipf(format, args...)
}

// NeedTool returns the path of the named program, looked up on PATH and
// in the sbin directories; a missing one is Unavailable.
func NeedTool(t testing.TB, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if p := dir + "/" + name; isExecutable(p) {
			return p
		}
	}
	Unavailable(t, "%s not installed (scripts/deps.sh installs the peer tools)", name)
	return ""
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// NeedPython returns /usr/bin/python3 if it has the libnbd bindings (the
// python3 first on PATH may not).
func NeedPython(t testing.TB) string {
	t.Helper()
	py := "/usr/bin/python3"
	if err := exec.Command(py, "-c", "import nbd").Run(); err != nil {
		Unavailable(t, "python3-libnbd not installed: %v", err)
	}
	return py
}

// NeedFUSE checks that /dev/fuse can be opened.
func NeedFUSE(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		Unavailable(t, "no FUSE: %v", err)
	}
	f.Close()
}

// NeedRoot checks that the test runs as root (loop devices, mount(8)).
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root for loop devices and mount")
	}
}

// FaultTmpfs mounts a tmpfs of the given size (mount(8) syntax, "8m") on a
// fresh directory and unmounts it when the test ends; register everything
// that uses it after this call, so that it is closed first. Without the
// privilege to mount, it is Unavailable.
func FaultTmpfs(t testing.TB, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		Unavailable(t, "cannot mount a size-limited tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount tmpfs %s: %v", dir, err)
			_ = unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
	return dir
}

// WaitTimeout bounds WaitFor. It is generous: it only matters when the
// condition never comes true, and the race detector on two loaded cores is
// slow.
const WaitTimeout = 30 * time.Second

// WaitFor polls cond until it returns true and fails the test, naming
// what it waited for, if that takes longer than WaitTimeout. It is the
// replacement for a sleep standing in for synchronisation.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	if err := Await(WaitTimeout, cond); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// Await polls cond until it returns true or limit passes; it returns an
// error in the latter case. Unlike WaitFor it may be called from any
// goroutine.
func Await(limit time.Duration, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for wait := 100 * time.Microsecond; !cond(); wait = min(2*wait, 20*time.Millisecond) {
		if time.Now().After(deadline) {
			return fmt.Errorf("not reached within %v", limit)
		}
		runtime.Gosched()
		time.Sleep(wait)
	}
	return nil
}

// SyncBuffer is a bytes.Buffer safe for concurrent writers and readers,
// e.g. a child process's output read while it runs.
type SyncBuffer struct {
	mu sync.Mutex // protects b
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns a copy of the contents.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Bytes returns a copy of the contents.
func (s *SyncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

// Len returns the number of bytes written.
func (s *SyncBuffer) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Len()
}

// childEnv carries the role of a re-executed test binary.
const childEnv = "SPARSEDISK_TEST_CHILD"

// ChildRole returns the role this process plays if the test binary was
// re-executed by ChildCommand, or "" in the test process itself. Call it
// from TestMain before m.Run.
func ChildRole() string { return os.Getenv(childEnv) }

// ChildArgs returns the arguments ChildCommand passed to this child.
func ChildArgs() []string {
	for i, a := range os.Args {
		if a == "--" {
			return os.Args[i+1:]
		}
	}
	return nil
}

// ChildCommand returns a command that re-executes the test binary as role
// with args (ChildArgs returns them in the child), and
// env added to the environment; TestMain dispatches on ChildRole. The
// binary runs no tests (-test.run matches nothing).
func ChildCommand(role string, env []string, args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^$", "--"}, args...)...)
	cmd.Env = append(append(os.Environ(), childEnv+"="+role), env...)
	return cmd
}

// Figure prints a long test's summary line to standard output, where `go
// test` passes it through without -v, as "figures: TEST: SUMMARY".
// scripts/testing-figures.sh collects these lines from the log of one run
// into the figures block of TESTING.md, so that the figures quoted there
// are a run's own output, never typed by hand.
func Figure(test, format string, args ...any) {
	fmt.Printf("figures: %s: %s\n", test, fmt.Sprintf(format, args...))
}
