package nbd

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// DefaultLoopbackCongestion is the TCP congestion control set on
// connections whose both ends are loopback addresses (the default: `serve`
// listens on 127.0.0.1, and qemu, fio and libnbd tools on the same host
// connect there), unless Config.LoopbackCongestion says otherwise.
//
// Why: many hosts default to BBR, which paces every send to its estimate
// of the path's bandwidth. On loopback there is no path to be fair to, and
// the estimate collapsed for this server's replies: measured on the
// benchmark machine (Linux 6.18, 2 vCPUs, BBR default), 1 MiB sequential
// reads at queue depth 1 ran at 2700-3300 MiB/s with the connection paced
// at about 40 Gbit/s and showing reordering, SACK recovery and spurious
// retransmits (nstat), against 4600-4900 MiB/s with cubic; nbdkit on the
// same machine ran at 4300-5300 either way. Connections from other hosts
// keep the system's choice.
const DefaultLoopbackCongestion = "cubic"

// KeepCongestion as Config.LoopbackCongestion leaves loopback connections
// with the system's default congestion control.
const KeepCongestion = "system"

// loopbackCongestion is the algorithm tuneLoopback sets.
const loopbackCongestion = DefaultLoopbackCongestion

// tuneLoopback sets loopbackCongestion on nc if it is a TCP connection
// between loopback addresses.
func tuneLoopback(nc net.Conn) { tuneLoopbackTo(nc, loopbackCongestion) }

// tuneLoopbackTo sets algo ("" = DefaultLoopbackCongestion, KeepCongestion
// = leave it) on nc if it is a TCP connection between loopback addresses.
// It is best effort: a kernel without the algorithm keeps its default, and
// nothing else depends on it.
func tuneLoopbackTo(nc net.Conn, algo string) {
	if algo == KeepCongestion {
		return
	}
	if algo == "" {
		algo = DefaultLoopbackCongestion
	}
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return
	}
	la, lok := tc.LocalAddr().(*net.TCPAddr)
	ra, rok := tc.RemoteAddr().(*net.TCPAddr)
	if !lok || !rok || !la.IP.IsLoopback() || !ra.IP.IsLoopback() {
		return
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptString(int(fd), syscall.IPPROTO_TCP, unix.TCP_CONGESTION, algo)
	})
}
