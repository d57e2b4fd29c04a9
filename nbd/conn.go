package nbd

import (
	"bufio"
	"container/list"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// conn is one client connection. Its goroutine runs the handshake and then
// the request reader; admitted requests run on the connection's worker
// goroutines and their replies go through the reply queue (out).
type conn struct {
	s   *Server
	log *slog.Logger
	raw net.Conn // the accepted socket, closed to evict the connection

	// The server's slot bookkeeping, protected by s.mu: elem is the
	// connection's entry in s.pending while it negotiates, admitted is
	// set once it holds a session slot, evicted once a newer connection
	// took its pending slot.
	elem     *list.Element
	admitted bool
	evicted  bool

	// mu protects nc (replaced by a *tls.Conn after STARTTLS), transmitting
	// and stopping.
	mu           sync.Mutex
	nc           net.Conn
	transmitting bool
	stopping     bool

	out replyQueue // replies waiting to be written

	inflight atomic.Int64 // requests admitted and not yet answered
}

func newConn(s *Server, nc net.Conn) *conn {
	return &conn{s: s, nc: nc, raw: nc, log: s.log.With("remote", remoteAddr(nc))}
}

// rw returns the current transport.
func (c *conn) rw() net.Conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nc
}

func (c *conn) setRW(nc net.Conn) {
	c.mu.Lock()
	c.nc = nc
	c.mu.Unlock()
}

// stop asks the connection to end gracefully: a handshake is cut at once, a
// transmitting connection stops reading requests and ends after answering
// those already received.
func (c *conn) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping = true
	if c.transmitting {
		_ = c.nc.SetReadDeadline(time.Now())
	} else {
		c.nc.Close()
	}
}

// serve runs the connection until it ends. It does not close the socket:
// the caller frees the connection's slot first, then closes.
func (c *conn) serve() {
	if tc, ok := c.nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
		_ = tc.SetKeepAlive(true)
		_ = tc.SetKeepAlivePeriod(DefaultKeepAlive)
	}
	if t := c.s.cfg.HandshakeTimeout; t > 0 {
		_ = c.nc.SetDeadline(time.Now().Add(t))
	}
	x, sess, err := c.handshake()
	if err != nil {
		switch {
		case errors.Is(err, errAbort):
			c.log.Debug("nbd: client aborted negotiation")
		case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, ErrEvicted):
			c.log.Debug("nbd: connection closed during handshake", "err", err)
		case errors.Is(err, ErrTooManyConnections):
			c.s.warnBadClient(c.log, "nbd: client refused", err)
		default:
			c.s.warnBadClient(c.log, "nbd: handshake failed", err)
		}
		return
	}
	c.mu.Lock()
	c.transmitting = true
	stopping := c.stopping
	_ = c.nc.SetDeadline(time.Time{})
	if stopping {
		_ = c.nc.SetReadDeadline(time.Now())
	}
	c.mu.Unlock()
	c.log = c.log.With("export", x.Name)
	c.log.Info("nbd: client connected", "tls", sess.tls, "structured", sess.structured)
	t := &transmission{c: c, x: x, sess: sess, nc: c.rw()}
	t.lim.init(c.s.cfg.MaxInFlight, c.s.cfg.MaxInFlightBytes)
	t.run()
}

// transmission is the transmission phase of one connection.
type transmission struct {
	c    *conn
	x    *export
	sess *session
	nc   net.Conn
	lim  limiter
	wg   sync.WaitGroup // one per admitted request not yet answered

	// jobs feeds the worker goroutines; jobs and workers are used by the
	// reader goroutine only (workers only receive from jobs).
	jobs    chan job
	workers int
}

func (t *transmission) run() {
	cfg := &t.c.s.cfg
	br := bufio.NewReaderSize(t.nc, 64<<10)
	var hdr [requestHeaderLen]byte
	disc := false
	var reason error
	for {
		if cfg.IdleTimeout > 0 {
			// Under c.mu so that a concurrent stop's deadline is not
			// overwritten.
			t.c.mu.Lock()
			if !t.c.stopping {
				_ = t.nc.SetReadDeadline(time.Now().Add(cfg.IdleTimeout))
			}
			t.c.mu.Unlock()
		}
		if n, err := io.ReadFull(br, hdr[:]); err != nil {
			if n == 0 && t.idleRetry(err) {
				continue
			}
			reason = err
			break
		}
		req, err := parseRequest(hdr[:])
		if err != nil {
			reason = err
			break
		}
		if req.typ == cmdDisc {
			disc = true
			break
		}
		var payload []byte
		weight := int64(0)
		switch req.typ {
		case cmdWrite:
			if req.length > cfg.MaxPayload {
				reason = fmt.Errorf("%w: write payload of %d bytes (maximum %d)", ErrProtocol, req.length, cfg.MaxPayload)
				break
			}
			weight = int64(req.length)
		case cmdRead:
			if req.length <= cfg.MaxPayload {
				weight = int64(req.length)
			}
		}
		if reason != nil {
			break
		}
		t.waitBacklog(cfg.MaxInFlightBytes)
		weight = t.lim.acquire(weight)
		if req.typ == cmdWrite {
			payload = getBuf(int(req.length))
			if _, err := io.ReadFull(br, payload); err != nil {
				putBuf(payload)
				t.lim.release(weight)
				reason = err
				break
			}
		}
		t.c.inflight.Add(1)
		t.wg.Add(1)
		t.dispatch(job{req, payload, weight})
	}
	t.wg.Wait()
	if t.jobs != nil {
		close(t.jobs)
	}
	switch {
	case disc:
		if !t.x.readOnly {
			if err := t.x.flush.Flush(); err != nil {
				t.c.log.Error("nbd: flush on disconnect", "err", err)
			}
		}
		t.c.log.Info("nbd: client disconnected")
	case errors.Is(reason, ErrBadMagic), errors.Is(reason, ErrProtocol):
		t.c.s.warnBadClient(t.c.log, "nbd: dropping connection", reason)
	case t.stopping():
		t.c.log.Info("nbd: connection closed by shutdown")
	default:
		t.c.log.Info("nbd: connection ended", "err", reason)
	}
}

