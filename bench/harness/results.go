package main

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
)

// Targets: the thing under test and its peers.
const (
	tSD       = "sparsedisk"
	tQcow     = "qemu-nbd qcow2"
	tQraw     = "qemu-nbd raw"
	tKit      = "nbdkit file"
	tKitMem   = "nbdkit memory"
	tLocal    = "local raw file"
	tFuseKit  = "nbdfuse+nbdkit file"
	tRawFile  = "raw sparse file"
	tQemuImg  = "qemu-img convert qcow2"
	tSDConv   = "sparsedisk convert"
	unitMiBps = "MiB/s"
	unitIOPS  = "IOPS"
	unitSec   = "s"
	unitMiB   = "MiB"
)

// allTargets fixes the column order and the chart colours.
var allTargets = []string{tSD, tSDConv, tQcow, tQraw, tKit, tKitMem, tFuseKit, tQemuImg, tRawFile, tLocal}

// goal is one performance target: sparsedisk's ratio to peer at least min.
type goal struct {
	peer string
	min  float64
	what string
}

// rowDef describes one line of the table.
type rowDef struct {
	id, group, title, unit string
	higherBetter           bool
	self                   string // the sparsedisk column of this row
	targets                []string
	goals                  []goal
	// profile: how to rerun sparsedisk's side of the row under perf.
	job *fioJob
	// NBD rows: the transport; the chart draws rows with the same panel
	// key as groups of bars in one panel, labelled with label.
	tr           *transport
	panel, label string
}

// The performance targets, stated here so the report states them itself.
// qcow2 behind qemu-nbd is what sparsedisk replaces; nbdkit file is the
// fastest plain-file NBD server; nbdkit memory serves from RAM with no
// file system at all, so on small I/O it is close to what the protocol and
// the transport allow.
var (
	goalQcow     = goal{tQcow, 1.0, "≥1.0× qemu-nbd qcow2"}
	nbdSeqGoals  = []goal{goalQcow, {tKit, 1.0, "≥1.0× nbdkit file"}}
	nbdRReadGoal = []goal{goalQcow, {tKit, 1.2, "≥1.2× nbdkit file"}, {tKitMem, 0.9, "≥0.9× nbdkit memory"}}
	nbdRWritGoal = []goal{goalQcow, {tKit, 1.5, "≥1.5× nbdkit file"}, {tKitMem, 0.9, "≥0.9× nbdkit memory"}}
	nbdMultiGoal = []goal{{tKit, 1.0, "≥1.0× nbdkit file"}}
	fuseGoals    = []goal{{tFuseKit, 1.0, "≥1.0× nbdfuse+nbdkit file"}}
)

// nbdTargets are the servers of every NBD row.
var nbdTargets = []string{tSD, tKit, tKitMem, tQcow}

var rowDefs []*rowDef

// nbdWorkload is one fio job run on every NBD server and transport.
type nbdWorkload struct {
	key, title string
	unit       string
	goals      []goal
}

func nbdWorkloads() []nbdWorkload {
	return []nbdWorkload{
		{"seqwrite", "seq write 1M qd1 (alloc)", unitMiBps, nbdSeqGoals},
		{"seqread", "seq read 1M qd1", unitMiBps, nbdSeqGoals},
		{"randwrite", "rand write 4K qd16", unitIOPS, nbdRWritGoal},
		{"randread", "rand read 4K qd16", unitIOPS, nbdRReadGoal},
		{"randwrite4", "rand write 4K 4 conns × qd16", unitIOPS, nbdMultiGoal},
		{"randread4", "rand read 4K 4 conns × qd16", unitIOPS, nbdMultiGoal},
	}
}

// nbdRowID names the row of workload w over transport key (or "local").
func nbdRowID(w, key string) string { return "nbd-" + w + "@" + key }

