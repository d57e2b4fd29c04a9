//go:build xhyvegen

// Command gen writes the xhyve-format fixtures in this folder, laid out the
// way xhyve's sparse-disk-image block layer (block_if.c with size=, split=,
// sectorsize=, sparse) leaves them, independently of sparsedisk's engine:
//
//   - no descriptor: the parameters live only on the hypervisor's command
//     line (here: in the fixture's name and in README.md);
//   - 512-byte sectors (xhyve's default);
//   - slots appended in the order the guest wrote them, so out of logical
//     order;
//   - one extra, empty segment file after the last (xhyve created
//     size/split + 1 files when size is a multiple of split);
//   - the LUT: one little-endian uint32 per sector, 0xFFFFFFFF unallocated.
//
// It also writes NAME.expected, the flat disk content, for the tests.
// Regenerate with: go run -tags xhyvegen ./testdata/xhyve
package main

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
)

func main() {
	dir := filepath.Join("testdata", "xhyve")
	gen(filepath.Join(dir, "hdd512.img"), 96<<10, 32<<10, 512, 1)
}

func gen(path string, size, split, ss int64, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, seed))
	nsec := size / ss
	perSeg := split / ss
	nseg := size / split // size is a multiple of split here
	flat := make([]byte, size)
	lut := make([]uint32, nsec)
	for i := range lut {
		lut[i] = 0xFFFFFFFF
	}
	segs := make([][]byte, nseg+1)
	// The guest writes 40 random sectors, some twice, in random order.
	for w := 0; w < 40; w++ {
		s := rng.Int64N(nsec)
		data := make([]byte, ss)
		for i := range data {
			data[i] = byte(rng.UintN(255) + 1)
		}
		copy(flat[s*ss:], data)
		seg := s / perSeg
		if lut[s] == 0xFFFFFFFF {
			lut[s] = uint32(int64(len(segs[seg])) / ss)
			segs[seg] = append(segs[seg], data...)
		} else {
			copy(segs[seg][int64(lut[s])*ss:], data)
		}
	}
	for i, b := range segs {
		must(os.WriteFile(fmt.Sprintf("%s.%04d", path, i), b, 0o644))
	}
	lb := make([]byte, 4*nsec)
	for i, v := range lut {
		binary.LittleEndian.PutUint32(lb[4*i:], v)
	}
	must(os.WriteFile(path+".lut", lb, 0o644))
	must(os.WriteFile(path+".expected", flat, 0o644))
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}
