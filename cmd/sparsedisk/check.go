package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/offline"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

// Exit codes of check, as qemu-img check's.
const (
	exitClean      = 0
	exitCannot     = 1
	exitCorruption = 2
	exitLeaks      = 3
)

func init() {
	register(&cli.Command{
		Name:      "check",
		Usage:     "check an image for corruption and leaks, optionally repair it",
		ArgsUsage: "IMAGE [-r leaks|all [--accept-loss]] [--undo] [-U] [--output=human|json]",
		Description: "Walks the descriptor, the LUT and every segment file. Findings are leaks (slots\n" +
			"no LUT entry references: wasted space only) and corruption (entries past a segment's\n" +
			"end, two entries sharing a slot, a LUT of the wrong length, missing or extra segment\n" +
			"files, an unfinished offline operation). Advice findings are neither: a segment file\n" +
			"whose apparent size is far beyond its live data (bloat, or slot numbers running out)\n" +
			"and heavy fragmentation; each names the command that fixes it (`sparsedisk shrink\n" +
			"IMAGE`). Without -r nothing is written.\n\n" +
			"First of all the descriptor is cross-examined against the files (segment count and\n" +
			"sizes against split, LUT length against size/sectorsize, a LUT against the layout,\n" +
			"every LUT entry against its segment's length). If they disagree, that is the one\n" +
			"finding, with the values the files imply and the edit or `adopt` that fixes it; -r\n" +
			"then refuses to act on a geometry it cannot trust and changes nothing.\n\n" +
			"-r leaks punches leaked slots. -r all also repairs corruption with the least data\n" +
			"loss possible and lists every change, naming the sectors whose content changed; it\n" +
			"marks a dirty image clean. A repair that would drop data the files hold (a missing\n" +
			"or shortened segment, a damaged LUT) needs --accept-loss. Everything a repair\n" +
			"removes, unmaps, cuts or renames is saved first in IMAGE.undo.N: --undo puts the\n" +
			"image back exactly as it was before the latest repair.\n\n" +
			"-U (--force-share) checks an image a server or mount holds open for writing, without\n" +
			"its lock: read-only, never a repair, and the result may be inconsistent.\n\n" +
			"Exit status (as qemu-img check): 0 clean (advice findings included), 1 could not\n" +
			"check, 2 corruption, 3 leaks only; after -r, the status describes the repaired image.\n\n" +
			"Examples:\n   sparsedisk check disk.img            # report only\n   sparsedisk check disk.img -r leaks   # reclaim leaked slots after a crash\n" +
			"   sparsedisk check disk.img -r all --output=json\n" +
			"   sparsedisk check --undo disk.img     # revert the latest repair",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "repair", Aliases: []string{"r"}, Usage: "repair: leaks or all"},
			&cli.BoolFlag{Name: "accept-loss", Usage: "with -r all: repair damaged files even though sectors they held are lost (saved for --undo)"},
			&cli.BoolFlag{Name: "undo", Usage: "revert the latest repair from IMAGE.undo.N"},
			forceShareFlag(),
			outputFlag(),
			quietFlag(),
		},
		Action: checkAction,
	})
}

func quietFlag() cli.Flag {
	return &cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "print nothing but errors; no progress bar"}
}

// checkJSON is check's --output=json document.
type checkJSON struct {
	Image    string                `json:"image"`
	Check    *blockif.Report       `json:"check"`
	Repair   *offline.RepairReport `json:"repair,omitempty"`
	After    *blockif.Report       `json:"after_repair,omitempty"`
	ExitCode int                   `json:"exit_code"`
}

