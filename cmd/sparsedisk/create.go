package main

import (
	"fmt"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "create",
		Usage:     "create a new, empty image",
		ArgsUsage: "[PATH] size=SIZE [split=SIZE] [sectorsize=N] [layout=sparse|split|raw] [lut=xhyve|thin]",
		Description: "Creates the descriptor PATH (default ./disk.img), its segment files PATH.0000, … and,\n" +
			"for the sparse layout, the lookup table PATH.lut. Nothing existing is overwritten.\n\n" +
			"Sizes take k/m/g/t/p suffixes (powers of 1024). Defaults: split=1G, sectorsize=4096,\n" +
			"layout=sparse, lut=xhyve. A sparse image takes almost no space until data is written.\n\n" +
			"lut= picks the sparse layout's LUT encoding: xhyve (default) is byte-compatible with\n" +
			"xhyve, and its LUT (4 bytes per sector: 1 GiB for 1 TiB at 4 KiB sectors) is written\n" +
			"in full at create; thin stores slot+1 with 0 for unallocated, so the LUT starts as a\n" +
			"file-system hole: creating even a 16 TiB image is instant and takes no space.\n" +
			"`sparsedisk convert --lut` moves an image between the two.\n\n" +
			"Examples:\n" +
			"   sparsedisk create size=20G split=1G sectorsize=4096\n" +
			"   sparsedisk create vm.img size=100G\n" +
			"   sparsedisk create big.img size=16T lut=thin\n" +
			"   sparsedisk create plain.img --size 8G --layout raw",
		Flags:  geometryFlags(),
		Action: createAction,
	})
}

func createAction(c *cli.Context) error {
	pos, p, err := geometryArgs(c)
	if err != nil {
		return err
	}
	for _, a := range pos {
		if unitLike(a) {
			return fmt.Errorf("create: %q looks like the unit of a size typed apart from its number: write it joined, like size=20%s", a, a)
		}
	}
	if len(pos) > 1 {
		return fmt.Errorf("create takes one image path, got %q", pos)
	}
	path := "disk.img"
	if len(pos) == 1 {
		path = pos[0]
	}
	if p.Size == 0 {
		return fmt.Errorf("create %s: size= is required (for example size=20G)", path)
	}
	if err := blockif.Create(path, p, nil); err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	d, err := blockif.Open(path, &blockif.Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer d.Close()
	q := d.Params()
	fmt.Fprintf(c.App.Writer, "created %s: layout %s, size %s", path, q.Layout, format.HumanSize(q.Size))
	if q.Layout != format.LayoutRaw {
		fmt.Fprintf(c.App.Writer, ", split %s, sector size %d, %d segment(s)", format.HumanSize(q.Split), q.SectorSize, q.Segments())
	}
	if q.Layout == format.LayoutSparse {
		fmt.Fprintf(c.App.Writer, ", lut %s", q.LUTKind())
	}
	fmt.Fprintln(c.App.Writer)
	return nil
}
