package main

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
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
	{0xbc, 0xbd, 0x22, 0xff}, // nbdkit memory
	{0x98, 0xdf, 0x8a, 0xff}, // nbdfuse+nbdkit
	{0x94, 0x67, 0xbd, 0xff}, // qemu-img qcow2
	{0x8c, 0x56, 0x4b, 0xff}, // raw sparse file
	{0x7f, 0x7f, 0x7f, 0xff}, // local raw file
}

func colourOf(t string) color.Color {
	return palette[slices.Index(allTargets, t)%len(palette)]
}

// bar is one drawn bar: the median, the min–max whisker and a label.
type bar struct {
	x, med, lo, hi float64
	colour         color.Color
	label          string
}

// bars draws bars at data coordinates (width in data units), each with a
// min–max whisker and its label written upwards above the whisker. Its
// data range holds every whisker and leaves room for the labels, so no
// bar is ever clipped.
type bars struct {
	bs    []bar
	width float64
	font  font.Font
}

func (b *bars) Plot(c draw.Canvas, p *plot.Plot) {
	trX, trY := p.Transforms(&c)
	ls := draw.LineStyle{Color: color.Black, Width: vg.Points(0.8)}
	ts := draw.TextStyle{Color: color.Black, Font: b.font, Rotation: math.Pi / 2, XAlign: draw.XLeft, YAlign: draw.YCenter, Handler: plot.DefaultTextHandler}
	for _, r := range b.bs {
		if math.IsNaN(r.med) {
			continue
		}
		x0, x1 := trX(r.x-b.width/2), trX(r.x+b.width/2)
		y0, y1 := trY(0), trY(r.med)
		c.FillPolygon(r.colour, c.ClipPolygonY([]vg.Point{{X: x0, Y: y0}, {X: x1, Y: y0}, {X: x1, Y: y1}, {X: x0, Y: y1}}))
		xm := trX(r.x)
		top := y1
		if !math.IsNaN(r.lo) && r.hi > r.lo {
			cap := (x1 - x0) / 4
			ylo, yhi := trY(r.lo), trY(r.hi)
			c.StrokeLine2(ls, xm, ylo, xm, yhi)
			c.StrokeLine2(ls, xm-cap, ylo, xm+cap, ylo)
			c.StrokeLine2(ls, xm-cap, yhi, xm+cap, yhi)
			top = max(top, yhi)
		}
		if r.label != "" {
			c.FillText(ts, vg.Point{X: xm, Y: top + vg.Points(2)}, r.label)
		}
	}
}

func (b *bars) DataRange() (xmin, xmax, ymin, ymax float64) {
	xmin, xmax = math.Inf(1), math.Inf(-1)
	for _, r := range b.bs {
		xmin, xmax = min(xmin, r.x-b.width), max(xmax, r.x+b.width)
		for _, v := range []float64{r.med, r.hi} {
			if !math.IsNaN(v) {
				ymax = max(ymax, v)
			}
		}
	}
	if ymax == 0 {
		ymax = 1
	}
	// Headroom for the labels above the tallest whisker.
	return xmin, xmax, 0, ymax * 1.3
}

// chartPanel is one panel: the rows sharing a panel key, drawn as groups
// of bars (one group per row, one bar per target).
type chartPanel struct {
	rows []*rowDef
}

func chartPanels() []chartPanel {
	var ps []chartPanel
	idx := map[string]int{}
	for _, r := range rowDefs {
		if r.group == "2 local" {
			// Page-cache speeds without a protocol would flatten every
			// server's bar; the local file is in the tables.
			continue
		}
		i, ok := idx[r.panel]
		if !ok {
			i = len(ps)
			idx[r.panel] = i
			ps = append(ps, chartPanel{})
		}
		ps[i].rows = append(ps[i].rows, r)
	}
	return ps
}

// barLabel is the ratio of sparsedisk to the bar's target (oriented as in
// the tables), "ref" on sparsedisk's own bar, and the value on a bar with
// no sparsedisk beside it.
func barLabel(res *results, r *rowDef, t string) string {
	if t == r.self {
		if len(r.targets) == 1 {
			return shortValue(res.median(r.id, t))
		}
		return "ref"
	}
	q := res.ratio(r, t)
	if math.IsNaN(q) {
		return ""
	}
	return fmt.Sprintf("%.2f×", q)
}

