package nbd

// Hostile-client tests: raw TCP connections to an in-process server that
// send garbage, cut handshakes, lie about lengths, send absurd requests,
// flood the listener or never read their replies. Throughout, the server
// must stay up, keep serving a well-behaved client correctly, keep its
// memory bounded and return to its baseline goroutine count once the
// hostile clients are gone.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/internal/reqlog"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"golang.org/x/sys/unix"
)

const hostileImageSize = 16 << 20

// hostileImage creates and opens a real sparse image in t.TempDir(). It is
// closed after the server has shut down (cleanups run in reverse order, and
// the server is started after this).
func hostileImage(t *testing.T) *blockif.Disk {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := blockif.Create(path, format.Params{Size: hostileImageSize, Split: 4 << 20, SectorSize: 4096}, nil); err != nil {
		t.Fatal(err)
	}
	d, err := blockif.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("close image: %v", err)
		}
	})
	return d
}

// heapInuse returns HeapInuse after two collections (the second also
// empties the sync.Pool victim caches).
func heapInuse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// meter samples the heap, the goroutine count and the server's connection
// count every 10 ms until finish.
type meter struct {
	s    *Server
	stop chan struct{}
	done chan struct{}

	// mu protects the peaks (read by the test while sampling goes on).
	mu             sync.Mutex
	peakHeap       uint64
	peakGoroutines int
	peakConns      int
	peakPending    int
}

func startMeter(s *Server) *meter {
	m := &meter{s: s, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(m.done)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			m.sample()
			select {
			case <-m.stop:
				m.sample()
				return
			case <-tick.C:
			}
		}
	}()
	return m
}

func (m *meter) sample() {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	g := runtime.NumGoroutine()
	m.s.mu.Lock()
	n, p := len(m.s.conns), m.s.pending.Len()
	m.s.mu.Unlock()
	m.mu.Lock()
	m.peakPending = max(m.peakPending, p)
	m.peakHeap = max(m.peakHeap, ms.HeapInuse)
	m.peakGoroutines = max(m.peakGoroutines, g)
	m.peakConns = max(m.peakConns, n)
	m.mu.Unlock()
}

// heapPeak returns the peak HeapInuse sampled so far.
func (m *meter) heapPeak() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peakHeap
}

func (m *meter) finish() {
	close(m.stop)
	<-m.done
}

// waitGoroutines polls until no more than baseline goroutines run, and
// fails the test with a stack dump if that takes longer than 10 s.
func waitGoroutines(t *testing.T, baseline int) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= baseline {
			return n
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines 10 s after the hostile clients left, baseline %d:\n%s", n, baseline, buf)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// rawGo negotiates export name with NBD_OPT_GO on nc. It returns errors
// instead of failing the test, so goroutines other than the test's may use
// it.
func rawGo(nc net.Conn, name string) error {
	g := make([]byte, 18)
	if _, err := io.ReadFull(nc, g); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if be.Uint64(g) != magicInit || be.Uint64(g[8:]) != magicOpt {
		return fmt.Errorf("bad greeting % x", g)
	}
	b := be.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	b = append(b, optionBytes(optGo, appendInfoRequest(nil, infoRequest{name: name}))...)
	if _, err := nc.Write(b); err != nil {
		return err
	}
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(nc, h); err != nil {
			return fmt.Errorf("option reply: %w", err)
		}
		d := make([]byte, be.Uint32(h[16:]))
		if _, err := io.ReadFull(nc, d); err != nil {
			return fmt.Errorf("option reply data: %w", err)
		}
		switch typ := be.Uint32(h[12:]); {
		case typ == repAck:
			return nil
		case typ&(1<<31) != 0:
			return fmt.Errorf("GO refused with %#x: %s", typ, d)
		}
	}
}

// readSimple reads a simple reply, checks its cookie and errno, and reads
// len(data) bytes of read data into data.
func readSimple(nc net.Conn, cookie uint64, data []byte) error {
	var h [16]byte
	if _, err := io.ReadFull(nc, h[:]); err != nil {
		return err
	}
	if m := be.Uint32(h[:]); m != magicSimpleReply {
		return fmt.Errorf("bad reply magic %#x", m)
	}
	if c := be.Uint64(h[8:]); c != cookie {
		return fmt.Errorf("reply cookie %d, want %d", c, cookie)
	}
	if e := be.Uint32(h[4:]); e != 0 {
		return fmt.Errorf("errno %d", e)
	}
	if len(data) > 0 {
		if _, err := io.ReadFull(nc, data); err != nil {
			return fmt.Errorf("read data: %w", err)
		}
	}
	return nil
}

// wellBehaved is a correct client on its own connection: it writes a
// block, reads it back and compares, in a loop, until stopped.
type wellBehaved struct {
	rounds atomic.Int64
	stopc  chan struct{}
	once   sync.Once
	done   chan struct{}
	err    error // written before done is closed
}

// wellBehavedRegion is where it writes: the first MiB of the export.
const wellBehavedRegion = 1 << 20

func startWellBehaved(t *testing.T, addr, name string) *wellBehaved {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
	if err := rawGo(nc, name); err != nil {
		nc.Close()
		t.Fatalf("well-behaved client: %v", err)
	}
	w := &wellBehaved{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		defer nc.Close()
		w.err = w.loop(nc)
	}()
	t.Cleanup(func() { w.stop() })
	return w
}

