// Package offline holds sparsedisk's offline tools: [Shrink] (compact a
// sparse image), [Resize] (grow or shrink the virtual disk), [Convert]
// (copy a disk into a new image of any layout), [Repair] (fix what
// blockif.Check finds) and [Adopt] (give an xhyve image a descriptor).
// Each works on an image that no one has open: it takes the image's
// exclusive lock (format.LockImage) for its whole run, or the shared one
// for a dry run, so a server or another tool holding it is refused with
// ErrInUse.
//
// # Design
//
// Every tool is crash-safe: an operation that touches several files
// records an intent in the descriptor first (format.IntentShrink,
// format.IntentResize), and the next Open for writing, `check -r all` or
// the same tool finishes or rolls it back (format.FinishIntent). Shrink
// commits one segment at a time through the shrink journal; Resize commits
// with the descriptor's new size; Convert builds its destination under a
// hidden name and renames it into place descriptor last; Repair orders its
// writes so that copied data is durable before a LUT entry points at it.
// The files, keys and journal are described in FORMAT.md at the
// repository root and implemented in package format.
//
// # Concurrency
//
// The functions are safe to call from several goroutines on different
// images; on one image the lock makes a second call fail with ErrInUse.
// Progress callbacks are called from one goroutine at a time.
//
// Convert reads and writes through the engine (blockif.Open); the other
// tools work on the files directly, under the lock.
package offline
