package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/urfave/cli/v2"
)

// TestBadInput runs every bad input of issue 13 through the CLI: each gets
// its exit status, one line on stderr that names the value and the fix,
// no sentinel package prefix, and leaves the directory it works in (an
// image, a garbage-LUT image, a non-empty and an empty directory)
// byte-identical.
func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := blockif.Create(img, format.Params{Size: 1 << 20, Split: 256 << 10, SectorSize: 4096}, nil); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage.img")
	if err := blockif.Create(garbage, format.Params{Size: 1 << 20, Split: 256 << 10, SectorSize: 4096}, nil); err != nil {
		t.Fatal(err)
	}
	junk := make([]byte, (1<<20)/4096*4)
	for i := range junk {
		junk[i] = byte(i*7 + 1)
	}
	if err := os.WriteFile(garbage+".lut", junk, 0o644); err != nil {
		t.Fatal(err)
	}
	full := filepath.Join(dir, "full")
	os.Mkdir(full, 0o755)
	os.WriteFile(filepath.Join(full, "keep.txt"), []byte("do not hide me"), 0o644)
	empty := filepath.Join(dir, "empty")
	os.Mkdir(empty, 0o755)

	cases := []struct {
		name string
		args []string
		code int
		want []string // on stderr
	}{
		{"serve value flag at the end", []string{"serve", img, garbage, "--socket"}, 1, []string{"--socket needs a value"}},
		{"create value flag at the end", []string{"create", filepath.Join(dir, "x.img"), "size=1M", "--layout"}, 1, []string{"--layout needs a value"}},
		{"check -r at the end", []string{"check", img, "-r"}, 1, []string{"-r needs a value"}},
		{"convert --overwrite onto a non-empty directory", []string{"convert", img, full, "--overwrite"}, 1, []string{full, "is a directory", "like " + filepath.Join(full, "disk.img")}},
		{"convert --overwrite onto an empty directory", []string{"convert", img, empty, "--overwrite"}, 1, []string{empty, "is a directory"}},
		{"convert onto a directory", []string{"convert", img, empty}, 1, []string{"is a directory"}},
		{"size=0", []string{"create", filepath.Join(dir, "x.img"), "size=0"}, 1, []string{"size=0", "size=20G"}},
		{"split=0", []string{"create", filepath.Join(dir, "x.img"), "size=1M", "split=0"}, 1, []string{"split=0", "split=1G"}},
		{"sectorsize=0", []string{"create", filepath.Join(dir, "x.img"), "size=1M", "sectorsize=0"}, 1, []string{"sectorsize=0", "sectorsize=4096"}},
		{"convert split=0", []string{"convert", img, filepath.Join(dir, "y.img"), "split=0"}, 1, []string{"split=0"}},
		{"create size=20 G", []string{"create", "size=20", "G"}, 1, []string{`"G"`, "size=20G"}},
		{"create path size=20 G", []string{"create", filepath.Join(dir, "x.img"), "size=20", "G"}, 1, []string{`"G"`, "size=20G"}},
		{"size not whole sectors", []string{"create", filepath.Join(dir, "x.img"), "size=1000"}, 1, []string{"size 1000", "sectorsize 4096"}},
		{"unknown command", []string{"bogus"}, 1, []string{`"bogus"`, "--help"}},
		{"create in /proc", []string{"create", "/proc/x.img", "size=1M"}, 1, []string{"/proc/x.img"}},
		{"bad sector size", []string{"create", filepath.Join(dir, "x.img"), "size=1M", "sectorsize=3000"}, 1, []string{"sectorsize 3000", "power of two"}},
		{"mount over a non-empty directory", []string{"mount", img, full}, 1, []string{full, "not empty", "--force"}},
		{"check two images", []string{"check", img, garbage}, 1, []string{"one image path"}},
		{"info on a garbage LUT", []string{"info", garbage}, 2, []string{"LUT entries point past", "disagrees"}},
		{"map on a garbage LUT", []string{"map", garbage}, 2, []string{"LUT entries point past", "disagrees"}},
		{"check -r all on a garbage LUT", []string{"check", "-r", "all", garbage}, 2, []string{"nothing changed", "--accept-loss"}},
		{"-U with -r", []string{"check", "-U", "-r", "all", img}, 1, []string{"-U", "never repairs"}},
		{"--accept-loss without -r all", []string{"check", "--accept-loss", img}, 1, []string{"--accept-loss goes with -r all"}},
		{"--undo without a repair", []string{"check", "--undo", img}, 1, []string{"no undo log"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := dirDigest(t, dir)
			out, errs, code := sdRun(t, c.args...)
			if code != c.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, c.code, out, errs)
			}
			lines := strings.Split(strings.TrimSpace(errs), "\n")
			if len(lines) != 1 {
				t.Errorf("stderr has %d lines, want one:\n%s", len(lines), errs)
			}
			for _, w := range c.want {
				if !strings.Contains(errs, w) {
					t.Errorf("stderr lacks %q:\n%s", w, errs)
				}
			}
			if strings.Contains(errs, "sparsedisk/") || strings.Contains(errs, "invalid parameters") || strings.Contains(errs, "No help topic") {
				t.Errorf("stderr carries a library prefix or urfave's help message:\n%s", errs)
			}
			if dirDigest(t, dir) != before {
				t.Error("the command changed files")
			}
		})
	}
	if _, err := os.Stat("G"); err == nil {
		t.Error("create size=20 G made a file named G")
	}
	// -h anywhere shows the command's help, exit 0.
	out, errs, code := sdRun(t, "info", "-h", "x")
	if code != 0 || !strings.Contains(out, "sparsedisk info") || errs != "" {
		t.Errorf("info -h x: exit %d\n%s%s", code, out, errs)
	}
}