func checkAction(c *cli.Context) error {
	pos, fl, err := splitArgs(c, []string{"repair", "output"}, []string{"quiet", "accept-loss", "undo", "force-share"})
	if err != nil {
		return cli.Exit(err.Error(), exitCannot)
	}
	if len(pos) != 1 {
		return cli.Exit(fmt.Sprintf("check takes one image path, got %d (%q)", len(pos), pos), exitCannot)
	}
	path := pos[0]
	output := fl.str("output", "human")
	if output != "human" && output != "json" {
		return cli.Exit(fmt.Sprintf("--output=%s: want human or json", output), exitCannot)
	}
	mode := offline.RepairMode(fl.str("repair", ""))
	if mode != "" && mode != offline.RepairLeaks && mode != offline.RepairAll {
		return cli.Exit(fmt.Sprintf("-r %s: want leaks or all", mode), exitCannot)
	}
	quiet := fl.on("quiet")
	w := c.App.Writer
	forceShare := fl.on("force-share")
	switch {
	case forceShare && (mode != "" || fl.on("undo")):
		return cli.Exit("-U (--force-share) is a read-only view of an image in use: it never repairs; stop the server first to use -r or --undo", exitCannot)
	case fl.on("undo") && mode != "":
		return cli.Exit("--undo and -r do not go together: --undo reverts the latest repair", exitCannot)
	case fl.on("accept-loss") && mode != offline.RepairAll:
		return cli.Exit("--accept-loss goes with -r all", exitCannot)
	}
	if fl.on("undo") {
		u, err := offline.Undo(path, nil)
		if err != nil {
			return cli.Exit(fmt.Sprintf("undo %s: %v", path, cleanErr(err)), exitCannot)
		}
		if !quiet {
			fmt.Fprintf(w, "%s: reverted the latest repair from %s: the descriptor and %d other change(s)\n", path, u.Log, u.Changes-1)
		}
		return nil
	}
	if forceShare {
		fmt.Fprintf(c.App.ErrWriter, "warning: %s\n", forceShareWarning(path))
	}
	progress, done := progressFor(c, !quiet && output == "human", "check")
	r, err := blockif.Check(path, &blockif.Options{Progress: progress, ForceShare: forceShare})
	done()
	if err != nil {
		return cli.Exit(fmt.Sprintf("could not check %s: %v", path, cleanErr(err)), exitCannot)
	}
	doc := checkJSON{Image: path, Check: r}
	dirty := false
	if desc, err := format.ReadDescriptor(nil, path); err == nil {
		dirty = desc.State == format.StateDirty
	}
	final := r
	if r.Layout == "" && !r.Clean() && mode != "" {
		// The descriptor does not parse: without the geometry nothing
		// can be repaired safely, and guessing it could destroy data.
		if !quiet && output == "human" {
			printCheck(w, r)
		}
		return cli.Exit(fmt.Sprintf("%s: cannot repair: %s", path, badDescriptorHint(path)), exitCorruption)
	}
	if mode != "" && (!r.Clean() || dirty) {
		rep, err := offline.RepairWith(path, mode, offline.RepairOptions{AcceptLoss: fl.on("accept-loss"), Consistent: r.Corruptions == 0}, nil)
		if errors.Is(err, offline.ErrGeometry) {
			if !quiet && output == "human" {
				printCheck(w, r)
			}
			return cli.Exit(fmt.Sprintf("%s: repair refused, nothing changed: %s", path, refusal(err, r)), exitCorruption)
		}
		if err != nil {
			return cli.Exit(fmt.Sprintf("repair %s: %v", path, cleanErr(err)), exitCannot)
		}
		doc.Repair = rep
		progress, done := progressFor(c, !quiet && output == "human", "check after repair")
		doc.After, err = blockif.Check(path, &blockif.Options{Progress: progress})
		done()
		if err != nil {
			return cli.Exit(fmt.Sprintf("could not check %s after repair: %v", path, err), exitCannot)
		}
		final = doc.After
	}
	doc.ExitCode = exitClean
	switch {
	case final.Corruptions > 0:
		doc.ExitCode = exitCorruption
	case final.Leaks > 0:
		doc.ExitCode = exitLeaks
	}
	if output == "json" {
		// Empty lists print as [] rather than null, so scripts can
		// iterate without a special case for a clean image.
		for _, r := range []*blockif.Report{doc.Check, doc.After} {
			if r != nil && r.Findings == nil {
				r.Findings = []blockif.Finding{}
			}
		}
		if doc.Repair != nil && doc.Repair.Actions == nil {
			doc.Repair.Actions = []offline.RepairAction{}
		}
		e := json.NewEncoder(w)
		e.SetIndent("", "  ")
		if err := e.Encode(doc); err != nil {
			return err
		}
	} else if !quiet {
		printCheck(w, r)
		if doc.Repair != nil {
			fmt.Fprintf(w, "repair (%s): %d change(s), %d sector(s) lost\n", mode, len(doc.Repair.Actions), doc.Repair.LostSectors)
			printActions(w, doc.Repair.Actions)
			if doc.Repair.Undo != "" {
				fmt.Fprintf(w, "what the repair changed is saved in %s: `sparsedisk check --undo %s` reverts it\n", doc.Repair.Undo, path)
			}
			fmt.Fprintln(w, "after repair:")
			printCheck(w, doc.After)
		}
	}
	switch doc.ExitCode {
	case exitCorruption:
		if g := final.Geometry; g != nil {
			return cli.Exit(fmt.Sprintf("%s: the descriptor disagrees with the files; %s", path, g.Fix), exitCorruption)
		}
		if final.Layout == "" {
			return cli.Exit(fmt.Sprintf("%s: %d corruption(s) found; %s", path, final.Corruptions, badDescriptorHint(path)), exitCorruption)
		}
		return cli.Exit(fmt.Sprintf("%s: %d corruption(s) found; `sparsedisk check -r all %s` repairs them", path, final.Corruptions, path), exitCorruption)
	case exitLeaks:
		return cli.Exit(fmt.Sprintf("%s: %d leaked slot(s); `sparsedisk check -r leaks` or `shrink` reclaims them", path, final.LeakedSlots), exitLeaks)
	}
	return nil
}

