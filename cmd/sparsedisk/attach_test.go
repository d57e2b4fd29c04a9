package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
)

func TestAttachArgs(t *testing.T) {
	img := newTestImage(t, "a.img", 1<<20)
	missing := "/dev/nbd-sparsedisk-test-missing"
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"attach"}, "IMAGE and /dev/nbdX"},
		{[]string{"attach", img}, "IMAGE and /dev/nbdX"},
		{[]string{"attach", img, missing}, "modprobe nbd"},
		{[]string{"attach", img, "/dev/null"}, "not a block device"},
		{[]string{"detach"}, "takes /dev/nbdX"},
		{[]string{"detach", missing}, "modprobe nbd"},
	}
	for _, tc := range cases {
		_, stderr, code := sdRun(t, tc.args...)
		if code == 0 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q, want it to mention %q", tc.args, code, stderr, tc.want)
		}
	}
	if got := kernelBlockSize(65536); got != 4096 {
		t.Errorf("kernelBlockSize(65536) = %d", got)
	}
	if got := kernelBlockSize(512); got != 512 {
		t.Errorf("kernelBlockSize(512) = %d", got)
	}
}

// TestAttachDetach attaches an image to /dev/nbd0 through the kernel,
// writes through the device, detaches, and checks the image.
func TestAttachDetach(t *testing.T) {
	const dev = "/dev/nbd0"
	if _, err := os.Stat(dev); err != nil {
		t.Skipf("%s not present (%v): the nbd kernel module is not loaded on this machine (modprobe nbd), so the kernel client cannot be exercised", dev, err)
	}
	if os.Geteuid() != 0 {
		t.Skipf("%s exists but attaching needs root", dev)
	}
	img := newTestImage(t, "kern.img", 32<<20)
	cmd, _, stderr := attachChild(t, img, dev)
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("sparsedisk!!"), 4096*4/12+1)[:4096*4]
	if _, err := f.WriteAt(data, 3<<20); err != nil {
		t.Fatal(err)
	}
	f.Sync()
	f.Close()
	out, _, code := sdRun(t, "detach", dev)
	if code != 0 || !strings.Contains(out, "detached") {
		t.Fatalf("detach: %d %q", code, out)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("attach exited with %v\n%s", err, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("attach did not exit after detach\n%s", stderr)
	}
	requireClean(t, img, true)
	d, err := blockif.Open(img, &blockif.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, len(data))
	d.ReadAt(got, 3<<20)
	if !bytes.Equal(got, data) {
		t.Fatal("data written through /dev/nbd0 not in the image")
	}
}

// attachChild runs `sparsedisk attach IMAGE DEV` as a child process and
// waits until it reports the device attached.
func attachChild(t *testing.T, img, dev string) (*exec.Cmd, string, *testutil.SyncBuffer) {
	t.Helper()
	cmd := testutil.ChildCommand(childSparsedisk, nil, "attach", img, dev)
	stdout, stderr := &testutil.SyncBuffer{}, &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			// Detach gracefully; kill only if it does not exit.
			cmd.Process.Signal(syscall.SIGTERM)
			exited := make(chan struct{})
			go func() { cmd.Wait(); close(exited) }()
			select {
			case <-exited:
			case <-time.After(testutil.WaitTimeout):
				cmd.Process.Kill()
				<-exited
			}
		}
	})
	if err := testutil.Await(testutil.WaitTimeout, func() bool { return strings.Contains(stdout.String(), "attached") }); err != nil {
		t.Fatalf("attach did not report success: %v\nstderr:\n%s", err, stderr)
	}
	return cmd, stdout.String(), stderr
}
