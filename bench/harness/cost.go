package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Per-request cost: a fixed number of 4 KiB random writes, then reads, at
// queue depth 16 over TCP (the first transport) into a region written
// first, for every NBD server, counting
//
//   - system calls of the server process (every thread), from
//     `strace -c -f -p PID` attached for the run: per request, by call.
//     strace stops the server at every call, so the server runs several
//     times slower meanwhile and may batch differently than unobserved;
//     the counts are for comparing servers and versions, not a profile.
//     (`perf stat -p` and `perf record -p` with syscall tracepoints count
//     nothing on this kernel with the distribution's perf 6.1.)
//   - for sparsedisk, heap allocations: runtime.MemStats (Mallocs,
//     TotalAlloc, NumGC) read from the server's /debug/vars
//     (SPARSEDISK_DEBUG_ADDR) before and after a separate run without
//     strace. The two reads of /debug/vars allocate a few hundred objects
//     themselves, under 0.01 per request at the sizes used.

// costRow is the per-request cost of one server on one job.
type costRow struct {
	Target    string             `json:"target"`
	Job       string             `json:"job"`
	Requests  int64              `json:"requests"`
	Syscalls  float64            `json:"syscalls_per_request"`
	BySyscall map[string]float64 `json:"by_syscall_per_request"`
	Allocs    *float64           `json:"allocs_per_request,omitempty"`
	Bytes     *float64           `json:"alloc_bytes_per_request,omitempty"`
	GCs       *uint64            `json:"gcs,omitempty"`
	AllocReqs int64              `json:"alloc_run_requests,omitempty"`
}

func costJobs() []fioJob {
	n := cfg.costRequests * 4096
	return []fioJob{
		{name: "randwrite", rw: "randwrite", bs: "4k", iodepth: 16, size: cfg.seqSize, ioSize: n},
		{name: "randread", rw: "randread", bs: "4k", iodepth: 16, size: cfg.seqSize, ioSize: n},
	}
}

func benchCost(ctx context.Context, res *results) error {
	if _, err := findTool("strace"); err != nil {
		return fmt.Errorf("strace is not installed (make deps): no per-request cost rows")
	}
	dir := filepath.Join(workDir, "cost")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var errs []string
	for _, t := range nbdTargets {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err := costOf(ctx, res, t, dir); err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", t, err))
			warnf("cost %s: %v", t, err)
		}
	}
	return joinErrs(errs)
}

func costOf(ctx context.Context, res *results, t, dir string) error {
	defer teardown()
	settle(ctx)
	img, err := createImage(ctx, t, filepath.Join(dir, imgName(0, t)), cfg.imageSize)
	if err != nil {
		return err
	}
	defer func() { teardown(); removeImage(img) }()
	debug := ""
	if t == tSD {
		port, err := freePort()
		if err != nil {
			return err
		}
		debug = "127.0.0.1:" + strconv.Itoa(port)
		extraEnv = []string{"SPARSEDISK_DEBUG_ADDR=" + debug}
	}
	srv, err := serveNBD(t, img, transports[0], dir)
	extraEnv = nil
	if err != nil {
		return err
	}
	target := nbdTarget(fioJob{}, srv, "")
	fill := fioJob{name: "fill", rw: "write", bs: "1M", iodepth: 1, size: cfg.seqSize, endFsync: true}
	if _, err := runFio(ctx, fill, target...); err != nil {
		return err
	}
	for _, j := range costJobs() {
		c := costRow{Target: t, Job: j.name}
		if debug != "" {
			m0, err := memStats(debug)
			if err != nil {
				return err
			}
			r, err := runFio(ctx, j, target...)
			if err != nil {
				return err
			}
			m1, err := memStats(debug)
			if err != nil {
				return err
			}
			if r.IOs > 0 {
				a := float64(m1.Mallocs-m0.Mallocs) / float64(r.IOs)
				b := float64(m1.TotalAlloc-m0.TotalAlloc) / float64(r.IOs)
				g := uint64(m1.NumGC - m0.NumGC)
				c.Allocs, c.Bytes, c.GCs, c.AllocReqs = &a, &b, &g, r.IOs
			}
		}
		calls, reqs, err := straceRun(ctx, srv.svc.cmd.Process.Pid, j, target, filepath.Join(dir, "strace.txt"))
		if err != nil {
			return err
		}
		c.Requests = reqs
		c.BySyscall = map[string]float64{}
		for name, n := range calls {
			c.BySyscall[name] = float64(n) / float64(reqs)
			c.Syscalls += float64(n) / float64(reqs)
		}
		res.mu.Lock()
		res.costs = append(res.costs, c)
		res.mu.Unlock()
		extra := ""
		if c.Allocs != nil {
			extra = fmt.Sprintf(", %.2f allocations (%.0f B) per request", *c.Allocs, *c.Bytes)
		}
		progress("cost %-14s %-9s %.2f syscalls per request%s", t, j.name, c.Syscalls, extra)
	}
	return nil
}

