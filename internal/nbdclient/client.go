package nbdclient

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Wire constants, named after the protocol document. Only the ones this
// client sends or understands are listed.
const (
	magicInit        uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt         uint64 = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply    uint64 = 0x3e889045565a9
	magicRequest     uint32 = 0x25609513
	magicSimpleReply uint32 = 0x67446698

	hflagFixedNewstyle uint16 = 1 << 0
	hflagNoZeroes      uint16 = 1 << 1
	cflagFixedNewstyle uint32 = 1 << 0
	cflagNoZeroes      uint32 = 1 << 1

	optGo uint32 = 7

	repAck              uint32 = 1
	repInfo             uint32 = 3
	repErrUnsup         uint32 = 1<<31 + 1
	repErrPolicy        uint32 = 1<<31 + 2
	repErrInvalid       uint32 = 1<<31 + 3
	repErrPlatform      uint32 = 1<<31 + 4
	repErrTLSReqd       uint32 = 1<<31 + 5
	repErrUnknown       uint32 = 1<<31 + 6
	repErrShutdown      uint32 = 1<<31 + 7
	repErrBlockSizeReqd uint32 = 1<<31 + 8
	repErrTooBig        uint32 = 1<<31 + 9

	infoExport    uint16 = 0
	infoBlockSize uint16 = 3

	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdWriteZeroes uint16 = 6

	cmdFlagFUA    uint16 = 1 << 0
	cmdFlagNoHole uint16 = 1 << 1

	requestLen     = 28 // magic, flags, type, cookie, offset, length
	replyLen       = 16 // magic, error, cookie
	optReplyLen    = 20 // magic, option, type, length
	maxOptReplyLen = 64 << 10
	maxNameLen     = 4096
	// defaultMaxPayload is the limit the protocol implies when the server
	// advertises no block sizes.
	defaultMaxPayload = 32 << 20
	// maxEffectLen is the longest TRIM or WRITE_ZEROES sent at once
	// (the length field is 32 bits; 1 GiB keeps any alignment).
	maxEffectLen = 1 << 30
)

// Transmission flags of an export, as returned by [Client.Flags].
const (
	FlagHasFlags        uint16 = 1 << 0
	FlagReadOnly        uint16 = 1 << 1
	FlagSendFlush       uint16 = 1 << 2
	FlagSendFUA         uint16 = 1 << 3
	FlagSendTrim        uint16 = 1 << 5
	FlagSendWriteZeroes uint16 = 1 << 6
	FlagCanMultiConn    uint16 = 1 << 8
)

var be = binary.BigEndian

// Options tune a Client. The zero value (or nil) is fine.
type Options struct {
	// HandshakeTimeout bounds connecting and negotiating; 0 means 30s.
	HandshakeTimeout time.Duration
	// CloseTimeout bounds how long Close waits for requests in flight and
	// for the server to hang up; 0 means 10s.
	CloseTimeout time.Duration
}

// Client is one negotiated NBD connection. See the package documentation
// for its concurrency model.
type Client struct {
	nc           net.Conn
	export       string
	size         uint64
	flags        uint16
	minBlock     uint32
	prefBlock    uint32
	maxPayload   uint32
	closeTimeout time.Duration

	wmu sync.Mutex // held while one request's header and payload are written

	mu      sync.Mutex // protects the fields below
	pending map[uint64]*call
	cookie  uint64
	err     error         // set once: the connection is unusable
	closed  bool          // Close was called
	idle    chan struct{} // closed when pending empties during Close

	readerDone chan struct{}
}

// call is one request waiting for its reply.
type call struct {
	buf  []byte     // where a read's data goes; nil for other commands
	done chan error // receives exactly one result
}

// Dial connects to address on network ("tcp", "unix") and negotiates
// export (the empty name is the server's default export).
func Dial(network, address, export string, o *Options) (*Client, error) {
	d := net.Dialer{Timeout: o.handshakeTimeout()}
	nc, err := d.Dial(network, address)
	if err != nil {
		return nil, fmt.Errorf("sparsedisk/nbdclient: dial %s: %w", address, err)
	}
	return New(nc, export, o)
}

