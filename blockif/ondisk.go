package blockif

import (
	"syscall"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// OnDiskBytes is what the image's files occupy on their device, as du
// counts them: every segment file, plus the descriptor and (sparse) the LUT.
// It takes one stat per file, opens no segment and reads no LUT entry, so
// it stays cheap for a huge image whose LUT is mostly unloaded. Unlike
// Stats.AllocatedBytes it includes the LUT, the descriptor and slots no
// longer referenced, and it follows the host file system's block
// granularity.
func (d *Disk) OnDiskBytes() (int64, error) {
	if err := d.enter(); err != nil {
		return 0, err
	}
	defer d.leave()
	return d.onDiskBytes()
}

// onDiskBytes is OnDiskBytes without entering.
func (d *Disk) onDiskBytes() (int64, error) {
	var total int64
	for _, s := range d.segs {
		a, err := d.allocatedFile(s.Path(), s.Allocated)
		if err != nil {
			return 0, err
		}
		total += a
	}
	if d.desc.Layout == format.LayoutRaw {
		return total, nil // the raw file is the one segment
	}
	names := []string{d.path}
	if d.desc.Layout == format.LayoutSparse {
		names = append(names, d.path+lut.Suffix)
	}
	for _, name := range names {
		a, err := d.allocatedFile(name, func() (int64, error) {
			f, err := d.fs.OpenFile(name, 0, 0)
			if err != nil {
				return 0, err
			}
			defer f.Close()
			return f.Allocated()
		})
		if err != nil {
			return 0, err
		}
		total += a
	}
	return total, nil
}

// allocatedFile returns the bytes file name occupies, from a stat when the
// file system gives st_blocks, from slow otherwise.
func (d *Disk) allocatedFile(name string, slow func() (int64, error)) (int64, error) {
	fi, err := d.fs.Stat(name)
	if err != nil {
		return 0, err
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512, nil
	}
	return slow()
}
