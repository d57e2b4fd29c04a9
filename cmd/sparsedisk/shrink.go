package main

import (
	"encoding/json"
	"fmt"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/offline"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "shrink",
		Usage:     "compact a sparse image: drop unused slots and zero sectors, undo fragmentation",
		ArgsUsage: "IMAGE [--dry-run]",
		Description: "Rewrites every segment with its live slots in logical sector order, dropping slots\n" +
			"no LUT entry references and sectors that hold only zeros, and truncates the files.\n" +
			"Crash-safe: an interrupted shrink is finished or rolled back by the next open or\n" +
			"shrink, and the image reads exactly as before at every instant. Temporary space: at\n" +
			"most one segment. --dry-run only reports what would be reclaimed.\n\n" +
			"Examples:\n   sparsedisk shrink disk.img --dry-run\n   sparsedisk shrink disk.img",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "dry-run", Aliases: []string{"n"}, Usage: "report what would be reclaimed, change nothing"},
			outputFlag(),
			quietFlag(),
		},
		Action: shrinkAction,
	})
}

func shrinkAction(c *cli.Context) error {
	pos, fl, err := splitArgs(c, []string{"output"}, []string{"dry-run", "quiet"})
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("shrink takes one image path")
	}
	path := pos[0]
	output := fl.str("output", "human")
	if output != "human" && output != "json" {
		return fmt.Errorf("--output=%s: want human or json", output)
	}
	quiet := fl.on("quiet")
	progress, done := progressFor(c, !quiet && output == "human", "shrink")
	rep, err := offline.Shrink(path, &offline.ShrinkOptions{DryRun: fl.on("dry-run"), Progress: progress})
	done()
	if err != nil {
		return fmt.Errorf("shrink %s: %w", path, err)
	}
	w := c.App.Writer
	if output == "json" {
		e := json.NewEncoder(w)
		e.SetIndent("", "  ")
		return e.Encode(rep)
	}
	if quiet {
		return nil
	}
	verb := "reclaimed"
	if rep.DryRun {
		verb = "would reclaim"
	}
	fmt.Fprintf(w, "%s: %s %s (on disk %s before, %s after)\n", path, verb,
		format.HumanSize(max(rep.BytesBefore-rep.BytesAfter, 0)), format.HumanSize(rep.BytesBefore), format.HumanSize(rep.BytesAfter))
	fmt.Fprintf(w, "  live data %s; %d of %d segment(s) compacted; %d zero sector(s) and %d unreferenced slot(s) dropped\n",
		format.HumanSize(rep.LiveBytes), rep.Compacted, rep.Segments, rep.ZeroSectors, rep.OrphanSlots)
	return nil
}