// New negotiates export on an established connection and takes ownership
// of it: on error it is closed, on success the Client closes it.
func New(nc net.Conn, export string, o *Options) (*Client, error) {
	c := &Client{
		nc:           nc,
		export:       export,
		maxPayload:   defaultMaxPayload,
		minBlock:     1,
		prefBlock:    4096,
		closeTimeout: 10 * time.Second,
		pending:      make(map[uint64]*call),
		readerDone:   make(chan struct{}),
	}
	if o != nil && o.CloseTimeout > 0 {
		c.closeTimeout = o.CloseTimeout
	}
	if len(export) > maxNameLen {
		nc.Close()
		return nil, fmt.Errorf("%w: export name of %d bytes (at most %d)", ErrRange, len(export), maxNameLen)
	}
	_ = nc.SetDeadline(time.Now().Add(o.handshakeTimeout()))
	if err := c.handshake(); err != nil {
		nc.Close()
		return nil, err
	}
	_ = nc.SetDeadline(time.Time{})
	go c.readLoop()
	return c, nil
}

func (o *Options) handshakeTimeout() time.Duration {
	if o == nil || o.HandshakeTimeout <= 0 {
		return 30 * time.Second
	}
	return o.HandshakeTimeout
}

// handshake performs fixed newstyle negotiation and NBD_OPT_GO.
func (c *Client) handshake() error {
	var g [18]byte
	if _, err := io.ReadFull(c.nc, g[:]); err != nil {
		return fmt.Errorf("sparsedisk/nbdclient: reading greeting: %w", err)
	}
	if be.Uint64(g[0:]) != magicInit || be.Uint64(g[8:]) != magicOpt {
		return fmt.Errorf("%w: greeting % x is not a newstyle NBD server", ErrProtocol, g[:16])
	}
	hflags := be.Uint16(g[16:])
	if hflags&hflagFixedNewstyle == 0 {
		return fmt.Errorf("%w: server does not speak fixed newstyle negotiation", ErrProtocol)
	}
	cflags := cflagFixedNewstyle
	if hflags&hflagNoZeroes != 0 {
		cflags |= cflagNoZeroes
	}
	data := be.AppendUint32(nil, uint32(len(c.export)))
	data = append(data, c.export...)
	data = be.AppendUint16(data, 1) // one information request
	data = be.AppendUint16(data, infoBlockSize)
	msg := be.AppendUint32(nil, cflags)
	msg = be.AppendUint64(msg, magicOpt)
	msg = be.AppendUint32(msg, optGo)
	msg = be.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := c.nc.Write(msg); err != nil {
		return fmt.Errorf("sparsedisk/nbdclient: sending NBD_OPT_GO: %w", err)
	}
	gotExport := false
	for range 64 { // a server sends a handful of NBD_REP_INFO at most
		var h [optReplyLen]byte
		if _, err := io.ReadFull(c.nc, h[:]); err != nil {
			return fmt.Errorf("sparsedisk/nbdclient: reading option reply: %w", err)
		}
		magic, opt, typ, n := be.Uint64(h[0:]), be.Uint32(h[8:]), be.Uint32(h[12:]), be.Uint32(h[16:])
		if magic != magicOptReply || opt != optGo || n > maxOptReplyLen {
			return fmt.Errorf("%w: option reply magic %#x, option %d, length %d", ErrProtocol, magic, opt, n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(c.nc, body); err != nil {
			return fmt.Errorf("sparsedisk/nbdclient: reading option reply: %w", err)
		}
		switch {
		case typ == repAck:
			if !gotExport {
				return fmt.Errorf("%w: NBD_REP_ACK without NBD_INFO_EXPORT", ErrProtocol)
			}
			if c.maxPayload < c.minBlock {
				return fmt.Errorf("%w: maximum payload %d below minimum block %d", ErrProtocol, c.maxPayload, c.minBlock)
			}
			return nil
		case typ&(1<<31) != 0:
			return &OptionError{Option: optGo, Reply: typ, Message: string(body)}
		case typ == repInfo:
			if len(body) < 2 {
				return fmt.Errorf("%w: NBD_REP_INFO of %d bytes", ErrProtocol, len(body))
			}
			switch be.Uint16(body) {
			case infoExport:
				if len(body) != 12 {
					return fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrProtocol, len(body))
				}
				c.size, c.flags, gotExport = be.Uint64(body[2:]), be.Uint16(body[10:]), true
			case infoBlockSize:
				if len(body) != 14 {
					return fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrProtocol, len(body))
				}
				c.minBlock, c.prefBlock, c.maxPayload = be.Uint32(body[2:]), be.Uint32(body[6:]), be.Uint32(body[10:])
				if c.minBlock == 0 || c.maxPayload == 0 {
					return fmt.Errorf("%w: block sizes %d/%d/%d", ErrProtocol, c.minBlock, c.prefBlock, c.maxPayload)
				}
			}
			// Other information types are ignored, as the protocol asks.
		default:
			// Unknown non-error reply types are ignored.
		}
	}
	return fmt.Errorf("%w: too many replies to NBD_OPT_GO", ErrProtocol)
}

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return int64(c.size) }