func (w *wellBehaved) loop(nc net.Conn) error {
	const bs = 4096
	got := make([]byte, bs)
	for i := uint64(0); ; i++ {
		select {
		case <-w.stopc:
			_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := nc.Write(appendRequest(nil, request{typ: cmdDisc, cookie: 2 * i})); err != nil {
				return fmt.Errorf("disconnect: %w", err)
			}
			// The server flushes and closes: EOF, nothing else.
			if n, err := nc.Read(got[:1]); n != 0 || !errors.Is(err, io.EOF) {
				return fmt.Errorf("after DISC read %d bytes, %v; want EOF", n, err)
			}
			return nil
		default:
		}
		// Generous: the race detector on two shared cores under a flood.
		_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
		off := i * bs % wellBehavedRegion
		data := pattern(bs, byte(i))
		req := appendRequest(nil, request{typ: cmdWrite, cookie: 2 * i, offset: off, length: bs})
		if _, err := nc.Write(append(req, data...)); err != nil {
			return fmt.Errorf("round %d: send write: %w", i, err)
		}
		if err := readSimple(nc, 2*i, nil); err != nil {
			return fmt.Errorf("round %d: write: %w", i, err)
		}
		if _, err := nc.Write(appendRequest(nil, request{typ: cmdRead, cookie: 2*i + 1, offset: off, length: bs})); err != nil {
			return fmt.Errorf("round %d: send read: %w", i, err)
		}
		if err := readSimple(nc, 2*i+1, got); err != nil {
			return fmt.Errorf("round %d: read: %w", i, err)
		}
		if !bytes.Equal(got, data) {
			return fmt.Errorf("round %d: read back different data at %d", i, off)
		}
		w.rounds.Add(1)
	}
}

// stop ends the loop and returns its error; it may be called repeatedly.
func (w *wellBehaved) stop() error {
	w.once.Do(func() { close(w.stopc) })
	<-w.done
	return w.err
}

// waitProgress waits until the well-behaved client has completed more
// than since rounds and returns the count; it fails the test if that takes
// longer than testutil.WaitTimeout or the client failed.
func (w *wellBehaved) waitProgress(t *testing.T, since int64) int64 {
	t.Helper()
	var n int64
	testutil.WaitFor(t, fmt.Sprintf("the well-behaved client's round %d", since+1), func() bool {
		select {
		case <-w.done:
			t.Fatalf("well-behaved client ended: %v", w.err)
		default:
		}
		n = w.rounds.Load()
		return n > since
	})
	return n
}

// checkServed fails the test unless the well-behaved client, connected
// before the attack began, completes a round after it began (each round
// writes a block and reads it back) and ends without error. It returns
// the rounds since before. Call it while the hostile clients are still
// connected where the test can hold them.
func checkServed(t *testing.T, w *wellBehaved, before int64) int64 {
	t.Helper()
	after := w.waitProgress(t, before)
	if err := w.stop(); err != nil {
		t.Fatalf("well-behaved client failed: %v", err)
	}
	return after - before
}

// waitClosed reads from nc until the server closes it and returns the
// bytes read and the time it took; timedOut reports that it was still
// open after limit.
func waitClosed(nc net.Conn, limit time.Duration) (n int64, took time.Duration, timedOut bool) {
	start := time.Now()
	_ = nc.SetReadDeadline(start.Add(limit))
	n, err := io.Copy(io.Discard, nc)
	var ne net.Error
	return n, time.Since(start), errors.As(err, &ne) && ne.Timeout()
}

// serverConn returns the server's side of the client connection nc.
func serverConn(t *testing.T, s *Server, nc net.Conn) *conn {
	t.Helper()
	var found *conn
	testutil.WaitFor(t, "the server to register the connection", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for c := range s.conns {
			if c.rw().RemoteAddr().String() == nc.LocalAddr().String() {
				found = c
				return true
			}
		}
		return false
	})
	return found
}

// unreadBytes returns the bytes received on the server's side of c that
// the server has not read yet.
func unreadBytes(c *conn) (int, error) {
	sc, ok := c.rw().(syscall.Conn)
	if !ok {
		return 0, fmt.Errorf("%T has no file descriptor", c.rw())
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var ierr error
	if err := raw.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil {
		return 0, err
	}
	return n, ierr
}

// waitHandshakesRead waits until the server holds n connections in
// handshake and has read everything each of them sent.
func waitHandshakesRead(t *testing.T, s *Server, n int) {
	t.Helper()
	testutil.WaitFor(t, fmt.Sprintf("the server to read what %d handshaking connections sent", n), func() bool {
		s.mu.Lock()
		var cs []*conn
		for c := range s.conns {
			cs = append(cs, c)
		}
		s.mu.Unlock()
		k := 0
		for _, c := range cs {
			c.mu.Lock()
			transmitting := c.transmitting
			c.mu.Unlock()
			if transmitting {
				continue
			}
			if u, err := unreadBytes(c); err != nil || u > 0 {
				return false
			}
			k++
		}
		return k == n
	})
}

// errList collects errors from many goroutines.
type errList struct {
	mu   sync.Mutex
	errs []error
}

func (l *errList) add(err error) {
	l.mu.Lock()
	l.errs = append(l.errs, err)
	l.mu.Unlock()
}

func (l *errList) report(t *testing.T) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, err := range l.errs {
		if i == 10 {
			t.Errorf("... and %d more", len(l.errs)-10)
			break
		}
		t.Error(err)
	}
	if len(l.errs) > 0 {
		t.FailNow()
	}
}

