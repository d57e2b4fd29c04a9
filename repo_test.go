package sparsedisk_test

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// outsideRefs are the ways a file can cite material that is not in the
// repository: the design notes and protocol copy the project started from,
// and issues of a tracker a reader of the repository cannot see. The
// patterns are assembled from pieces so that this file does not match them.
var outsideRefs = []*regexp.Regexp{
	regexp.MustCompile(regexp.QuoteMeta(".." + "/shared")),
	regexp.MustCompile(`(?i)\bdesign` + `\.md\b`),
	regexp.MustCompile(`(?i)\bnbd-proto` + `\.md\b`),
	regexp.MustCompile(`(?i)\bthe ` + `issue\b`),
}

// badReferences returns "line N: match" for every citation of outside
// material in text.
func badReferences(text string) []string {
	var out []string
	for i, line := range strings.Split(text, "\n") {
		for _, re := range outsideRefs {
			for _, m := range re.FindAllString(line, -1) {
				out = append(out, "line "+strconv.Itoa(i+1)+": "+m)
			}
		}
	}
	return out
}

// repoFiles lists the files of the repository: the tracked ones when this
// is a git checkout, else every file under the root except .git.
func repoFiles(t *testing.T) []string {
	t.Helper()
	if out, err := exec.Command("git", "ls-files", "-z").Output(); err == nil {
		var files []string
		for _, f := range strings.Split(string(out), "\x00") {
			if f != "" {
				files = append(files, f)
			}
		}
		if len(files) > 0 {
			return files
		}
	}
	var files []string
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == ".git" {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// TestNoOutsideReferences: the repository stands on its own. No file may
// send a reader to design notes or a protocol copy outside it, or to "the
// issue": the format is in FORMAT.md, the NBD protocol is cited by its
// upstream name (doc/proto.md of the NetworkBlockDevice/nbd project) and
// section, and a target is stated where it is used.
func TestNoOutsideReferences(t *testing.T) {
	files := repoFiles(t)
	if len(files) < 50 {
		t.Fatalf("found only %d files; is the test running at the repository root?", len(files))
	}
	checked := 0
	for _, name := range files {
		data, err := os.ReadFile(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue // tracked but deleted in the work tree
		}
		if err != nil {
			t.Fatal(err)
		}
		if bytes.IndexByte(data[:min(len(data), 8000)], 0) >= 0 {
			continue // binary (image fixtures, charts)
		}
		checked++
		for _, bad := range badReferences(string(data)) {
			t.Errorf("%s %s: cites material outside the repository (use FORMAT.md, or the NBD protocol specification by its upstream name and section, or state the target)", name, bad)
		}
	}
	if checked < 50 {
		t.Fatalf("checked only %d text files", checked)
	}
}

// TestBadReferencesMatcher: the matcher finds each kind of citation and
// leaves ordinary prose alone.
func TestBadReferencesMatcher(t *testing.T) {
	bad := []string{
		"see " + "DESIGN" + ".md §3",
		"(" + ".." + "/sha" + "red/refer" + "ence/nbd-pro" + "to" + ".md)",
		"the protocol copy nbd-proto" + ".md",
		"Bold ratios are the ones The " + "issue sets a target for.",
		"the " + "issue's targets",
	}
	for _, s := range bad {
		if len(badReferences(s)) == 0 {
			t.Errorf("%q: not flagged", s)
		}
	}
	good := []string{
		"see FORMAT.md, section 7",
		"the NBD protocol specification (doc/proto.md of the NetworkBlockDevice/nbd project)",
		"issues a flush; the tissue", // words that merely contain the letters
		"shared lock on the descriptor",
	}
	for _, s := range good {
		if got := badReferences(s); len(got) != 0 {
			t.Errorf("%q: flagged %v", s, got)
		}
	}
}
