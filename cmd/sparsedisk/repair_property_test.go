package main

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
)

// dirDigest hashes every file and directory under dir by name, content
// and kind: the proof that a command changed nothing.
func dirDigest(t testing.TB, dir string) string {
	t.Helper()
	var names []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil {
			names = append(names, p)
		}
		return nil
	})
	sort.Strings(names)
	h := sha256.New()
	for _, n := range names {
		fi, err := os.Lstat(n)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(h, "%s %v %d\n", n, fi.Mode().Type(), fi.Size())
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(n)
			if err != nil {
				t.Fatal(err)
			}
			h.Write(b)
		}
	}
	return string(h.Sum(nil))
}

// setLine sets (or, with val "", removes) the descriptor line of key.
func setLine(t testing.TB, path, key, val string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`(?m)^` + key + ` =.*\n`)
	line := ""
	if val != "" {
		line = key + " = " + val + "\n"
	}
	var out []byte
	if re.Match(b) {
		out = re.ReplaceAll(b, []byte(line))
	} else {
		out = append(b, line...)
	}
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
}

// diskContent reads every sector of the image; nil if it does not open,
// a nil sector if it cannot be read.
func diskContent(path string) [][]byte {
	d, err := blockif.Open(path, &blockif.Options{ReadOnly: true, NoDirtyCheck: true})
	if err != nil {
		return nil
	}
	defer d.Close()
	ss := d.SectorSize()
	out := make([][]byte, d.Size()/ss)
	for i := range out {
		b := make([]byte, ss)
		if _, err := d.ReadAt(b, int64(i)*ss); err == nil {
			out[i] = b
		}
	}
	return out
}

