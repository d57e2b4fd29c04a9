package main

import (
	"encoding/json"
	"fmt"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "map",
		Usage:     "list an image's allocated (data) and hole runs",
		ArgsUsage: "PATH",
		Description: "Prints the disk as alternating runs, like `qemu-img map`: data runs hold sectors\n" +
			"with stored data, holes read as zeros and take no space. Read-only.\n\n" +
			"-U (--force-share) reads an image a server or mount holds open for writing, without\n" +
			"its lock: a warning says the figures may be inconsistent. A descriptor that disagrees\n" +
			"with the files (or a LUT pointing outside them) is reported, exit status 2.\n\n" +
			"Examples:\n   sparsedisk map disk.img\n   sparsedisk map disk.img --output=json   # [{\"start\":…,\"length\":…,\"data\":true}, …]",
		Flags:  []cli.Flag{outputFlag(), forceShareFlag()},
		Action: mapAction,
	})
}

// mapEntry is one run in --output=json, named like qemu-img map's fields.
type mapEntry struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Data   bool  `json:"data"`
	Zero   bool  `json:"zero"`
}

func mapAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("map takes one image path")
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
	// One segment at a time, releasing its LUT part after, so mapping a
	// huge image needs memory for one segment's entries, not all.
	var ext []blockif.Extent
	step := d.Params().Split
	if step <= 0 {
		step = d.Size()
	}
	for off := int64(0); off < d.Size(); off += step {
		e, err := d.Extents(off, min(step, d.Size()-off))
		if err != nil {
			return fmt.Errorf("map %s: %w", path, err)
		}
		if k := len(ext) - 1; k >= 0 && len(e) > 0 && ext[k].Allocated == e[0].Allocated {
			ext[k].Length += e[0].Length // a run continuing across segments
			e = e[1:]
		}
		ext = append(ext, e...)
		if err := d.ReleaseTablesIn(off, min(step, d.Size()-off)); err != nil {
			return fmt.Errorf("map %s: %w", path, err)
		}
	}
	w := c.App.Writer
	if op := unfinishedOp(path); op != "" {
		fmt.Fprintf(c.App.ErrWriter, "warning: %s\n", unfinishedWarning(path, op))
	}
	switch c.String("output") {
	case "json":
		out := make([]mapEntry, len(ext))
		for i, e := range ext {
			out[i] = mapEntry{Start: e.Offset, Length: e.Length, Data: e.Allocated, Zero: !e.Allocated}
		}
		e := json.NewEncoder(w)
		e.SetIndent("", "  ")
		return e.Encode(out)
	case "human":
	default:
		return fmt.Errorf("--output=%s: want human or json", c.String("output"))
	}
	fmt.Fprintf(w, "%-20s %-20s %-6s %s\n", "Offset", "Length", "Kind", "")
	for _, e := range ext {
		kind := "hole"
		if e.Allocated {
			kind = "data"
		}
		fmt.Fprintf(w, "0x%-18x 0x%-18x %-6s %s\n", e.Offset, e.Length, kind, format.HumanSize(e.Length))
	}
	return nil
}
