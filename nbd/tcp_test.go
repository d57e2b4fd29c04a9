package nbd

import (
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sparsedisk/sparsedisk/internal/testutil"
)

func congestion(t *testing.T, c net.Conn) string {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var name string
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		name, gerr = unix.GetsockoptString(int(fd), syscall.IPPROTO_TCP, unix.TCP_CONGESTION)
	}); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return strings.TrimRight(name, "\x00")
}

// acceptedPair returns the server end of a new TCP connection to ip.
func acceptedPair(t *testing.T, ip string) net.Conn {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cc, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	sc, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sc.Close() })
	return sc
}

// setCongestion sets the connection's congestion control to name.
func setCongestion(t *testing.T, c net.Conn, name string) {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptString(int(fd), syscall.IPPROTO_TCP, unix.TCP_CONGESTION, name)
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatalf("set congestion control %s: %v", name, serr)
	}
}

// startCongestion is what each connection is switched to before
// tuneLoopback runs, so that the test can fail wherever the system
// default already is loopbackCongestion: reno is built into every Linux
// kernel.
const startCongestion = "reno"

// TestTuneLoopback: connections between loopback addresses get
// loopbackCongestion (when the kernel offers it); others keep what they
// had.
func TestTuneLoopback(t *testing.T) {
	avail, err := os.ReadFile("/proc/sys/net/ipv4/tcp_available_congestion_control")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(strings.Fields(string(avail)), loopbackCongestion) {
		// modprobe tcp_cubic, or build it in: without it, the test
		// cannot tell tuneLoopback from doing nothing.
		testutil.Unavailable(t, "congestion control %s not available (have: %s)", loopbackCongestion, strings.TrimSpace(string(avail)))
	}
	sc := acceptedPair(t, "127.0.0.1")
	setCongestion(t, sc, startCongestion)
	if got := congestion(t, sc); got != startCongestion {
		t.Fatalf("connection uses %q after setting %q", got, startCongestion)
	}
	tuneLoopback(sc)
	if got := congestion(t, sc); got != loopbackCongestion {
		t.Fatalf("loopback connection after tuneLoopback uses %q, want %q", got, loopbackCongestion)
	}

	// A connection to one of this host's other addresses is not touched.
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok || ipn.IP.IsLoopback() || ipn.IP.To4() == nil {
			continue
		}
		sc := acceptedPair(t, ipn.IP.String())
		setCongestion(t, sc, startCongestion)
		tuneLoopback(sc)
		if got := congestion(t, sc); got != startCongestion {
			t.Fatalf("connection over %s uses %q after tuneLoopback, want it unchanged (%q)", ipn.IP, got, startCongestion)
		}
		return
	}
	t.Log("no non-loopback IPv4 address on this host: only the loopback case was checked")
}

// TestTuneLoopbackKeep: KeepCongestion leaves a loopback connection with
// the system default, and an explicit algorithm other than the system
// default is set (reno is built into every kernel that has TCP).
func TestTuneLoopbackKeep(t *testing.T) {
	def, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control")
	if err != nil {
		t.Fatal(err)
	}
	sys := strings.TrimSpace(string(def))
	other := "reno"
	if sys == "reno" {
		other = "cubic"
	}
	sc := acceptedPair(t, "127.0.0.1")
	tuneLoopbackTo(sc, other)
	if got := congestion(t, sc); got != other {
		t.Fatalf("tuneLoopbackTo(%q) left %q", other, got)
	}
	sc = acceptedPair(t, "127.0.0.1")
	tuneLoopbackTo(sc, KeepCongestion)
	if got := congestion(t, sc); got != sys {
		t.Fatalf("tuneLoopbackTo(KeepCongestion) gave %q, want the system default %q", got, sys)
	}
}
