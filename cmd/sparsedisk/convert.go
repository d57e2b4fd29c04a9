package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/offline"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "convert",
		Usage:     "copy an image into another layout (raw, split, sparse)",
		ArgsUsage: "SRC DST [layout=sparse|split|raw] [split=SIZE] [sectorsize=N] [lut=xhyve|thin] [--overwrite]",
		Description: "SRC is any image: a plain raw file, a split image or a sparse one. DST is written in\n" +
			"the layout asked for (default sparse; split and sector size default to SRC's). Sectors\n" +
			"that are all zeros at DST's sector size are not written: sparse images do not allocate\n" +
			"them and raw/split files keep holes. Segments are copied in parallel.\n\n" +
			"--lut (or lut=) picks a sparse DST's LUT encoding: xhyve (xhyve-compatible) or thin\n" +
			"(unallocated LUT pages are holes); default: SRC's if SRC is sparse, else xhyve.\n" +
			"Sparse to sparse with another --lut converts an image between the two kinds.\n\n" +
			"DST must not exist unless --overwrite. DST is built under a hidden temporary name and\n" +
			"renamed into place (descriptor last) once complete and flushed, so an interrupted\n" +
			"convert never leaves an image that looks whole.\n\n" +
			"--overwrite refuses a DST that a server, mount or tool has open, and replaces only DST's\n" +
			"own files (a sparsedisk image's segments and LUT, or the one plain file). The old DST is\n" +
			"removed just before the finished copy is renamed in: a crash in that instant leaves no\n" +
			"image at DST (never a mixed one); run the convert again.\n\n" +
			"Examples:\n   sparsedisk convert vm.raw vm.img\n   sparsedisk convert vm.img vm.raw layout=raw\n" +
			"   sparsedisk convert vm.img vm-thin.img --lut thin",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "layout", Usage: "destination layout: sparse, split or raw"},
			&cli.StringFlag{Name: "split", Usage: "destination segment size"},
			&cli.StringFlag{Name: "sectorsize", Usage: "destination sector size"},
			&cli.StringFlag{Name: "lut", Usage: "sparse destination's LUT encoding: xhyve or thin"},
			&cli.BoolFlag{Name: "overwrite", Usage: "replace an existing destination"},
			&cli.IntFlag{Name: "jobs", Aliases: []string{"j"}, Usage: "parallel copiers (default: number of CPUs)"},
			&cli.BoolFlag{Name: "progress", Value: true, Usage: "progress bar (only ever on a terminal)"},
			quietFlag(),
		},
		Action: convertAction,
	})
}

func convertAction(c *cli.Context) error {
	args, fl, err := splitArgs(c, []string{"layout", "split", "sectorsize", "lut", "jobs"}, []string{"overwrite", "progress", "quiet"})
	if err != nil {
		return err
	}
	o := offline.ConvertOptions{Overwrite: fl.on("overwrite")}
	kv := map[string]string{}
	for _, k := range []string{"layout", "split", "sectorsize", "lut", "jobs"} {
		if v := fl.str(k, ""); v != "" {
			kv[k] = v
		}
	}
	var pos []string
	for _, a := range args {
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			pos = append(pos, a)
			continue
		}
		switch k = strings.ToLower(k); k {
		case "layout", "split", "sectorsize", "lut":
			kv[k] = v
		default:
			return fmt.Errorf("unknown setting %q (want layout=, split=, sectorsize= or lut=)", a)
		}
	}
	if len(pos) != 2 {
		return fmt.Errorf("convert takes a source and a destination path, got %q", pos)
	}
	src, dst := pos[0], pos[1]
	if fi, err := os.Stat(dst); err == nil && fi.IsDir() {
		// Refused before anything is copied, --overwrite or not: an image
		// never replaces a directory.
		return fmt.Errorf("convert: destination %s is a directory; give the path of the image to write, like %s", dst, filepath.Join(dst, filepath.Base(src)))
	}
	o.Layout = format.Layout(kv["layout"])
	if v, ok := kv["lut"]; ok {
		if o.LUT, err = lut.ParseKind(v); err != nil || v == "" {
			return fmt.Errorf("lut=%s: want xhyve or thin", v)
		}
	}
	for _, k := range []string{"split", "sectorsize"} {
		if v, ok := kv[k]; ok {
			n, err := parseSetting(k, v)
			if err != nil {
				return err
			}
			if k == "split" {
				o.Split = n
			} else {
				o.SectorSize = n
			}
		}
	}
	if v, ok := kv["jobs"]; ok {
		if o.Workers, err = strconv.Atoi(v); err != nil || o.Workers < 1 {
			return fmt.Errorf("--jobs=%s: want a positive number", v)
		}
	}
	quiet := fl.on("quiet")
	progress, done := progressFor(c, !quiet && (fl.str("progress", "true") == "true"), "convert")
	o.Progress = progress
	start := time.Now()
	rep, err := offline.Convert(src, dst, &o)
	done()
	if err != nil {
		return fmt.Errorf("convert %s → %s: %w", src, dst, err)
	}
	if !quiet {
		p := rep.Params
		fmt.Fprintf(c.App.Writer, "converted %s → %s: layout %s, size %s", src, dst, p.Layout, format.HumanSize(p.Size))
		if p.Layout != format.LayoutRaw {
			fmt.Fprintf(c.App.Writer, ", split %s, sector size %d", format.HumanSize(p.Split), p.SectorSize)
		}
		if p.Layout == format.LayoutSparse {
			fmt.Fprintf(c.App.Writer, ", lut %s", p.LUTKind())
		}
		fmt.Fprintf(c.App.Writer, "; %s of data written in %.2fs\n", format.HumanSize(rep.DataBytes), time.Since(start).Seconds())
	}
	return nil
}
