package nbd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/internal/vmtest"
	"github.com/sparsedisk/sparsedisk/lut"
)

// vmInit is the guest's /init: load the virtio and ext4 modules, mount the
// export's ext4, write a file with its checksum, write and delete a
// scratch file, fstrim, unmount, power off.
const vmInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4; do
	insmod /lib/modules/$m.ko || echo "VM-FAIL insmod $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt; then
	head -c 3145728 /dev/urandom > /mnt/file
	sha256sum /mnt/file | cut -d' ' -f1 > /mnt/file.sha256
	sync
	dd if=/dev/urandom of=/mnt/scratch bs=1048576 count=48 2>/dev/null
	sync
	rm /mnt/scratch
	sync
	fstrim -v /mnt
	umount /mnt && echo VM-DONE
else
	echo "VM-FAIL mount"
fi
poweroff -f
`

// TestVMOnExport boots a Debian kernel under qemu TCG with the export as
// its virtio disk (cache=writeback, discard=unmap). The guest writes a
// file on ext4, writes and deletes a scratch file and runs fstrim. The
// host then checks the image, that the scratch space was released from
// the segments, e2fsck -fn, and the file's checksum.
func TestVMOnExport(t *testing.T) {
	if testing.Short() {
		t.Skip("VM boot skipped in -short mode")
	}
	qemu := testutil.NeedTool(t, "qemu-system-x86_64")
	mkfs := testutil.NeedTool(t, "mkfs.ext4")
	e2fsck := testutil.NeedTool(t, "e2fsck")
	debugfs := testutil.NeedTool(t, "debugfs")
	kernel, modDir, err := vmtest.Kernel()
	if err != nil {
		testutil.Unavailable(t, "%v", err)
	}
	files, err := vmtest.Base(vmInit, modDir, strings.Fields("virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4")...)
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	initrd := filepath.Join(tmp, "initrd")
	if err := os.WriteFile(initrd, vmtest.Initramfs(files), 0o644); err != nil {
		t.Fatal(err)
	}

	// The disk: ext4 made on the host, copied into a sparse image. 4 KiB
	// blocks: with 1 KiB blocks this guest kernel's FITRIM reports
	// "0 bytes trimmed" and sends no discard at all, whatever the device.
	const size = 256 * mib
	raw := filepath.Join(tmp, "fs.raw")
	f, _ := os.Create(raw)
	f.Truncate(size)
	f.Close()
	run(t, mkfs, "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", raw)
	d := newImage(t, size, 4*mib, 4096, false, lut.Xhyve)
	// Once the server has stopped (its cleanup runs before this one), the
	// image must check without a single finding: no corruption and no
	// leaked slot from the guest's trims.
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		r, err := blockif.Check(d.Path(), nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range r.Findings {
			if f.Kind != blockif.Advice {
				t.Errorf("check: %s", f)
			}
		}
	})
	copyIn(t, raw, d)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	before, err := d.Stats()
	if err != nil {
		t.Fatal(err)
	}

	srv, addr := startServer(t, Config{}, Export{Name: "vm", Backend: d})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu, vmtest.QemuArgs(kernel, initrd, 512,
		"-drive", "file=nbd://"+addr+"/,format=raw,if=virtio,cache=writeback,discard=unmap")...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	t.Logf("VM ran %v", time.Since(start).Round(time.Second))
	if testing.Verbose() {
		t.Logf("VM console:\n%s", out)
	}
	if err != nil || !strings.Contains(string(out), "VM-DONE") || strings.Contains(string(out), "VM-FAIL") {
		t.Fatalf("VM: %v\n%s", err, out)
	}
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	if err := srv.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}

	after, err := d.Stats()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("allocated before %d, after %d; on disk before %d, after %d", before.AllocatedBytes, after.AllocatedBytes, before.OnDiskBytes, after.OnDiskBytes)
	// 3 MiB file + checksum + metadata; the 48 MiB scratch must be gone
	// from the LUT and from the segment files.
	if grew := after.AllocatedBytes - before.AllocatedBytes; grew > 8*mib {
		t.Errorf("allocation grew by %d bytes: scratch space not released", grew)
	}
	if grew := after.OnDiskBytes - before.OnDiskBytes; grew > 8*mib {
		t.Errorf("segments grew by %d bytes on disk: scratch space not punched", grew)
	}

	out2 := filepath.Join(tmp, "after.raw")
	copyOut(t, d, out2)
	run(t, e2fsck, "-fn", out2)
	cat := func(name string) []byte {
		out, err := exec.Command(debugfs, "-R", "cat "+name, out2).Output()
		if err != nil {
			t.Fatalf("debugfs cat %s: %v", name, err)
		}
		return out
	}
	content := cat("/file")
	sum := strings.TrimSpace(string(cat("/file.sha256")))
	got := sha256.Sum256(content)
	if len(content) != 3*int(mib) || hex.EncodeToString(got[:]) != sum {
		t.Fatalf("guest file: %d bytes, sha256 %x, guest said %q", len(content), got, sum)
	}
}

// copyIn writes the non-zero MiB chunks of a raw file into d.
func copyIn(t *testing.T, raw string, d blockif.Device) {
	t.Helper()
	data, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	zero := make([]byte, mib)
	for off := 0; off < len(data); off += int(mib) {
		chunk := data[off:min(off+int(mib), len(data))]
		if bytes.Equal(chunk, zero[:len(chunk)]) {
			continue
		}
		if _, err := d.WriteAt(chunk, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
}

// copyOut writes d into a sparse raw file.
func copyOut(t *testing.T, d blockif.Device, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(d.Size())
	buf := make([]byte, mib)
	for off := int64(0); off < d.Size(); off += mib {
		n := min(mib, d.Size()-off)
		if _, err := d.ReadAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf[:n], make([]byte, n)) {
			f.WriteAt(buf[:n], off)
		}
	}
}
