package sparsedisk_test

import (
	"bytes"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// section returns the text of FORMAT.md under the heading line heading, up
// to the next heading of the same or a higher level (outside code blocks).
func section(t *testing.T, doc, heading string) string {
	t.Helper()
	level := strings.Index(heading, " ") // number of '#'
	var out []string
	in, fenced := false, false
	for _, line := range strings.Split(doc, "\n") {
		if strings.HasPrefix(line, "```") {
			fenced = !fenced
		}
		if !fenced && strings.HasPrefix(line, "#") {
			l := strings.Index(line, " ")
			if in && l > 0 && l <= level && strings.Trim(line[:l], "#") == "" {
				break
			}
			if line == heading {
				in = true
				continue
			}
		}
		if in {
			out = append(out, line)
		}
	}
	if !in {
		t.Fatalf("FORMAT.md has no heading %q", heading)
	}
	return strings.Join(out, "\n")
}

// TestFormatDoc checks FORMAT.md against the format's constants in the
// code, where that is cheap: the descriptor keys, the exact descriptor
// bytes, the LUT's unallocated value and file names, the sector size
// limits, the intents and the names of the offline tools' files.
func TestFormatDoc(t *testing.T) {
	raw, err := os.ReadFile("FORMAT.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	need := func(what, s string) {
		t.Helper()
		if !strings.Contains(doc, s) {
			t.Errorf("FORMAT.md does not contain %s %q", what, s)
		}
	}

	// Descriptor keys: every key the code writes is documented, every
	// documented key is known to the parser, and a key it does not
	// document (a planned one) is refused, as the document says.
	keys := section(t, doc, "### 3.2 Keys")
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `([a-z]+)` \\|").FindAllStringSubmatch(keys, -1) {
		documented[m[1]] = true
	}
	p := format.Params{Layout: format.LayoutSparse, Size: 65536, Split: 16384, SectorSize: 4096}
	full := format.Descriptor{Params: p, State: format.StateDirty, Intent: format.IntentShrink}.Marshal()
	written := 0
	for _, line := range strings.Split(string(full), "\n") {
		key, _, ok := strings.Cut(line, "=")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		written++
		if key = strings.TrimSpace(key); !documented[key] {
			t.Errorf("the code writes descriptor key %q, which FORMAT.md section 3.2 does not list", key)
		}
	}
	if written != 7 || len(documented) != 7 {
		t.Errorf("the code writes %d descriptor keys and FORMAT.md lists %d (%v); want 7 each", written, len(documented), documented)
	}
	base := format.Descriptor{Params: p}.Marshal()
	base = bytes.ReplaceAll(base, []byte("state = clean\n"), nil)
	for key := range documented {
		_, err := format.ParseDescriptor(append(append([]byte{}, base...), key+" = clean\n"...), "FORMAT.md")
		if err != nil && strings.Contains(err.Error(), "unknown key") {
			t.Errorf("FORMAT.md documents descriptor key %q, which the parser does not know: %v", key, err)
		}
	}
	for _, key := range []string{"backing"} {
		_, err := format.ParseDescriptor(append(append([]byte{}, base...), key+" = x\n"...), "FORMAT.md")
		if err == nil || !strings.Contains(err.Error(), "unknown key") {
			t.Errorf("descriptor with planned key %q: %v, want an unknown-key refusal", key, err)
		}
	}

	// The descriptor FORMAT.md shows is byte for byte what the code writes.
	ex := section(t, doc, "### 3.3 What sparsedisk writes")
	m := regexp.MustCompile("(?s)```\n(.*?)```").FindStringSubmatch(ex)
	if m == nil {
		t.Fatal("FORMAT.md section 3.3 has no example block")
	}
	if want := string(format.Descriptor{Params: p, State: format.StateClean}.Marshal()); m[1] != want {
		t.Errorf("FORMAT.md section 3.3 shows\n%s\nthe code writes\n%s", m[1], want)
	}

	// Values and names.
	need("the format version", "`"+format.FormatVersion+"`")
	for _, l := range []format.Layout{format.LayoutSparse, format.LayoutSplit, format.LayoutRaw} {
		need("the layout", "| `"+string(l)+"` |")
	}
	need("the state", "`"+format.StateClean+"`")
	need("the state", "`"+format.StateDirty+"`")
	for _, in := range []string{format.IntentShrink, format.IntentResize} {
		need("the intent", "| `"+in+"` |")
	}
	need("the unallocated entry", fmt.Sprintf("`0x%08X`", lut.Unallocated))
	need("the largest slot", fmt.Sprintf("`0x%08X`", lut.Unallocated-1))
	need("the LUT entry size", fmt.Sprintf("%d bytes, uint32 little-endian", lut.EntrySize))
	need("the LUT file", "`P"+lut.Suffix+"`")
	need("a segment name", "`"+format.SegmentName("P", 0)+"`")
	need("a segment name past 9999", "`"+format.SegmentName("P", 10000)+"`")
	need("the sector size range", fmt.Sprintf("%d … %d", format.MinSectorSize, format.MaxSectorSize))
	need("the default sector size", fmt.Sprintf("default for new images: %d", format.DefaultSectorSize))

	// The offline tools' file names and the journal magic are unexported:
	// each must appear as a string literal in the code and in FORMAT.md.
	code := goSources(t)
	for _, lit := range []string{".tmp", ".shrink", ".shrink-journal", ".orphaned", ".converting", "SDSHRNK1"} {
		if !strings.Contains(code, `"`+lit+`"`) {
			t.Errorf("no Go source holds the literal %q that FORMAT.md documents", lit)
		}
		need("the name", lit+"`")
	}
}

// goSources concatenates the non-test Go files of the repository.
func goSources(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, name := range repoFiles(t) {
		if !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") {
			continue
		}
		data, err := os.ReadFile(name)
		if err != nil {
			continue
		}
		b.Write(data)
	}
	return b.String()
}
