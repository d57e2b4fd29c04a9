package blockif

import "errors"

// Errors returned by the engine. Match them with errors.Is: returned errors
// wrap these sentinels together with the file, segment, sector or offset
// concerned.
var (
	// ErrCorrupt is the class of every on-disk inconsistency: a LUT entry
	// past its segment's end, a truncated LUT, a missing segment file, a
	// descriptor that contradicts the files. Frontends report it as EIO.
	ErrCorrupt = errors.New("sparsedisk/blockif: image corrupt")
	// ErrInUse: another process (or Disk) holds the image open for writing,
	// or a reader holds it while a writer asks.
	ErrInUse = errors.New("sparsedisk/blockif: image in use")
	// ErrReadOnly: a write, trim or zeroing on a Disk opened read-only.
	ErrReadOnly = errors.New("sparsedisk/blockif: image opened read-only")
	// ErrOutOfRange: the request reaches past the end of the disk or starts
	// at a negative offset. Nothing was written.
	ErrOutOfRange = errors.New("sparsedisk/blockif: request out of range")
	// ErrInvalid: bad parameters (size, split, sectorsize, layout) or a
	// malformed descriptor.
	ErrInvalid = errors.New("sparsedisk/blockif: invalid parameters")
	// ErrExist: Create or Adopt would overwrite an existing file.
	ErrExist = errors.New("sparsedisk/blockif: image already exists")
	// ErrClosed: the Disk was closed.
	ErrClosed = errors.New("sparsedisk/blockif: disk closed")
	// ErrNotAdopted: the path holds xhyve segments but no descriptor; run
	// `sparsedisk adopt` with the image's parameters.
	ErrNotAdopted = errors.New("sparsedisk/blockif: no descriptor (xhyve image? adopt it first)")
)
