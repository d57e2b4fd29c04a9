package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/urfave/cli/v2"
)

func outputFlag() cli.Flag {
	return &cli.StringFlag{Name: "output", Value: "human", Usage: "output format: human or json"}
}

func init() {
	register(&cli.Command{
		Name:      "info",
		Usage:     "show an image's geometry, space use and state",
		ArgsUsage: "PATH",
		Description: "Opens the image read-only (it is left byte-identical) and prints its layout, virtual\n" +
			"size, sector size, split, segments, allocated data, bytes on disk, LUT kind (xhyve or\n" +
			"thin; JSON key lut), fragmentation (breaks in the logical order of slots; `shrink`\n" +
			"makes it 0) and state.\n\n" +
			"-U (--force-share) reads an image a server or mount holds open for writing, without\n" +
			"its lock: a warning says the figures may be inconsistent. A descriptor that disagrees\n" +
			"with the files (or a LUT pointing outside them) is reported, exit status 2.\n\n" +
			"Examples:\n   sparsedisk info disk.img\n   sparsedisk info disk.img --output=json | jq .allocated_bytes",
		Flags:  []cli.Flag{outputFlag(), forceShareFlag()},
		Action: infoAction,
	})
}

// infoJSON is the --output=json form of info.
type infoJSON struct {
	Image string `json:"image"`
	// Unfinished names an interrupted offline operation (shrink, resize)
	// recorded in the descriptor; until it is finished the other figures
	// may describe a half-done state.
	Unfinished string `json:"unfinished,omitempty"`
	blockif.Stats
}

// unfinishedOp returns the interrupted offline operation recorded in the
// descriptor at path, or "" (also for raw images and unreadable ones).
func unfinishedOp(path string) string {
	desc, err := format.ReadDescriptor(nil, path)
	if err != nil {
		return ""
	}
	return desc.Intent
}

// unfinishedWarning is what info and map say about an unfinished op.
func unfinishedWarning(path, op string) string {
	return fmt.Sprintf("%s has an unfinished %q (interrupted); what follows may show a half-done state: "+
		"`sparsedisk check -r all %s` (or repeating the operation) finishes it", path, op, path)
}

func infoAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("info takes one image path")
	}
	path := c.Args().First()
	if c.Bool("force-share") {
		fmt.Fprintf(c.App.ErrWriter, "warning: %s\n", forceShareWarning(path))
	}
	if err := examineGeometry(path); err != nil {
		return cli.Exit(fmt.Sprintf("%s: %v", c.Command.Name, err), exitCorruption)
	}
	d, err := blockif.Open(path, &blockif.Options{ReadOnly: true, NoDirtyCheck: true, ForceShare: c.Bool("force-share")})
	if err != nil {
		return err
	}
	defer d.Close()
	st, err := d.Stats()
	if err != nil {
		return fmt.Errorf("info %s: %w", path, err)
	}
	w := c.App.Writer
	op := unfinishedOp(path)
	switch c.String("output") {
	case "json":
		e := json.NewEncoder(w)
		e.SetIndent("", "  ")
		return e.Encode(infoJSON{Image: path, Unfinished: op, Stats: st})
	case "human":
	default:
		return fmt.Errorf("--output=%s: want human or json", c.String("output"))
	}
	if op != "" {
		fmt.Fprintf(c.App.ErrWriter, "warning: %s\n", unfinishedWarning(path, op))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "image:\t%s\n", path)
	fmt.Fprintf(tw, "layout:\t%s\n", st.Layout)
	fmt.Fprintf(tw, "virtual size:\t%s\n", format.HumanSize(st.Size))
	fmt.Fprintf(tw, "sector size:\t%d\n", st.SectorSize)
	if st.Layout != format.LayoutRaw {
		fmt.Fprintf(tw, "split:\t%s\n", format.HumanSize(st.Split))
		fmt.Fprintf(tw, "segments:\t%d\n", st.Segments)
	}
	fmt.Fprintf(tw, "allocated:\t%s\n", format.HumanSize(st.AllocatedBytes))
	fmt.Fprintf(tw, "on disk:\t%s\n", format.HumanSize(st.OnDiskBytes))
	if st.Layout == format.LayoutSparse {
		fmt.Fprintf(tw, "lut:\t%s\n", st.LUTKind())
		fmt.Fprintf(tw, "slots:\t%d\n", st.Slots)
		fmt.Fprintf(tw, "leaked slots:\t%d\n", st.LeakedSlots)
		frag := 0.0
		if n := st.AllocatedBytes / st.SectorSize; n > 0 {
			frag = 100 * float64(st.Fragments) / float64(n)
		}
		fmt.Fprintf(tw, "fragmentation:\t%d breaks (%.1f%%)\n", st.Fragments, frag)
		if st.Advice > 0 {
			fmt.Fprintf(tw, "advice:\t%d finding(s): `sparsedisk check %s` lists them, `sparsedisk shrink %s` fixes them\n", st.Advice, path, path)
		}
		fmt.Fprintf(tw, "state:\t%s\n", st.State)
	}
	if op != "" {
		fmt.Fprintf(tw, "unfinished:\t%s (run `sparsedisk check -r all %s`)\n", op, path)
	}
	return tw.Flush()
}
