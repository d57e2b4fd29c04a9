package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
)

// fioJob is one fio run: the workload-specific options; the target adds
// where the I/O goes (nbd engine and URI, or a file name).
type fioJob struct {
	name     string
	rw       string // write, read, randwrite, randread
	bs       string
	iodepth  int
	engine   string // for files: psync, libaio, io_uring; ignored for NBD
	size     string // region (and amount, unless runtime > 0)
	runtime  int    // seconds; 0 = run through size once
	direct   bool
	endFsync bool
	numjobs  int   // > 1: that many jobs at once, each with its own connection (NBD) or file descriptor
	ioSize   int64 // > 0: stop after this many bytes (a fixed number of requests)
}

// fioResult is what the harness keeps of fio's JSON output.
type fioResult struct {
	MiBps float64
	IOPS  float64
	IOs   int64 // requests completed (reads and writes, every job)
}

type fioJSON struct {
	Jobs []struct {
		Error int `json:"error"`
		Read  struct {
			BwBytes  float64 `json:"bw_bytes"`
			IOPS     float64 `json:"iops"`
			TotalIOs int64   `json:"total_ios"`
		} `json:"read"`
		Write struct {
			BwBytes  float64 `json:"bw_bytes"`
			IOPS     float64 `json:"iops"`
			TotalIOs int64   `json:"total_ios"`
		} `json:"write"`
	} `json:"jobs"`
}

func (j fioJob) args() []string {
	a := []string{"fio", "--name=" + j.name, "--rw=" + j.rw, "--bs=" + j.bs,
		"--iodepth=" + strconv.Itoa(j.iodepth), "--size=" + j.size,
		"--output-format=json", "--randrepeat=0", "--norandommap", "--invalidate=0"}
	if j.numjobs > 1 {
		a = append(a, "--numjobs="+strconv.Itoa(j.numjobs))
	}
	if j.ioSize > 0 {
		a = append(a, "--io_size="+strconv.FormatInt(j.ioSize, 10))
	}
	if j.runtime > 0 {
		a = append(a, "--time_based", "--runtime="+strconv.Itoa(j.runtime))
	}
	if j.direct {
		a = append(a, "--direct=1")
	}
	if j.endFsync {
		a = append(a, "--end_fsync=1")
	}
	return a
}

// The page cache is never invalidated (fio's default invalidate=1 drops
// a local file's cached pages before each job, while a server's image
// files stay cached): every target reads data it has just written, from
// the page cache, and every write job starts from the same memory state
// (see settle).

// runFio runs fio with the job plus target options and parses its JSON.
func runFio(ctx context.Context, j fioJob, target ...string) (fioResult, error) {
	args := append(j.args(), target...)
	out, err := run(ctx, args...)
	if err != nil {
		return fioResult{}, err
	}
	return parseFio(out)
}

func parseFio(out []byte) (fioResult, error) {
	// fio may print notes before the JSON document.
	start := -1
	for i, c := range out {
		if c == '{' {
			start = i
			break
		}
	}
	if start < 0 {
		return fioResult{}, fmt.Errorf("fio printed no JSON: %q", truncate(string(out), 300))
	}
	var doc fioJSON
	if err := json.Unmarshal(out[start:], &doc); err != nil {
		return fioResult{}, fmt.Errorf("fio JSON: %w", err)
	}
	if len(doc.Jobs) == 0 {
		return fioResult{}, fmt.Errorf("fio JSON has no jobs")
	}
	var r fioResult
	for _, jb := range doc.Jobs {
		if jb.Error != 0 {
			return fioResult{}, fmt.Errorf("fio job failed with error %d", jb.Error)
		}
		r.MiBps += (jb.Read.BwBytes + jb.Write.BwBytes) / (1 << 20)
		r.IOPS += jb.Read.IOPS + jb.Write.IOPS
		r.IOs += jb.Read.TotalIOs + jb.Write.TotalIOs
	}
	return r, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
