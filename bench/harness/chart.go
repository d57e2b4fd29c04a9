package main

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// palette gives each target the same colour in every panel.
var palette = []color.RGBA{
	{0xd6, 0x27, 0x28, 0xff}, // sparsedisk
	{0xd6, 0x27, 0x28, 0xff}, // sparsedisk convert
	{0x1f, 0x77, 0xb4, 0xff}, // qemu-nbd qcow2
	{0x17, 0xbe, 0xcf, 0xff}, // qemu-nbd raw
	{0x2c, 0xa0, 0x2c, 0xff}, // nbdkit file
	{0x98, 0xdf, 0x8a, 0xff}, // nbdfuse+nbdkit
	{0x94, 0x67, 0xbd, 0xff}, // qemu-img qcow2
	{0x8c, 0x56, 0x4b, 0xff}, // raw sparse file
	{0x7f, 0x7f, 0x7f, 0xff}, // local raw file
}

func colourOf(t string) color.Color {
	return palette[slices.Index(allTargets, t)%len(palette)]
}

// drawChart draws one panel per row (workload), one bar per target, with
// the row's unit on the y axis and the ratio to the main peer in the title.
func drawChart(res *results, path string) error {
	const cols = 4
	rows := (len(rowDefs) + cols - 1) / cols
	panels := make([][]*plot.Plot, rows)
	for i := range panels {
		panels[i] = make([]*plot.Plot, cols)
	}
	for i, r := range rowDefs {
		p := plot.New()
		title := r.title
		if len(r.goals) > 0 {
			title += fmt.Sprintf("\n%s vs %s", fmtRatio(res.ratio(r, r.goals[0].peer)), r.goals[0].peer)
		} else if ps := peersOf(r); len(ps) > 0 {
			title += fmt.Sprintf("\n%s vs %s", fmtRatio(res.ratio(r, ps[0])), ps[0])
		}
		p.Title.Text = title
		p.Title.TextStyle.Font.Size = vg.Points(9)
		p.Y.Label.Text = r.unit
		if !r.higherBetter {
			p.Y.Label.Text += " (lower is better)"
		}
		p.Y.Label.TextStyle.Font.Size = vg.Points(8)
		p.Y.Tick.Label.Font.Size = vg.Points(7)
		p.X.Tick.Label.Font.Size = vg.Points(6.5)
		p.Y.Min = 0
		w := vg.Points(22)
		var names []string
		for k, t := range r.targets {
			v := res.median(r.id, t)
			if math.IsNaN(v) {
				v = 0
			}
			// One chart per target so each gets its colour; its only
			// non-zero bar sits at the target's position k.
			vals := make(plotter.Values, len(r.targets))
			vals[k] = v
			bars, err := plotter.NewBarChart(vals, w)
			if err != nil {
				return err
			}
			bars.Color = colourOf(t)
			bars.LineStyle.Width = 0
			p.Add(bars)
			names = append(names, shortName(t))
		}
		p.NominalX(names...)
		p.Add(plotter.NewGrid())
		panels[i/cols][i%cols] = p
	}
	// Empty trailing panels.
	for i := len(rowDefs); i < rows*cols; i++ {
		panels[i/cols][i%cols] = plot.New()
		panels[i/cols][i%cols].HideAxes()
	}
	width, height := 16*vg.Inch, vg.Length(rows)*3.2*vg.Inch
	img := vgimg.New(width, height)
	dc := draw.New(img)
	t := draw.Tiles{Rows: rows, Cols: cols, PadX: vg.Millimeter * 4, PadY: vg.Millimeter * 4,
		PadTop: vg.Millimeter * 3, PadBottom: vg.Millimeter * 3, PadLeft: vg.Millimeter * 3, PadRight: vg.Millimeter * 3}
	canvases := plot.Align(panels, t, dc)
	for i := range panels {
		for j := range panels[i] {
			if panels[i][j] != nil {
				panels[i][j].Draw(canvases[i][j])
			}
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func shortName(t string) string {
	switch t {
	case tSD, tSDConv:
		return "sparsedisk"
	case tQcow:
		return "qemu qcow2"
	case tQraw:
		return "qemu raw"
	case tKit:
		return "nbdkit"
	case tFuseKit:
		return "nbdfuse+kit"
	case tQemuImg:
		return "qemu-img"
	case tRawFile:
		return "raw file"
	case tLocal:
		return "local"
	}
	return t
}
