package main

import (
	"fmt"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/offline"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "adopt",
		Usage:     "write the descriptor for an image made by xhyve",
		ArgsUsage: "PATH size=SIZE split=SIZE sectorsize=N [layout=sparse|split]",
		Description: "xhyve keeps a split/sparse image's parameters only on its command line\n" +
			"(-s 4,virtio-blk,PATH,size=…,split=…,sectorsize=…,sparse). adopt checks them against\n" +
			"the files (segment count, LUT length, every LUT entry inside its segment) and only\n" +
			"then writes the descriptor PATH, after which every sparsedisk command works on it.\n" +
			"xhyve's default sector size was 512: give sectorsize=512 unless it was set.\n\n" +
			"Example:\n   sparsedisk adopt hdd.img size=20G split=1G sectorsize=512",
		Flags:  geometryFlags(),
		Action: adoptAction,
	})
}

func adoptAction(c *cli.Context) error {
	pos, p, err := geometryArgs(c)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("adopt takes one image path")
	}
	if p.Size == 0 || p.Split == 0 || p.SectorSize == 0 {
		return fmt.Errorf("adopt %s: give size=, split= and sectorsize= exactly as xhyve was given them", pos[0])
	}
	if err := offline.Adopt(pos[0], p, nil); err != nil {
		return fmt.Errorf("adopt %s: %w", pos[0], err)
	}
	fmt.Fprintf(c.App.Writer, "adopted %s: layout %s, size %s, split %s, sector size %d\n",
		pos[0], layoutOr(p.Layout), format.HumanSize(p.Size), format.HumanSize(p.Split), p.SectorSize)
	return nil
}

func layoutOr(l format.Layout) format.Layout {
	if l == "" {
		return format.LayoutSparse
	}
	return l
}