// TestHostileGarbage sends random bytes at every phase: instead of the
// client flags, after valid flags (as options), and after a successful GO
// (as requests). Every such connection must be closed by the server.
func TestHostileGarbage(t *testing.T) {
	d := hostileImage(t)
	const handshake = time.Second
	logs := &countingHandler{n: map[string]int{}}
	s, addr := startServer(t, Config{HandshakeTimeout: handshake, Logger: slog.New(logs)}, Export{Name: "disk", Backend: d})
	start := time.Now()
	baseline := runtime.NumGoroutine()
	heap0 := heapInuse()
	w := startWellBehaved(t, addr, "disk")
	m := startMeter(s)
	before := w.rounds.Load()

	const conns = 300
	rng := rand.New(rand.NewPCG(20240601, 1))
	garbage := make([][]byte, conns)
	var total int64
	for i := range garbage {
		// At least one request header, so that every phase has a
		// complete (invalid) message to reject.
		garbage[i] = make([]byte, requestHeaderLen+rng.IntN(16<<10))
		for j := range garbage[i] {
			garbage[i][j] = byte(rng.Uint32())
		}
		total += int64(len(garbage[i]))
	}
	var errs errList
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			nc, err := net.Dial("tcp", addr)
			if err != nil {
				errs.add(err)
				return
			}
			defer nc.Close()
			_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
			phase := []string{"flags", "options", "requests"}[i%3]
			switch phase {
			case "options":
				if _, err := io.ReadFull(nc, make([]byte, 18)); err != nil {
					errs.add(fmt.Errorf("conn %d: greeting: %w", i, err))
					return
				}
				if _, err := nc.Write(be.AppendUint32(nil, clientFixedNewstyle)); err != nil {
					errs.add(err)
					return
				}
			case "requests":
				if err := rawGo(nc, "disk"); err != nil {
					errs.add(fmt.Errorf("conn %d: %w", i, err))
					return
				}
			}
			// The server may close before reading everything: a failed
			// write is expected.
			_, _ = nc.Write(garbage[i])
			if _, took, open := waitClosed(nc, handshake+5*time.Second); open {
				errs.add(fmt.Errorf("conn %d: garbage as %s: still open after %v", i, phase, took))
			}
		}()
	}
	wg.Wait()
	errs.report(t)
	// Every bad client is worth a warning, but not one line each: at most
	// reqlog.PerSecond per second of the attack (+1 for the partial
	// window at each end).
	secs := int(time.Since(start)/time.Second) + 2
	if n := logs.count("nbd: handshake failed") + logs.count("nbd: dropping connection"); n == 0 || n > reqlog.PerSecond*secs {
		t.Errorf("%d warning lines for %d bad clients in %d s; want between 1 and %d", n, conns, secs-2, reqlog.PerSecond*secs)
	}
	rounds := checkServed(t, w, before)
	m.finish()
	final := waitGoroutines(t, baseline)
	heap1 := heapInuse()
	t.Logf("garbage: %d connections, %d bytes sent; well-behaved rounds since the attack began %d; heap before %d KiB, peak %d KiB, after %d KiB; goroutines baseline %d, peak %d, final %d",
		conns, total, rounds, heap0>>10, m.peakHeap>>10, heap1>>10, baseline, m.peakGoroutines, final)
	// Bound: 16 connections at a time, each holding at most a 64 KiB
	// option buffer or request reader plus its 16 KiB of garbage on the
	// client side (~1.3 MiB), the 4.8 MiB of generated garbage, and GC
	// slack (the heap may reach twice the live data before a collection).
	if m.peakHeap > heap0+32<<20 {
		t.Errorf("peak heap %d KiB, more than 32 MiB above the %d KiB baseline", m.peakHeap>>10, heap0>>10)
	}
	if heap1 > heap0+8<<20 {
		t.Errorf("heap after the attack %d KiB, more than 8 MiB above the %d KiB baseline", heap1>>10, heap0>>10)
	}
}

// validPrefix is a complete, valid session: flags, structured replies,
// base:allocation, GO, a 64-byte write and a read of it.
func validPrefix(name string) []byte {
	b := be.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	b = append(b, optionBytes(optStructuredReply, nil)...)
	b = append(b, optionBytes(optSetMetaContext, appendMetaRequest(nil, metaRequest{name, []string{metaBaseAllocation}}))...)
	b = append(b, optionBytes(optGo, appendInfoRequest(nil, infoRequest{name: name}))...)
	b = appendRequest(b, request{typ: cmdWrite, cookie: 1, offset: 2 << 20, length: 64})
	b = append(b, pattern(64, 9)...)
	return appendRequest(b, request{typ: cmdRead, cookie: 2, offset: 2 << 20, length: 64})
}

