package nbd

import (
	"container/list"
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
	"github.com/sparsedisk/sparsedisk/internal/reqlog"
)

// Export is one named disk offered by a Server. It is plain data, copied
// by NewServer; it is not used concurrently by itself (its Backend is).
type Export struct {
	// Name is the export name clients ask for. The first export is also
	// the default export, selected by an empty name.
	Name string
	// Description is shown by clients that list exports (optional).
	Description string
	// Backend serves the data (normally a *blockif.Disk).
	Backend blockif.Device
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
// DefaultMaxConnections is finite so that clients cannot exhaust file
// descriptors, goroutines or memory: every negotiated connection may hold
// up to MaxInFlight worker goroutines and a small multiple of
// MaxInFlightBytes of buffers (requests executing, replies queued for a
// slow reader). 128 is far above what the intended clients open (a VM
// uses one connection, nbdcopy four, a multi-connection kernel client a
// handful per device) and keeps the descriptors well below the usual 1024
// soft limit.
//
// DefaultMaxHandshakes bounds the connections still negotiating. They
// have a budget of their own, so that connections that never negotiate
// cannot lock real clients out: when it is full, a new connection evicts
// the oldest one still negotiating (see Config.MaxHandshakes).
const (
	DefaultMaxConnections   = 128
	DefaultMaxHandshakes    = 128
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

	// MaxConnections bounds the negotiated connections (transmission
	// phase). A client that asks for an export while all are taken gets
	// NBD_REP_ERR_POLICY (NBD_OPT_GO) or is dropped (NBD_OPT_EXPORT_NAME),
	// and may retry. 0 = DefaultMaxConnections (128); negative = unlimited.
	MaxConnections int
	// MaxHandshakes bounds the connections that have not finished
	// negotiating. A connection accepted while that many are pending
	// evicts the oldest pending one (reset at once), so a flood of idle
	// or trickling sockets delays a real client by at most its own
	// handshake, never locks it out. Each pending connection holds at
	// most one option's data (64 KiB) plus its goroutine and, during
	// STARTTLS, the TLS handshake state.
	// 0 = DefaultMaxHandshakes (128); negative = unlimited.
	MaxHandshakes int
	// MinBlock is the minimum block size advertised in
	// NBD_INFO_BLOCK_SIZE: a power of two up to 65536 that divides every
	// export's size. 0 or 1 = any offset and length (the engine does
	// read-modify-write under its range lock), as qemu-nbd and nbdkit
	// advertise for files. A larger value is enforced, with NBD_EINVAL,
	// for clients that requested block sizes with NBD_OPT_GO.
	MinBlock uint32
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
	// to that client.
	AcceptUnframedGo bool

	// LoopbackCongestion is the TCP congestion control set on connections
	// whose both ends are loopback addresses: "" means
	// DefaultLoopbackCongestion, KeepCongestion leaves the system's
	// default (for benchmarks that run every server under one setting).
	LoopbackCongestion string
}

func (c *Config) withDefaults() Config {
	d := *c
	if d.MaxConnections == 0 {
		d.MaxConnections = DefaultMaxConnections
	}
	if d.MaxHandshakes == 0 {
		d.MaxHandshakes = DefaultMaxHandshakes
	}
	if d.MinBlock == 0 {
		d.MinBlock = 1
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
	readOnly  bool
	size      int64
	minBlock  uint32 // advertised and, for clients that agreed, enforced
	prefBlock uint32 // advertised preferred block size
	flush     flusher
}

// Server serves NBD exports. It is safe for concurrent use: Serve may run
// on several listeners at once, and Shutdown or Close may be called from
// any goroutine.
type Server struct {
	cfg     Config
	exports []*export
	log     *slog.Logger

	// mu protects listeners, conns, pending, sessions, closing, done,
	// evicted, evictedAt and the slot fields of every conn.
	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{} // every connection goroutine running
	pending   list.List          // of *conn still negotiating, oldest first
	sessions  int                // connections admitted to transmission
	closing   bool
	done      chan struct{} // closed when closing becomes true
	evicted   int           // handshakes evicted and not yet logged
	evictedAt time.Time     // when an eviction was last logged

	// badClients limits the log lines of failed handshakes and dropped
	// connections, which a hostile or broken client can cause at will.
	badClients reqlog.Limiter // rate-limits warnings about misbehaving clients
	// failed limits the log lines of requests the images failed.
	failed reqlog.Limiter

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
	if c.MinBlock > 65536 || c.MinBlock&(c.MinBlock-1) != 0 {
		return nil, fmt.Errorf("%w: minimum block size %d is not a power of two up to 65536", ErrConfig, c.MinBlock)
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
		if size := e.Backend.Size(); size%int64(c.MinBlock) != 0 {
			return nil, fmt.Errorf("%w: export %q size %d is not a multiple of the minimum block size %d", ErrConfig, e.Name, size, c.MinBlock)
		}
		x := &export{
			Export:    e,
			readOnly:  e.ReadOnly || e.Backend.ReadOnly(),
			size:      e.Backend.Size(),
			minBlock:  c.MinBlock,
			prefBlock: uint32(max(ss, int64(c.MinBlock), 512)),
		}
		if int64(x.prefBlock) > int64(c.MaxPayload) {
			return nil, fmt.Errorf("%w: export %q preferred block size %d above the maximum payload", ErrConfig, e.Name, x.prefBlock)
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

// evictionLogEvery bounds the log lines a connection flood causes.
const evictionLogEvery = time.Second

// ServeConn serves one already established connection in a new goroutine
// and returns at once. The server owns nc from then on and closes it.
//
// The connection takes a pending-handshake slot. If all
// Config.MaxHandshakes slots are taken, the oldest pending connection is
// evicted (reset) to make room: an attacker's idle sockets are always
// older than the real client that just connected, so they go first.
func (s *Server) ServeConn(nc net.Conn) {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	var victim *conn
	if s.cfg.MaxHandshakes > 0 && s.pending.Len() >= s.cfg.MaxHandshakes {
		victim = s.pending.Front().Value.(*conn)
		s.pending.Remove(victim.elem)
		victim.elem, victim.evicted = nil, true
		s.evicted++
	}
	var logN int
	if s.evicted > 0 {
		if now := time.Now(); now.Sub(s.evictedAt) >= evictionLogEvery {
			logN, s.evicted, s.evictedAt = s.evicted, 0, now
		}
	}
	c := newConn(s, nc)
	c.elem = s.pending.PushBack(c)
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	if victim != nil {
		// A reset rather than an orderly close leaves no TIME_WAIT
		// state behind; closing the raw socket also ends a TLS
		// handshake in progress. The victim's goroutine then ends and
		// frees what it held.
		resetClose(victim.raw)
	}
	if logN > 0 {
		// Under a flood, one line per second summarizes the evictions.
		s.log.Warn("nbd: pending handshakes evicted by newer connections", "count", logN, "newest_remote", remoteAddr(nc), "err", ErrEvicted)
	}
	go func() {
		defer s.wg.Done()
		tuneLoopbackTo(nc, s.cfg.LoopbackCongestion)
		c.serve()
		// The slot is free before the client can see the connection
		// end, so a client that reconnects at once after EOF finds room.
		s.release(c)
		c.rw().Close()
	}()
}

// resetClose closes nc with an RST if it is a TCP connection.
func resetClose(nc net.Conn) {
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	nc.Close()
}

// admit moves c from the pending handshakes to the negotiated sessions.
// It fails with ErrTooManyConnections if Config.MaxConnections sessions
// exist, and with ErrEvicted if c was evicted meanwhile.
func (s *Server) admit(c *conn) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.evicted {
		return ErrEvicted
	}
	if c.admitted {
		return nil
	}
	if s.cfg.MaxConnections > 0 && s.sessions >= s.cfg.MaxConnections {
		return fmt.Errorf("%w: %d negotiated connections", ErrTooManyConnections, s.sessions)
	}
	if c.elem != nil {
		s.pending.Remove(c.elem)
		c.elem = nil
	}
	c.admitted = true
	s.sessions++
	return nil
}

// release frees whichever slot c holds; its goroutine calls it once, as
// the last thing before closing the socket.
func (s *Server) release(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.elem != nil {
		s.pending.Remove(c.elem)
		c.elem = nil
	}
	if c.admitted {
		c.admitted = false
		s.sessions--
	}
	delete(s.conns, c)
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
	b blockif.Device

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

// reqlog.PerSecond is how many failed-handshake and dropped-connection
// lines are logged per second; the rest are counted and the count is
// attached to the next line logged.
// warnBadClient logs a warning about a misbehaving client, rate-limited.
func (s *Server) warnBadClient(log *slog.Logger, msg string, err error) {
	ok, suppressed := s.badClients.Allow(time.Now())
	if !ok {
		return
	}
	if suppressed > 0 {
		log.Warn(msg, "err", err, "suppressed_before", suppressed)
		return
	}
	log.Warn(msg, "err", err)
}
