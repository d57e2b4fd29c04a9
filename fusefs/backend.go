package fusefs

import "github.com/sparsedisk/sparsedisk/blockif"

// OnDiskByteser is an optional extension of the mounted blockif.Device: the bytes the backend's
// storage occupies on its device, found cheaply. *blockif.Disk has it
// (OnDiskBytes: the allocated blocks of the image's files, one stat each,
// whatever the layout). When present it is what st_blocks and statfs
// report, re-read at most once per attribute timeout. Like every Device
// method it must be safe for concurrent use.
type OnDiskByteser interface {
	OnDiskBytes() (int64, error)
}

// allocatedBytes returns the space the backend uses: OnDiskBytes when it has
// it, otherwise the allocated runs of Extents over the whole disk (which
// for a large image may be costly: the mount recounts only after a data
// change).
func allocatedBytes(b blockif.Device) (int64, error) {
	if a, ok := b.(OnDiskByteser); ok {
		return a.OnDiskBytes()
	}
	var total int64
	size := b.Size()
	for off := int64(0); off < size; off += extentWindow {
		n := min(extentWindow, size-off)
		ext, err := b.Extents(off, n)
		if err != nil {
			return 0, err
		}
		for _, e := range ext {
			if e.Allocated {
				total += e.Length
			}
		}
	}
	return total, nil
}

// extentWindow bounds one Extents query, so that seeking on a large, mostly
// allocated disk does not build one huge extent list.
const extentWindow = 1 << 30

// seekData returns the first offset >= off that lies in allocated data, or
// ENXIO-equivalent ok=false when there is none before the end.
func seekData(b blockif.Device, off int64) (int64, bool, error) {
	return seekKind(b, off, true)
}

// seekHole returns the first offset >= off that lies in a hole; the end of
// the disk counts as a hole, so it always succeeds for off < Size.
func seekHole(b blockif.Device, off int64) (int64, error) {
	pos, ok, err := seekKind(b, off, false)
	if err != nil {
		return 0, err
	}
	if !ok {
		return b.Size(), nil
	}
	return pos, nil
}

func seekKind(b blockif.Device, off int64, allocated bool) (int64, bool, error) {
	size := b.Size()
	for w := off; w < size; w += extentWindow {
		n := min(extentWindow, size-w)
		ext, err := b.Extents(w, n)
		if err != nil {
			return 0, false, err
		}
		for _, e := range ext {
			if e.Allocated == allocated && e.Length > 0 {
				return max(e.Offset, off), true, nil
			}
		}
	}
	return 0, false, nil
}
