package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
)

// Backend is the disk an export serves. *blockif.Disk implements it.
// Implementations must be safe for concurrent use: the server calls them
// from many goroutines at once, for one connection and across connections.
type Backend interface {
	// ReadAt and WriteAt follow io.ReaderAt and io.WriterAt; any offset
	// and length within Size is allowed.
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every write completed before the call durable.
	Flush() error
	// Trim and WriteZeroes make [off, off+n) read as zeros and may release
	// its space.
	Trim(off, n int64) error
	WriteZeroes(off, n int64) error
	// Extents describes exactly [off, off+n) as runs of allocated data
	// and unallocated (zero) space.
	Extents(off, n int64) ([]blockif.Extent, error)
	// Size is the export size in bytes.
	Size() int64
	// SectorSize is the smallest efficient I/O unit, advertised as the
	// minimum and preferred block size. A power of two, 1…65536.
	SectorSize() int64
	// ReadOnly reports whether writes are refused.
	ReadOnly() bool
}

// Export is one named disk offered by a Server. It is plain data, copied
// by NewServer; it is not used concurrently by itself (its Backend is).
type Export struct {
	// Name is the export name clients ask for. The first export is also
	// the default export, selected by an empty name.
	Name string
	// Description is shown by clients that list exports (optional).
	Description string
	// Backend serves the data.
	Backend Backend
	// ReadOnly forces the export read-only even if Backend is writable.
	ReadOnly bool
}

// TLSMode selects how the server uses TLS. It is an immutable value, safe
// to share.
type TLSMode int

const (
	// TLSOff: no TLS; NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY.
	TLSOff TLSMode = iota
	// TLSOn: clients may upgrade with NBD_OPT_STARTTLS; plain clients are
	// served too (the protocol's SELECTIVETLS mode with no TLS-only
	// export).
	TLSOn
	// TLSRequire: every option except STARTTLS and ABORT is refused with
	// NBD_REP_ERR_TLS_REQD until TLS is up (FORCEDTLS), so no export name,
	// list or data is revealed in clear text.
	TLSRequire
)

// String returns "off", "on" or "require".
func (m TLSMode) String() string {
	switch m {
	case TLSOff:
		return "off"
	case TLSOn:
		return "on"
	case TLSRequire:
		return "require"
	}
	return fmt.Sprintf("TLSMode(%d)", int(m))
}

// ParseTLSMode parses "off", "on" or "require".
func ParseTLSMode(s string) (TLSMode, error) {
	switch s {
	case "off", "":
		return TLSOff, nil
	case "on":
		return TLSOn, nil
	case "require":
		return TLSRequire, nil
	}
	return TLSOff, fmt.Errorf("%w: tls mode %q (want off, on or require)", ErrConfig, s)
}

// Defaults for the zero fields of Config.
//
// DefaultMaxConnections is finite so that a client flood cannot exhaust
// file descriptors, goroutines or memory: every connection may hold up to
// MaxInFlight worker goroutines and a small multiple of MaxInFlightBytes
// of buffers (requests executing, replies queued for a slow reader), and
// a connection that never finishes negotiating occupies a slot until
// HandshakeTimeout. 128 is far above what the intended clients open (a VM
// uses one connection, nbdcopy four, a multi-connection kernel client a
// handful per device) and keeps the descriptors well below the usual 1024
// soft limit.
const (
	DefaultMaxConnections   = 128
	DefaultMaxPayload       = 32 << 20
	DefaultMaxInFlight      = 16
	DefaultMaxInFlightBytes = 64 << 20
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultWriteTimeout     = 2 * time.Minute
	DefaultKeepAlive        = 30 * time.Second
)

