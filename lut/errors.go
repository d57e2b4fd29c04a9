package lut

import "errors"

// ErrTruncated is returned by [Open] when the LUT file is shorter than the
// disk's sector count requires (or not a whole number of entries).
var ErrTruncated = errors.New("sparsedisk/lut: LUT file truncated")