// TestForceShare: an image open for writing is refused to info, map and
// check ("another process writes it"); with -U they read it, warn, change
// nothing, and check -U never repairs.
func TestForceShare(t *testing.T) {
	path := makeImage(t)
	d, err := blockif.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	before := imageDigest(t, path)
	for _, cmd := range []string{"info", "map", "check"} {
		if _, errs, code := sdRun(t, cmd, path); code == 0 || !strings.Contains(errs, "another process writes it") {
			t.Errorf("%s of an image open for writing: exit %d, want a refusal:\n%s", cmd, code, errs)
		}
		out, errs, code := sdRun(t, cmd, "-U", path)
		if code != 0 || !strings.Contains(errs, "may be inconsistent") || out == "" {
			t.Errorf("%s -U: exit %d, want the view with a warning\nstdout: %s\nstderr: %s", cmd, code, out, errs)
		}
		if _, _, code := sdRun(t, cmd, path, "--force-share"); code != 0 {
			t.Errorf("%s --force-share: exit %d", cmd, code)
		}
	}
	if imageDigest(t, path) != before {
		t.Error("-U changed the image")
	}
	if _, err := d.WriteAt([]byte("still writable"), 0); err != nil {
		t.Errorf("the writer lost the image: %v", err)
	}
}

// FuzzCLIArgs feeds random argument vectors to the CLI's parsers (the
// flag reordering, the command lookup, urfave/cli and each command's own
// argument parser) with every command's action replaced by its parsing
// alone: nothing may panic, and no file may be written (the working
// directory is a fresh temporary one and must stay empty).
func FuzzCLIArgs(f *testing.F) {
	for _, s := range []string{
		"serve z1 z2 --socket", "create x.img size=1M --layout", "check base.img -r",
		"create size=20 G", "info -h x", "bogus", "convert a b --overwrite -j", "check -U -r all x",
		"mount a b --force --name", "resize a.img -1G --shrink", "adopt a size=1M split=0 sectorsize=512",
		"check --undo x -- -r", "serve a:b --listen", "create --size 1M --size=2M",
	} {
		f.Add(strings.ReplaceAll(s, " ", "\x00"))
	}
	dir := f.TempDir()
	f.Chdir(dir)
	parsers := map[string]func(*cli.Context) error{
		"create": func(c *cli.Context) error { _, _, err := geometryArgs(c); return err },
		"adopt":  func(c *cli.Context) error { _, _, err := geometryArgs(c); return err },
		"check": func(c *cli.Context) error {
			_, _, err := splitArgs(c, []string{"repair", "output"}, []string{"quiet", "accept-loss", "undo", "force-share"})
			return err
		},
		"convert": func(c *cli.Context) error {
			_, _, err := splitArgs(c, []string{"layout", "split", "sectorsize", "jobs"}, []string{"overwrite", "progress", "quiet"})
			return err
		},
		"resize": func(c *cli.Context) error {
			_, _, err := splitArgs(c, nil, []string{"shrink", "force", "quiet"})
			return err
		},
		"shrink": func(c *cli.Context) error {
			_, _, err := splitArgs(c, []string{"output"}, []string{"dry-run", "quiet"})
			return err
		},
	}
	f.Fuzz(func(t *testing.T, in string) {
		args := append([]string{"sparsedisk"}, strings.Split(in, "\x00")...)
		args, err := flagsFirst(args)
		if err == nil {
			err = unknownCommand(args)
		}
		if err != nil {
			if err.Error() == "" {
				t.Fatal("an empty error message")
			}
			return
		}
		var out, errb strings.Builder
		app := newApp(&out, &errb)
		app.EnableBashCompletion = false
		var cmds []*cli.Command
		for _, c := range app.Commands {
			cc := *c
			parse := parsers[c.Name]
			if parse == nil {
				parse = func(c *cli.Context) error { _, err := positional(c); return err }
			}
			cc.Action = parse
			cmds = append(cmds, &cc)
		}
		app.Commands = cmds
		app.Run(args)
		ents, err := os.ReadDir(dir)
		if err != nil || len(ents) != 0 {
			t.Fatalf("parsing %q wrote files: %v %v", args, ents, err)
		}
	})
}