// Config holds the server's limits and TLS setup. The zero value is usable:
// every zero field takes the documented default. NewServer copies it;
// changing a Config afterwards does not affect the server, and the
// TLSConfig it points to must not be modified once serving.
type Config struct {
	// TLS selects the TLS mode; TLSConfig must be set unless TLSOff.
	// To demand client certificates, set TLSConfig.ClientAuth and ClientCAs.
	TLS       TLSMode
	TLSConfig *tls.Config

	// MaxConnections bounds concurrent connections (handshaking and
	// transmitting); extra connections are closed at once, before any
	// byte is sent or any per-connection state is allocated.
	// 0 = DefaultMaxConnections (128); negative = unlimited.
	MaxConnections int
	// MaxPayload is the largest read or write payload, advertised as the
	// NBD_INFO_BLOCK_SIZE maximum. 0 = 32 MiB.
	MaxPayload uint32
	// MaxInFlight bounds the requests one connection may have executing
	// at once. 0 = 16.
	MaxInFlight int
	// MaxInFlightBytes bounds the payload buffers one connection may hold
	// at once (a single larger request is still admitted alone). It also
	// bounds the replies queued behind a client that does not read them:
	// while more than this many bytes wait to be written, no further
	// request is read. 0 = 64 MiB.
	MaxInFlightBytes int64
	// HandshakeTimeout bounds the whole option haggling, TLS included.
	// 0 = 10 s; negative = no limit.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a transmitting connection that sent no request
	// for this long while none was in flight. 0 = never (kernel clients
	// idle for long periods); dead peers are still found by TCP
	// keep-alive and WriteTimeout.
	IdleTimeout time.Duration
	// WriteTimeout bounds the sending of one reply, so a client that stops
	// reading cannot pin the connection's workers. 0 = 2 min.
	WriteTimeout time.Duration
	// Logger receives structured logs; nil discards them.
	Logger *slog.Logger

	// AcceptUnframedGo tolerates NBD_OPT_GO and NBD_OPT_INFO whose option
	// header says length 0 but which are followed by their data anyway
	// (name length, name, information count, requests), which is what
	// the client package of github.com/pojntfx/go-nbd v0.3.2 sends. A
	// conforming client never sends a zero-length GO, but one that did
	// would stall until the handshake timeout instead of getting
	// NBD_REP_ERR_INVALID, so enable this only for private connections
	// to that client (sparsedisk attach).
	AcceptUnframedGo bool
}

