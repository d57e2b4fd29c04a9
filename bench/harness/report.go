package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"
)

func fmtVal(v float64, unit string) string {
	if math.IsNaN(v) {
		return "—"
	}
	switch unit {
	case unitIOPS:
		return fmt.Sprintf("%.0f", v)
	case unitSec:
		if v < 10 {
			return fmt.Sprintf("%.3f", v)
		}
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

func fmtRatio(q float64) string {
	if math.IsNaN(q) {
		return "—"
	}
	return fmt.Sprintf("%.2f×", q)
}

// peersOf lists the columns for which a row has a ratio.
func peersOf(row *rowDef) []string {
	var ps []string
	for _, t := range row.targets {
		if t != row.self {
			ps = append(ps, t)
		}
	}
	return ps
}

// machine describes the host from /proc/cpuinfo, nproc, free and uname.
func machine(ctx context.Context) string {
	var b strings.Builder
	model, cpus := "", 0
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			switch strings.TrimSpace(k) {
			case "model name":
				model = strings.TrimSpace(v)
			case "processor":
				cpus++
			}
		}
	}
	fmt.Fprintf(&b, "- CPU: %s, %d logical CPUs in /proc/cpuinfo\n", model, cpus)
	if out, err := run(ctx, "nproc"); err == nil {
		fmt.Fprintf(&b, "- nproc: %s\n", strings.TrimSpace(string(out)))
	}
	if out, err := run(ctx, "uname", "-srm"); err == nil {
		fmt.Fprintf(&b, "- kernel: %s\n", strings.TrimSpace(string(out)))
	}
	if out, err := run(ctx, "df", "-hT", "--output=source,fstype,size", workDir); err == nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		fmt.Fprintf(&b, "- work directory file system: `%s`\n", strings.Join(strings.Fields(lines[len(lines)-1]), " "))
	}
	fmt.Fprintf(&b, "- Go: %s\n", runtime.Version())
	for _, v := range [][]string{{"fio", "--version"}, {"qemu-nbd", "--version"}, {"nbdkit", "--version"}, {"nbdcopy", "--version"}} {
		if out, err := run(ctx, v...); err == nil {
			fmt.Fprintf(&b, "- %s: %s\n", v[0], strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0])
		}
	}
	if out, err := run(ctx, "free", "-m"); err == nil {
		fmt.Fprintf(&b, "\n`free -m` at the end of the run:\n\n```\n%s\n```\n", strings.TrimRight(string(out), "\n"))
	}
	if data, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Fprintf(&b, "\nLoad average at the end of the run (the machine is shared): `%s`\n", strings.TrimSpace(string(data)))
	}
	return b.String()
}