type memStatsDoc struct {
	Mallocs, TotalAlloc uint64
	NumGC               uint32
}

// memStats reads runtime.MemStats from a sparsedisk debug endpoint.
func memStats(addr string) (memStatsDoc, error) {
	cl := http.Client{Timeout: 10 * time.Second}
	resp, err := cl.Get("http://" + addr + "/debug/vars")
	if err != nil {
		return memStatsDoc{}, err
	}
	defer resp.Body.Close()
	var doc struct{ Memstats memStatsDoc }
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return memStatsDoc{}, fmt.Errorf("/debug/vars: %w", err)
	}
	return doc.Memstats, nil
}

// straceRun runs job j with strace -c -f attached to pid and returns the
// calls per system call and the requests fio completed.
func straceRun(ctx context.Context, pid int, j fioJob, target []string, out string) (map[string]int64, int64, error) {
	os.Remove(out)
	st, err := start("strace", "strace", "-c", "-f", "-o", out, "-p", strconv.Itoa(pid))
	if err != nil {
		return nil, 0, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(st.output(), "attached") {
		if st.exited() || time.Now().After(deadline) {
			return nil, 0, fmt.Errorf("strace did not attach: %s", st.output())
		}
		time.Sleep(20 * time.Millisecond)
	}
	r, ferr := runFio(ctx, j, target...)
	// SIGINT makes strace detach and write its summary.
	syscall.Kill(st.cmd.Process.Pid, syscall.SIGINT)
	select {
	case <-st.done:
	case <-time.After(30 * time.Second):
		st.stop()
		return nil, 0, fmt.Errorf("strace did not exit on SIGINT")
	}
	if ferr != nil {
		return nil, 0, ferr
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return nil, 0, err
	}
	calls := parseStrace(string(data))
	if len(calls) == 0 || r.IOs == 0 {
		return nil, 0, fmt.Errorf("strace counted nothing: %q", truncate(string(data), 300))
	}
	return calls, r.IOs, nil
}

// parseStrace reads the table of strace -c: "% time seconds usecs/call
// calls [errors] syscall" per line; the total line is left out.
func parseStrace(s string) map[string]int64 {
	calls := map[string]int64{}
	for _, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || f[len(f)-1] == "total" {
			continue
		}
		if _, err := strconv.ParseFloat(f[0], 64); err != nil {
			continue
		}
		n, err := strconv.ParseInt(f[3], 10, 64)
		if err != nil {
			continue
		}
		calls[f[len(f)-1]] += n
	}
	return calls
}

// topSyscalls lists the calls of c with at least 0.05 per request, most
// frequent first, as "name 1.23".
func topSyscalls(c costRow) string {
	type kv struct {
		k string
		v float64
	}
	var l []kv
	for k, v := range c.BySyscall {
		if v >= 0.05 {
			l = append(l, kv{k, v})
		}
	}
	sort.Slice(l, func(i, j int) bool { return l[i].v > l[j].v || l[i].v == l[j].v && l[i].k < l[j].k })
	var parts []string
	for _, e := range l {
		parts = append(parts, fmt.Sprintf("%s %.2f", e.k, e.v))
	}
	return strings.Join(parts, ", ")
}

// findTool finds a program on PATH or in the sbin directories.
func findTool(name string) (string, error) {
	for _, d := range []string{"/usr/bin", "/usr/sbin", "/bin", "/sbin"} {
		if _, err := os.Stat(filepath.Join(d, name)); err == nil {
			return filepath.Join(d, name), nil
		}
	}
	return "", fmt.Errorf("%s not found", name)
}
