package main

import (
	"fmt"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/offline"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "resize",
		Usage:     "change an image's virtual size",
		ArgsUsage: "IMAGE SIZE|+N|-N [--shrink] [--force]",
		Description: "SIZE is absolute (20G), +N grows by N, -N shrinks by N (k/m/g/t/p suffixes).\n" +
			"Growing adds segment files and LUT entries; the descriptor's new size is written last,\n" +
			"so an interrupted grow leaves the old size. Shrinking needs --shrink and refuses while\n" +
			"allocated data lies past the new end, naming the first such sector, unless --force.\n" +
			"On a terminal a progress bar shows the LUT extension and the scan (--quiet hides it).\n\n" +
			"Examples:\n   sparsedisk resize disk.img +10G\n   sparsedisk resize disk.img -2G --shrink",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "shrink", Aliases: []string{"s"}, Usage: "allow making the disk smaller"},
			&cli.BoolFlag{Name: "force", Aliases: []string{"f"}, Usage: "with --shrink: drop data past the new end"},
			quietFlag(),
		},
		Action: resizeAction,
	})
}

func resizeAction(c *cli.Context) error {
	pos, fl, err := splitArgs(c, nil, []string{"shrink", "force", "quiet"})
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return fmt.Errorf("resize takes an image path and a size (SIZE, +N or -N)")
	}
	path := pos[0]
	d, err := blockif.Open(path, &blockif.Options{ReadOnly: true, NoDirtyCheck: true})
	if err != nil {
		return err
	}
	cur := d.Size()
	d.Close()
	size, err := offline.ResolveSize(cur, pos[1])
	if err != nil {
		return fmt.Errorf("resize %s: %w", path, err)
	}
	what := "resize: extend LUT"
	if size < cur {
		what = "resize: scan past new end"
	}
	progress, done := progressFor(c, !fl.on("quiet"), what)
	rep, err := offline.Resize(path, size, &offline.ResizeOptions{AllowShrink: fl.on("shrink"), Force: fl.on("force"), Progress: progress})
	done()
	if err != nil {
		return fmt.Errorf("resize %s: %w", path, err)
	}
	if !fl.on("quiet") {
		fmt.Fprintf(c.App.Writer, "%s: size %s → %s\n", path, format.HumanSize(rep.OldSize), format.HumanSize(rep.NewSize))
		if rep.DroppedSectors > 0 {
			fmt.Fprintf(c.App.Writer, "  dropped %d sector(s) holding data, the first sector %d\n", rep.DroppedSectors, rep.FirstDropped)
		}
	}
	return nil
}
