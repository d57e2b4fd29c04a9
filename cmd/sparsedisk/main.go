// Command sparsedisk creates, inspects, serves and repairs sparsedisk
// virtual-disk images. Each subcommand lives in its own file and registers
// itself with [register]; this file only assembles the app.
package main

import (
	"fmt"
	"io"
	"os"

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
	err := newApp(stdout, stderr).Run(args)
	if err == nil {
		return 0
	}
	fmt.Fprintf(stderr, "sparsedisk: %v\n", err)
	if ec, ok := err.(cli.ExitCoder); ok && ec.ExitCode() != 0 {
		return ec.ExitCode()
	}
	return 1
}

func main() { os.Exit(run(os.Args, os.Stdout, os.Stderr)) }