// TestHostileTruncatedHandshake cuts a valid session at every byte offset:
// even offsets half-close and wait for the server to close its side, odd
// offsets close abruptly.
func TestHostileTruncatedHandshake(t *testing.T) {
	d := hostileImage(t)
	// A handshake timeout no connection here waits for: every close is
	// the server seeing the cut.
	s, addr := startServer(t, Config{HandshakeTimeout: 10 * time.Minute}, Export{Name: "disk", Backend: d})
	baseline := runtime.NumGoroutine()
	heap0 := heapInuse()
	w := startWellBehaved(t, addr, "disk")
	m := startMeter(s)
	before := w.rounds.Load()
	prefix := validPrefix("disk")
	var sent int64
	for k := 0; k <= len(prefix); k++ {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := io.ReadFull(nc, make([]byte, 18)); err != nil {
			nc.Close()
			t.Fatalf("cut at %d: greeting: %v", k, err)
		}
		if _, err := nc.Write(prefix[:k]); err != nil {
			nc.Close()
			t.Fatalf("cut at %d: %v", k, err)
		}
		sent += int64(k)
		if k%2 == 1 {
			nc.Close()
			continue
		}
		_ = nc.(*net.TCPConn).CloseWrite()
		// The server sees EOF and closes (no timeout is near).
		if _, took, open := waitClosed(nc, 20*time.Second); open {
			nc.Close()
			t.Fatalf("cut at %d of %d: server kept the connection open for %v after EOF", k, len(prefix), took)
		}
		nc.Close()
	}
	rounds := checkServed(t, w, before)
	m.finish()
	final := waitGoroutines(t, baseline)
	heap1 := heapInuse()
	t.Logf("truncated handshakes: %d connections, %d bytes sent; well-behaved rounds since the attack began %d; heap before %d KiB, peak %d KiB, after %d KiB; goroutines baseline %d, peak %d, final %d",
		len(prefix)+1, sent, rounds, heap0>>10, m.peakHeap>>10, heap1>>10, baseline, m.peakGoroutines, final)
	// One connection at a time: a few KiB each, plus GC slack.
	if m.peakHeap > heap0+16<<20 {
		t.Errorf("peak heap %d KiB, more than 16 MiB above the %d KiB baseline", m.peakHeap>>10, heap0>>10)
	}
	// The complete session wrote its 64 bytes.
	got := make([]byte, 64)
	if _, err := d.ReadAt(got, 2<<20); err != nil || !bytes.Equal(got, pattern(64, 9)) {
		t.Fatalf("the uncut session's write is missing: %v", err)
	}
}

// TestHostileOptionLengths sends option headers whose lengths the server
// must not believe.
func TestHostileOptionLengths(t *testing.T) {
	d := hostileImage(t)
	const handshake = time.Second
	const held = 200
	s, addr := startServer(t, Config{HandshakeTimeout: handshake, MaxConnections: held + 10}, Export{Name: "disk", Backend: d})
	baseline := runtime.NumGoroutine()
	heap0 := heapInuse()
	w := startWellBehaved(t, addr, "disk")
	m := startMeter(s)
	before := w.rounds.Load()

	// A server whose handshake timeout no test waits for: whatever closes
	// a connection there is not the timeout.
	s2, addr2, stop2 := startServerStop(t, Config{HandshakeTimeout: 10 * time.Minute, MaxHandshakes: held + 10}, Export{Name: "disk", Backend: d})

	t.Run("export name of 4 GiB", func(t *testing.T) {
		c := dial(t, addr2)
		c.hello(clientFixedNewstyle)
		c.write(be.AppendUint32(be.AppendUint32(be.AppendUint64(nil, magicOpt), optExportName), math.MaxUint32))
		if _, took, open := waitClosed(c.nc, 20*time.Second); open {
			t.Fatalf("still open after %v: the server waits for a 4 GiB export name", took)
		}
	})

	var streamed int64
	t.Run("GO of 4 GiB", func(t *testing.T) {
		// The server may skip the announced data, but only until the
		// handshake timeout, and without buffering it.
		c := dial(t, addr)
		c.hello(clientFixedNewstyle)
		c.write(be.AppendUint32(be.AppendUint32(be.AppendUint64(nil, magicOpt), optGo), math.MaxUint32))
		start := time.Now()
		chunk := make([]byte, 64<<10)
		for time.Since(start) < handshake+20*time.Second {
			_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
			n, err := c.nc.Write(chunk)
			streamed += int64(n)
			if err != nil {
				break
			}
		}
		// Not before the handshake timeout; the upper bound only tells
		// "closed at the timeout" from "never closed" (the race
		// detector on two loaded cores can delay the close by seconds).
		took := time.Since(start)
		if took < handshake*9/10 || took > handshake+15*time.Second {
			t.Fatalf("connection closed after %v, want about the handshake timeout %v", took, handshake)
		}
	})

	t.Run("too big, then GO", func(t *testing.T) {
		c := dial(t, addr)
		c.hello(clientFixedNewstyle | clientNoZeroes)
		c.expect(optList, make([]byte, maxOptionLen+1), repErrTooBig)
		c.expect(optGo, appendInfoRequest(nil, infoRequest{name: "disk"}), repAck)
		c.request(cmdWrite, 0, 1, 3<<20, 4096, pattern(4096, 3))
		if errno, _, _ := c.simpleReply(0); errno != 0 {
			t.Fatalf("write errno %d", errno)
		}
		c.request(cmdRead, 0, 2, 3<<20, 4096, nil)
		if errno, _, data := c.simpleReply(4096); errno != 0 || !bytes.Equal(data, pattern(4096, 3)) {
			t.Fatalf("read back errno %d", errno)
		}
	})

	t.Run("many announced, none sent", func(t *testing.T) {
		// held connections each announce a 64 KiB option (the most the
		// server accepts) and send one byte of it. The server must not
		// reserve the announced size up front. The long-timeout server
		// holds all of them at once however long dialing them takes.
		base := heapInuse()
		conns := make([]net.Conn, 0, held)
		defer func() {
			for _, nc := range conns {
				nc.Close()
			}
		}()
		hdr := be.AppendUint32(nil, clientFixedNewstyle)
		hdr = append(hdr, be.AppendUint32(be.AppendUint32(be.AppendUint64(nil, magicOpt), optGo), maxOptionLen)...)
		hdr = append(hdr, 0)
		for range held {
			nc, err := net.Dial("tcp", addr2)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, nc)
			_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
			if _, err := io.ReadFull(nc, make([]byte, 18)); err != nil {
				t.Fatalf("greeting: %v", err)
			}
			if _, err := nc.Write(hdr); err != nil {
				t.Fatal(err)
			}
		}
		// Wait until the server has read what every held connection
		// sent (the header and the one byte), not for a fixed time.
		waitHandshakesRead(t, s2, held)
		used := int64(heapInuse()) - int64(base)
		perConn := used / held
		t.Logf("%d connections holding a 64 KiB option announcement: heap +%d KiB (%d bytes each, both ends of the connection)", held, used>>10, perConn)
		// A connection costs a few KiB of heap on both ends together
		// (conn, logger, poll descriptors; stacks are not heap).
		// Reserving the announced 64 KiB would show as more than 64 KiB
		// each.
		if perConn > 16<<10 {
			t.Fatalf("%d bytes of heap per connection that announced 64 KiB and sent 1 byte", perConn)
		}
		// The server lets them go when the clients leave.
		for _, nc := range conns {
			nc.Close()
		}
		testutil.WaitFor(t, "the server to drop the held connections", func() bool {
			s2.mu.Lock()
			defer s2.mu.Unlock()
			return len(s2.conns) == 0
		})
	})

	rounds := checkServed(t, w, before)
	stop2()
	m.finish()
	final := waitGoroutines(t, baseline)
	t.Logf("option lengths: %d bytes streamed into a 4 GiB option; well-behaved rounds since the attack began %d; heap before %d KiB, peak %d KiB; goroutines baseline %d, peak %d, final %d",
		streamed, rounds, heap0>>10, m.peakHeap>>10, baseline, m.peakGoroutines, final)
	// Far below the 4 GiB a believed length would cost; the 200 held
	// connections need about 1 MiB; the rest is GC slack.
	if m.peakHeap > heap0+32<<20 {
		t.Errorf("peak heap %d KiB, more than 32 MiB above the %d KiB baseline", m.peakHeap>>10, heap0>>10)
	}
}