// badDescriptorHint tells what to do about a descriptor that does not
// parse (check cannot repair it: the geometry is unknown).
func badDescriptorHint(path string) string {
	return fmt.Sprintf("the descriptor %s does not parse, so the image's geometry is unknown: it is a small text file, "+
		"fix the line named above by hand, or move it aside and run `sparsedisk adopt %s size=… split=… sectorsize=…` "+
		"with the original values (adopt verifies them against the segments and the LUT)", path, path)
}

// refusal is the reason a repair was refused, without the error chain's
// prefixes: the geometry finding was printed already, so only the fix.
func refusal(err error, r *blockif.Report) string {
	if g := r.Geometry; g != nil {
		return "the descriptor disagrees with the files; " + g.Fix
	}
	return cleanErr(err).Error()
}

// printActions lists a repair's changes; long runs of the same kind of
// change are summarised after the first few.
func printActions(w io.Writer, acts []offline.RepairAction) {
	const show = 20
	for i, a := range acts {
		if i == show && len(acts) > show+5 {
			fmt.Fprintf(w, "  … and %d more change(s) (--output=json lists all)\n", len(acts)-show)
			return
		}
		fmt.Fprintf(w, "  %s\n", a)
	}
}

func printCheck(w io.Writer, r *blockif.Report) {
	for _, f := range r.Findings {
		fmt.Fprintf(w, "  %s\n", f)
	}
	if r.Layout == "" && !r.Clean() {
		fmt.Fprintf(w, "%s: %d corruption(s) (descriptor unreadable)\n", r.Image, r.Corruptions)
		return
	}
	if r.Clean() {
		fmt.Fprintf(w, "%s: no errors found (%s layout", r.Image, r.Layout)
		if r.Advice > 0 {
			fmt.Fprintf(w, "; %d advice finding(s)", r.Advice)
		}
	} else {
		fmt.Fprintf(w, "%s: %d corruption(s), %d leak(s) (%d slot(s)) (%s layout", r.Image, r.Corruptions, r.Leaks, r.LeakedSlots, r.Layout)
	}
	if r.Layout == format.LayoutSparse {
		fmt.Fprintf(w, ", %d allocated sectors, %d slots, %d fragment breaks", r.AllocatedSectors, r.Slots, r.Fragments)
	}
	fmt.Fprintln(w, ")")
}

