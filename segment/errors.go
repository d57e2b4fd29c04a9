package segment

import "errors"

// ErrShort is returned when a slot that should exist lies (partly) past the
// end of its segment file.
var ErrShort = errors.New("sparsedisk/segment: slot past end of segment file")