func shortValue(v float64) string {
	switch {
	case math.IsNaN(v):
		return ""
	case v >= 10000:
		return fmt.Sprintf("%.0fk", v/1000)
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.2g", v)
}

// drawChart draws one panel per workload: bars are medians, whiskers the
// min and max of the repetitions, the label on each peer's bar the ratio
// of sparsedisk to it; NBD panels hold one group of bars per transport.
func drawChart(res *results, path string) error {
	const cols = 4
	ps := chartPanels()
	nrows := (len(ps) + cols - 1) / cols
	panels := make([][]*plot.Plot, nrows)
	for i := range panels {
		panels[i] = make([]*plot.Plot, cols)
	}
	for i, cp := range ps {
		p := plot.New()
		first := cp.rows[0]
		title := first.title
		if len(cp.rows) == 1 {
			if len(first.goals) > 0 {
				title += fmt.Sprintf("\n%s vs %s", fmtRatio(res.ratio(first, first.goals[0].peer)), first.goals[0].peer)
			} else if pp := peersOf(first); len(pp) > 0 {
				title += fmt.Sprintf("\n%s vs %s", fmtRatio(res.ratio(first, pp[0])), pp[0])
			}
		}
		p.Title.Text = title
		p.Title.TextStyle.Font.Size = vg.Points(9)
		p.Y.Label.Text = first.unit
		if !first.higherBetter {
			p.Y.Label.Text += " (lower is better)"
		}
		p.Y.Label.TextStyle.Font.Size = vg.Points(8)
		p.Y.Tick.Label.Font.Size = vg.Points(7)
		p.X.Tick.Label.Font.Size = vg.Points(6.5)
		labelFont := p.Y.Tick.Label.Font
		labelFont.Size = vg.Points(6)
		bs := &bars{width: 0.8, font: labelFont}
		var ticks []plot.Tick
		x := 0.0
		for _, r := range cp.rows {
			start := x
			for _, t := range r.targets {
				lo, hi := res.spread(r.id, t)
				bs.bs = append(bs.bs, bar{x: x, med: res.median(r.id, t), lo: lo, hi: hi, colour: colourOf(t), label: barLabel(res, r, t)})
				if len(cp.rows) == 1 {
					ticks = append(ticks, plot.Tick{Value: x, Label: shortName(t)})
				}
				x++
			}
			if len(cp.rows) > 1 {
				ticks = append(ticks, plot.Tick{Value: (start + x - 1) / 2, Label: shortLabel(r.label)})
			}
			x += 0.6 // gap between groups
		}
		p.Add(bs)
		p.X.Tick.Marker = plot.ConstantTicks(ticks)
		p.Y.Min = 0
		p.Add(plotGrid())
		panels[i/cols][i%cols] = p
	}
	for i := len(ps); i < nrows*cols; i++ {
		panels[i/cols][i%cols] = plot.New()
		panels[i/cols][i%cols].HideAxes()
	}
	legendH := 3 * vg.Inch / 4
	width, height := 16*vg.Inch, vg.Length(nrows)*3.2*vg.Inch+legendH
	img := vgimg.New(width, height)
	dc := draw.New(img)
	drawLegend(dc, legendH)
	body := draw.Crop(dc, 0, 0, 0, -legendH)
	t := draw.Tiles{Rows: nrows, Cols: cols, PadX: vg.Millimeter * 4, PadY: vg.Millimeter * 4,
		PadTop: vg.Millimeter * 3, PadBottom: vg.Millimeter * 3, PadLeft: vg.Millimeter * 3, PadRight: vg.Millimeter * 3}
	canvases := plot.Align(panels, t, body)
	for i := range panels {
		for j := range panels[i] {
			if panels[i][j] != nil {
				panels[i][j].Draw(canvases[i][j])
			}
		}
	}
	f, err := createFile(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// drawLegend writes, in a strip along the top, what bars, whiskers and
// labels mean (first line) and the colour of every target (second line).
func drawLegend(dc draw.Canvas, h vg.Length) {
	p := plot.New()
	fnt := p.Y.Tick.Label.Font
	fnt.Size = vg.Points(9)
	ts := draw.TextStyle{Color: color.Black, Font: fnt, XAlign: draw.XLeft, YAlign: draw.YCenter, Handler: plot.DefaultTextHandler}
	x0 := dc.Min.X + vg.Inch/2
	y := dc.Max.Y - h/4
	dc.FillText(ts, vg.Point{X: x0, Y: y}, "Bars: median; whiskers: min–max of the repetitions; labels: sparsedisk ÷ that bar (above 1: sparsedisk better). "+
		"NBD panels: one group per transport. The local file of the NBD rows is in RESULTS.md.")
	y = dc.Max.Y - 3*h/4
	x := x0
	seen := map[string]bool{}
	for _, t := range allTargets {
		n := shortName(t)
		if seen[n] || t == tSDConv {
			continue
		}
		seen[n] = true
		sq := vg.Points(9)
		dc.FillPolygon(colourOf(t), []vg.Point{{X: x, Y: y - sq/2}, {X: x + sq, Y: y - sq/2}, {X: x + sq, Y: y + sq/2}, {X: x, Y: y + sq/2}})
		x += sq + vg.Points(3)
		dc.FillText(ts, vg.Point{X: x, Y: y}, t)
		x += ts.Width(t) + vg.Points(14)
	}
}

func shortLabel(l string) string {
	switch l {
	case "Unix socket":
		return "Unix"
	case "local file":
		return "local file"
	}
	for _, tr := range transports {
		if tr.label == l && tr.kind == transportTCP {
			return "TCP " + tr.cc
		}
	}
	return l
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
	case tKitMem:
		return "nbdkit mem"
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

func plotGrid() plot.Plotter {
	g := plotter.NewGrid()
	g.Vertical.Color = nil // horizontal lines only
	return g
}

func createFile(path string) (*os.File, error) { return os.Create(path) }
