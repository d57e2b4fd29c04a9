package offline

import (
	"bytes"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// fsOf is the file system o names: the operating system's if none.
func fsOf(o *blockif.Options) vfs.FS {
	if o == nil || o.FS == nil {
		return vfs.OS{}
	}
	return o.FS
}

// zeros is a read-only buffer of zero bytes, as large as the largest sector.
var zeros = make([]byte, format.MaxSectorSize)

// isZero tells whether p holds only zero bytes.
func isZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeros))
		if !bytes.Equal(p[:n], zeros[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

// maxSlot is the largest slot number a LUT entry can hold.
const maxSlot = int64(lut.Unallocated) - 1
