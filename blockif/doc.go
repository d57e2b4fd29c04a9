// Package blockif is the sparsedisk online engine: one [Disk] type that
// serves a virtual disk stored in one of three layouts, with the
// durability contract of FORMAT.md; [Check], the one consistency check of
// an image; and [Device], the interface the frontends (nbd, fusefs) serve,
// which *Disk satisfies.
//
// # On-disk format
//
// The engine reads and writes images in the format of package format
// (FORMAT.md at the repository root is the reference): a descriptor, the
// segment files (package segment) and, in the sparse layout, the LUT
// (package lut). The offline tools that rewrite images (shrink, resize,
// convert, repair, adopt) live in package offline; Open finishes what an
// interrupted one left (format.FinishIntent) before it looks at the files.
//
// # Design
//
// Reads look up each sector's slot and coalesce runs of sectors whose slots
// are consecutive into one pread; unallocated sectors are zero-filled
// without I/O. Writes take a range lock over the sectors they touch, merge
// partial sectors with their current content (read-modify-write), write
// allocated sectors in place, skip all-zero data for unallocated sectors,
// and append new slots for the rest (one write per run of consecutive
// slots, which the OS file system issues as pwrites of at most 64 KiB: see
// vfs.OS for why). A new sector's LUT entry becomes visible in memory only after its
// data is written, and reaches P.lut only in a later Flush, after the
// segment holding it was fdatasynced:
//
//  1. Flush snapshots the dirty LUT pages (4 KiB each),
//  2. fdatasyncs every segment written since the last Flush,
//  3. writes the snapshot pages into P.lut and fdatasyncs it.
//
// So every durable LUT entry points at durable data, at every instant. A
// crash can leave only orphan slots (leaks), which Check reports and
// offline.Shrink reclaims. Trim and WriteZeroes unmap whole sectors and punch their slots
// at once; slots are never reused while the image is open (the append
// cursor of a segment starts at max(file slots, highest referenced + 1)),
// so a stale on-disk entry can only point at a punched slot, which reads
// as zeros.
//
// Opening for writing takes an exclusive flock on the descriptor (readers a
// shared one) and rewrites the descriptor with state = dirty; Close flushes
// and writes state = clean. An image found dirty at Open is checked first
// (corruption refuses a writable open). A segment whose LUT entries point
// past its file's end fails every access for a writer; a reader is only
// refused the sectors behind those entries, so the rest can be salvaged.
// Descriptor rewrites are atomic
// (temp file, fsync, rename, fsync directory) and the lock moves to the new
// file before it becomes visible.
//
// The LUT is loaded one segment at a time, on first access, so opening a
// 1 TiB image reads a few hundred bytes and touching one sector loads
// split/sectorsize entries. What only needs to know where data is costs
// what the data costs, not the disk's or the files' apparent size:
// Extents answers a segment whose part is not loaded from a summary
// probed once from the LUT (a seek over a thin LUT's holes, a comparison
// pass over an xhyve LUT's 0xFF pages) without loading it; Check and
// Stats keep only the allocated entries of one segment at a time, scanned
// the same way, and look for leaked slots only inside the segment files'
// data regions (SEEK_DATA/SEEK_HOLE), reading only unreferenced slots
// there. Check also gives Advice findings (a segment file's apparent size
// far beyond its live data, or slot numbers running out; heavy
// fragmentation), which name `sparsedisk shrink` and leave the image
// clean.
//
// All I/O goes through vfs.FS, so tests run the engine on vfs.MemFS, which
// keeps only synced data when it simulates a crash.
//
// # Concurrency
//
// [Disk] is safe for concurrent use. Locks, in acquisition order:
//
//   - closeMu (RW): read-held by every operation for its duration (across
//     its I/O, on purpose), write-held by Close.
//   - flushMu: serialises Flush, held across its fsyncs on purpose (a Flush
//     must cover writes that completed before it started).
//   - ranges: exclusive per sector range for writers; readers skip it.
//   - segState.mu (RW): protects one segment's LUT part; held only for
//     lookups and updates in memory, except across the one-time load.
//
// Concurrent writes to the same bytes end with one of them; concurrent
// writes to different bytes of one sector both survive.
package blockif
