package blockif

import "errors"

// Errors returned by the offline tools (shrink, resize, repair, convert).
// Match them with errors.Is; returned errors wrap them with the file,
// segment or sector concerned.
var (
	// ErrDataPastEnd: a shrinking resize would cut off allocated data; the
	// error names the first such sector. Force the resize to drop it.
	ErrDataPastEnd = errors.New("sparsedisk/blockif: allocated data past the new end")
	// ErrIntent: the descriptor records an offline operation this version
	// does not know how to finish, or its journal is unusable.
	ErrIntent = errors.New("sparsedisk/blockif: unfinished offline operation")
)
