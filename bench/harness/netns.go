package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strings"
	"syscall"
)

// Congestion control. Every TCP row runs under one congestion control for
// every target (client and server ends alike): the host's default, and
// cubic when the host's default is something else (BBR on the development
// machines). sparsedisk is started with `--tcp-congestion=system`, so it
// does not switch its loopback sockets to cubic the way it does by default.
//
// The setting is changed without touching the host: as root the harness
// re-executes itself in a private network namespace (CLONE_NEWNET, its own
// loopback device), whose net.ipv4.tcp_congestion_control is its own. A
// namespace other than the host's may only pick an algorithm listed in the
// host-wide net.ipv4.tcp_allowed_congestion_control; if cubic is missing
// there, the parent adds it for the run and restores the list afterwards
// (that list only says what unprivileged programs may choose per socket).

const (
	netnsEnv     = "SPARSEDISK_BENCH_NETNS"   // set in the re-executed child
	hostCCEnv    = "SPARSEDISK_BENCH_HOST_CC" // the host's default, for the child
	ccPath       = "/proc/sys/net/ipv4/tcp_congestion_control"
	ccAllowed    = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
	ccAvailable  = "/proc/sys/net/ipv4/tcp_available_congestion_control"
	alternateCC  = "cubic"
	transportTCP = "tcp"
	transportUDS = "unix"
)

// transport is how fio reaches an NBD server: TCP on loopback under one
// congestion control, or a Unix socket.
type transport struct {
	key   string // row id suffix: tcp-bbr, tcp-cubic, unix
	label string // for tables and charts
	kind  string // transportTCP or transportUDS
	cc    string // TCP only: the namespace default set before the server starts
}

var (
	hostCC     string      // the host's default congestion control
	inNetns    bool        // running in the private namespace: cc can be set
	transports []transport // in table order
)

// reexecInNetns runs the harness again in a private network namespace and
// exits with its status. It returns (without exiting) when that is not
// possible or already done.
func reexecInNetns() {
	if os.Getenv(netnsEnv) != "" || os.Geteuid() != 0 {
		return
	}
	for _, a := range os.Args[1:] {
		if strings.HasPrefix(strings.TrimLeft(a, "-"), "chart") {
			return // redraws only
		}
	}
	host := readTrim(ccPath)
	if host == "" {
		return
	}
	restore := ""
	allowed := readTrim(ccAllowed)
	if host != alternateCC && slices.Contains(strings.Fields(readTrim(ccAvailable)), alternateCC) &&
		!slices.Contains(strings.Fields(allowed), alternateCC) {
		if err := os.WriteFile(ccAllowed, []byte(allowed+" "+alternateCC+"\n"), 0); err == nil {
			restore = allowed
		} else {
			warnf("adding %s to %s: %v", alternateCC, ccAllowed, err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return
	}
	cmd := exec.Command(self, os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), netnsEnv+"=1", hostCCEnv+"="+host)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	// The child handles SIGINT/SIGTERM (and tears down); the parent only
	// passes SIGTERM on and waits, so it can restore the allowed list.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	if err := cmd.Start(); err != nil {
		signal.Stop(sigs)
		if restore != "" {
			os.WriteFile(ccAllowed, []byte(restore+"\n"), 0)
		}
		warnf("no private network namespace (%v): every TCP row runs under the host's %s only", err, host)
		return
	}
	go func() {
		for s := range sigs {
			if s == syscall.SIGTERM {
				cmd.Process.Signal(s)
			}
		}
	}()
	err = cmd.Wait()
	if restore != "" {
		if werr := os.WriteFile(ccAllowed, []byte(restore+"\n"), 0); werr != nil {
			warnf("restoring %s to %q: %v", ccAllowed, restore, werr)
		}
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
		if code < 0 {
			code = 1
		}
	} else if err != nil {
		code = 1
	}
	os.Exit(code)
}

// setupTransports brings the namespace's loopback up and lists the
// transports this run measures.
func setupTransports() error {
	hostCC = readTrim(ccPath)
	if os.Getenv(netnsEnv) != "" {
		hostCC = os.Getenv(hostCCEnv)
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			return fmt.Errorf("ip link set lo up in the benchmark's network namespace: %v: %s", err, out)
		}
		inNetns = true
		if err := setCC(hostCC); err != nil {
			return err
		}
	}
	transports = []transport{{key: "tcp-" + hostCC, label: "TCP, " + hostCC + " (host default)", kind: transportTCP, cc: hostCC}}
	if hostCC != alternateCC {
		if !inNetns {
			warnf("not in a private network namespace (not root?): the %s rows are not measured", alternateCC)
		} else if err := setCC(alternateCC); err != nil {
			warnf("%v: the %s rows are not measured", err, alternateCC)
		} else {
			transports = append(transports, transport{key: "tcp-" + alternateCC, label: "TCP, " + alternateCC, kind: transportTCP, cc: alternateCC})
		}
		setCC(hostCC)
	}
	transports = append(transports, transport{key: "unix", label: "Unix socket", kind: transportUDS})
	return nil
}

// setCC makes algo the default congestion control of the harness's
// network namespace (new sockets of the servers and of fio use it).
func setCC(algo string) error {
	if !inNetns || algo == "" {
		return nil
	}
	if readTrim(ccPath) == algo {
		return nil
	}
	if err := os.WriteFile(ccPath, []byte(algo+"\n"), 0); err != nil {
		return fmt.Errorf("setting net.ipv4.tcp_congestion_control=%s in the benchmark's namespace: %w", algo, err)
	}
	return nil
}

func readTrim(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