// job is one admitted request.
type job struct {
	req     request
	payload []byte
	weight  int64
}

// dispatch hands j to an idle worker, or starts a new one while fewer than
// MaxInFlight exist. Workers live as long as the connection, so requests
// do not pay for a fresh goroutine and its stack growth each time.
func (t *transmission) dispatch(j job) {
	if t.jobs == nil {
		t.jobs = make(chan job)
	}
	select {
	case t.jobs <- j:
		return
	default:
	}
	if t.workers < t.c.s.cfg.MaxInFlight {
		t.workers++
		go t.worker(j)
		return
	}
	t.jobs <- j
}

// worker executes j, then further jobs until the connection ends.
func (t *transmission) worker(j job) {
	for {
		t.handle(j.req, j.payload)
		if j.payload != nil {
			putBuf(j.payload)
		}
		t.lim.release(j.weight)
		t.c.inflight.Add(-1)
		t.wg.Done()
		var ok bool
		if j, ok = <-t.jobs; !ok {
			return
		}
	}
}

func (t *transmission) stopping() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	return t.c.stopping
}

// idleRetry reports whether a read error is an idle-timeout expiry that
// should not end the connection because requests are still in flight.
func (t *transmission) idleRetry(err error) bool {
	if !errors.Is(err, os.ErrDeadlineExceeded) || t.stopping() {
		return false
	}
	return t.c.inflight.Load() > 0
}

// waitBacklog holds the request reader while more than max bytes of
// replies are queued behind a write in progress. Without it a client that
// sends requests but does not read the replies (or reads them slowly)
// would make the server buffer every reply until the write timeout: the
// limiter is released once a reply is queued, not once it is written, so
// tiny READ requests could pile up gigabytes of queued read data. The
// writer wakes it each time it takes a batch, which it always does: by
// writing, or by dropping everything once a write failed or timed out.
func (t *transmission) waitBacklog(max int64) {
	q := &t.c.out
	q.mu.Lock()
	for q.queued > max {
		q.cond().Wait()
	}
	q.mu.Unlock()
}

// cond returns the condition the writer broadcasts when it takes the
// queue; q.mu must be held.
func (q *replyQueue) cond() *sync.Cond {
	if q.drained.L == nil {
		q.drained.L = &q.mu
	}
	return &q.drained
}

// replyQueue collects whole replies for the connection's current writer
// (see transmission.send).
type replyQueue struct {
	// mu protects every field; failed is also read by the writer, which
	// alone sets it.
	mu       sync.Mutex
	pending  net.Buffers // buffers of whole replies, in queue order
	release  [][]byte    // pooled buffers to return once pending is written
	spare    net.Buffers // recycled slices
	spareRel [][]byte
	writing  bool  // a sender is writing; others only queue
	failed   bool  // a write failed; the connection is closed
	queued   int64 // bytes in pending
	drained  sync.Cond
}

// limiter bounds the requests (count and payload bytes) one connection has
// in flight. It is safe for concurrent use.
type limiter struct {
	// mu protects n and bytes; cond signals releases.
	mu              sync.Mutex
	cond            *sync.Cond
	n, maxN         int
	bytes, maxBytes int64
}

func (l *limiter) init(maxN int, maxBytes int64) {
	l.cond = sync.NewCond(&l.mu)
	l.maxN, l.maxBytes = maxN, maxBytes
}

// acquire waits for room for one request of w bytes and returns the weight
// to release (w clamped to the byte budget, so a large request runs alone
// rather than never).
func (l *limiter) acquire(w int64) int64 {
	w = min(w, l.maxBytes)
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.n >= l.maxN || l.bytes+w > l.maxBytes {
		l.cond.Wait()
	}
	l.n++
	l.bytes += w
	return w
}

func (l *limiter) release(w int64) {
	l.mu.Lock()
	l.n--
	l.bytes -= w
	l.mu.Unlock()
	l.cond.Broadcast()
}

// Payload buffers are pooled by power-of-two size class.
const (
	minBufShift = 12 // 4 KiB
	maxBufShift = 25 // 32 MiB
)

var bufPools [maxBufShift + 1]sync.Pool

func bufClass(n int) int {
	c := minBufShift
	for 1<<c < n {
		c++
	}
	return c
}

// getBuf returns a buffer of length n; its contents are undefined.
func getBuf(n int) []byte {
	c := bufClass(n)
	if c > maxBufShift {
		return make([]byte, n)
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<c)
}

func putBuf(b []byte) {
	c := bufClass(cap(b))
	if c > maxBufShift || cap(b) != 1<<c {
		return
	}
	b = b[:cap(b)]
	bufPools[c].Put(&b)
}
