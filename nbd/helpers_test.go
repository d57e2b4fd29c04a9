package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
)

// memBackend is an in-memory Backend with sector-granular allocation, for
// unit tests that must not depend on the engine.
type memBackend struct {
	sector   int64
	readOnly bool

	// mu protects data and alloc.
	mu    sync.RWMutex
	data  []byte
	alloc []bool // per sector

	flushes atomic.Int64
	// hooks (optional) run before the operation; a non-nil error fails it.
	readHook  func(off int64) error
	writeHook func(off int64) error
	flushHook func() error
}

func newMem(size, sector int64) *memBackend {
	return &memBackend{sector: sector, data: make([]byte, size), alloc: make([]bool, size/sector)}
}

func (m *memBackend) Size() int64       { return int64(len(m.data)) }
func (m *memBackend) SectorSize() int64 { return m.sector }
func (m *memBackend) ReadOnly() bool    { return m.readOnly }

func (m *memBackend) bounds(off, n int64) error {
	if off < 0 || n < 0 || off > int64(len(m.data)) || n > int64(len(m.data))-off {
		return blockif.ErrOutOfRange
	}
	return nil
}

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	if m.readHook != nil {
		if err := m.readHook(off); err != nil {
			return 0, err
		}
	}
	if err := m.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return copy(p, m.data[off:]), nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	if m.readOnly {
		return 0, blockif.ErrReadOnly
	}
	if m.writeHook != nil {
		if err := m.writeHook(off); err != nil {
			return 0, err
		}
	}
	if err := m.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	for s := off / m.sector; s*m.sector < off+int64(len(p)); s++ {
		sec := m.data[s*m.sector : (s+1)*m.sector]
		m.alloc[s] = m.alloc[s] || !bytes.Equal(sec, make([]byte, m.sector))
	}
	return len(p), nil
}

func (m *memBackend) Flush() error {
	m.flushes.Add(1)
	if m.flushHook != nil {
		return m.flushHook()
	}
	return nil
}

func (m *memBackend) Trim(off, n int64) error { return m.WriteZeroes(off, n) }

func (m *memBackend) WriteZeroes(off, n int64) error {
	if m.readOnly {
		return blockif.ErrReadOnly
	}
	if err := m.bounds(off, n); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	for s := off / m.sector; s*m.sector < off+n; s++ {
		if s*m.sector >= off && (s+1)*m.sector <= off+n {
			m.alloc[s] = false
		}
	}
	return nil
}

func (m *memBackend) Extents(off, n int64) ([]blockif.Extent, error) {
	if err := m.bounds(off, n); err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []blockif.Extent
	for p := off; p < off+n; {
		s := p / m.sector
		end := min((s+1)*m.sector, off+n)
		a := m.alloc[s]
		if k := len(out); k > 0 && out[k-1].Allocated == a {
			out[k-1].Length += end - p
		} else {
			out = append(out, blockif.Extent{Offset: p, Length: end - p, Allocated: a})
		}
		p = end
	}
	return out, nil
}

// startServer serves exps on a loopback port until the test ends.
func startServer(t testing.TB, cfg Config, exps ...Export) (*Server, string) {
	t.Helper()
	s, addr, _ := startServerStop(t, cfg, exps...)
	return s, addr
}

// startServerStop is startServer that also returns stop, which shuts the
// server down and checks it closed cleanly; it runs at the end of the test
// if the test did not call it.
func startServerStop(t testing.TB, cfg Config, exps ...Export) (*Server, string, func()) {
	t.Helper()
	s, err := NewServer(cfg, exps...)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := s.Shutdown(ctx); err != nil {
				t.Errorf("shutdown: %v", err)
			}
			if err := <-done; !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve returned %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return s, l.Addr().String(), stop
}

// client is a hand-written NBD client for protocol tests. It speaks the
// wire format directly so tests can send anything, valid or not.
type client struct {
	t  testing.TB
	nc net.Conn
}

func dial(t testing.TB, addr string) *client {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return &client{t: t, nc: nc}
}

func (c *client) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *client) readN(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.nc, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// hello reads the server greeting and sends client flags.
func (c *client) hello(flags uint32) {
	c.t.Helper()
	g := c.readN(18)
	if be.Uint64(g) != magicInit || be.Uint64(g[8:]) != magicOpt {
		c.t.Fatalf("bad greeting % x", g)
	}
	if hf := be.Uint16(g[16:]); hf != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags %#x", hf)
	}
	c.write(be.AppendUint32(nil, flags))
}

