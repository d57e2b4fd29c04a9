// Package format is sparsedisk's on-disk format: an image's geometry
// ([Params]), its descriptor ([Descriptor], rewritten atomically), the LUT
// entry codecs, the shrink journal, the intents the offline tools record
// and their recovery, the names of an image's files, and the lock an image
// is opened under. The online engine (package blockif) and the offline
// tools (package offline) both build on it; it knows nothing of either.
//
// # On-disk format
//
// FORMAT.md at the repository root is the reference: every file an image
// can have, every descriptor key, the LUT encoding, the journal and the
// intents, the durability contract and the locking rules between
// processes. In short, an image at path P (byte-compatible with xhyve's
// split/sparse images):
//
//	| file             | content                                                   |
//	|------------------|-----------------------------------------------------------|
//	| P                | descriptor: `key = value` text (see [Descriptor])         |
//	| P.0000, …        | segments ([SegmentName]): slots, or verbatim bytes        |
//	| P.lut            | sparse only: uint32 LE per sector (see LUT below)         |
//	| P.tmp            | a descriptor being rewritten ([TempName])                 |
//	| P.NNNN.shrink    | shrink: a compacted segment copy ([ShrinkCopyName])       |
//	| P.shrink-journal | shrink: the committed segment's entries ([WriteJournal])  |
//	| P.NNNN.orphaned  | repair: a stray segment file moved aside ([OrphanedName]) |
//	| P.undo.N         | repair: what it removed or changed, for undo ([UndoName]) |
//	| .P.converting    | convert: the destination being built ([ConvertingName])   |
//
// LUT (P.lut): entry n describes sector n of the disk (segment n / (split
// / sectorsize)); its encoding, the LUT kind, is named by the
// descriptor's `lut` key (until FORMAT.md describes it, this is the
// reference):
//
//	| kind            | unallocated | slot v     | never-written LUT pages    |
//	|-----------------|-------------|------------|----------------------------|
//	| xhyve (default) | 0xFFFFFFFF  | v          | hold 0xFF bytes (written)  |
//	| thin            | 0x00000000  | v + 1      | are holes (ftruncate only) |
//
// Both address slots 0 … 0xFFFFFFFE. An xhyve-kind image's descriptor has
// no `lut` key (`lut = xhyve` is accepted and means the same), so images
// made before thin LUTs existed, and images made since with the default,
// are byte-identical to what earlier versions wrote and still open there;
// a thin image's descriptor says `lut = thin`, which earlier versions
// refuse as an unknown key (they would misread the LUT). A `lut` value
// this version does not know is refused (lut.ErrUnknownKind) naming it
// and the kinds known. Creating a thin LUT, or growing one (resize), is an
// ftruncate: a 16 TiB image's 16 GiB LUT takes no space until written.
// Shrinking one truncates it like an xhyve LUT. The shrink journal stores
// entries kind-independently, as the slot or 0xFFFFFFFF (the xhyve
// encoding), and RedoSegment encodes them for the image's kind; a journal
// written before thin LUTs existed is therefore still valid. In memory
// every API (lut.Part.Entries, ReadEntries, the journal) uses that same
// kind-independent form; only lut.Kind's Encode/Decode know the bytes.
//
// Layouts: sparse (slots appended in allocation order, mapped by P.lut),
// split (segment i holds disk bytes [i*split, (i+1)*split) verbatim), raw
// (one plain file, no descriptor; any regular file that is not a
// descriptor opens as raw).
//
// # Design
//
// Every change to the descriptor goes through a temporary file, fsync,
// rename and an fsync of the directory, so a crash leaves either the old
// or the new descriptor. An offline tool that changes several files
// records an intent in the descriptor first ([IntentShrink],
// [IntentResize]); [FinishIntent] finishes or rolls the operation back
// from what is on disk, and is what Open for writing runs on an image
// whose tool was interrupted. Each step of a recovery is idempotent, so a
// crash during recovery is recovered the same way.
//
// # Concurrency
//
// The functions of this package keep no state: callers serialise access
// to one image by holding its [ImageLock] (exclusive for any change). An
// ImageLock follows the descriptor across rewrites: the new file is locked
// before it is renamed into place, so no other process can take the image
// in between. An ImageLock itself is not safe for concurrent use.
package format
