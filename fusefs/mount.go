package fusefs

import (
	"fmt"
	"log"
	"log/slog"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sparsedisk/sparsedisk/blockif"
)

// MaxWrite is the largest read or write request the kernel sends: 1 MiB,
// the Linux FUSE cap (256 pages).
const MaxWrite = 1 << 20

// maxBackground is how many asynchronous requests (libaio / io_uring direct
// I/O, readahead) the kernel keeps in flight. The kernel default of 12 caps
// iodepth-16 workloads.
const maxBackground = 64

// attrTimeout is how long the kernel caches the file's attributes, and
// how long a space count from OnDiskBytes is reused.
const attrTimeout = time.Second

// Options configure New. The zero value is usable apart from Name. New
// copies what it needs, so an Options value may be reused or changed
// afterwards; it is plain data with no concurrency guarantees of its own.
type Options struct {
	// Name is the file name inside the mount point. Required.
	Name string
	// ReadOnly mounts read-only even when the Device is writable. A
	// read-only Device always gives a read-only mount.
	ReadOnly bool
	// AllowOther lets users other than the mounting one see the mount
	// (the FUSE allow_other option; non-root needs user_allow_other in
	// /etc/fuse.conf). Permission bits are enforced by the kernel
	// (default_permissions) either way, and the file starts as 0600
	// (0400 read-only), so other users can open it only after a
	// deliberate chmod.
	AllowOther bool
	// FsName is shown as the source in /proc/mounts and df; default "sparsedisk".
	FsName string
	// Logger receives request errors; nil discards them.
	Logger *slog.Logger
	// Debug logs every FUSE request (very verbose) through Logger.
	Debug bool
}

// Mount is a mounted disk. Its methods are safe for concurrent use.
type Mount struct {
	dir    string
	server *fuse.Server
	file   *diskFile
}

// New mounts b at dir, which must be an existing directory, as the single
// file o.Name, and starts serving in the background. Call Wait to block
// until the file system is unmounted (by Unmount, umount(8) or
// fusermount3 -u).
func New(dir string, b blockif.Device, o *Options) (*Mount, error) {
	if o == nil {
		o = &Options{}
	}
	if err := checkName(o.Name); err != nil {
		return nil, err
	}
	st, err := os.Stat(dir)
	if err != nil || !st.IsDir() {
		if err == nil {
			err = fmt.Errorf("%s: %w", dir, syscall.ENOTDIR)
		}
		return nil, fmt.Errorf("%w: %w", ErrNoMountpoint, err)
	}
	if fd, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoFUSE, err)
	} else {
		fd.Close()
	}
	logger := o.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	ro := o.ReadOnly || b.ReadOnly()
	now := time.Now()
	f := &diskFile{
		b:        b,
		name:     o.Name,
		readOnly: ro,
		log:      logger,
		uid:      uint32(os.Getuid()),
		gid:      uint32(os.Getgid()),
		started:  now,
		mode:     0o600, // the disk is private to the mount owner; chmod widens it
		atime:    now,
	}
	if ro {
		f.mode = 0o400
	}
	f.mtime.Store(now.UnixNano())
	fsName := o.FsName
	if fsName == "" {
		fsName = "sparsedisk"
	}
	mountOpts := []string{"default_permissions"}
	if ro {
		mountOpts = append(mountOpts, "ro")
	}
	entryTimeout := time.Hour // the one name never changes
	attrTTL := attrTimeout
	opts := &fs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther:    o.AllowOther,
			Options:       mountOpts,
			MaxWrite:      MaxWrite,
			MaxBackground: maxBackground,
			FsName:        fsName,
			Name:          "sparsedisk",
			DirectMount:   true, // falls back to fusermount3 when not permitted
			DisableXAttrs: true,
			Debug:         o.Debug,
			Logger:        log.New(slogWriter{logger}, "", 0),
			// Direct I/O on the file, yet shared mmap must work: the
			// kernel allows it only with this capability. ASYNC_DIO lets
			// libaio/io_uring keep several direct requests in flight.
			ExtraCapabilities: fuse.CAP_DIRECT_IO_ALLOW_MMAP | fuse.CAP_ASYNC_DIO,
		},
		RootStableAttr:  &fs.StableAttr{Mode: syscall.S_IFDIR, Ino: 1},
		EntryTimeout:    &entryTimeout,
		AttrTimeout:     &attrTTL,
		NegativeTimeout: &entryTimeout,
		UID:             f.uid,
		GID:             f.gid,
	}
	// As fs.Mount does, with the node file system wrapped so synchronous
	// writes are made durable (see syncWrites).
	raw := syncWrites{RawFileSystem: fs.NewNodeFS(&root{file: f}, opts), file: f}
	server, err := fuse.NewServer(raw, dir, &opts.MountOptions)
	if err != nil {
		return nil, fmt.Errorf("sparsedisk/fusefs: mount %s: %w", dir, err)
	}
	go server.Serve()
	if err := server.WaitMount(); err != nil {
		return nil, fmt.Errorf("sparsedisk/fusefs: mount %s: %w", dir, err)
	}
	return &Mount{dir: dir, server: server, file: f}, nil
}

// syncWrites makes writes that the caller asked to be synchronous durable
// before they are acknowledged: writes through a descriptor opened with
// O_SYNC or O_DSYNC, and pwritev2 with RWF_SYNC or RWF_DSYNC. With direct
// I/O (openFlags) the kernel does not follow such a write with an FSYNC
// request, as it does for page-cache writes; it only marks the WRITE
// request's flags, which go-fuse's node API does not pass on. qemu's
// cache=writethrough and cache=directsync rely on these semantics.
type syncWrites struct {
	fuse.RawFileSystem
	file *diskFile
}

func (s syncWrites) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	n, st := s.RawFileSystem.Write(cancel, in, data)
	return s.file.syncAfterWrite(in.Flags, n, st)
}

func (s syncWrites) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	n, st := s.RawFileSystem.Writev(cancel, in, data)
	return s.file.syncAfterWrite(in.Flags, n, st)
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || len(name) > 255 {
		return fmt.Errorf("%w: %q", ErrBadName, name)
	}
	return nil
}

// Dir returns the mount point.
func (m *Mount) Dir() string { return m.dir }

// Path returns the path of the disk file inside the mount point.
func (m *Mount) Path() string { return m.dir + "/" + m.file.name }

// ReadOnly reports whether the mount refuses writes.
func (m *Mount) ReadOnly() bool { return m.file.readOnly }

// Wait blocks until the file system is unmounted and every request has
// been answered.
func (m *Mount) Wait() { m.server.Wait() }

// Unmount asks the kernel to unmount. It fails with EBUSY while the file is
// open or the mount point is some process's working directory; Wait returns
// once it succeeds.
func (m *Mount) Unmount() error {
	if err := m.server.Unmount(); err != nil {
		return fmt.Errorf("sparsedisk/fusefs: unmount %s: %w", m.dir, err)
	}
	return nil
}

// slogWriter adapts go-fuse's *log.Logger output to slog at debug level.
type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.l.Debug(strings.TrimRight(string(p), "\n"), "component", "go-fuse")
	return len(p), nil
}
