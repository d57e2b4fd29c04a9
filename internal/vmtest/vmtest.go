// Package vmtest builds what the tests need to boot a throw-away Linux
// guest under qemu (TCG, no KVM needed): the Debian kernel unpacked by
// scripts/deps.sh, an initramfs holding busybox, the test's /init,
// kernel modules and host binaries with their shared libraries. It is
// used by tests only.
//
// # Concurrency
//
// The functions are pure or touch only their arguments and the files they
// read; they are safe for concurrent use.
package vmtest

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// Busybox is the static busybox the guest's /init runs under.
const Busybox = "/bin/busybox"

// KernelDir is where scripts/deps.sh unpacks the Debian kernel package:
// $SPARSEDISK_VM_KERNEL_DIR, else the user cache's sparsedisk/vmkernel.
func KernelDir() string {
	if d := os.Getenv("SPARSEDISK_VM_KERNEL_DIR"); d != "" {
		return d
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	return filepath.Join(cache, "sparsedisk", "vmkernel")
}

// Kernel returns the kernel image and its modules' directory, or an error
// saying what is missing (the kernel, or a static busybox).
func Kernel() (vmlinuz, modDir string, err error) {
	kdir := KernelDir()
	kernels, _ := filepath.Glob(filepath.Join(kdir, "boot", "vmlinuz-*"))
	if !StaticELF(Busybox) || len(kernels) == 0 {
		return "", "", fmt.Errorf("the VM tests need busybox-static (a static %s) and a Debian kernel unpacked in %s (scripts/deps.sh, nbd/testdata/vm/fetch-kernel.sh)", Busybox, kdir)
	}
	vmlinuz = kernels[0]
	modDir = filepath.Join(kdir, "lib", "modules", strings.TrimPrefix(filepath.Base(vmlinuz), "vmlinuz-"), "kernel")
	return vmlinuz, modDir, nil
}

// File is one entry of an initramfs. Directories leading to it are added
// by Initramfs.
type File struct {
	Name string // path inside the archive, without a leading slash
	Mode uint32 // file type and permission bits, as in stat(2)
	Data []byte
}

// Module returns the file of kernel module name (without ".ko") found
// under modDir, stored as lib/modules/NAME.ko.
func Module(modDir, name string) (File, error) {
	var found string
	_ = filepath.WalkDir(modDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Name() == name+".ko" {
			found = p
		}
		return nil
	})
	if found == "" {
		return File{}, fmt.Errorf("module %s not found under %s", name, modDir)
	}
	data, err := os.ReadFile(found)
	if err != nil {
		return File{}, err
	}
	return File{Name: "lib/modules/" + name + ".ko", Mode: 0o100644, Data: data}, nil
}

// Binary returns the host executable at p and, for a dynamically linked
// one, the shared libraries and loader ldd lists for it, each at its
// host path.
func Binary(p string) ([]File, error) {
	data, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	files := []File{{Name: strings.TrimPrefix(p, "/"), Mode: 0o100755, Data: data}}
	if StaticELF(p) {
		return files, nil
	}
	out, err := exec.Command("ldd", p).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", p, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		var lib string
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			lib = f[2]
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			lib = f[0] // the loader
		default:
			continue
		}
		data, err := os.ReadFile(lib)
		if err != nil {
			return nil, err
		}
		files = append(files, File{Name: strings.TrimPrefix(lib, "/"), Mode: 0o100755, Data: data})
	}
	return files, nil
}

// Initramfs returns a cpio archive in the "newc" format holding files,
// preceded by every directory they need (mode 0755). Later files replace
// earlier ones of the same name.
func Initramfs(files []File) []byte {
	byName := map[string]File{}
	for _, f := range files {
		byName[f.Name] = f
		for d := path.Dir(f.Name); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := byName[d]; !ok {
				byName[d] = File{Name: d, Mode: 0o40755}
			}
		}
	}
	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, n)
	}
	sort.Strings(names) // a parent sorts before its children
	var b bytes.Buffer
	pad := func() {
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
	}
	add := func(ino int, f File) {
		fmt.Fprintf(&b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, f.Mode, 0, 0, 1, 0, len(f.Data), 0, 0, 0, 0, len(f.Name)+1, 0)
		b.WriteString(f.Name)
		b.WriteByte(0)
		pad()
		b.Write(f.Data)
		pad()
	}
	for i, n := range names {
		add(i+1, byName[n])
	}
	add(len(names)+1, File{Name: "TRAILER!!!"})
	return b.Bytes()
}

// Base returns the files every guest needs: busybox as /bin/busybox and
// init as /init, plus the named modules from modDir.
func Base(init, modDir string, modules ...string) ([]File, error) {
	bb, err := os.ReadFile(Busybox)
	if err != nil {
		return nil, err
	}
	files := []File{
		{Name: "proc", Mode: 0o40755}, {Name: "sys", Mode: 0o40755}, {Name: "dev", Mode: 0o40755},
		{Name: "bin/busybox", Mode: 0o100755, Data: bb},
		{Name: "init", Mode: 0o100755, Data: []byte(init)},
	}
	for _, m := range modules {
		f, err := Module(modDir, m)
		if err != nil {
			return nil, err
		}
		files = append(files, f)
	}
	return files, nil
}

// StaticELF reports whether path is an ELF executable without a program
// interpreter, i.e. one that runs in an initramfs without a libc.
func StaticELF(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// QemuArgs are the arguments that boot kernel with initrd under TCG with
// memMiB of memory, the serial console on stdio and no reboot, followed
// by extra (drives, …). The guest should power off when done.
func QemuArgs(kernel, initrd string, memMiB int, extra ...string) []string {
	args := []string{"-accel", "tcg", "-m", fmt.Sprint(memMiB), "-smp", "1",
		"-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 loglevel=3"}
	return append(args, extra...)
}