// Flags are the export's transmission flags (FlagReadOnly, ...).
func (c *Client) Flags() uint16 { return c.flags }

// ReadOnly tells whether the export is read-only.
func (c *Client) ReadOnly() bool { return c.flags&FlagReadOnly != 0 }

// BlockSize returns the server's block size constraints: minimum,
// preferred, and the largest payload of one request. Requests should be
// aligned to the minimum; ReadAt and WriteAt split at the maximum.
func (c *Client) BlockSize() (minimum, preferred, maxPayload uint32) {
	return c.minBlock, c.prefBlock, c.maxPayload
}

// readLoop receives replies and hands them to their callers until the
// connection ends.
func (c *Client) readLoop() {
	defer close(c.readerDone)
	var h [replyLen]byte
	for {
		if _, err := io.ReadFull(c.nc, h[:]); err != nil {
			c.fail(fmt.Errorf("%w: %w", ErrDisconnected, err))
			return
		}
		magic, errno, cookie := be.Uint32(h[0:]), be.Uint32(h[4:]), be.Uint64(h[8:])
		if magic != magicSimpleReply {
			c.fail(fmt.Errorf("%w: %w: reply magic %#x (only simple replies were negotiated)", ErrDisconnected, ErrProtocol, magic))
			return
		}
		cl := c.take(cookie)
		if cl == nil {
			c.fail(fmt.Errorf("%w: %w: reply for unknown cookie %d", ErrDisconnected, ErrProtocol, cookie))
			return
		}
		if errno != 0 {
			cl.done <- &Error{Errno: errno}
			continue
		}
		if cl.buf != nil {
			if _, err := io.ReadFull(c.nc, cl.buf); err != nil {
				err = fmt.Errorf("%w: reading data: %w", ErrDisconnected, err)
				cl.done <- err
				c.fail(err)
				return
			}
		}
		cl.done <- nil
	}
}

// take removes and returns the call waiting under cookie (nil if none).
// Whoever takes a call delivers its result.
func (c *Client) take(cookie uint64) *call {
	c.mu.Lock()
	defer c.mu.Unlock()
	cl := c.pending[cookie]
	if cl != nil {
		delete(c.pending, cookie)
		c.signalIdleLocked()
	}
	return cl
}

func (c *Client) signalIdleLocked() {
	if len(c.pending) == 0 && c.idle != nil {
		close(c.idle)
		c.idle = nil
	}
}

// fail makes the connection unusable with err (the first error wins) and
// fails every request in flight.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	err = c.err
	calls := c.pending
	c.pending = make(map[uint64]*call)
	c.signalIdleLocked()
	c.mu.Unlock()
	c.nc.Close() // unblocks a writer stuck on a dead peer
	for _, cl := range calls {
		cl.done <- err
	}
}

