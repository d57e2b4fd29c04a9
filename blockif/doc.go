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
// free the slot of a sector overwritten with all zeros, and give the rest
// slots (one write per run of consecutive slots, which the OS file system
// issues as pwrites of at most 64 KiB: see vfs.OS for why). A new sector's
// LUT entry becomes visible in memory only after its data is written, and
// reaches P.lut only in a later Flush, after the segment holding it was
// fdatasynced:
//
//  1. Flush snapshots the dirty LUT pages (4 KiB each),
//  2. fdatasyncs every segment written since the last Flush,
//  3. writes the snapshot pages into P.lut and fdatasyncs it.
//
// So every durable LUT entry points at durable data, at every instant. A
// crash can leave only orphan slots (leaks), which Check reports, a writer
// reuses and offline.Shrink reclaims.
//
// # Slot reuse
//
// Trim, WriteZeroes and an all-zero overwrite unmap whole sectors and
// punch their slots at once (the space comes back at once). A freed slot
// is not reusable at once: until a Flush has made the unmapping durable,
// the on-disk LUT may still name it for its old sector, and a read that
// looked the old sector up may still be about to read it. Per segment,
// each slot is in one of these states (FORMAT.md, section 7.8, has the full
// argument):
//
//	append ──▶ live ──free──▶ freed ──LUT synced──▶ synced ──reads drained──▶ reusable ──▶ live
//	             ▲              │                                                  │
//	             └─same sector──┘                               compactor: truncated (gone)
//
// In words:
//
//   - freed: unmapped in memory in flush epoch N (between the LUT
//     snapshots N−1 and N of its segment).
//   - synced: the Flush that took snapshot N has fdatasynced P.lut; no
//     durable entry names the slot any more.
//   - reusable: also, every read that looked slots up before the free
//     has finished (reader generations, below). Reuse takes the lowest
//     reusable slot, so files stay dense; only when there is none does a
//     write append at the end of the file.
//   - a freed slot may go straight back to live for the sector that freed
//     it (a rewrite after a trim): no other sector's entry, in memory or on
//     disk, can name it, so a crash finds that sector's old data, zeros or
//     the new data, all allowed for an unflushed write.
//
// Reads do not take the range lock. Instead each segment has a reader
// generation: a read registers in the current one (an atomic counter,
// under the segment's read lock, before its lookup) and leaves it after
// its preads. The generation moves on (at each Flush snapshot and when
// freed slots are promoted) only once the previous one has drained, so a
// slot freed in generation g is not reused before generation g+2, by
// which time every read that could have looked it up is done. A read
// never waits; a slot may wait for a read.
//
// A writer, before it treats any unreferenced slot of a segment as
// reusable (at the segment's first access after Open), fdatasyncs P.lut
// (once per Open) and the segment file: a previous process killed between
// writing LUT pages and syncing them leaves them in the page cache, and
// "unreferenced in what we read" must mean "unreferenced on disk". Every
// unreferenced slot of the file (orphans of a crash included) is then
// reusable. Slots are per segment: a free-run list (memory follows the
// number of runs of free slots, not the file's size) and a queue of
// freed slots.
//
// # Online compaction
//
// With Options.Compact (experimental, off by default: see FORMAT.md 7.8) a
// goroutine per Disk moves slots from the tail of each segment file into
// the lowest reusable holes and truncates the file. One move is: take the
// sector's range lock, copy the slot into a hole, point the entry at the
// copy, release the lock; the old slot becomes freed but is not punched
// (the durable LUT still names it). After a batch (at most 1 MiB, 16 slots
// or more), the compactor Flushes; once the old slots are reusable they
// are punched, and once the tail of the file is all reusable it is
// truncated (with the segment's lock held, so no write appends
// meanwhile). A crash at any step finds either the old entry and the
// intact old slot, or the new entry and its durable copy. Work is
// throttled (at most a quarter of the time moving data) and no client request
// waits for it longer than one sector copy, one Flush or one truncate. It
// starts on a segment when its reusable holes exceed 1/16 of its live
// data (at least 256 KiB) and then goes on until nothing live sits above
// a hole; it logs each batch and truncation at Info. Segments untouched
// since Open are left alone unless their file is longer than all their
// sectors could need (an old version's bloat).
//
// Slack: a segment file's apparent size stays within its live data plus
// the slots freed since the last Flush (and not rewritten by their own
// sector), plus the holes the compactor tolerates (above), plus a batch
// in flight; once the client stops, the compactor brings it to the live
// data plus that tolerance. Offline shrink still defragments.
//
// Limits: slot numbers stop at 2^32−2. The first append past 90 % of that
// in a segment logs a warning (once per segment per Open), and a write
// that finds no slot fails with ENOSPC naming the image, the segment and
// the fix. With reuse, a segment an old version grew to the edge keeps
// accepting writes, and the compactor truncates it.
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
//   - ranges: exclusive per sector range for writers, for frees (Trim,
//     WriteZeroes, zero overwrites) and for the compactor's moves, so a
//     free never races a write of the same sector; readers skip it (they
//     register in a reader generation instead, see Slot reuse).
//   - segState.mu (RW): protects one segment's LUT part and slot state;
//     held only for lookups and updates in memory, except across the
//     one-time load and the compactor's truncation of the file.
//
// Concurrent writes to the same bytes end with one of them; concurrent
// writes to different bytes of one sector both survive.
package blockif
