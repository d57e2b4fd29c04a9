package main

import (
	"bytes"
	"crypto/sha256"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// sdRun runs the CLI in-process and returns stdout, stderr and exit code.
func sdRun(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(append([]string{"sparsedisk"}, args...), &out, &errb)
	return out.String(), errb.String(), code
}

// imageDigest hashes every file of the image at path (descriptor,
// segments, LUT) by name, to prove a command left them byte-identical.
func imageDigest(t *testing.T, path string) string {
	t.Helper()
	files, err := filepath.Glob(path + "*")
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(files)
	h := sha256.New()
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		h.Write([]byte(f))
		h.Write(data)
	}
	return string(h.Sum(nil))
}

func TestHelpTeaches(t *testing.T) {
	out, _, code := sdRun(t, "--help")
	if code != 0 {
		t.Fatalf("--help exit %d", code)
	}
	for _, want := range []string{"create", "info", "map", "adopt"} {
		if !strings.Contains(out, want) {
			t.Errorf("--help does not mention %q:\n%s", want, out)
		}
	}
	out, _, _ = sdRun(t, "create", "--help")
	if !strings.Contains(out, "size=20G") {
		t.Errorf("create --help has no example:\n%s", out)
	}
	// Every subcommand's help teaches by example: an "Example" section
	// with at least one line that runs the command itself.
	for _, c := range commands {
		out, _, code := sdRun(t, c.Name, "--help")
		if code != 0 {
			t.Errorf("%s --help: exit %d", c.Name, code)
			continue
		}
		_, ex, ok := strings.Cut(out, "Example")
		if !ok || !strings.Contains(ex, "sparsedisk "+c.Name+" ") {
			t.Errorf("%s --help has no example running it:\n%s", c.Name, out)
		}
	}
}

func TestFlagsFirst(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"sparsedisk serve a.img --listen :1 b.img", "sparsedisk serve --listen :1 a.img b.img"},
		{"sparsedisk serve a.img --listen=:1 --read-only", "sparsedisk serve --listen=:1 --read-only a.img"},
		{"sparsedisk resize a.img -1G --shrink", "sparsedisk resize --shrink a.img -1G"},
		{"sparsedisk info a.img -- --output=json", "sparsedisk info a.img -- --output=json"},
		{"sparsedisk info a.img --help", "sparsedisk info --help"},
		{"sparsedisk info -h x", "sparsedisk info --help"},
		{"sparsedisk serve z1 z2 --socket", "error"},
		{"sparsedisk check base.img -r", "error"},
		{"sparsedisk create x.img size=1M --layout", "error"},
		{"sparsedisk nosuchcommand a --b", "sparsedisk nosuchcommand a --b"},
		{"sparsedisk", "sparsedisk"},
	} {
		args, err := flagsFirst(strings.Fields(tc.in))
		got := strings.Join(args, " ")
		if err != nil {
			got = "error"
		}
		if got != tc.want {
			t.Errorf("flagsFirst(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	// End to end: a flag after the image is applied, not taken as a path.
	img := filepath.Join(t.TempDir(), "d.img")
	if _, errOut, code := sdRun(t, "create", img, "size=1M", "split=1M"); code != 0 {
		t.Fatal(errOut)
	}
	out, errOut, code := sdRun(t, "info", img, "--output=json")
	if code != 0 || !strings.HasPrefix(strings.TrimSpace(out), "{") {
		t.Errorf("info IMAGE --output=json: exit %d, %q %q", code, out, errOut)
	}
}
