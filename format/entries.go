package format

import (
	"fmt"

	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// ReadEntries reads segment i's LUT entries from the LUT file f, decoded
// with the image's LUT kind (p.LUT).
func ReadEntries(f vfs.File, p Params, i int) ([]uint32, error) {
	first, n := SegmentEntries(p, i)
	e, err := lut.ReadEntries(f, p.LUTKind(), first, n)
	if err != nil {
		return nil, fmt.Errorf("LUT of segment %d: %w", i, err)
	}
	return e, nil
}

// WriteEntries writes entries e, encoded with the image's LUT kind, at
// global entry first of the LUT file f (not durable: sync f).
func WriteEntries(f vfs.File, p Params, first int64, e []uint32) error {
	return lut.WriteEntries(f, p.LUTKind(), first, e)
}

// SegmentEntries is the global index of segment i's first LUT entry and
// the number of its entries.
func SegmentEntries(p Params, i int) (first, n int64) {
	perSeg := p.Split / p.SectorSize
	first = int64(i) * perSeg
	return first, min(perSeg, p.Sectors()-first)
}
