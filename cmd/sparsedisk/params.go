package main

import (
	"fmt"
	"strings"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/urfave/cli/v2"
)

// geometryFlags are the --size style equivalents of size= split=
// sectorsize= layout= lut= arguments.
func geometryFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "size", Usage: "virtual disk size, like 20G (k/m/g/t/p = powers of 1024)"},
		&cli.StringFlag{Name: "split", Usage: "segment file size, a multiple of the sector size (default 1G)"},
		&cli.StringFlag{Name: "sectorsize", Usage: "sector size: a power of two from 512 to 65536 (default 4096)"},
		&cli.StringFlag{Name: "layout", Usage: "sparse (default), split or raw"},
		&cli.StringFlag{Name: "lut", Usage: "sparse LUT encoding: xhyve (default, xhyve-compatible) or thin (empty LUT pages are holes)"},
	}
}

// geometryArgs splits the arguments into positional ones and key=value
// geometry settings, merged with the --flags (an argument wins over a flag
// only if the flag was not given; giving both differently is an error).
func geometryArgs(c *cli.Context) (pos []string, p format.Params, err error) {
	kv := map[string]string{}
	args := c.Args().Slice()
	for i := 0; i < len(args); i++ {
		a := args[i]
		// urfave/cli stops parsing flags at the first positional argument:
		// accept --size=… and --size … after the path too.
		if strings.HasPrefix(a, "--") {
			a = strings.TrimPrefix(a, "--")
			if !strings.Contains(a, "=") {
				if i+1 >= len(args) {
					return nil, p, fmt.Errorf("--%s needs a value", a)
				}
				i++
				a += "=" + args[i]
			}
		}
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			pos = append(pos, a)
			continue
		}
		k = strings.ToLower(strings.TrimSpace(k))
		switch k {
		case "size", "split", "sectorsize", "layout", "lut":
		default:
			return nil, p, fmt.Errorf("unknown setting %q (want size=, split=, sectorsize=, layout= or lut=)", a)
		}
		if _, dup := kv[k]; dup {
			return nil, p, fmt.Errorf("%s= given twice", k)
		}
		kv[k] = v
	}
	for _, k := range []string{"size", "split", "sectorsize", "layout", "lut"} {
		if c.IsSet(k) {
			if v, dup := kv[k]; dup && v != c.String(k) {
				return nil, p, fmt.Errorf("%s given both as %s=%s and --%s=%s", k, k, v, k, c.String(k))
			}
			kv[k] = c.String(k)
		}
	}
	num := func(k string) (int64, error) {
		v, ok := kv[k]
		if !ok {
			return 0, nil
		}
		return parseSetting(k, v)
	}
	if p.Size, err = num("size"); err != nil {
		return nil, p, err
	}
	if p.Split, err = num("split"); err != nil {
		return nil, p, err
	}
	if p.SectorSize, err = num("sectorsize"); err != nil {
		return nil, p, err
	}
	p.Layout = format.Layout(kv["layout"])
	if v, ok := kv["lut"]; ok {
		k, err := lut.ParseKind(v)
		if err != nil || v == "" {
			return nil, p, fmt.Errorf("lut=%s: want xhyve or thin", v)
		}
		p.LUT = k
	}
	return pos, p, nil
}

// parseSetting parses a size=, split= or sectorsize= value given on the
// command line. Zero is refused, naming the setting: it would otherwise
// read as "not given" and silently mean the default.
func parseSetting(k, v string) (int64, error) {
	n, err := format.ParseSize(v)
	if err != nil {
		return 0, fmt.Errorf("%s=%s: %w", k, v, err)
	}
	if n == 0 {
		switch k {
		case "size":
			return 0, fmt.Errorf("size=%s: the disk size must be positive, like size=20G", v)
		case "split":
			return 0, fmt.Errorf("split=%s: the segment size must be a positive multiple of the sector size, like split=1G (the default)", v)
		default:
			return 0, fmt.Errorf("%s=%s: the sector size must be a power of two from %d to %d, like sectorsize=4096 (the default)", k, v, format.MinSectorSize, format.MaxSectorSize)
		}
	}
	return n, nil
}

// unitLike tells whether a word is a bare size unit ("G", "MiB"): typed
// apart from its number (`size=20 G`), it must not become a file name.
func unitLike(a string) bool {
	switch strings.ToLower(a) {
	case "k", "m", "g", "t", "p", "kb", "mb", "gb", "tb", "pb", "kib", "mib", "gib", "tib", "pib", "b":
		return true
	}
	return false
}
