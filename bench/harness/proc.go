package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The harness owns every process and mount it starts. Each long-running
// process runs in its own process group so that teardown reaches its
// children too; teardown runs after every workload, on failure, and on
// SIGINT/SIGTERM (see main).

type service struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	log  *bytes.Buffer
}

var (
	regMu    sync.Mutex
	services []*service
	mounts   []string
)

// commandLog records every command the harness runs, for RESULTS.md.
var (
	cmdLogMu sync.Mutex
	cmdLog   []string
	cmdSeen  = map[string]bool{}
)

// logCommand remembers the command line once, with the work directory
// abbreviated to $WORK so the list reads well.
func logCommand(args []string) {
	s := shellJoin(args)
	if binPath != "" && binShown != "" {
		s = strings.ReplaceAll(s, binPath, binShown)
	}
	if workDir != "" {
		s = strings.ReplaceAll(s, workDir, "$WORK")
	}
	for _, p := range portsInUse() {
		s = strings.ReplaceAll(s, ":"+p, ":$PORT")
		s = strings.ReplaceAll(s, " "+p+" ", " $PORT ")
		s = strings.ReplaceAll(s, "-p "+p, "-p $PORT")
	}
	cmdLogMu.Lock()
	defer cmdLogMu.Unlock()
	if !cmdSeen[s] {
		cmdSeen[s] = true
		cmdLog = append(cmdLog, s)
	}
}

var (
	portsMu sync.Mutex
	ports   []string
)

func portsInUse() []string {
	portsMu.Lock()
	defer portsMu.Unlock()
	return append([]string(nil), ports...)
}

func shellJoin(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"$&;|<>()*?") {
			out[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		} else {
			out[i] = a
		}
	}
	return strings.Join(out, " ")
}

// toolEnv puts /usr/bin first so the Debian libnbd tools are found before
// anything else on PATH, and the sbin directories for mkfs.
func toolEnv() []string {
	env := os.Environ()
	path := "/usr/bin:/usr/sbin:/bin:/sbin:" + os.Getenv("PATH")
	out := env[:0:0]
	for _, e := range env {
		if !strings.HasPrefix(e, "PATH=") {
			out = append(out, e)
		}
	}
	return append(append(out, "PATH="+path), extraEnv...)
}

// extraEnv is added to the environment of the next commands started; the
// profiler sets it around the start of the server it profiles.
var extraEnv []string

// run runs a command to completion and returns its stdout; stderr goes
// into the error when it fails.
func run(ctx context.Context, args ...string) ([]byte, error) {
	logCommand(args)
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = toolEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 2000 {
			msg = msg[len(msg)-2000:]
		}
		return stdout.Bytes(), fmt.Errorf("%s: %w: %s", shellJoin(args), err, msg)
	}
	return stdout.Bytes(), nil
}

// timed runs a command and returns its wall-clock time.
func timed(ctx context.Context, args ...string) (time.Duration, error) {
	start := time.Now()
	_, err := run(ctx, args...)
	return time.Since(start), err
}

// start launches a long-running process in its own process group.
func start(name string, args ...string) (*service, error) {
	logCommand(args)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = toolEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	s := &service{name: name, cmd: cmd, done: make(chan struct{}), log: &bytes.Buffer{}}
	cmd.Stdout, cmd.Stderr = &syncWriter{w: s.log}, &syncWriter{w: s.log}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() { cmd.Wait(); close(s.done) }()
	regMu.Lock()
	services = append(services, s)
	regMu.Unlock()
	return s, nil
}

type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func (s *service) exited() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

func (s *service) output() string {
	s.cmd.Stdout.(*syncWriter).mu.Lock()
	defer s.cmd.Stdout.(*syncWriter).mu.Unlock()
	return s.log.String()
}

// stop sends SIGTERM to the process group, then SIGKILL if it lingers.
func (s *service) stop() {
	if s.exited() {
		return
	}
	pg := -s.cmd.Process.Pid
	syscall.Kill(pg, syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(20 * time.Second):
		syscall.Kill(pg, syscall.SIGKILL)
		<-s.done
	}
	// Children that escaped the leader's exit.
	syscall.Kill(pg, syscall.SIGKILL)
}