// start sends one request and returns the call that will receive its reply.
func (c *Client) start(typ, flags uint16, off uint64, length uint32, payload, buf []byte) (*call, error) {
	cl := &call{buf: buf, done: make(chan error, 1)}
	c.mu.Lock()
	switch {
	case c.closed:
		c.mu.Unlock()
		return nil, ErrClosed
	case c.err != nil:
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.cookie++
	cookie := c.cookie
	c.pending[cookie] = cl
	c.mu.Unlock()

	hdr := make([]byte, 0, requestLen)
	hdr = be.AppendUint32(hdr, magicRequest)
	hdr = be.AppendUint16(hdr, flags)
	hdr = be.AppendUint16(hdr, typ)
	hdr = be.AppendUint64(hdr, cookie)
	hdr = be.AppendUint64(hdr, off)
	hdr = be.AppendUint32(hdr, length)
	bufs := net.Buffers{hdr}
	if len(payload) > 0 {
		bufs = append(bufs, payload)
	}
	c.wmu.Lock()
	_, err := bufs.WriteTo(c.nc)
	c.wmu.Unlock()
	if err != nil {
		// fail delivers the error to this call too (it is still pending,
		// or the reader already took and answered it).
		c.fail(fmt.Errorf("%w: sending request: %w", ErrDisconnected, err))
	}
	return cl, nil
}

// wait waits for a call's reply and decorates a server error.
func (cl *call) wait(op string, off uint64, length uint32) error {
	err := <-cl.done
	var e *Error
	if errors.As(err, &e) {
		e.Op, e.Offset, e.Length = op, off, length
	}
	return err
}

// rangeOK checks that [off, off+n) is a valid 64-bit range.
func rangeOK(off, n int64) error {
	if off < 0 || n < 0 || off+n < off {
		return fmt.Errorf("%w: offset %d length %d", ErrRange, off, n)
	}
	return nil
}

// pieces splits [off, off+n) into requests of at most chunk bytes, issues
// them all (pipelined) and waits for every reply. It returns the first
// error in offset order. An empty range sends nothing.
func (c *Client) pieces(op string, off, n, chunk int64, issue func(o, l int64) (*call, error)) error {
	type piece struct {
		cl   *call
		o, l int64
	}
	var ps []piece
	var first error
	for o, l := off, int64(0); o < off+n; o += l {
		l = min(chunk, off+n-o)
		cl, err := issue(o, l)
		if err != nil {
			first = err
			break
		}
		ps = append(ps, piece{cl, o, l})
	}
	for _, p := range ps {
		if err := p.cl.wait(op, uint64(p.o), uint32(p.l)); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// ReadAt reads len(p) bytes at off, as io.ReaderAt: a range reaching past
// the end of the export is shortened and io.EOF returned.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if err := rangeOK(off, int64(len(p))); err != nil {
		return 0, err
	}
	size := int64(c.size)
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := min(int64(len(p)), size-off)
	err := c.pieces("read", off, n, int64(c.maxPayload), func(o, l int64) (*call, error) {
		return c.start(cmdRead, 0, uint64(o), uint32(l), nil, p[o-off:o-off+l])
	})
	if err != nil {
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt writes p at off, as io.WriterAt. The data is durable only after
// a later Flush (or if written with WriteAtFUA).
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	return c.write(p, off, 0)
}

// WriteAtFUA writes p at off with NBD_CMD_FLAG_FUA: when it returns
// without error, the data is durable. It fails with ErrUnsupported if the
// export does not advertise FUA.
func (c *Client) WriteAtFUA(p []byte, off int64) (int, error) {
	if c.flags&FlagSendFUA == 0 {
		return 0, fmt.Errorf("%w: FUA", ErrUnsupported)
	}
	return c.write(p, off, cmdFlagFUA)
}

func (c *Client) write(p []byte, off int64, flags uint16) (int, error) {
	if err := rangeOK(off, int64(len(p))); err != nil {
		return 0, err
	}
	err := c.pieces("write", off, int64(len(p)), int64(c.maxPayload), func(o, l int64) (*call, error) {
		return c.start(cmdWrite, flags, uint64(o), uint32(l), p[o-off:o-off+l], nil)
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush asks the server to make every write that was answered before this
// call durable (NBD_CMD_FLUSH).
func (c *Client) Flush() error {
	if c.flags&FlagSendFlush == 0 {
		return fmt.Errorf("%w: FLUSH", ErrUnsupported)
	}
	cl, err := c.start(cmdFlush, 0, 0, 0, nil, nil)
	if err != nil {
		return err
	}
	return cl.wait("flush", 0, 0)
}

// Trim tells the server that [off, off+length) is no longer needed
// (NBD_CMD_TRIM). What the range reads as afterwards is up to the server
// (sparsedisk: zeros).
func (c *Client) Trim(off, length int64) error {
	if c.flags&FlagSendTrim == 0 {
		return fmt.Errorf("%w: TRIM", ErrUnsupported)
	}
	if err := rangeOK(off, length); err != nil {
		return err
	}
	return c.pieces("trim", off, length, maxEffectLen, func(o, l int64) (*call, error) {
		return c.start(cmdTrim, 0, uint64(o), uint32(l), nil, nil)
	})
}

// WriteZeroes makes [off, off+length) read as zeros
// (NBD_CMD_WRITE_ZEROES). With noHole the server must keep the range
// allocated (NBD_CMD_FLAG_NO_HOLE); without it, it may deallocate.
func (c *Client) WriteZeroes(off, length int64, noHole bool) error {
	if c.flags&FlagSendWriteZeroes == 0 {
		return fmt.Errorf("%w: WRITE_ZEROES", ErrUnsupported)
	}
	if err := rangeOK(off, length); err != nil {
		return err
	}
	var flags uint16
	if noHole {
		flags = cmdFlagNoHole
	}
	return c.pieces("write-zeroes", off, length, maxEffectLen, func(o, l int64) (*call, error) {
		return c.start(cmdWriteZeroes, flags, uint64(o), uint32(l), nil, nil)
	})
}

// Close waits (up to Options.CloseTimeout) for requests in flight, sends
// NBD_CMD_DISC, waits for the server to hang up and closes the
// connection. Later calls fail with ErrClosed. Close on a connection that
// has already failed just releases it. It returns an error if requests
// were still in flight at the timeout or the disconnect could not be sent.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	var idle chan struct{}
	if len(c.pending) > 0 {
		idle = make(chan struct{})
		c.idle = idle
	}
	broken := c.err != nil
	c.mu.Unlock()

	timer := time.NewTimer(c.closeTimeout)
	defer timer.Stop()
	var err error
	if idle != nil {
		select {
		case <-idle:
		case <-timer.C:
			err = fmt.Errorf("%w: requests still in flight after %v", ErrClosed, c.closeTimeout)
			c.fail(err)
			broken = true
		}
	}
	if !broken {
		c.mu.Lock()
		if c.err == nil {
			c.err = ErrClosed // the server's hang-up is expected from now on
		} else {
			broken = true
		}
		c.mu.Unlock()
	}
	if !broken {
		msg := make([]byte, 0, requestLen)
		msg = be.AppendUint32(msg, magicRequest)
		msg = be.AppendUint16(msg, 0)
		msg = be.AppendUint16(msg, cmdDisc)
		msg = be.AppendUint64(msg, 0)
		msg = be.AppendUint64(msg, 0)
		msg = be.AppendUint32(msg, 0)
		_ = c.nc.SetWriteDeadline(time.Now().Add(c.closeTimeout))
		c.wmu.Lock()
		_, werr := c.nc.Write(msg)
		c.wmu.Unlock()
		if werr != nil {
			err = fmt.Errorf("%w: sending NBD_CMD_DISC: %w", ErrDisconnected, werr)
		} else {
			select {
			case <-c.readerDone: // the server hung up
			case <-timer.C:
			}
		}
	}
	c.nc.Close()
	<-c.readerDone
	return err
}
