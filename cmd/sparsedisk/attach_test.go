package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/internal/vmtest"
	"github.com/sparsedisk/sparsedisk/nbd"
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
	for _, tc := range []struct {
		want, min, pref, got uint32
		err                  string
	}{
		{0, 1, 65536, 4096, ""}, // 64 KiB sectors: the kernel's largest
		{0, 1, 512, 512, ""},
		{0, 1, 4096, 4096, ""},
		{512, 1, 4096, 512, ""}, // any alignment: a 512-byte device on 4 KiB sectors
		{0, 4096, 512, 4096, ""},
		{512, 4096, 4096, 0, "below the export's minimum"},
		{0, 8192, 8192, 0, "kernel NBD driver supports"},
		{1000, 1, 4096, 0, "power of two"},
		{8192, 1, 4096, 0, "power of two"},
	} {
		got, err := kernelBlockSize(tc.want, nbd.ExportInfo{MinBlock: tc.min, PrefBlock: tc.pref})
		if got != tc.got || (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("kernelBlockSize(%d, min %d, pref %d) = %d, %v; want %d, %q", tc.want, tc.min, tc.pref, got, err, tc.got, tc.err)
		}
	}
}

// TestAttachDetach attaches an image to /dev/nbd0 through the kernel,
// writes through the device, detaches, and checks the image. Where this
// machine has no nbd module (or the test is not root), the same
// happens inside a qemu guest instead (attachInVM).
func TestAttachDetach(t *testing.T) {
	const dev = "/dev/nbd0"
	if _, err := os.Stat(dev); err != nil || os.Geteuid() != 0 {
		t.Logf("%s not usable here (%v, uid %d): the kernel path runs in the guest of TestAttachInVM", dev, err, os.Geteuid())
		attachInVM(t)
		return
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

// attachGuestInit is the /init of the attach guest. For each case (image
// sector size, device block size given to attach, ext4 block size) it
// creates an image on the guest's tmpfs, attaches it to /dev/nbd0, makes
// ext4, writes files with fsync, writes and deletes a scratch file,
// fstrims, unmounts and detaches; then checks the image with `sparsedisk
// check`, attaches it again read-only, runs e2fsck -fn and compares the
// files' checksums. Every step prints a VM- line the host checks; the
// kernel log is printed at the end between markers.
const attachGuestInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /mnt
mount -t tmpfs -o size=400m tmpfs /tmp
for m in crc16 mbcache jbd2 crc32c_generic ext4 nbd; do
	insmod /lib/modules/$m.ko || echo "VM-FAIL insmod $m"
done
i=0
while [ ! -b /dev/nbd0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done

# attach IMAGE [FLAGS]: start sparsedisk attach in the background and wait
# until it reports the device attached.
attach() {
	img=$1; shift
	: > /tmp/attach.out
	sparsedisk attach "$@" $img /dev/nbd0 > /tmp/attach.out 2> /tmp/attach.err &
	apid=$!
	i=0
	while ! grep -q attached /tmp/attach.out; do
		sleep 0.1; i=$((i+1))
		if [ $i -gt 600 ] || ! kill -0 $apid 2>/dev/null; then
			echo "VM-FAIL attach $img: $(cat /tmp/attach.err)"; return 1
		fi
	done
}

# detach: sparsedisk detach, then wait for the attach process's exit status.
detach() {
	sparsedisk detach /dev/nbd0 > /dev/null || echo "VM-FAIL detach"
	wait $apid
	rc=$?
	[ $rc -eq 0 ] || { echo "VM-FAIL attach exit $rc: $(cat /tmp/attach.err)"; }
}

run_case() {
	name=$1 sector=$2 fsblock=$3; shift 3
	img=/tmp/$name.img
	sparsedisk create $img size=96m split=32m sectorsize=$sector > /dev/null || { echo "VM-FAIL create $name"; return; }
	attach $img "$@" || return
	echo "VM-LBS $name $(cat /sys/block/nbd0/queue/logical_block_size) discard $(cat /sys/block/nbd0/queue/discard_granularity)"
	mkfs.ext4 -q -F -b $fsblock -E lazy_itable_init=0,lazy_journal_init=0 /dev/nbd0 || echo "VM-FAIL mkfs $name"
	mount -t ext4 /dev/nbd0 /mnt || { echo "VM-FAIL mount $name"; detach; return; }
	dd if=/dev/urandom of=/mnt/a bs=4096 count=300 conv=fsync 2>/dev/null || echo "VM-FAIL write a $name"
	dd if=/dev/urandom of=/mnt/odd bs=1000 count=7 conv=fsync 2>/dev/null || echo "VM-FAIL write odd $name"
	mkdir /mnt/dir && echo "hello $name" > /mnt/dir/small && sync
	(cd /mnt && sha256sum a odd dir/small) > /tmp/$name.sums
	dd if=/dev/urandom of=/mnt/scratch bs=65536 count=256 conv=fsync 2>/dev/null || echo "VM-FAIL write scratch $name"
	rm /mnt/scratch && sync
	echo "VM-FSTRIM $name $(fstrim -v /mnt 2>&1)"
	umount /mnt || echo "VM-FAIL umount $name"
	detach
	echo "VM-INFO $name $(sparsedisk info $img | tr '
' ' ')"
	sparsedisk check $img > /tmp/check.out 2>&1
	rc=$?
	[ $rc -eq 0 ] || echo "VM-FAIL check $name exit $rc: $(cat /tmp/check.out)"
	attach $img --read-only "$@" || return
	e2fsck -fn /dev/nbd0 > /tmp/fsck.out 2>&1 || echo "VM-FAIL e2fsck $name: $(cat /tmp/fsck.out)"
	mount -t ext4 -o ro /dev/nbd0 /mnt || { echo "VM-FAIL mount ro $name"; detach; return; }
	(cd /mnt && sha256sum -c /tmp/$name.sums > /dev/null) || echo "VM-FAIL content $name"
	umount /mnt
	detach
	echo "VM-CASE-OK $name"
}

run_case s4096 4096 4096
run_case s4096-lbs512 4096 1024 --block-size 512
run_case s512 512 1024
run_case s4096-strict 4096 4096 --min-block 4096
echo VM-DMESG-BEGIN
dmesg
echo VM-DMESG-END
echo VM-DONE
poweroff -f
`

// attachCases are the run_case names of attachGuestInit.
var attachCases = []string{"s4096", "s4096-lbs512", "s512", "s4096-strict"}

// attachInVM boots the Debian kernel of the VM tests under qemu TCG with
// a static sparsedisk binary and the host's mkfs.ext4 and e2fsck in the
// initramfs, and runs attachGuestInit there.
func attachInVM(t *testing.T) {
	qemu := testutil.NeedTool(t, "qemu-system-x86_64")
	kernel, modDir, err := vmtest.Kernel()
	if err != nil {
		testutil.Unavailable(t, "%v", err)
	}
	tmp := t.TempDir()
	bin := filepath.Join(tmp, "sparsedisk")
	build := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build a static sparsedisk: %v\n%s", err, out)
	}
	files, err := vmtest.Base(attachGuestInit, modDir, "crc16", "mbcache", "jbd2", "crc32c_generic", "ext4", "nbd")
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, vmtest.File{Name: "bin/sparsedisk", Mode: 0o100755, Data: data})
	for _, tool := range []string{"mkfs.ext4", "e2fsck"} {
		fs, err := vmtest.Binary(testutil.NeedTool(t, tool))
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, fs...)
	}
	if conf, err := os.ReadFile("/etc/mke2fs.conf"); err == nil {
		files = append(files, vmtest.File{Name: "etc/mke2fs.conf", Mode: 0o100644, Data: conf})
	}
	initrd := filepath.Join(tmp, "initrd")
	if err := os.WriteFile(initrd, vmtest.Initramfs(files), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, qemu, vmtest.QemuArgs(kernel, initrd, 768)...).CombinedOutput()
	console := string(out)
	t.Logf("VM ran %v", time.Since(start).Round(time.Second))
	for _, line := range strings.Split(console, "\n") {
		if strings.HasPrefix(line, "VM-") && !strings.HasPrefix(line, "VM-DMESG") {
			t.Log(strings.TrimSpace(line))
		}
	}
	if err != nil || !strings.Contains(console, "VM-DONE") || strings.Contains(console, "VM-FAIL") {
		t.Fatalf("VM: %v\n%s", err, console)
	}
	for _, c := range attachCases {
		if !strings.Contains(console, "VM-CASE-OK "+c+"\n") && !strings.Contains(console, "VM-CASE-OK "+c+"\r") {
			t.Errorf("case %s did not finish", c)
		}
	}
	if !strings.Contains(console, "VM-LBS s4096-lbs512 512 ") || !strings.Contains(console, "VM-LBS s4096 4096 ") {
		t.Errorf("the devices' logical block sizes are not what attach asked for")
	}
	// fstrim released the 16 MiB scratch file: what stays allocated is
	// the files (1.2 MiB), the metadata mkfs wrote and the journal's used
	// part.
	for _, m := range regexp.MustCompile(`VM-INFO (\S+) .*?allocated: +(\d+)`).FindAllStringSubmatch(console, -1) {
		if n, _ := strconv.ParseInt(m[2], 10, 64); n > 8<<20 {
			t.Errorf("case %s: %d bytes allocated after fstrim: the scratch file's space was not released", m[1], n)
		}
	}
	// No I/O error of any kind in the guest kernel's log: the device never
	// sent a request the export refused.
	dmesg := console[strings.Index(console, "VM-DMESG-BEGIN"):strings.Index(console, "VM-DMESG-END")]
	if !strings.Contains(dmesg, "EXT4-fs (nbd0)") {
		t.Fatalf("the guest's kernel log does not show the ext4 mounts: not captured?\n%s", dmesg)
	}
	for _, line := range strings.Split(dmesg, "\n") {
		l := strings.ToLower(line)
		if strings.Contains(l, "error") || strings.Contains(l, "nbd0: other side returned") || strings.Contains(l, "critical") {
			t.Errorf("guest kernel: %s", strings.TrimSpace(line))
		}
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