// TestHostileRequests sends requests with absurd offsets, lengths, flags
// and types. Each gets an error reply with its own cookie, the connection
// keeps working, and only the two unanswerable ones (a payload above the
// maximum, a bad magic) drop it.
func TestHostileRequests(t *testing.T) {
	d := hostileImage(t)
	s, addr := startServer(t, Config{MaxPayload: 1 << 20}, Export{Name: "disk", Backend: d})
	baseline := runtime.NumGoroutine()
	w := startWellBehaved(t, addr, "disk")
	m := startMeter(s)
	before := w.rounds.Load()

	const size = hostileImageSize
	cases := []struct {
		name   string
		typ    uint16
		flags  uint16
		off    uint64
		length uint32
		send   int // payload bytes that follow (writes)
	}{
		{"read at 2^64-1", cmdRead, 0, math.MaxUint64, 4096, 0},
		{"read of 4 GiB", cmdRead, 0, 0, math.MaxUint32, 0},
		{"read past the end", cmdRead, 0, size - 1, 2, 0},
		{"read at the end + 1", cmdRead, 0, size + 1, 0, 0},
		{"read above max payload", cmdRead, 0, 0, 2 << 20, 0},
		{"read with every flag", cmdRead, 0xffff, 0, 4096, 0},
		{"read with DF, no structured replies", cmdRead, cflagDF, 0, 4096, 0},
		{"write at 2^64-512", cmdWrite, 0, math.MaxUint64 - 511, 512, 512},
		{"write wrapping around", cmdWrite, 0, size - 256, 512, 512},
		{"write with every flag", cmdWrite, 0xffff, 0, 512, 512},
		{"trim of 4 GiB", cmdTrim, 0, 0, math.MaxUint32, 0},
		{"trim at 2^64-1", cmdTrim, cflagFUA, math.MaxUint64, 1, 0},
		{"write zeroes at 2^64-1", cmdWriteZeroes, cflagNoHole, math.MaxUint64, math.MaxUint32, 0},
		{"write zeroes with every flag", cmdWriteZeroes, 0xffff, 0, 4096, 0},
		{"cache past the end", cmdCache, 0, size, math.MaxUint32, 0},
		{"flush with every flag", cmdFlush, 0xffff, math.MaxUint64, math.MaxUint32, 0},
		{"block status without a context", cmdBlockStatus, 0, 0, math.MaxUint32, 0},
		{"type 8", 8, 0, 0, 0, 0},
		{"type 100 of 4 GiB", 100, 0, math.MaxUint64, math.MaxUint32, 0},
		{"type 0x7fff", 0x7fff, 0xffff, 0, 4096, 0},
		{"type 0xffff", 0xffff, 0xffff, math.MaxUint64, math.MaxUint32, 0},
	}
	c := dial(t, addr)
	c.connect("disk", connectOpts{})
	for i, tc := range cases {
		cookie := uint64(1000 + i)
		c.request(tc.typ, tc.flags, cookie, tc.off, tc.length, pattern(tc.send, byte(i)))
		errno, got, _ := c.simpleReply(0)
		if errno == 0 || got != cookie {
			t.Fatalf("%s: errno %d cookie %d, want an error for cookie %d", tc.name, errno, got, cookie)
		}
	}
	// The same connection still works.
	c.request(cmdWrite, 0, 1, 4<<20, 4096, pattern(4096, 7))
	if errno, _, _ := c.simpleReply(0); errno != 0 {
		t.Fatalf("write after absurd requests: errno %d", errno)
	}
	c.request(cmdRead, 0, 2, 4<<20, 4096, nil)
	if errno, _, data := c.simpleReply(4096); errno != 0 || !bytes.Equal(data, pattern(4096, 7)) {
		t.Fatalf("read after absurd requests: errno %d", errno)
	}
	// Structured replies: an absurd block status is an error chunk.
	sc := dial(t, addr)
	sc.connect("disk", connectOpts{structured: true, meta: true})
	sc.request(cmdBlockStatus, 0, 7, math.MaxUint64, math.MaxUint32, nil)
	if ch := sc.chunk(); ch.cookie != 7 || ch.typ != chunkError || ch.flags&replyFlagDone == 0 {
		t.Fatalf("block status at 2^64-1: chunk %+v, want a final error chunk", ch)
	}
	sc.request(cmdBlockStatus, 0, 8, 0, math.MaxUint32, nil)
	if ch := sc.chunk(); ch.cookie != 8 || ch.typ != chunkError {
		t.Fatalf("block status of 4 GiB: chunk %+v, want an error chunk", ch)
	}
	// Unanswerable: the connection is dropped, nothing else.
	for name, hdr := range map[string][]byte{
		"write of 4 GiB": appendRequest(nil, request{typ: cmdWrite, length: math.MaxUint32}),
		"bad magic":      append(be.AppendUint32(nil, 0xdeadbeef), make([]byte, requestHeaderLen-4)...),
		"extended magic": append(be.AppendUint32(nil, magicExtendedRequest), make([]byte, requestHeaderLen-4)...),
	} {
		x := dial(t, addr)
		x.connect("disk", connectOpts{})
		x.write(hdr)
		if n, took, open := waitClosed(x.nc, 5*time.Second); open || n != 0 {
			t.Fatalf("%s: %d bytes, open %v after %v; want the connection dropped without a reply", name, n, open, took)
		}
	}
	// The attack above can end within milliseconds, before the
	// well-behaved client's first round: wait for one while the hostile
	// connections c and sc are still open.
	checkServed(t, w, before)
	c.request(cmdDisc, 0, 3, 0, 0, nil)
	c.expectClosed()
	sc.request(cmdDisc, 0, 9, 0, 0, nil)
	sc.expectClosed()
	m.finish()
	final := waitGoroutines(t, baseline)
	t.Logf("absurd requests: %d answered with errors, 3 connections dropped; heap peak %d KiB; goroutines baseline %d, peak %d, final %d",
		len(cases)+2, m.peakHeap>>10, baseline, m.peakGoroutines, final)
}