// flagVals are a command's flags, from before or after its positional
// arguments.
type flagVals struct {
	c    *cli.Context
	vals map[string]string
}

// str is the flag's value: given after the positional arguments, else
// given before them, else def.
func (f flagVals) str(name, def string) string {
	if v, ok := f.vals[name]; ok {
		return v
	}
	if f.c.IsSet(name) {
		return f.c.String(name)
	}
	return def
}

// on tells whether a boolean flag is set.
func (f flagVals) on(name string) bool {
	if v, ok := f.vals[name]; ok {
		return v == "true" || v == "1"
	}
	return f.c.Bool(name)
}

// splitArgs separates the positional arguments from flags that follow
// them (urfave/cli stops parsing flags at the first positional argument).
// valued flags take a value (--name=v, --name v), boolean ones may be
// given as --name or --name=false. A one-letter alias (-r, -q, -f, -j)
// works for the flag whose name starts with it. "-1G" and other negative
// numbers are positional.
func splitArgs(c *cli.Context, valued, boolean []string) ([]string, flagVals, error) {
	fv := flagVals{c: c, vals: map[string]string{}}
	var pos []string
	args := c.Args().Slice()
	lookup := func(name string) (string, bool, bool) {
		if c.Command != nil { // declared aliases first: -U is --force-share
			for _, f := range c.Command.Flags {
				names := f.Names()
				for _, a := range names[1:] {
					if a == name {
						name = names[0]
					}
				}
			}
		}
		for _, n := range valued {
			if n == name || (len(name) == 1 && n[0] == name[0]) {
				return n, true, true
			}
		}
		for _, n := range boolean {
			if n == name || (len(name) == 1 && n[0] == name[0]) {
				return n, false, true
			}
		}
		return "", false, false
	}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' || (a[1] >= '0' && a[1] <= '9') {
			pos = append(pos, a)
			continue
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		full, takesValue, ok := lookup(name)
		if !ok {
			return nil, fv, fmt.Errorf("unknown flag %s", a)
		}
		switch {
		case takesValue && !hasVal:
			if i+1 >= len(args) {
				return nil, fv, fmt.Errorf("flag %s needs a value", a)
			}
			i++
			val = args[i]
		case !takesValue && !hasVal:
			val = "true"
		}
		fv.vals[full] = val
	}
	return pos, fv, nil
}

// progressFor returns a callback that draws a progress bar on stderr when
// it is a terminal (nil otherwise, or when disabled), and a function that
// finishes the bar.
func progressFor(c *cli.Context, enabled bool, what string) (func(done, total int64), func()) {
	f, ok := c.App.ErrWriter.(*os.File)
	if !enabled || !ok || !term.IsTerminal(int(f.Fd())) {
		return nil, func() {}
	}
	var bar *progressbar.ProgressBar
	update := func(done, total int64) {
		if bar == nil {
			bar = progressbar.NewOptions64(total,
				progressbar.OptionSetWriter(f),
				progressbar.OptionSetDescription(what),
				progressbar.OptionShowBytes(true),
				progressbar.OptionSetWidth(30),
				progressbar.OptionThrottle(100*time.Millisecond),
				progressbar.OptionClearOnFinish(),
			)
		}
		bar.Set64(done)
	}
	return update, func() {
		if bar != nil {
			bar.Finish()
		}
	}
}