// TestRepairNeverLosesData is issue 13's property: for every single-key
// corruption of the descriptor (several wrong values per key) and for
// damaged files, `check`, `check -r all`, putting the right line back and
// `check -r all` again ends with every sector reading its original
// content, or with both repairs refused and nothing changed. Counted:
// the number of cases and how each ended.
func TestRepairNeverLosesData(t *testing.T) {
	p := format.Params{Layout: format.LayoutSparse, Size: 256 << 10, Split: 64 << 10, SectorSize: 4096}
	type corruption struct {
		name    string
		key     string // descriptor key corrupted ("" for file damage)
		val     string
		corrupt func(t *testing.T, path string)
	}
	var cases []corruption
	for key, vals := range map[string][]string{
		"size":       {"128K", "192K", "512K", "1M", "4K", "255K", "0", "12345", "-1", "huge"},
		"split":      {"32K", "128K", "256K", "4096", "8K", "48K", "1M", "1000", "0"},
		"sectorsize": {"512", "1024", "2048", "8192", "16384", "65536", "3000", "0"},
		"layout":     {"split", "raw", "bogus", ""},
		"format":     {"sparsedisk/2", "qcow2", ""},
		"state":      {"dirty", "bogus", ""},
		"intent":     {"shrink", "resize", "bogus"},
	} {
		for _, v := range vals {
			cases = append(cases, corruption{name: fmt.Sprintf("%s=%q", key, v), key: key, val: v})
		}
	}
	rngData := func(n int64, seed uint64) []byte {
		b := make([]byte, n)
		r := rand.New(rand.NewPCG(seed, 13))
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	truncLUT := func(n int64) func(t *testing.T, path string) {
		return func(t *testing.T, path string) { os.Truncate(path+".lut", n) }
	}
	fileDamage := []corruption{
		{name: "lut-empty", corrupt: truncLUT(0)},
		{name: "lut-half", corrupt: truncLUT(p.Sectors() * 2)},
		{name: "lut-minus-one-entry", corrupt: truncLUT(p.Sectors()*4 - 4)},
		{name: "lut-odd-length", corrupt: truncLUT(p.Sectors()*4 - 1)},
		{name: "lut-garbage", corrupt: func(t *testing.T, path string) { os.WriteFile(path+".lut", rngData(p.Sectors()*4, 1), 0o644) }},
		{name: "lut-garbage-tail", corrupt: func(t *testing.T, path string) {
			f, _ := os.OpenFile(path+".lut", os.O_RDWR, 0)
			f.WriteAt(rngData(64, 2), p.Sectors()*4-64)
			f.Close()
		}},
		{name: "lut-missing", corrupt: func(t *testing.T, path string) { os.Remove(path + ".lut") }},
		{name: "lut-directory", corrupt: func(t *testing.T, path string) { os.Remove(path + ".lut"); os.Mkdir(path+".lut", 0o755) }},
	}
	for i := 0; i < p.Segments(); i++ {
		seg := format.SegmentName("", i)
		fileDamage = append(fileDamage,
			corruption{name: "segment-missing" + seg, corrupt: func(t *testing.T, path string) { os.Remove(path + seg) }},
			corruption{name: "segment-halved" + seg, corrupt: func(t *testing.T, path string) {
				fi, _ := os.Stat(path + seg)
				os.Truncate(path+seg, fi.Size()/2)
			}},
			corruption{name: "segment-empty" + seg, corrupt: func(t *testing.T, path string) { os.Truncate(path+seg, 0) }},
			corruption{name: "segment-directory" + seg, corrupt: func(t *testing.T, path string) { os.Remove(path + seg); os.Mkdir(path+seg, 0o755) }},
		)
	}
	cases = append(cases, fileDamage...)
	sort.SliceStable(cases, func(i, j int) bool { return cases[i].name < cases[j].name })

	var recovered, refused, lost int
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "disk.img")
			if err := blockif.Create(path, p, nil); err != nil {
				t.Fatal(err)
			}
			d, err := blockif.Open(path, nil)
			if err != nil {
				t.Fatal(err)
			}
			// Data in every segment, holes between, the last sector too.
			for s := int64(0); s < p.Sectors(); s++ {
				if s%5 != 3 {
					if _, err := d.WriteAt(rngData(p.SectorSize, uint64(s)+100), s*p.SectorSize); err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			orig := diskContent(path)
			origDesc, _ := os.ReadFile(path)
			origLine := ""
			if c.key != "" {
				if m := regexp.MustCompile(`(?m)^` + c.key + ` =(.*)$`).FindStringSubmatch(string(origDesc)); m != nil {
					origLine = strings.TrimSpace(strings.SplitN(m[1], "#", 2)[0])
				}
				setLine(t, path, c.key, c.val)
			} else {
				c.corrupt(t, path)
			}
			corrupted := dirDigest(t, dir)
			out, errs, code := sdRun(t, "check", path)
			if dirDigest(t, dir) != corrupted {
				t.Fatalf("check without -r changed the image")
			}
			if code == 0 && c.key != "state" {
				t.Errorf("check of a corrupted image: exit 0\n%s%s", out, errs)
			}
			out1, errs1, code1 := sdRun(t, "check", "-r", "all", path)
			firstUnchanged := dirDigest(t, dir) == corrupted
			if c.key != "" {
				setLine(t, path, c.key, origLine)
			}
			restored := dirDigest(t, dir)
			out2, errs2, code2 := sdRun(t, "check", "-r", "all", path)
			secondUnchanged := dirDigest(t, dir) == restored
			got := diskContent(path)
			same := got != nil && len(got) == len(orig)
			for i := 0; same && i < len(got); i++ {
				same = bytes.Equal(got[i], orig[i])
			}
			switch {
			case same:
				recovered++
			case firstUnchanged && secondUnchanged:
				refused++
				if code1 != 2 && code1 != 1 || !strings.Contains(errs1, "nothing changed") && !strings.Contains(errs1, "cannot repair") && !strings.Contains(errs1, "could not check") {
					t.Errorf("-r all changed nothing but did not say it refused (exit %d):\n%s", code1, errs1)
				}
			default:
				lost++
				t.Errorf("data lost: first -r all (exit %d, changed: %v):\n%s%s\nsecond -r all (exit %d, changed: %v):\n%s%s",
					code1, !firstUnchanged, out1, errs1, code2, !secondUnchanged, out2, errs2)
			}
		})
	}
	t.Logf("%d corruption cases: %d recovered every sector, %d refused without changing anything, %d lost data",
		len(cases), recovered, refused, lost)
	if recovered+refused != len(cases) {
		t.Errorf("%d of %d cases lost data", lost, len(cases))
	}
}