func (c *Config) withDefaults() Config {
	d := *c
	if d.MaxConnections == 0 {
		d.MaxConnections = DefaultMaxConnections
	}
	if d.MaxPayload == 0 {
		d.MaxPayload = DefaultMaxPayload
	}
	if d.MaxInFlight <= 0 {
		d.MaxInFlight = DefaultMaxInFlight
	}
	if d.MaxInFlightBytes <= 0 {
		d.MaxInFlightBytes = DefaultMaxInFlightBytes
	}
	if d.HandshakeTimeout == 0 {
		d.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if d.WriteTimeout == 0 {
		d.WriteTimeout = DefaultWriteTimeout
	}
	if d.Logger == nil {
		d.Logger = slog.New(slog.DiscardHandler)
	}
	return d
}

// export is an Export plus the state shared by all its connections.
type export struct {
	Export
	readOnly bool
	size     int64
	minBlock uint32
	flush    flusher
}

// Server serves NBD exports. It is safe for concurrent use: Serve may run
// on several listeners at once, and Shutdown or Close may be called from
// any goroutine.
type Server struct {
	cfg     Config
	exports []*export
	log     *slog.Logger

	// mu protects listeners, conns, closing and done.
	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closing   bool
	done      chan struct{} // closed when closing becomes true
	refused   int           // connections refused and not yet logged
	refusedAt time.Time     // when a refusal was last logged

	// badClients limits the log lines of failed handshakes and dropped
	// connections, which a hostile or broken client can cause at will.
	badClients logLimiter

	wg sync.WaitGroup // one per running connection goroutine
}

// NewServer checks the exports and returns a server for them.
func NewServer(cfg Config, exports ...Export) (*Server, error) {
	c := cfg.withDefaults()
	if len(exports) == 0 {
		return nil, fmt.Errorf("%w: no exports", ErrConfig)
	}
	if c.TLS != TLSOff && c.TLSConfig == nil {
		return nil, fmt.Errorf("%w: tls mode %s needs a TLS configuration", ErrConfig, c.TLS)
	}
	if c.MaxPayload < 1<<20 {
		return nil, fmt.Errorf("%w: max payload %d below 1 MiB", ErrConfig, c.MaxPayload)
	}
	s := &Server{
		cfg:       c,
		log:       c.Logger,
		listeners: map[net.Listener]struct{}{},
		conns:     map[*conn]struct{}{},
		done:      make(chan struct{}),
	}
	seen := map[string]bool{}
	for _, e := range exports {
		if e.Backend == nil {
			return nil, fmt.Errorf("%w: export %q has no backend", ErrConfig, e.Name)
		}
		if len(e.Name) > maxStringLen || len(e.Description) > maxStringLen {
			return nil, fmt.Errorf("%w: export name or description longer than %d bytes", ErrConfig, maxStringLen)
		}
		if seen[e.Name] {
			return nil, fmt.Errorf("%w: duplicate export name %q", ErrConfig, e.Name)
		}
		seen[e.Name] = true
		ss := e.Backend.SectorSize()
		if ss < 1 || ss > 65536 || ss&(ss-1) != 0 || int64(c.MaxPayload) < ss {
			return nil, fmt.Errorf("%w: export %q sector size %d", ErrConfig, e.Name, ss)
		}
		x := &export{
			Export:   e,
			readOnly: e.ReadOnly || e.Backend.ReadOnly(),
			size:     e.Backend.Size(),
			minBlock: uint32(ss),
		}
		x.flush.b = e.Backend
		s.exports = append(s.exports, x)
	}
	return s, nil
}

// lookup returns the export called name; "" selects the first one.
func (s *Server) lookup(name string) *export {
	if name == "" {
		return s.exports[0]
	}
	for _, e := range s.exports {
		if e.Name == name {
			return e
		}
	}
	return nil
}

// Serve accepts connections on l until Shutdown or Close, serving each in
// its own goroutine. It always returns a non-nil error: ErrServerClosed
// after Shutdown or Close. l is closed on return.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isClosing() {
				return ErrServerClosed
			}
			if acceptRetryable(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		s.ServeConn(nc)
	}
}

// acceptRetryable reports whether an Accept error is transient: a timeout,
// or the process or system running out of descriptors or buffers (a
// connection flood must not stop the server; the descriptors come back as
// connections end).
func acceptRetryable(err error) bool {
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return true
	}
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// refusalLogEvery bounds the log lines a connection flood causes.
const refusalLogEvery = time.Second

// ServeConn serves one already established connection in a new goroutine
// and returns at once. The server owns nc from then on and closes it.
func (s *Server) ServeConn(nc net.Conn) {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	if s.cfg.MaxConnections > 0 && len(s.conns) >= s.cfg.MaxConnections {
		// Refused before anything is allocated for it; a reset rather
		// than an orderly close leaves no TIME_WAIT state behind. Under a
		// flood, one line per second summarizes the refusals.
		s.refused++
		var n int
		if now := time.Now(); now.Sub(s.refusedAt) >= refusalLogEvery {
			n, s.refused, s.refusedAt = s.refused, 0, now
		}
		s.mu.Unlock()
		if tc, ok := nc.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		nc.Close()
		if n > 0 {
			s.log.Warn("nbd: connections refused", "count", n, "last_remote", remoteAddr(nc), "err", ErrTooManyConnections)
		}
		return
	}
	c := newConn(s, nc)
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer func() {
			// The slot is free before the socket closes: a client that
			// sees EOF and reconnects at once is never refused for the
			// connection it just ended.
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.rw().Close()
		}()
		tuneLoopback(nc)
		c.serve()
	}()
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// beginClose stops all listeners and marks the server closing; it returns
// the connections that were open.
func (s *Server) beginClose() []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closing {
		s.closing = true
		close(s.done)
	}
	for l := range s.listeners {
		l.Close()
	}
	cs := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		cs = append(cs, c)
	}
	return cs
}