func (c *client) option(opt uint32, data []byte) {
	c.t.Helper()
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *client) optReply() optReply {
	c.t.Helper()
	h := c.readN(20)
	if be.Uint64(h) != magicOptReply {
		c.t.Fatalf("bad option reply magic % x", h)
	}
	return optReply{be.Uint32(h[8:]), be.Uint32(h[12:]), c.readN(int(be.Uint32(h[16:])))}
}

// expect sends an option and checks that its final reply has type want;
// intermediate replies are returned.
func (c *client) expect(opt uint32, data []byte, want uint32) []optReply {
	c.t.Helper()
	c.option(opt, data)
	var out []optReply
	for {
		r := c.optReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ == repAck || r.typ&(1<<31) != 0 {
			if r.typ != want {
				c.t.Fatalf("option %d: reply %#x (%q), want %#x", opt, r.typ, r.data, want)
			}
			return out
		}
		out = append(out, r)
	}
}

// connect negotiates and enters transmission on export name.
type connectOpts struct {
	structured, meta, blockSize bool
}

func (c *client) connect(name string, o connectOpts) (size uint64, flags uint16) {
	c.t.Helper()
	c.hello(clientFixedNewstyle | clientNoZeroes)
	if o.structured {
		c.expect(optStructuredReply, nil, repAck)
	}
	if o.meta {
		rs := c.expect(optSetMetaContext, appendMetaRequest(nil, metaRequest{name, []string{metaBaseAllocation}}), repAck)
		if len(rs) != 1 || rs[0].typ != repMetaContext {
			c.t.Fatalf("set meta context replies %v", rs)
		}
	}
	var infos []uint16
	if o.blockSize {
		infos = append(infos, infoBlockSize)
	}
	for _, r := range c.expect(optGo, appendInfoRequest(nil, infoRequest{name, infos}), repAck) {
		if r.typ == repInfo && be.Uint16(r.data) == infoExport {
			size, flags = be.Uint64(r.data[2:]), be.Uint16(r.data[10:])
		}
	}
	return size, flags
}

func (c *client) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := appendRequest(nil, request{flags: flags, typ: typ, cookie: cookie, offset: off, length: length})
	c.write(append(b, payload...))
}

// simpleReply reads a simple reply and, for a successful read of n bytes,
// its data.
func (c *client) simpleReply(n int) (errno uint32, cookie uint64, data []byte) {
	c.t.Helper()
	h := c.readN(16)
	if be.Uint32(h) != magicSimpleReply {
		c.t.Fatalf("bad simple reply magic % x", h)
	}
	errno, cookie = be.Uint32(h[4:]), be.Uint64(h[8:])
	if errno == 0 && n > 0 {
		data = c.readN(n)
	}
	return
}

type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

func (c *client) chunk() chunk {
	c.t.Helper()
	h := c.readN(4)
	if m := be.Uint32(h); m == magicSimpleReply {
		rest := c.readN(12)
		return chunk{flags: replyFlagDone, typ: 0xffff, cookie: be.Uint64(rest[4:]), payload: rest[:4]}
	} else if m != magicStructuredReply {
		c.t.Fatalf("bad reply magic %#x", m)
	}
	h = c.readN(16)
	return chunk{be.Uint16(h), be.Uint16(h[2:]), be.Uint64(h[4:]), c.readN(int(be.Uint32(h[12:])))}
}

// structuredRead reads all chunks of one structured read reply and
// reassembles the data; errno is from an error chunk, holes counts hole
// chunks.
func (c *client) structuredRead(off uint64, n int) (data []byte, errno uint32, holes, chunks int) {
	c.t.Helper()
	data = make([]byte, n)
	covered := 0
	for {
		ch := c.chunk()
		chunks++
		switch ch.typ {
		case chunkOffsetData:
			o := be.Uint64(ch.payload) - off
			covered += copy(data[o:], ch.payload[8:])
		case chunkOffsetHole:
			covered += int(be.Uint32(ch.payload[8:]))
			holes++
		case chunkError, chunkErrorOffset:
			errno = be.Uint32(ch.payload)
		case chunkNone:
		default:
			c.t.Fatalf("unexpected chunk type %d", ch.typ)
		}
		if ch.flags&replyFlagDone != 0 {
			break
		}
	}
	if errno == 0 && covered != n {
		c.t.Fatalf("read chunks cover %d bytes, want %d", covered, n)
	}
	return data, errno, holes, chunks
}

// expectClosed checks that the server closed the connection.
func (c *client) expectClosed() {
	c.t.Helper()
	_ = c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 1)
	if n, err := c.nc.Read(b); err == nil {
		c.t.Fatalf("connection still open (read %d bytes)", n)
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		c.t.Fatal("connection not closed within 10s")
	}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed | 1
	}
	return b
}

func netListen(t testing.TB) (net.Listener, error) {
	t.Helper()
	return net.Listen("tcp", "127.0.0.1:0")
}
