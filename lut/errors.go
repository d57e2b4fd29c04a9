package lut

import "errors"

// ErrTruncated is returned by [Open] when the LUT file is shorter than the
// disk's sector count requires (or not a whole number of entries).
var ErrTruncated = errors.New("sparsedisk/lut: LUT file truncated")

// ErrUnknownKind: a LUT kind this version does not know (the descriptor's
// `lut` key names one written by a newer version, or a typo).
var ErrUnknownKind = errors.New("sparsedisk/lut: unknown LUT kind")