// Shutdown stops accepting connections, ends every handshake in progress,
// stops reading new requests, waits until every request already received
// has been answered, closes the connections and flushes every export. If
// ctx ends first, the remaining connections are closed forcibly and
// ctx.Err() is returned. Shutdown does not close the backends.
func (s *Server) Shutdown(ctx context.Context) error {
	for _, c := range s.beginClose() {
		c.stop()
	}
	finished := make(chan struct{})
	go func() { s.wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-ctx.Done():
		for _, c := range s.beginClose() {
			c.nc.Close()
		}
		<-finished
		return ctx.Err()
	}
	var first error
	for _, e := range s.exports {
		if e.readOnly {
			continue
		}
		if err := e.flush.Flush(); err != nil && first == nil {
			first = fmt.Errorf("nbd: flush export %q: %w", e.Name, err)
		}
	}
	return first
}

// Close closes the listeners and every connection at once, without waiting
// for requests in flight to be answered, and waits for the connection
// goroutines to end. Use Shutdown for a graceful stop.
func (s *Server) Close() error {
	for _, c := range s.beginClose() {
		c.nc.Close()
	}
	s.wg.Wait()
	return nil
}

func remoteAddr(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "local"
}

// flusher coalesces concurrent flushes of one backend (group commit): a
// caller waits for one backend Flush that started after it called, and
// many callers share that Flush. FUA on many parallel writes therefore
// costs about one durable sync per round, not one per request. It is safe
// for concurrent use.
type flusher struct {
	b Backend

	// mu protects the fields below; cond signals completion of a flush.
	mu        sync.Mutex
	cond      *sync.Cond
	started   uint64 // number of flushes started
	completed uint64 // number of flushes finished (they run one at a time)
	running   bool
	errGen    uint64 // generation of the last failed flush
	err       error  // its error
	waiting   int    // callers waiting for a running flush (tests observe it)
}

// Flush returns once a backend flush that began after this call finished.
func (f *flusher) Flush() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cond == nil {
		f.cond = sync.NewCond(&f.mu)
	}
	// A flush already running may have started before our caller's write
	// completed, so only the next one counts.
	want := f.started + 1
	for f.completed < want {
		if f.running {
			f.waiting++
			f.cond.Wait()
			f.waiting--
			continue
		}
		f.running = true
		f.started++
		gen := f.started
		f.mu.Unlock()
		err := f.b.Flush()
		f.mu.Lock()
		f.running = false
		f.completed = gen
		if err != nil {
			f.errGen, f.err = gen, err
		}
		f.cond.Broadcast()
	}
	if f.err != nil && f.errGen >= want {
		return f.err
	}
	return nil
}

// discard reads and drops n bytes.
func discard(r io.Reader, n int64) error {
	_, err := io.CopyN(io.Discard, r, n)
	return err
}

// badClientLogsPerSecond is how many failed-handshake and dropped-connection
// lines are logged per second; the rest are counted and the count is
// attached to the next line logged.
const badClientLogsPerSecond = 10

// logLimiter lets through at most badClientLogsPerSecond log lines per
// one-second window. It is safe for concurrent use.
type logLimiter struct {
	mu         sync.Mutex // protects every field
	window     time.Time  // start of the current window
	n          int        // lines allowed in the window
	suppressed int        // lines suppressed since the last allowed one
}

// allow reports whether a line may be logged now and, if so, how many were
// suppressed before it.
func (l *logLimiter) allow(now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.window) >= time.Second {
		l.window, l.n = now, 0
	}
	if l.n >= badClientLogsPerSecond {
		l.suppressed++
		return false, 0
	}
	l.n++
	k := l.suppressed
	l.suppressed = 0
	return true, k
}

// warnBadClient logs a warning about a misbehaving client, rate-limited.
func (s *Server) warnBadClient(log *slog.Logger, msg string, err error) {
	ok, suppressed := s.badClients.allow(time.Now())
	if !ok {
		return
	}
	if suppressed > 0 {
		log.Warn(msg, "err", err, "suppressed_before", suppressed)
		return
	}
	log.Warn(msg, "err", err)
}