func renderMarkdown(ctx context.Context, res *results, profs []*profileReport, convProf *profileReport, failures []string, elapsed time.Duration) string {
	var b strings.Builder
	mode := "full run"
	if cfg.quick {
		mode = "quick smoke run (`-quick`: small sizes, one repetition — not for conclusions)"
	}
	fmt.Fprintf(&b, "# sparsedisk against its peers\n\n")
	fmt.Fprintf(&b, "Written by `bench/harness` (never by hand) on %s, %s, %d repetition(s) per measurement, each cell the median with (min–max) of the repetitions; the run took %s.\n",
		time.Now().UTC().Format("2006-01-02 15:04 MST"), mode, cfg.reps, elapsed.Round(time.Second))
	fmt.Fprintf(&b, "Reproduce with `make bench` (or `go run ./bench/harness`); the chart is `results.png`, the profiles `profile.txt` and `profile-convert.txt`.\n\n")
	fmt.Fprintf(&b, "Ratios are oriented so that **above 1 means sparsedisk is better**: throughput and IOPS are sparsedisk ÷ peer, times and bytes on disk are peer ÷ sparsedisk. ")
	fmt.Fprintf(&b, "Every target ran on the same machine in the same run, interleaved (the order of targets rotates each repetition), so compare ratios rather than absolute numbers. Ratios are of medians.\n\n")
	fmt.Fprintf(&b, settleNote+"\n\n", mib(cfg.prefault))
	fmt.Fprintf(&b, "%s\n\n", ccNote())

	fmt.Fprintf(&b, "## Machine\n\n%s\n", machine(ctx))

	fmt.Fprintf(&b, "## Results\n\n")
	groups := []string{}
	for _, r := range rowDefs {
		if !slices.Contains(groups, r.group) {
			groups = append(groups, r.group)
		}
	}
	for _, g := range groups {
		var rows []*rowDef
		for _, r := range rowDefs {
			if r.group == g {
				rows = append(rows, r)
			}
		}
		// The rows of a group share their targets.
		ts := rows[0].targets
		labelled := rows[0].tr != nil
		fmt.Fprintf(&b, "### %s\n\n| row |", groupTitle(g))
		if labelled {
			fmt.Fprintf(&b, " transport |")
		}
		fmt.Fprintf(&b, " unit |")
		for _, t := range ts {
			fmt.Fprintf(&b, " %s |", t)
		}
		for _, p := range peersOf(rows[0]) {
			fmt.Fprintf(&b, " vs %s |", p)
		}
		cols := 2 + len(ts) + len(peersOf(rows[0]))
		if labelled {
			cols++
		}
		fmt.Fprintf(&b, "\n|---|---|%s\n", strings.Repeat("---:|", cols-2))
		for _, r := range rows {
			fmt.Fprintf(&b, "| %s |", r.title)
			if labelled {
				fmt.Fprintf(&b, " %s |", r.label)
			}
			fmt.Fprintf(&b, " %s |", r.unit)
			for _, t := range ts {
				fmt.Fprintf(&b, " %s |", fmtCell(res, r, t))
			}
			for _, p := range peersOf(r) {
				q := fmtRatio(res.ratio(r, p))
				for _, gl := range r.goals {
					if gl.peer == p {
						q = "**" + q + "**"
					}
				}
				fmt.Fprintf(&b, " %s |", q)
			}
			fmt.Fprintf(&b, "\n")
		}
		fmt.Fprintf(&b, "\n")
		if note := groupNote(g); note != "" {
			fmt.Fprintf(&b, "%s\n\n", note)
		}
	}
	fmt.Fprintf(&b, "Bold ratios have a target (next section).\n\n")
	fmt.Fprintf(&b, "%s", renderCosts(res))

	fmt.Fprintf(&b, "## Targets\n\n| target | row | ratio | needed | |\n|---|---|---:|---:|---|\n")
	met, total := 0, 0
	var missed []goalStatus
	for _, g := range res.goals() {
		total++
		status := "met"
		switch {
		case math.IsNaN(g.ratio):
			status = "**no data**"
			missed = append(missed, g)
		case g.met:
			met++
		default:
			status = fmt.Sprintf("**missed by %.1f%%**", (1-g.ratio/g.goal.min)*100)
			missed = append(missed, g)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %.2f× | %s |\n", g.goal.what, g.row.fullTitle(), fmtRatio(g.ratio), g.goal.min, status)
	}
	fmt.Fprintf(&b, "\n%d of %d targets met.", met, total)
	if len(missed) > 0 {
		sort.SliceStable(missed, func(i, j int) bool { return missed[i].ratio/missed[i].goal.min < missed[j].ratio/missed[j].goal.min })
		fmt.Fprintf(&b, " Missed, worst first:\n\n")
		for _, g := range missed {
			why := ""
			switch {
			case math.IsNaN(g.ratio):
				why = " (no data: see Failures)"
			case g.row.job != nil:
				why = " Why: see this row's profile below."
			case g.row.id == "space":
				why = " Why: the LUT, see the note below."
			}
			fmt.Fprintf(&b, "- %s: %s — %s needed, got %s.%s\n", g.row.fullTitle(), g.goal.what, fmtRatio(g.goal.min), fmtRatio(g.ratio), why)
		}
	}
	fmt.Fprintf(&b, "\n\n")

	if lut := medianOf(res.lutMiB); !math.IsNaN(lut) {
		sd, q := res.median("space", tSD), res.median("space", tQcow)
		fmt.Fprintf(&b, "Space: of sparsedisk's %.1f MiB, %.1f MiB is the LUT (one 4-byte entry per 4 KiB sector of the 20 GiB disk, written in full with 0xFFFFFFFF at create, so it cannot be a hole); data and descriptor take %.1f MiB against qcow2's %.1f MiB in total.\n\n",
			sd, lut, sd-lut, q)
	}

	for i, p := range profs {
		if i == 0 {
			fmt.Fprintf(&b, "## Profile of the worst row\n\n%s\n", renderProfile(p, true))
			continue
		}
		if i == 1 {
			fmt.Fprintf(&b, "## Profiles of the other rows that miss a target\n\n")
		}
		fmt.Fprintf(&b, "### %s\n\n%s\n", p.row.fullTitle(), renderProfile(p, true))
	}
	if convProf != nil {
		fmt.Fprintf(&b, "## Profile of sparsedisk convert\n\n%s\n", renderProfile(convProf, false))
	}

	if len(failures) > 0 {
		fmt.Fprintf(&b, "## Failures\n\nThese workloads failed in this run (their cells show —):\n\n")
		for _, f := range failures {
			fmt.Fprintf(&b, "- `%s`\n", truncate(strings.ReplaceAll(f, workDir, "$WORK"), 600))
		}
		fmt.Fprintf(&b, "\n")
	}

	fmt.Fprintf(&b, "## Method\n\n")
	fmt.Fprintf(&b, "- NBD rows: each repetition visits every server × transport (and the local file) in a rotated order; each gets a fresh, empty %s image, "+
		"`settle` and `prefault`, then fio's `nbd` engine (libnbd) writes %s sequentially in 1 MiB requests at queue depth 1 (allocation path, then a flush), reads it back, "+
		"then runs 4 KiB random writes (in place) and random reads over that region at queue depth 16 for %d s each, on one connection and then on four (`--numjobs=4`, each job its own connection). "+
		"Servers: `sparsedisk serve --tcp-congestion=system`, `nbdkit file`, `nbdkit memory` (RAM, no file system: the cost of the protocol and transport through nbdkit's request loop), `qemu-nbd -f qcow2 --cache=writeback --shared=8`. "+
		"The local file runs the same jobs on the file itself (psync; io_uring at depth 16), buffered, with the cache as warm as the servers': an upper bound for the reads, not for the writes (see the local-file table).\n",
		cfg.imageSize, cfg.seqSize, cfg.randNBD)
	fmt.Fprintf(&b, "- nbdcopy (4): a %s raw file with %s of random data in 1 MiB extents spread evenly; the qcow2 copy is made by `qemu-img convert`, the sparsedisk copy by `nbdcopy --destination-is-zero` into `sparsedisk serve`. Time of `nbdcopy URI null:` (default request size and extents), which shows how well holes are reported and skipped.\n",
		gib(cfg.copyDisk), mib(cfg.copyData))
	fmt.Fprintf(&b, "- Space (5): `mkfs.ext4 -d` with %d files of 16 MiB of random data onto a 20 GiB disk; the kernel here has no NBD module, so sparsedisk goes through `sparsedisk mount` and qcow2 through `nbdfuse` over `qemu-nbd`; raw is a sparse file. Bytes on disk = st_blocks × 512 of every file of the image (sparsedisk: descriptor, segments and LUT) after unmount.\n",
		cfg.spaceFiles)
	fmt.Fprintf(&b, "- FUSE rows (6): fio with `--direct=1` on the file in the mount (`sparsedisk mount` vs `nbdfuse` over `nbdkit file` on a Unix socket), fresh image per repetition, `settle` and `prefault` before; sequential %s, random for %d s. Behind FUSE both engines read and write the page cache, so the local file runs the same jobs buffered (not O_DIRECT, which would measure the disk instead) with the same warm cache: an upper bound for the reads; for the writes only a reference (see the local-file table).\n",
		cfg.seqSize, cfg.randFUSE)
	fmt.Fprintf(&b, "- Convert (7): a %s raw file with 10%% of its 64 KiB blocks (chosen at random) holding random data; wall time of each converter including a final `sync` of its output, and bytes of its output on disk. Once per run, untimed, the sparsedisk image is converted back to raw, compared byte for byte with the source and checked (`sparsedisk check`).\n",
		gib(cfg.convertSize))
	fmt.Fprintf(&b, "- Per-request cost: see that section.\n\n")

	fmt.Fprintf(&b, "## Every sample\n\nIn run order (the medians above come from these; `results.json` holds the same):\n\n| row | target | samples |\n|---|---|---|\n")
	for _, r := range rowDefs {
		for _, t := range r.targets {
			var vs []string
			for _, v := range res.allSamples(r.id, t) {
				vs = append(vs, fmtVal(v, r.unit))
			}
			if len(vs) > 0 {
				fmt.Fprintf(&b, "| %s | %s | %s |\n", r.title, t, strings.Join(vs, ", "))
			}
		}
	}
	fmt.Fprintf(&b, "\n")

	fmt.Fprintf(&b, "## Commands run\n\nEvery distinct command line, in order (`$WORK` is the scratch directory, `$PORT` a free loopback port picked per server):\n\n```\n")
	cmdLogMu.Lock()
	for _, c := range cmdLog {
		fmt.Fprintln(&b, c)
	}
	cmdLogMu.Unlock()
	fmt.Fprintf(&b, "```\n")
	return b.String()
}

func groupTitle(g string) string {
	return map[string]string{
		"1 NBD":     "NBD: fio --ioengine=nbd, every server over every transport",
		"2 local":   "The local file: the NBD jobs without a server (an upper bound for reads, not for writes: see below)",
		"4 nbdcopy": "nbdcopy of a sparse disk (4)",
		"5 space":   "Space on disk (5)",
		"6 FUSE":    "FUSE (6): fio --direct=1 on the file in the mount",
		"7 convert": "Convert from raw (7)",
	}[g]
}

func renderProfile(p *profileReport, worst bool) string {
	if p == nil {
		return "Not run.\n"
	}
	if p.err != "" {
		return fmt.Sprintf("The profile could not be taken: `%s`\n", p.err)
	}
	var b strings.Builder
	if worst {
		fmt.Fprintf(&b, "Row **%s** (%s vs %s). It was run again for sparsedisk alone with `perf record -F 999 -g` attached to the serving process (%s samples):\n\n",
			p.row.fullTitle(), fmtRatio(p.ratio), p.peer, p.samples)
	} else {
		fmt.Fprintf(&b, "The convert row has no target, but sparsedisk is %s of %s there, so it was profiled too: one more convert under `perf record -F 999 -g` (%s samples):\n\n",
			fmtRatio(p.ratio), p.peer, p.samples)
	}
	fmt.Fprintf(&b, "```\n%s\n```\n\n", p.command)
	fmt.Fprintf(&b, "Where the sparsedisk process's CPU time went (self time, by bucket):\n\n| bucket | share |\n|---|---:|\n")
	type kv struct {
		k string
		v float64
	}
	var cats []kv
	for k, v := range p.category {
		cats = append(cats, kv{k, v})
	}
	sort.Slice(cats, func(i, j int) bool { return cats[i].v > cats[j].v })
	for _, c := range cats {
		fmt.Fprintf(&b, "| %s | %.1f%% |\n", c.k, c.v)
	}
	fmt.Fprintf(&b, "\nTop symbols by self time:\n\n| self | symbol |\n|---:|---|\n")
	for i, s := range p.selfTop {
		if i == 15 {
			break
		}
		fmt.Fprintf(&b, "| %.1f%% | `%s` |\n", s.pct, s.sym)
	}
	if len(p.ours) > 0 {
		fmt.Fprintf(&b, "\nsparsedisk functions by cumulative time (they and what they call):\n\n| cumulative | function |\n|---:|---|\n")
		for i, s := range p.ours {
			if i == 12 {
				break
			}
			fmt.Fprintf(&b, "| %.1f%% | `%s` |\n", s.pct, s.sym)
		}
	}
	if p.pprofTop != "" {
		fmt.Fprintf(&b, "\nThe same server's Go CPU profile over %d s inside the measured job, after the fill (`SPARSEDISK_DEBUG_ADDR`, `/debug/pprof/profile?seconds=%d`, then `go tool pprof -top`; Go code and the syscalls it makes, not the kernel's side):\n\n```\n%s\n```\n", cfg.profileSecs, cfg.profileSecs, pprofHead(p.pprofTop, 16))
	}
	fmt.Fprintf(&b, "\n%s Full report with call chains: `%s`.\n", profileVerdict(p), p.file)
	return b.String()
}

// profileVerdict states, from the numbers alone, where the time goes.
func profileVerdict(p *profileReport) string {
	var kernel, gc, ours, sched float64
	for k, v := range p.category {
		switch {
		case strings.HasPrefix(k, "kernel"):
			kernel += v
		case k == "Go: allocation and GC":
			gc = v
		case k == "sparsedisk code":
			ours = v
		case k == "Go: scheduler and other runtime":
			sched = v
		}
	}
	self := func(subs ...string) float64 {
		var t float64
		for _, s := range p.selfTop {
			for _, sub := range subs {
				if strings.Contains(s.sym, sub) {
					t += s.pct
					break
				}
			}
		}
		return t
	}
	cum := func(sub string) float64 {
		for _, s := range p.ours {
			if strings.Contains(s.sym, sub) {
				return s.pct
			}
		}
		return 0
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Findings (derived from the samples above):")
	if p.wall > 0 && p.cpu > 0 {
		u := p.cpu.Seconds() / p.wall.Seconds()
		fmt.Fprintf(&b, " the process used %.2f s of CPU in %.2f s of wall time (%.0f%% of one CPU)", p.cpu.Seconds(), p.wall.Seconds(), u*100)
		switch {
		case u < 0.6 && p.row.job == nil:
			fmt.Fprintf(&b, " — it mostly waits (for reads, writes and syncs to complete, for a CPU on this shared host), not computes;")
		case u < 0.6:
			fmt.Fprintf(&b, " — it mostly waits (for the client's next request, for the disk, for a CPU on this shared host), so latency per request, not CPU, limits the row;")
		default:
			fmt.Fprintf(&b, " — it is CPU-bound;")
		}
	}
	fmt.Fprintf(&b, " %.0f%% of the samples are in the kernel, %.0f%% in the Go scheduler and runtime, %.0f%% in allocation and GC, %.0f%% in sparsedisk's own code (self time).",
		kernel, sched, gc, ours)
	if c := p.category["kernel: copying and zeroing memory"]; c >= 20 {
		fmt.Fprintf(&b, " %.0f%% is the kernel copying data (`_copy_to_iter`: page cache → user buffer on pread; `_copy_from_iter`: user buffer → socket on send) — the same copies every user-space server makes, so they set the floor rather than explain a gap.", c)
	}
	if sw := self("finish_task_switch", "_raw_spin_unlock_irq"); sw >= 15 && p.row.job == nil {
		fmt.Fprintf(&b, " %.0f%% is threads being switched out and woken (`finish_task_switch`, wake-up spinlocks) between the parallel copiers and I/O completions.", sw)
	} else if sw >= 15 {
		fmt.Fprintf(&b, " %.0f%% is threads being switched out and woken (`finish_task_switch`, wake-up spinlocks): every request crosses threads (request reader → worker goroutine → reply writer, and the client), and on 2 shared CPUs each hand-off is a context switch that a single-threaded request loop would not pay.", sw)
	}
	if z := self("memset", "clear_page", "__filemap_add_folio", "page_cache_ra", "memcg"); z >= 8 {
		fmt.Fprintf(&b, " %.0f%% is the kernel allocating zero-filled page-cache pages (`memset`, `__filemap_add_folio`, read-ahead, memcg charging): holes of the input are read rather than skipped with SEEK_DATA/SEEK_HOLE.", z)
	}
	if fsw := self("ext4_block_write_begin", "rwsem_spin_on_owner", "ext4_da_", "block_commit_write"); fsw >= 20 {
		fmt.Fprintf(&b, " %.0f%% is ext4's buffered-write path (`ext4_block_write_begin`", fsw)
		if self("rwsem_spin_on_owner") >= 1 {
			fmt.Fprintf(&b, ", and `rwsem_spin_on_owner`: several writers waiting for one file's inode lock, which ext4 holds exclusively for each buffered write, so parallel 4 KiB writes to one segment file serialize")
		}
		fmt.Fprintf(&b, ").")
	}
	if z := self("memeqbody", "runtime.memclr"); z >= 10 {
		fmt.Fprintf(&b, " %.0f%% is clearing buffers (`runtime.memclrNoHeapPointers`) and comparing them with zeros (`memeqbody`) in user space.", z)
	}
	if s := cum(".send"); s >= 30 {
		fmt.Fprintf(&b, " The NBD reply path (`nbd.(*transmission).send`, writing to the socket) holds %.0f%% cumulative.", s)
	}
	if r := cum("blockif.(*Disk).ReadAt"); r >= 10 {
		fmt.Fprintf(&b, " The engine's read (`blockif.(*Disk).ReadAt`, almost all of it the pread) holds %.0f%% cumulative.", r)
	}
	if gc >= 10 {
		fmt.Fprintf(&b, " Allocation and GC are a visible share: per-request buffers are the first thing to pool.")
	}
	if ours < 5 {
		fmt.Fprintf(&b, " sparsedisk's own computation (LUT lookups, locks, zero checks) is under 5%%: it is not the bottleneck.")
	}
	return b.String()
}

// renderSummary is the short table printed on stdout at the end.
func renderSummary(res *results) string {
	var b strings.Builder
	for _, r := range rowDefs {
		fmt.Fprintf(&b, "%-60s %10s %-6s", r.fullTitle(), fmtVal(res.median(r.id, r.self), r.unit), r.unit)
		for _, p := range peersOf(r) {
			fmt.Fprintf(&b, "  %s %s", p, fmtRatio(res.ratio(r, p)))
		}
		fmt.Fprintln(&b)
	}
	for _, g := range res.goals() {
		if !g.met {
			fmt.Fprintf(&b, "MISSED: %s: %s (%s)\n", g.row.fullTitle(), g.goal.what, fmtRatio(g.ratio))
		}
	}
	return b.String()
}

// writeJSON saves every sample, so the numbers behind RESULTS.md can be
// checked or re-plotted without running again.
func writeJSON(res *results, path string) error {
	type cell struct {
		Row       string    `json:"row"`
		Title     string    `json:"title"`
		Transport string    `json:"transport,omitempty"`
		Unit      string    `json:"unit"`
		Target    string    `json:"target"`
		Samples   []float64 `json:"samples"`
		Median    float64   `json:"median"`
		Min       float64   `json:"min"`
		Max       float64   `json:"max"`
	}
	var cells []cell
	for _, r := range rowDefs {
		for _, t := range r.targets {
			if s := res.allSamples(r.id, t); len(s) > 0 {
				cells = append(cells, cell{r.id, r.title, r.label, r.unit, t, s, medianOf(s), slices.Min(s), slices.Max(s)})
			}
		}
	}
	doc := map[string]any{"date": time.Now().UTC().Format(time.RFC3339), "quick": cfg.quick, "repetitions": cfg.reps, "cells": cells, "lut_mib": res.lutMiB,
		"per_request_cost": res.costs, "host_congestion_control": hostCC}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// pprofHead keeps the first n lines of a pprof listing.
func pprofHead(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}

// fullTitle names a row with its transport, where it has one.
func (r *rowDef) fullTitle() string {
	if r.label != "" {
		return r.title + " — " + r.label
	}
	return r.title
}

// fmtCell is "median (min–max)" of row/target, or just the value when
// there is one sample.
func fmtCell(res *results, r *rowDef, t string) string {
	m := res.median(r.id, t)
	if math.IsNaN(m) {
		return "—"
	}
	if res.count(r.id, t) < 2 {
		return fmtVal(m, r.unit)
	}
	lo, hi := res.spread(r.id, t)
	return fmt.Sprintf("%s (%s–%s)", fmtVal(m, r.unit), fmtVal(lo, r.unit), fmtVal(hi, r.unit))
}

func groupNote(g string) string {
	switch g {
	case "2 local":
		return "For reads the local file is a true ceiling: the same page cache with no protocol and no server. For writes it is not: here its writes, and those of nbdkit file, " +
			"which writes its file the same way, are slower than sparsedisk's through NBD. The likely cause, measured on this machine before: 1 MiB-aligned buffered writes get 1 MiB " +
			"page-cache folios, slow to allocate in this VM, and each later 4 KiB write walks the whole folio's buffer heads in ext4 (`ext4_block_write_begin`); sparsedisk writes " +
			"its segment files in pieces of at most 64 KiB (vfs `maxWriteChunk`). Compare writes with nbdkit memory instead.\n"
	case "1 NBD":
		return "nbdkit memory keeps the disk in RAM and has no file system underneath: it shows what the NBD protocol and the transport cost with nbdkit's request loop and no storage work at all. " +
			"It is a reference, not a hard ceiling: a server with a cheaper request path can pass it (sparsedisk does on some read rows). Unix-socket rows need no congestion control."
	}
	return ""
}

// ccNote explains the congestion-control rows.
func ccNote() string {
	var labels []string
	for _, t := range transports {
		labels = append(labels, t.label)
	}
	s := fmt.Sprintf("Transports: %s. ", strings.Join(labels, "; "))
	if inNetns {
		s += "The run happens in a private network namespace (the host's settings are untouched); before each TCP server starts, the namespace's default congestion control (`net.ipv4.tcp_congestion_control`) is set, " +
			"so the server's and fio's sockets both use it, and sparsedisk runs with `--tcp-congestion=system` so it keeps that default like every peer (by default it switches its loopback connections to cubic)."
	} else {
		s += "The harness could not use a private network namespace (not root), so only the host's default congestion control was measured; sparsedisk ran with `--tcp-congestion=system` like the peers."
	}
	return s
}

// renderCosts is the per-request cost section.
func renderCosts(res *results) string {
	if len(res.costs) == 0 {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "### Per-request cost\n\n%d 4 KiB requests at queue depth 16 over %s into a written region, per server. System calls of the server process "+
		"(all threads) counted by `strace -c -f -p PID` attached for the run (strace slows the server several-fold, so batching may differ from an unobserved run); "+
		"heap allocations of sparsedisk from `runtime.MemStats` (`/debug/vars`, `SPARSEDISK_DEBUG_ADDR`) before and after a separate run without strace.\n\n", cfg.costRequests, transports[0].label)
	fmt.Fprintf(&b, "| server | job | syscalls / request | by call (≥ 0.05 / request) | allocations / request | bytes allocated / request | GCs |\n|---|---|---:|---|---:|---:|---:|\n")
	for _, c := range res.costs {
		a, by, gcs := "—", "—", "—"
		if c.Allocs != nil {
			a, by, gcs = fmt.Sprintf("%.2f", *c.Allocs), fmt.Sprintf("%.0f", *c.Bytes), fmt.Sprint(*c.GCs)
		}
		fmt.Fprintf(&b, "| %s | %s | %.2f | %s | %s | %s | %s |\n", c.Target, c.Job, c.Syscalls, topSyscalls(c), a, by, gcs)
	}
	fmt.Fprintf(&b, "\n")
	return b.String()
}
