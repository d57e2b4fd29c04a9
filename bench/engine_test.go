// Package bench holds sparsedisk's end-to-end benchmarks. Every benchmark
// measures sparsedisk and a peer (here: a plain file, the ceiling) in the
// same run and reports the ratio, so a noisy shared machine affects both
// sides alike. Run with `make bench`; results go to bench/README.md.
package bench

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
)

// target is something that takes pwrite/pread: the engine or a plain file.
type target interface {
	WriteAt(p []byte, off int64) (int, error)
	ReadAt(p []byte, off int64) (int, error)
	Close() error
}

type rawFile struct{ *os.File }

// Flush in the raw file's case is fdatasync, like the engine's.
func flushOf(t target) error {
	switch v := t.(type) {
	case *blockif.Disk:
		return v.Flush()
	case rawFile:
		return v.Sync()
	}
	return nil
}

func openBoth(b *testing.B, size int64) (disk, raw target) {
	dir := b.TempDir()
	path := filepath.Join(dir, "disk.img")
	if err := blockif.Create(path, format.Params{Size: size, Split: 1 << 30, SectorSize: 4096}, nil); err != nil {
		b.Fatal(err)
	}
	d, err := blockif.Open(path, nil)
	if err != nil {
		b.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "raw.img"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	return d, rawFile{f}
}

func fill(n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i*7 + 1)
	}
	return p
}

// seqWrite writes total bytes in chunk-sized writes, then flushes.
func seqWrite(t target, total, chunk int64) time.Duration {
	p := fill(int(chunk))
	start := time.Now()
	for off := int64(0); off < total; off += chunk {
		if _, err := t.WriteAt(p, off); err != nil {
			panic(err)
		}
	}
	if err := flushOf(t); err != nil {
		panic(err)
	}
	return time.Since(start)
}

func report(b *testing.B, name string, bytes int64, sd, raw time.Duration) {
	sdMB := float64(bytes) / sd.Seconds() / (1 << 20)
	rawMB := float64(bytes) / raw.Seconds() / (1 << 20)
	b.ReportMetric(sdMB, name+"-sparsedisk-MiB/s")
	b.ReportMetric(rawMB, name+"-rawfile-MiB/s")
	b.ReportMetric(sdMB/rawMB, name+"-ratio")
}

// BenchmarkSeqWriteAlloc: 1 GiB of sequential 1 MiB writes into an empty
// image (every sector allocates a slot), flushed, vs the same into a
// fresh sparse raw file with pwrite + fdatasync. Target ratio ≥ 0.8.
func BenchmarkSeqWriteAlloc(b *testing.B) {
	total := int64(1 << 30)
	if testing.Short() {
		total = 128 << 20
	}
	for i := 0; i < b.N; i++ {
		d, r := openBoth(b, 2<<30)
		// Alternate the order so neither side always runs first.
		var sd, raw time.Duration
		if i%2 == 0 {
			sd, raw = seqWrite(d, total, 1<<20), seqWrite(r, total, 1<<20)
		} else {
			raw, sd = seqWrite(r, total, 1<<20), seqWrite(d, total, 1<<20)
		}
		report(b, "seqwrite1M", total, sd, raw)
		d.Close()
		r.Close()
	}
}

// Benchmark4K: on 256 MiB written beforehand, 4 KiB sequential and random
// reads, and random in-place writes, vs a raw file in the same run.
func Benchmark4K(b *testing.B) {
	const span = 256 << 20
	const ops = 32768
	d, r := openBoth(b, 1<<30)
	defer d.Close()
	defer r.Close()
	seqWrite(d, span, 1<<20)
	seqWrite(r, span, 1<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	offs := make([]int64, ops)
	for i := range offs {
		offs[i] = rng.Int64N(span/4096) * 4096
	}
	buf := make([]byte, 4096)
	run := func(t target, kind string) time.Duration {
		start := time.Now()
		for i := 0; i < ops; i++ {
			var err error
			switch kind {
			case "seqread":
				_, err = t.ReadAt(buf, int64(i)*4096%span)
			case "randread":
				_, err = t.ReadAt(buf, offs[i])
			case "randwrite":
				_, err = t.WriteAt(buf, offs[i])
			}
			if err != nil {
				panic(err)
			}
		}
		if kind == "randwrite" {
			flushOf(t)
		}
		return time.Since(start)
	}
	for i := 0; i < b.N; i++ {
		for _, kind := range []string{"seqread", "randread", "randwrite"} {
			sd, raw := run(d, kind), run(r, kind)
			report(b, kind+"4K", ops*4096, sd, raw)
		}
	}
}

// BenchmarkOpen1TiB: open a 1 TiB image (sectorsize 4096, split 1G) and
// read one sector, in a child process, whose peak RSS and wall time are
// reported. Targets: under 50 MiB and under 1 s.
func BenchmarkOpen1TiB(b *testing.B) {
	path := filepath.Join(b.TempDir(), "big.img")
	if err := blockif.Create(path, format.Params{Size: 1 << 40, Split: 1 << 30, SectorSize: 4096}, nil); err != nil {
		b.Fatal(err)
	}
	d, err := blockif.Open(path, nil)
	if err != nil {
		b.Fatal(err)
	}
	d.WriteAt(fill(4096), 600<<30)
	d.Close()
	for i := 0; i < b.N; i++ {
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), "SPARSEDISK_OPEN_CHILD="+path)
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("child: %v\n%s", err, out)
		}
		secs, err := strconv.ParseFloat(string(out), 64)
		if err != nil {
			b.Fatalf("child output %q: %v", out, err)
		}
		rss := cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss // KiB
		b.ReportMetric(float64(rss)/1024, "child-peak-RSS-MiB")
		b.ReportMetric(secs*1000, "open+read-ms")
	}
}

// TestMain runs BenchmarkOpen1TiB's child when SPARSEDISK_OPEN_CHILD names
// an image: open it, read one sector, print the seconds taken, exit.
func TestMain(m *testing.M) {
	if path := os.Getenv("SPARSEDISK_OPEN_CHILD"); path != "" {
		if err := openChild(path); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func openChild(path string) error {
	start := time.Now()
	d, err := blockif.Open(path, nil)
	if err != nil {
		return err
	}
	buf := make([]byte, 4096)
	if _, err := d.ReadAt(buf, 600<<30); err != nil {
		return err
	}
	if buf[0] != 1 {
		return fmt.Errorf("read back %x, want 01", buf[:4])
	}
	if err := d.Close(); err != nil {
		return err
	}
	fmt.Printf("%.6f", time.Since(start).Seconds())
	return nil
}