func defineRows() {
	jobs := nbdJobs()
	rowDefs = nil
	for i, w := range nbdWorkloads() {
		for k := range transports {
			tr := &transports[k]
			rowDefs = append(rowDefs, &rowDef{id: nbdRowID(w.key, tr.key), group: "1 NBD", title: w.title, unit: w.unit, higherBetter: true,
				targets: nbdTargets, goals: w.goals, job: &jobs[i], tr: tr, panel: "nbd-" + w.key, label: tr.label})
		}
		rowDefs = append(rowDefs, &rowDef{id: nbdRowID(w.key, "local"), group: "2 local", title: w.title, unit: w.unit, higherBetter: true,
			self: tLocal, targets: []string{tLocal}, panel: "nbd-" + w.key, label: "local file"})
	}
	rowDefs = append(rowDefs,
		&rowDef{id: "nbdcopy", group: "4 nbdcopy", title: fmt.Sprintf("nbdcopy %s (%s data) to null:", gib(cfg.copyDisk), mib(cfg.copyData)), unit: unitSec,
			targets: []string{tSD, tQcow, tQraw, tKit, tLocal}, goals: []goal{{tQcow, 1 / 1.5, "within 1.5× of qemu-nbd qcow2"}, {tQraw, 1 / 1.5, "within 1.5× of qemu-nbd raw"}}},
		&rowDef{id: "space", group: "5 space", title: fmt.Sprintf("space: ext4 on 20 GiB + %d MiB files", cfg.spaceFiles*16), unit: unitMiB,
			targets: []string{tSD, tQcow, tRawFile}, goals: []goal{{tQcow, 1.0, "space ≤ qcow2"}}},
	)
	fuseT := []string{tSD, tFuseKit, tLocal}
	for _, j := range fuseJobs() {
		j := j
		unit := unitMiBps
		if strings.HasPrefix(j.rw, "rand") {
			unit = unitIOPS
		}
		rowDefs = append(rowDefs, &rowDef{id: "fuse-" + j.name, group: "6 FUSE", title: "FUSE " + fuseTitle(j), unit: unit, higherBetter: true,
			targets: fuseT, goals: fuseGoals, job: &j})
	}
	rowDefs = append(rowDefs,
		&rowDef{id: "convert-time", group: "7 convert", title: fmt.Sprintf("convert %s raw (10%% data)", gib(cfg.convertSize)), unit: unitSec,
			self: tSDConv, targets: []string{tSDConv, tQemuImg}},
		&rowDef{id: "convert-size", group: "7 convert", title: "convert output on disk", unit: unitMiB,
			self: tSDConv, targets: []string{tSDConv, tQemuImg}},
	)
	for _, r := range rowDefs {
		if r.self == "" {
			r.self = tSD
		}
		if r.panel == "" {
			r.panel = r.id
		}
	}
}

func fuseTitle(j fioJob) string {
	kind := map[string]string{"write": "seq write 1M", "read": "seq read 1M", "randwrite": "rand write 4K", "randread": "rand read 4K"}[j.rw]
	return fmt.Sprintf("%s %s qd%d", kind, j.engine, j.iodepth)
}

func gib(n int64) string { return fmt.Sprintf("%g GiB", float64(n)/(1<<30)) }
func mib(n int64) string { return fmt.Sprintf("%g MiB", float64(n)/(1<<20)) }

func rowByID(id string) *rowDef {
	for _, r := range rowDefs {
		if r.id == id {
			return r
		}
	}
	panic("no row " + id)
}

// results holds every sample, by row and target.
type results struct {
	mu      sync.Mutex
	samples map[string]map[string][]float64
	// lutMiB: the sparsedisk LUT's share of the space row, per repetition.
	lutMiB []float64
	// costs: per-request system calls and allocations (cost.go).
	costs []costRow
}

func newResults() *results {
	defineRows()
	return &results{samples: map[string]map[string][]float64{}}
}

func (r *results) add(row, target string, v float64) {
	rowByID(row) // panics on a typo
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.samples[row] == nil {
		r.samples[row] = map[string][]float64{}
	}
	r.samples[row][target] = append(r.samples[row][target], v)
}

// spread is the smallest and largest sample of row/target (NaN if none).
func (r *results) spread(row, target string) (lo, hi float64) {
	s := r.allSamples(row, target)
	if len(s) == 0 {
		return math.NaN(), math.NaN()
	}
	return slices.Min(s), slices.Max(s)
}

// median of the samples of row/target, NaN when there are none.
func (r *results) median(row, target string) float64 {
	r.mu.Lock()
	s := slices.Clone(r.samples[row][target])
	r.mu.Unlock()
	if len(s) == 0 {
		return math.NaN()
	}
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (r *results) count(row, target string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.samples[row][target])
}

// ratio of the row's sparsedisk median to peer's, oriented so that above
// 1 always means sparsedisk is better (faster, or smaller on disk).
func (r *results) ratio(row *rowDef, peer string) float64 {
	s, p := r.median(row.id, row.self), r.median(row.id, peer)
	if math.IsNaN(s) || math.IsNaN(p) || s == 0 || p == 0 {
		return math.NaN()
	}
	if row.higherBetter {
		return s / p
	}
	return p / s
}

// goalStatus evaluates one goal: met, and the ratio.
type goalStatus struct {
	row   *rowDef
	goal  goal
	ratio float64
	met   bool
}

func (r *results) goals() []goalStatus {
	var out []goalStatus
	for _, row := range rowDefs {
		for _, g := range row.goals {
			q := r.ratio(row, g.peer)
			out = append(out, goalStatus{row: row, goal: g, ratio: q, met: !math.IsNaN(q) && q >= g.min-1e-9})
		}
	}
	return out
}

// allSamples lists every sample of a row and target, in run order.
func (r *results) allSamples(row, target string) []float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.samples[row][target])
}

func medianOf(s []float64) float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	s = slices.Clone(s)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