// freePort asks the kernel for an unused loopback TCP port.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	p := l.Addr().(*net.TCPAddr).Port
	portsMu.Lock()
	ports = append(ports, strconv.Itoa(p))
	portsMu.Unlock()
	return p, nil
}

// waitTCP waits until something accepts connections on port.
func waitTCP(s *service, port int) error {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if s.exited() {
			return fmt.Errorf("%s exited: %s", s.name, strings.TrimSpace(s.output()))
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s: nothing listens on %s after 30s", s.name, addr)
}

// waitUnix waits until something accepts connections on the Unix socket.
func waitUnix(s *service, path string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if s.exited() {
			return fmt.Errorf("%s exited: %s", s.name, strings.TrimSpace(s.output()))
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s: nothing listens on %s after 30s", s.name, path)
}

// waitPath waits until path exists (a socket, or the file in a FUSE mount).
func waitPath(s *service, path string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if s.exited() {
			return fmt.Errorf("%s exited: %s", s.name, strings.TrimSpace(s.output()))
		}
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s: %s did not appear after 30s", s.name, path)
}

func addMount(dir string) {
	regMu.Lock()
	mounts = append(mounts, dir)
	regMu.Unlock()
}

// isMounted reports whether dir is a mount point, from /proc/self/mounts.
func isMounted(dir string) bool {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

// unmount detaches a FUSE mount, lazily if it is busy.
func unmount(dir string) error {
	if !isMounted(dir) {
		return nil
	}
	var err error
	for i := 0; i < 50; i++ {
		if _, err = run(context.Background(), "fusermount3", "-u", dir); err == nil || !isMounted(dir) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err2 := run(context.Background(), "fusermount3", "-u", "-z", dir); err2 != nil {
		return errors.Join(err, err2)
	}
	return err
}

// teardown unmounts every mount and stops every process the harness
// started, newest first. It is safe to call any number of times.
func teardown() {
	regMu.Lock()
	ms, ss := mounts, services
	mounts, services = nil, nil
	regMu.Unlock()
	for i := len(ms) - 1; i >= 0; i-- {
		if err := unmount(ms[i]); err != nil {
			warnf("unmount %s: %v", ms[i], err)
		}
	}
	for i := len(ss) - 1; i >= 0; i-- {
		ss[i].stop()
	}
}

func warnf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "harness: warning: "+format+"\n", args...)
}

// settleNote explains settle and prefault in RESULTS.md.
const settleNote = "Memory and cache state are the same for every target. Before each target's NBD and FUSE runs the harness " +
	"syncs and drops the page cache (`settle`); after the server is up, just before the first job, it touches and frees " +
	"%s of anonymous memory (`prefault`). fio never invalidates the cache (`--invalidate=0`, for the local file too), so " +
	"every read job reads data its target has just written, from the page cache. Why the prefault: these machines are VMs whose " +
	"balloon hands freed memory back to the host (free page reporting, 2 s after it is freed), and memory the guest touches " +
	"for the first time after that is slow (about 450 MiB/s here, against GB/s for memory already backed): a sequential write " +
	"into an empty image allocates page cache (or, for nbdkit memory, heap) and ran at 370–1300 MiB/s depending on what the " +
	"previous target had freed. Pages freed just before the job are reused first and are still backed, so every target's " +
	"writes land in the same, warm memory."

// settle makes the page cache state equal for the next target: dirty
// data written back, clean pages dropped. Without root it only syncs.
func settle(ctx context.Context) {
	_, _ = run(ctx, "sync")
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		warnf("settle: %v (measurements may depend on target order)", err)
	}
}

// prefault touches and frees cfg.prefault bytes of anonymous memory, so
// the allocations of the job that follows get memory the host backs
// already (see settleNote). It runs right before the first job of every
// target, after the server has started.
func prefault() {
	n := int(cfg.prefault)
	if n <= 0 {
		return
	}
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		warnf("prefault: %v", err)
		return
	}
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	if err := unix.Munmap(b); err != nil {
		warnf("prefault: %v", err)
	}
}
