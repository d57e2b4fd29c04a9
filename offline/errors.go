package offline

import (
	"errors"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
)

// Errors returned by the offline tools (shrink, resize, repair, convert,
// adopt). Match them with errors.Is; returned errors wrap them with the
// file, segment or sector concerned. The tools also return the engine's
// and the format's sentinels (blockif.ErrExist, blockif.ErrNotAdopted, …);
// those re-exported here are the very same values, so errors.Is matches
// them under either name.
var (
	// ErrDataPastEnd: a shrinking resize would cut off allocated data; the
	// error names the first such sector. Force the resize to drop it.
	ErrDataPastEnd = errors.New("sparsedisk/offline: allocated data past the new end")
	// ErrIntent: the descriptor records an offline operation this version
	// does not know how to finish, or its journal is unusable. It is
	// [format.ErrIntent].
	ErrIntent = format.ErrIntent
	// ErrCorrupt: the image is inconsistent; the tool refuses to work on
	// it until `sparsedisk check -r all` repaired it. It is
	// [format.ErrCorrupt], the same as [blockif.ErrCorrupt].
	ErrCorrupt = format.ErrCorrupt
	// ErrInvalid: bad parameters, or an operation the image's layout does
	// not allow. It is [format.ErrInvalid], the same as [blockif.ErrInvalid].
	ErrInvalid = format.ErrInvalid
	// ErrGeometry: the descriptor disagrees with the image's files; the
	// repair refused and changed nothing. It is [format.ErrGeometry].
	ErrGeometry = format.ErrGeometry
	// ErrExist: the tool would overwrite an existing file. It is
	// [blockif.ErrExist].
	ErrExist = blockif.ErrExist
)
