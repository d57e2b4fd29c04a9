// Package fusefs exposes a sparsedisk image through FUSE as one ordinary,
// fixed-size regular file, so that every tool taking a raw image (qemu
// format=raw, losetup plus a real file system, dd, cp --sparse, backup
// tools) can use it. It is built on github.com/hanwen/go-fuse/v2 and named
// fusefs so it does not clash with go-fuse's own fuse and fs packages.
//
// # Design
//
// The mount root is a directory holding exactly one regular file whose
// size is the disk size. The file is backed by a [blockif.Device], a small
// interface (ReadAt, WriteAt, Flush, Trim, WriteZeroes, Extents, Size,
// ReadOnly) that *blockif.Disk satisfies; tests also use an in-memory one.
// File operations map one to one onto it:
//
//   - read/write at any offset inside the disk. A write starting at or past
//     the end fails with ENOSPC; one straddling the end is cut short there,
//     as on a block device. The file never grows.
//   - fsync and fdatasync both call Device.Flush, which is global: every
//     write acknowledged before the fsync, through any descriptor, is
//     durable when it returns (the engine's durability contract).
//   - a write the caller asked to be synchronous (a descriptor opened with
//     O_SYNC or O_DSYNC, pwritev2 with RWF_SYNC or RWF_DSYNC) calls
//     Device.Flush before it is acknowledged. With direct I/O the kernel
//     sends no FSYNC for these; it only sets the WRITE request's flags,
//     which the mount reads below go-fuse's node API (syncWrites).
//   - close(2) does not flush the engine; close promises no durability and
//     tools that open and close often would pay a sync each time. Opens are
//     answered with FOPEN_NOFLUSH, so the kernel (5.16 and later) does not
//     even send the FLUSH request: close never waits for the server, and a
//     process exiting with the file open cannot hang on a server that is
//     gone. The mount command flushes and closes the image once the file
//     system is unmounted.
//   - fallocate(PUNCH_HOLE|KEEP_SIZE) is Trim; fallocate(ZERO_RANGE), with
//     or without KEEP_SIZE, is WriteZeroes. Both free the space. Other modes,
//     plain preallocation included, are EOPNOTSUPP (there is nothing to
//     reserve: space is taken on first non-zero write).
//   - lseek(SEEK_DATA/SEEK_HOLE) is answered from Device.Extents, so
//     cp --sparse, qemu-img and tar skip holes without reading them.
//   - st_blocks is the space the image's files take on the host: for
//     *blockif.Disk its OnDiskBytes, the allocated blocks of the segment
//     files plus the descriptor and the LUT, whatever the layout (one stat
//     per file; the LUT is not read, so its lazy loading is kept). du of
//     the exposed file thus equals du of the image files: it includes the
//     LUT (a fixed 1/1024 of the disk size with 4 KiB sectors) and slots
//     freed only by a later shrink, and a split or raw image counts what
//     its sparse files really hold, not its full size. statfs reports the
//     disk size as the total and the same count as used. A Device without
//     OnDiskBytes is counted from its allocated Extents instead.
//   - truncate (and open with O_TRUNC) to any size other than the current
//     one fails with EPERM ([ErrSizeFixed]): the size belongs to the image
//     and changes only through an explicit offline resize. Owner changes
//     are EPERM too; mode and times may change and live as long as the
//     mount.
//   - the file belongs to the mounting user and is mode 0600 (0400 when
//     read-only): even with allow_other, other local users cannot read or
//     write the disk until the owner chmods the file on purpose.
//   - a read-only mount (or image) is mounted "ro" and also refuses opens
//     for writing, writes and fallocate itself with EROFS.
//
// Engine errors reach applications through one translator, [Errno]:
// read-only → EROFS, out of range and a full host disk → ENOSPC, quota →
// EDQUOT, invalid arguments → EINVAL, corruption and anything unknown → EIO.
//
// Kernel caching is chosen for a disk, not for a document. Every open gets
// FOPEN_DIRECT_IO: reads and writes bypass the FUSE page cache and reach
// the engine as issued, in requests of up to 1 MiB (max_write and max_read
// are [MaxWrite]). The engine already sits on the host page cache of its
// segment files, so a second cache above it would only double the memory
// and the copies; the guests and file systems that use disk images run
// their own caches anyway. With direct I/O:
//
//   - FOPEN_PARALLEL_DIRECT_WRITES is set, otherwise the kernel takes the
//     inode lock for each write and serialises them.
//   - CAP_ASYNC_DIO is requested so libaio and io_uring keep several
//     requests in flight (max_background is raised from 12 to 64).
//   - CAP_DIRECT_IO_ALLOW_MMAP is requested, without which the kernel
//     refuses shared writable mmap on a direct-I/O file (Linux 6.6 and
//     later grant it). Pages of such a mapping do live in the page cache;
//     msync or fsync writes them back before the FSYNC request reaches
//     us, so fsync covers mapped writes too (close does not write them
//     back; the kernel's writeback and the unmount do).
//
// A process must not fault on a mapping of a file it serves itself: the
// faulting goroutine sleeps in the kernel, uninterruptibly, until the
// server answers, yet the Go runtime counts it as running, so a garbage
// collection that must stop every goroutine waits for it for ever while
// the server goroutines wait for the collection. Map the file from another
// process (the package's tests do). Plain system calls on the file are safe.
//
// What fsync guarantees: a write(2) returns only after the engine's WriteAt
// returned, so no acknowledged data sits in a kernel cache of ours; fsync
// then makes all of it durable. Without fsync, data written is in the
// engine (the host page cache of its segment files), survives the mount
// process being killed, but not a host crash. With the --sync option of the
// command (blockif Options.Sync) every write is durable before it returns.
//
// The attribute timeout is one second (the size never changes); the space
// count behind st_blocks and statfs is reused for as long, so st_blocks may
// lag by up to two seconds. The single directory entry is cached for an
// hour.
// Xattrs are disabled. The mount uses default_permissions so the kernel
// enforces the file's mode bits, which matters with allow_other.
//
// # Concurrency
//
// go-fuse serves each request on its own goroutine and the kernel issues
// reads and writes in parallel (async reads, parallel direct writes, async
// direct I/O), so a Device must be safe for concurrent use; the package
// adds no lock on the data path. Ordering between overlapping concurrent
// requests is whatever the Device gives, as on a real disk. The only
// mutable state of the file is cosmetic (mode, atime under a mutex, mtime in
// an atomic). [Mount] is safe for concurrent use; [Errno] is a pure
// function.
package fusefs
