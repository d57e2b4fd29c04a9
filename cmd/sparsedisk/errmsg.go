package main

import (
	"errors"
	"fmt"
	"regexp"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/urfave/cli/v2"
)

// sentinelPrefix matches the package prefix of the libraries' sentinel
// errors ("sparsedisk/format: invalid parameters: "), which programs match
// with errors.Is and users need not read.
var sentinelPrefix = regexp.MustCompile(`sparsedisk/[a-z0-9]+: (invalid parameters: )?`)

// cleanMsg is an error's text as the CLI prints it: without the
// sentinels' package prefixes.
func cleanMsg(s string) string { return sentinelPrefix.ReplaceAllString(s, "") }

// cleanErr is err with cleanMsg's text (for printing only).
func cleanErr(err error) error {
	if err == nil {
		return nil
	}
	return errors.New(cleanMsg(err.Error()))
}

// forceShareFlag is -U/--force-share of info, map and check (qemu-img's).
func forceShareFlag() cli.Flag {
	return &cli.BoolFlag{Name: "force-share", Aliases: []string{"U"},
		Usage: "read an image another process holds open for writing, without its lock (read-only; may be inconsistent)"}
}

func forceShareWarning(path string) string {
	return fmt.Sprintf("-U: reading %s without its lock; if a server or mount writes it meanwhile, what follows may be inconsistent", path)
}

// examineGeometry refuses to describe an image whose descriptor disagrees
// with its files (info and map would print figures of a wrong geometry,
// or count a garbage LUT as data).
func examineGeometry(path string) error {
	desc, err := format.ReadDescriptor(nil, path)
	if err != nil {
		return nil // raw, or Open reports it
	}
	g, err := blockif.CrossExamine(nil, path, desc)
	if err != nil || g.Trusted() {
		return err
	}
	return fmt.Errorf("%s: %s; %s", path, g.Summary(), g.Fix)
}
