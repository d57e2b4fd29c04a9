// Command sparsedisk creates, inspects, serves and repairs sparsedisk
// virtual-disk images. Each subcommand lives in its own file and registers
// itself with [register]; this file only assembles the app.
package main

import (
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strings"

	"github.com/urfave/cli/v2"
)

// commands is filled by the init functions of the subcommand files.
var commands []*cli.Command

func register(c *cli.Command) { commands = append(commands, c) }

// newApp builds the CLI with the given output writers (tests use buffers).
func newApp(stdout, stderr io.Writer) *cli.App {
	return &cli.App{
		Name:  "sparsedisk",
		Usage: "split, sparse virtual-disk images, served over NBD and FUSE",
		Description: "A sparsedisk image is a small text descriptor P, segment files P.0000, P.0001, …\n" +
			"and (sparse layout) a lookup table P.lut. Only sectors that ever held non-zero data\n" +
			"take space. Images are byte-compatible with xhyve's sparse disks.\n\n" +
			"Example:\n   sparsedisk create disk.img size=20G split=1G sectorsize=4096\n   sparsedisk info disk.img",
		Commands:             commands,
		Writer:               stdout,
		ErrWriter:            stderr,
		EnableBashCompletion: true,
		ExitErrHandler:       func(*cli.Context, error) {},
	}
}

// run executes the app and returns the process exit code.
func run(args []string, stdout, stderr io.Writer) int {
	args, err := flagsFirst(args)
	if err == nil {
		err = unknownCommand(args)
	}
	if err == nil {
		err = newApp(stdout, stderr).Run(args)
	}
	if err == nil {
		return 0
	}
	fmt.Fprintf(stderr, "sparsedisk: %s\n", cleanMsg(err.Error()))
	if ec, ok := err.(cli.ExitCoder); ok && ec.ExitCode() != 0 {
		return ec.ExitCode()
	}
	return 1
}

// flagsFirst lets flags follow positional arguments, as users type them
// (`serve disk.img --listen :10810`): urfave/cli stops parsing flags at a
// command's first positional argument, so this moves the subcommand's
// known flags, with their values, ahead of its positional arguments.
// Anything else keeps its place, including words that merely start with
// a dash (`resize disk.img -1G`) and everything after "--". A value
// flag with no value after it is an error naming the flag: it must not
// take the next positional argument (`serve a.img --socket` would bind
// the socket at the image's path).
func flagsFirst(args []string) ([]string, error) {
	if len(args) < 3 {
		return args, nil
	}
	var cmd *cli.Command
	for _, c := range commands {
		if c.HasName(args[1]) {
			cmd = c
		}
	}
	if cmd == nil {
		return args, nil
	}
	known := map[string]cli.Flag{"help": cli.HelpFlag, "h": cli.HelpFlag}
	for _, f := range cmd.Flags {
		for _, n := range f.Names() {
			known[n] = f
		}
	}
	flags, pos := []string{}, []string{}
	rest := args[2:]
	for i := 0; i < len(rest); i++ {
		a := rest[i]
		if a == "--" {
			pos = append(pos, rest[i:]...)
			break
		}
		name, _, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		f, ok := known[name]
		if len(a) < 2 || a[0] != '-' || !ok {
			pos = append(pos, a)
			continue
		}
		if f == cli.HelpFlag {
			// `info -h x`: help for the command, whatever follows.
			return []string{args[0], args[1], "--help"}, nil
		}
		flags = append(flags, a)
		if _, isBool := f.(*cli.BoolFlag); !isBool && !hasVal {
			if i+1 >= len(rest) || rest[i+1] == "--" {
				return nil, fmt.Errorf("%s %s needs a value (%s=VALUE); see `sparsedisk %s --help`", args[1], a, a, cmd.Name)
			}
			i++
			flags = append(flags, rest[i])
		}
	}
	return append(append(append([]string{}, args[:2]...), flags...), pos...), nil
}

// unknownCommand refuses a first argument that names no command (urfave
// would answer "No help topic", exit 3).
func unknownCommand(args []string) error {
	if len(args) < 2 || strings.HasPrefix(args[1], "-") {
		return nil
	}
	for _, c := range commands {
		if c.HasName(args[1]) {
			return nil
		}
	}
	if args[1] == "help" || args[1] == "h" {
		return nil
	}
	names := make([]string, 0, len(commands))
	for _, c := range commands {
		names = append(names, c.Name)
	}
	return fmt.Errorf("unknown command %q; the commands are %s (`sparsedisk --help` explains them)", args[1], strings.Join(names, ", "))
}

// cpuProfileEnv names a file to write a Go CPU profile (pprof format) of
// the whole run into, for any subcommand: the benchmark harness sets it
// on the server it profiles (`go tool pprof -top sparsedisk FILE`). The
// profile is written when the command returns, so a server must be
// stopped cleanly (SIGTERM, umount), not killed.
const cpuProfileEnv = "SPARSEDISK_CPUPROFILE"

func main() {
	if addr := os.Getenv(debugAddrEnv); addr != "" {
		if _, err := startDebugServer(addr); err != nil {
			fmt.Fprintf(os.Stderr, "sparsedisk: %v\n", err)
			os.Exit(1)
		}
	}
	if path := os.Getenv(cpuProfileEnv); path != "" {
		f, err := os.Create(path)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "sparsedisk: %s: %v\n", cpuProfileEnv, err)
			os.Exit(1)
		}
		code := run(os.Args, os.Stdout, os.Stderr)
		pprof.StopCPUProfile()
		f.Close()
		os.Exit(code)
	}
	os.Exit(run(os.Args, os.Stdout, os.Stderr))
}
