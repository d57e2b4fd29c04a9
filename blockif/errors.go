package blockif

import (
	"errors"

	"github.com/sparsedisk/sparsedisk/format"
)

// Errors returned by the engine. Match them with errors.Is: returned errors
// wrap these sentinels together with the file, segment, sector or offset
// concerned.
var (
	// ErrCorrupt is the class of every on-disk inconsistency: a LUT entry
	// past its segment's end, a truncated LUT, a missing segment file, a
	// descriptor that contradicts the files. Frontends report it as EIO.
	// It is [format.ErrCorrupt]: the format's codecs and the offline tools
	// return the same sentinel.
	ErrCorrupt = format.ErrCorrupt
	// ErrInUse: another process (or Disk) holds the image open for writing,
	// or a reader holds it while a writer asks. It is [format.ErrInUse].
	ErrInUse = format.ErrInUse
	// ErrInvalid: bad parameters (size, split, sectorsize, layout) or a
	// malformed descriptor. It is [format.ErrInvalid].
	ErrInvalid = format.ErrInvalid
	// ErrGeometry: the descriptor disagrees with the image's files (see
	// [CrossExamine]). It is [format.ErrGeometry].
	ErrGeometry = format.ErrGeometry
	// ErrReadOnly: a write, trim or zeroing on a Disk opened read-only.
	ErrReadOnly = errors.New("sparsedisk/blockif: image opened read-only")
	// ErrOutOfRange: the request reaches past the end of the disk or starts
	// at a negative offset. Nothing was written.
	ErrOutOfRange = errors.New("sparsedisk/blockif: request out of range")
	// ErrExist: Create (or an offline tool creating an image) would
	// overwrite an existing file.
	ErrExist = errors.New("sparsedisk/blockif: image already exists")
	// ErrClosed: the Disk was closed.
	ErrClosed = errors.New("sparsedisk/blockif: disk closed")
	// ErrNotAdopted: the path holds xhyve segments but no descriptor; run
	// `sparsedisk adopt` with the image's parameters.
	ErrNotAdopted = errors.New("sparsedisk/blockif: no descriptor (xhyve image? adopt it first)")
)