// TestHostileReplyBacklog: a client sends many large reads and does not
// read the replies. The server must stop reading its requests instead of
// queueing every reply in memory, serve others meanwhile, and deliver
// every reply correctly once the client reads.
func TestHostileReplyBacklog(t *testing.T) {
	d := hostileImage(t)
	const inflight = 4 << 20
	s, addr := startServer(t, Config{MaxPayload: 1 << 20, MaxInFlightBytes: inflight}, Export{Name: "disk", Backend: d})
	baseline := runtime.NumGoroutine()
	// Some data to read back; the rest reads as zeros.
	if _, err := d.WriteAt(pattern(1<<20, 5), 8<<20); err != nil {
		t.Fatal(err)
	}
	heap0 := heapInuse()
	w := startWellBehaved(t, addr, "disk")
	m := startMeter(s)
	before := w.rounds.Load()

	const reads, rsize = 400, 256 << 10 // 100 MiB of replies
	c := dial(t, addr)
	c.connect("disk", connectOpts{})
	var reqs []byte
	for i := range reads {
		reqs = appendRequest(reqs, request{typ: cmdRead, cookie: uint64(i), offset: uint64(8<<20 + i%4*rsize), length: rsize})
	}
	c.write(reqs)
	// The client reads nothing meanwhile. Wait until the server has
	// stopped reading its requests (every admitted request answered into
	// a reply queue above the budget, the reader held), then until the
	// well-behaved client is served while this one stalls.
	sc := serverConn(t, s, c.nc)
	// Stalled: more than the budget queued behind the write in
	// progress (the reader waits in waitBacklog), and no request in
	// flight but the one whose worker is that blocked writer.
	testutil.WaitFor(t, "the server to stop reading the stalled client's requests", func() bool {
		sc.out.mu.Lock()
		queued, writing := sc.out.queued, sc.out.writing
		sc.out.mu.Unlock()
		return queued > inflight && writing && sc.inflight.Load() == 1
	})
	during := w.waitProgress(t, before)
	m.sample()
	stalled := m.heapPeak()
	// Replies may come in any order; each cookie exactly once.
	seen := make([]bool, reads)
	for range reads {
		errno, cookie, data := c.simpleReply(rsize)
		if errno != 0 || cookie >= reads || seen[cookie] {
			t.Fatalf("reply errno %d cookie %d (seen before: %v)", errno, cookie, cookie < reads && seen[cookie])
		}
		seen[cookie] = true
		o := int(cookie) % 4 * rsize
		if !bytes.Equal(data, pattern(1<<20, 5)[o:o+rsize]) {
			t.Fatalf("reply %d: wrong data", cookie)
		}
	}
	c.request(cmdDisc, 0, 0, 0, 0, nil)
	c.expectClosed()
	checkServed(t, w, during-1)
	m.finish()
	final := waitGoroutines(t, baseline)
	t.Logf("reply backlog: %d reads of %d KiB (%d MiB) not read until the server stalled; well-behaved rounds meanwhile %d; heap before %d KiB, peak while stalled %d KiB, peak %d KiB; goroutines baseline %d, peak %d, final %d",
		reads, rsize>>10, reads*rsize>>20, during-before, heap0>>10, stalled>>10, m.peakHeap>>10, baseline, m.peakGoroutines, final)
	// Bound: reads executing (MaxInFlightBytes, 4 MiB) + replies queued
	// before the reader stops (4 MiB + one admission) + the batch being
	// written (the same again) is about 16 MiB; twice that for GC slack.
	// Queueing every reply would take 200 MiB.
	if stalled > heap0+32<<20 {
		t.Errorf("heap while the client did not read: %d KiB, more than 32 MiB above the %d KiB baseline", stalled>>10, heap0>>10)
	}
}

