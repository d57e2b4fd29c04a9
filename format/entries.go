package format

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// ReadEntries reads segment i's LUT entries from the LUT file f.
func ReadEntries(f vfs.File, p Params, i int) ([]uint32, error) {
	perSeg := p.Split / p.SectorSize
	first := int64(i) * perSeg
	n := min(perSeg, p.Sectors()-first)
	buf := make([]byte, n*lut.EntrySize)
	got, err := f.ReadAt(buf, first*lut.EntrySize)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read LUT of segment %d at offset %d: %w", i, first*lut.EntrySize, err)
	}
	for k := got; k < len(buf); k++ {
		buf[k] = 0xFF
	}
	e := make([]uint32, n)
	for j := range e {
		e[j] = binary.LittleEndian.Uint32(buf[j*lut.EntrySize:])
	}
	return e, nil
}

// EncodeEntries renders LUT entries as they sit in the LUT file.
func EncodeEntries(e []uint32) []byte {
	buf := make([]byte, len(e)*lut.EntrySize)
	for j, v := range e {
		binary.LittleEndian.PutUint32(buf[j*lut.EntrySize:], v)
	}
	return buf
}

// DecodeEntries parses LUT entries as they sit in the LUT file.
func DecodeEntries(raw []byte) []uint32 {
	e := make([]uint32, len(raw)/lut.EntrySize)
	for j := range e {
		e[j] = binary.LittleEndian.Uint32(raw[j*lut.EntrySize:])
	}
	return e
}
