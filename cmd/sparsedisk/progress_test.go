package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// openPty returns the two ends of a new pseudo-terminal.
func openPty(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open /dev/ptmx: %v", err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		t.Fatalf("unlock pty: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		m.Close()
		t.Fatalf("pty number: %v", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		t.Fatalf("open pty slave: %v", err)
	}
	return m, s
}

// runOnTerminal runs the CLI with stderr on a pseudo-terminal, as a user
// at a shell would, and returns what reached the terminal.
func runOnTerminal(t *testing.T, args ...string) (string, int) {
	t.Helper()
	m, s := openPty(t)
	defer m.Close()
	got := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(m) // ends with EIO once the slave is closed
		got <- b
	}()
	var out bytes.Buffer
	code := run(append([]string{"sparsedisk"}, args...), &out, s)
	s.Close()
	return string(<-got), code
}

// TestProgressBarsOnTerminal: every long offline command (check, shrink,
// convert, resize) draws a progress bar on a terminal, and none with
// --quiet. (Off a terminal they are silent: every other test runs them
// with buffers and checks their exact output.)
func TestProgressBarsOnTerminal(t *testing.T) {
	for _, c := range []struct {
		name string
		args func(img string) []string
		bar  string
	}{
		{"check", func(img string) []string { return []string{"check", img} }, "check"},
		{"shrink", func(img string) []string { return []string{"shrink", img} }, "shrink"},
		{"convert", func(img string) []string {
			return []string{"convert", img, filepath.Join(filepath.Dir(img), "out.raw"), "layout=raw"}
		}, "convert"},
		// Work that finishes at its first report draws no bar: these
		// are large enough to report several times.
		{"resize grow", func(img string) []string { return []string{"resize", img, "+40G"} }, "resize: extend LUT"},
		{"resize shrink", func(img string) []string { return []string{"resize", img, "-32M", "--shrink", "--force"} }, "resize: scan past new end"},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, quiet := range []bool{false, true} {
				args := c.args(makeImage(t))
				if quiet {
					args = append(args, "--quiet")
				}
				term, code := runOnTerminal(t, args...)
				if code != 0 {
					t.Fatalf("%v: exit %d\n%s", args, code, term)
				}
				hasBar := strings.Contains(term, c.bar) && strings.Contains(term, "%")
				if !quiet && !hasBar {
					t.Errorf("%v: no progress bar %q on the terminal; it got %q", args, c.bar, term)
				}
				if quiet && term != "" {
					t.Errorf("%v: --quiet still wrote %q to the terminal", args, term)
				}
			}
		})
	}
}
