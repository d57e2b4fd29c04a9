package format

import "errors"

// Errors returned by the format's codecs and recovery, and re-exported by
// the engine (package blockif) and the offline tools (package offline)
// under the same names: they are one sentinel each, so errors.Is matches
// whichever package's name a caller uses. Returned errors wrap them with
// the file, segment, sector or offset concerned.
var (
	// ErrCorrupt is the class of every on-disk inconsistency: a LUT entry
	// past its segment's end, a truncated LUT, a missing segment file, a
	// descriptor that contradicts the files. Frontends report it as EIO.
	ErrCorrupt = errors.New("sparsedisk/format: image corrupt")
	// ErrInvalid: bad parameters (size, split, sectorsize, layout) or a
	// malformed descriptor.
	ErrInvalid = errors.New("sparsedisk/format: invalid parameters")
	// ErrInUse: another process (or Disk) holds the image open for writing,
	// or a reader holds it while a writer asks.
	ErrInUse = errors.New("sparsedisk/format: image in use")
	// ErrIntent: the descriptor records an offline operation this version
	// does not know how to finish, or its journal is unusable.
	ErrIntent = errors.New("sparsedisk/format: unfinished offline operation")
	// ErrGeometry: the descriptor disagrees with the image's files (segment
	// count, LUT length, layout, slot ranges), so its geometry cannot be
	// trusted; a repair refuses to act on it.
	ErrGeometry = errors.New("sparsedisk/format: the descriptor disagrees with the files")
)