// countingHandler counts log records by message.
type countingHandler struct {
	mu sync.Mutex
	n  map[string]int
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *countingHandler) WithGroup(string) slog.Handler            { return h }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.n[r.Message]++
	h.mu.Unlock()
	return nil
}

func (h *countingHandler) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n[msg]
}

// TestHostileFlood opens 2000 connections, 150 at a time, that never
// finish the handshake. The server must hold no more than MaxHandshakes of
// them pending, evicting the oldest when a new one arrives; every one must
// be closed by eviction or at the handshake timeout; evictions must not
// log a line each; and the well-behaved client connected before the flood
// must keep being served.
func TestHostileFlood(t *testing.T) {
	d := hostileImage(t)
	const (
		maxPending = 64
		handshake  = time.Second
		total      = 2000
		parallel   = 150
	)
	logs := &countingHandler{n: map[string]int{}}
	s, addr := startServer(t, Config{MaxHandshakes: maxPending, HandshakeTimeout: handshake, Logger: slog.New(logs)}, Export{Name: "disk", Backend: d})
	baseline := runtime.NumGoroutine()
	heap0 := heapInuse()
	w := startWellBehaved(t, addr, "disk")
	m := startMeter(s)
	before := w.rounds.Load()

	var greeted, early, sent atomic.Int64
	var errs errList
	var wg sync.WaitGroup
	sem := make(chan struct{}, parallel)
	start := time.Now()
	for i := range total {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			t0 := time.Now()
			nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if errors.Is(err, syscall.ECONNRESET) {
				early.Add(1) // evicted before connect returned
				return
			}
			if err != nil {
				errs.add(fmt.Errorf("dial %d: %w", i, err))
				return
			}
			defer nc.Close()
			_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
			// What a stuck client sends: nothing, the flags, half an
			// option header, or an option promising more than it sends.
			var partial []byte
			switch i % 4 {
			case 1:
				partial = be.AppendUint32(nil, clientFixedNewstyle)
			case 2:
				partial = append(be.AppendUint32(nil, clientFixedNewstyle), optionBytes(optList, nil)[:7]...)
			case 3:
				partial = append(be.AppendUint32(nil, clientFixedNewstyle), optionBytes(optGo, make([]byte, 1000))[:40]...)
			}
			if len(partial) > 0 {
				if n, err := nc.Write(partial); err == nil {
					sent.Add(int64(n))
				}
			}
			n, _, open := waitClosed(nc, handshake+20*time.Second)
			took := time.Since(t0)
			switch {
			case open:
				errs.add(fmt.Errorf("conn %d: still open after %v", i, took))
			case took > handshake+15*time.Second:
				// Evicted at once or dropped at the handshake
				// timeout; the bound only tells "closed" from
				// "held much longer" (the race detector on two
				// loaded cores can delay a close by seconds).
				errs.add(fmt.Errorf("conn %d: closed only after %v (handshake timeout %v)", i, took, handshake))
			case n > 0:
				greeted.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	errs.report(t)
	rounds := checkServed(t, w, before)

	// With the flood gone, a new client gets in at once: every admitted
	// flood connection's handshake slot was freed before its socket closed.
	c := dial(t, addr)
	c.connect("disk", connectOpts{})
	c.request(cmdRead, 0, 1, 0, 4096, nil)
	if errno, _, _ := c.simpleReply(4096); errno != 0 {
		t.Fatalf("read after the flood: errno %d", errno)
	}
	c.request(cmdDisc, 0, 2, 0, 0, nil)
	c.expectClosed()

	m.finish()
	final := waitGoroutines(t, baseline)
	heap1 := heapInuse()
	evictionLogs := logs.count("nbd: pending handshakes evicted by newer connections")
	t.Logf("flood: %d connections in %v (%d greeted, %d reset during connect), %d bytes sent; server pending peak %d (limit %d), connections peak %d; well-behaved rounds %d; eviction log lines %d; heap before %d KiB, peak %d KiB, after %d KiB; goroutines baseline %d, peak %d, final %d",
		total, elapsed.Round(time.Millisecond), greeted.Load(), early.Load(), sent.Load(),
		m.peakPending, maxPending, m.peakConns, rounds, evictionLogs, heap0>>10, m.peakHeap>>10, heap1>>10, baseline, m.peakGoroutines, final)
	if m.peakPending > maxPending {
		t.Errorf("server held %d pending handshakes, limit %d", m.peakPending, maxPending)
	}
	if m.peakPending < maxPending/2 {
		t.Errorf("pending peak %d: the flood did not fill the budget of %d", m.peakPending, maxPending)
	}
	// One summary line per second of flood (plus the first).
	if limit := int(elapsed/evictionLogEvery) + 2; evictionLogs > limit || evictionLogs == 0 {
		t.Errorf("%d eviction log lines in %v, want 1 to %d", evictionLogs, elapsed, limit)
	}
	// Bound: at most 64 server connections in handshake (no buffers:
	// the largest partial option is 1000 bytes), those being evicted,
	// and 150 client connections, a few KiB each, plus GC slack.
	if m.peakHeap > heap0+32<<20 {
		t.Errorf("peak heap %d KiB, more than 32 MiB above the %d KiB baseline", m.peakHeap>>10, heap0>>10)
	}
	if heap1 > heap0+8<<20 {
		t.Errorf("heap after the flood %d KiB, more than 8 MiB above the %d KiB baseline", heap1>>10, heap0>>10)
	}
}

// flakyListener fails its first Accept calls with EMFILE, as a listener
// does when a flood has used up the process's file descriptors.
type flakyListener struct {
	net.Listener
	fails atomic.Int32
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

// TestHostileAcceptEMFILE: running out of file descriptors is transient;
// Serve backs off and keeps accepting instead of returning (which would
// stop `sparsedisk serve`).
func TestHostileAcceptEMFILE(t *testing.T) {
	m := newMem(1<<20, 4096)
	s, err := NewServer(Config{}, Export{Name: "d", Backend: m})
	if err != nil {
		t.Fatal(err)
	}
	inner, err := netListen(t)
	if err != nil {
		t.Fatal(err)
	}
	l := &flakyListener{Listener: inner}
	l.fails.Store(5)
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	c := dial(t, inner.Addr().String())
	c.connect("d", connectOpts{})
	c.request(cmdWrite, 0, 1, 0, 4, []byte("emfi"))
	if errno, _, _ := c.simpleReply(0); errno != 0 {
		t.Fatalf("write errno %d", errno)
	}
	select {
	case err := <-served:
		t.Fatalf("Serve returned %v after EMFILE", err)
	default:
	}
	if n := l.fails.Load(); n >= 0 {
		t.Fatalf("Accept failures left %d: the listener was not retried", n+1)
	}
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
}

// TestHostileExportNames: an export name is looked up among the configured
// exports only; paths, traversal and look-alikes reach nothing.
func TestHostileExportNames(t *testing.T) {
	d := hostileImage(t)
	_, addr := startServer(t, Config{}, Export{Name: "disk", Description: d.Path(), Backend: d})
	names := []string{
		"/etc/passwd", "../../../../../etc/passwd", d.Path(), d.Path() + ".0000", d.Path() + ".lut",
		"disk/../disk", "./disk", "disk\x00", "DISK", " disk", "disk ", "%2e%2e%2fetc%2fpasswd",
		filepath.Dir(d.Path()), strings.Repeat("a", maxStringLen),
	}
	for _, name := range names {
		for _, opt := range []uint32{optInfo, optGo} {
			c := dial(t, addr)
			c.hello(clientFixedNewstyle | clientNoZeroes)
			c.option(opt, appendInfoRequest(nil, infoRequest{name: name}))
			r := c.optReply()
			if r.typ != repErrUnknown {
				t.Fatalf("option %d for %q: reply %#x, want NBD_REP_ERR_UNKNOWN", opt, name, r.typ)
			}
			c.expect(optAbort, nil, repAck)
		}
		c := dial(t, addr)
		c.hello(clientFixedNewstyle | clientNoZeroes)
		c.option(optExportName, []byte(name))
		if n, _, open := waitClosed(c.nc, 5*time.Second); open || n != 0 {
			t.Fatalf("NBD_OPT_EXPORT_NAME %q: %d bytes, open %v; want the connection dropped", name, n, open)
		}
	}
	// Longer than any export name may be: malformed, not looked up.
	c := dial(t, addr)
	c.hello(clientFixedNewstyle | clientNoZeroes)
	c.expect(optGo, appendInfoRequest(nil, infoRequest{name: strings.Repeat("b", maxStringLen+1)}), repErrInvalid)
}

// TestLogLimiter: reqlog.PerSecond lines per one-second window; the
// first line of a later window carries the count of those suppressed.
func TestLogLimiter(t *testing.T) {
	var l reqlog.Limiter
	t0 := time.Unix(1000, 0)
	for i := 0; i < reqlog.PerSecond; i++ {
		if ok, k := l.Allow(t0.Add(time.Duration(i) * time.Millisecond)); !ok || k != 0 {
			t.Fatalf("line %d of the first window: allow = %v, %d", i, ok, k)
		}
	}
	for i := 0; i < 7; i++ {
		if ok, _ := l.Allow(t0.Add(500 * time.Millisecond)); ok {
			t.Fatalf("line %d past the limit was allowed", reqlog.PerSecond+i)
		}
	}
	if ok, k := l.Allow(t0.Add(1500 * time.Millisecond)); !ok || k != 7 {
		t.Fatalf("first line of the next window: allow = %v, suppressed %d; want true, 7", ok, k)
	}
	if ok, k := l.Allow(t0.Add(1600 * time.Millisecond)); !ok || k != 0 {
		t.Fatalf("second line of the next window: allow = %v, suppressed %d; want true, 0", ok, k)
	}
}
