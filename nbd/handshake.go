package nbd

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
)

// session is the state negotiated during option haggling.
type session struct {
	tls        bool   // STARTTLS succeeded
	noZeroes   bool   // client set NBD_FLAG_C_NO_ZEROES
	fixed      bool   // client set NBD_FLAG_C_FIXED_NEWSTYLE
	structured bool   // NBD_OPT_STRUCTURED_REPLY acknowledged
	metaSet    bool   // a SET_META_CONTEXT selected base:allocation ...
	metaExport string // ... for this export name
	blockSizes bool   // the client asked for NBD_INFO_BLOCK_SIZE in GO
}

// errAbort ends a handshake after NBD_OPT_ABORT (a soft disconnect).
var errAbort = errors.New("client aborted negotiation")

// handshake runs the fixed-newstyle negotiation and returns the export and
// session to serve in transmission phase.
func (c *conn) handshake() (*export, *session, error) {
	hello := be.AppendUint64(nil, magicInit)
	hello = be.AppendUint64(hello, magicOpt)
	hello = be.AppendUint16(hello, flagFixedNewstyle|flagNoZeroes)
	if _, err := c.rw().Write(hello); err != nil {
		return nil, nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.rw(), cf[:]); err != nil {
		return nil, nil, err
	}
	flags := be.Uint32(cf[:])
	if flags&^clientKnownFlags != 0 {
		return nil, nil, fmt.Errorf("%w: unknown client flags %#x", ErrProtocol, flags)
	}
	sess := &session{
		fixed:    flags&clientFixedNewstyle != 0,
		noZeroes: flags&clientNoZeroes != 0,
	}
	if c.s.cfg.TLS == TLSRequire && !sess.fixed {
		return nil, nil, fmt.Errorf("%w: client without fixed newstyle cannot start TLS", ErrTLSRequired)
	}
	var hdr [optionHeaderLen]byte
	for {
		if _, err := io.ReadFull(c.rw(), hdr[:]); err != nil {
			return nil, nil, err
		}
		if be.Uint64(hdr[0:8]) != magicOpt {
			return nil, nil, fmt.Errorf("%w: option magic %#x", ErrBadMagic, be.Uint64(hdr[0:8]))
		}
		opt := be.Uint32(hdr[8:12])
		n := be.Uint32(hdr[12:16])
		if n > maxOptionLen {
			if opt == optExportName {
				return nil, nil, fmt.Errorf("%w: export name of %d bytes", ErrProtocol, n)
			}
			if err := discard(c.rw(), int64(n)); err != nil {
				return nil, nil, err
			}
			if err := c.optReply(opt, repErrTooBig, "option data too large"); err != nil {
				return nil, nil, err
			}
			continue
		}
		data, err := readOptionData(c.rw(), n)
		if err != nil {
			return nil, nil, err
		}
		if n == 0 && (opt == optGo || opt == optInfo) && c.s.cfg.AcceptUnframedGo {
			var err error
			if data, err = c.readUnframedInfo(); err != nil {
				return nil, nil, err
			}
		}
		e, done, err := c.option(sess, opt, data)
		if err != nil || done {
			return e, sess, err
		}
	}
}

// readOptionData reads the n bytes of an option's data. Beyond a small
// first buffer it grows as bytes arrive, so a client that announces a long
// option and then sends nothing makes the server hold little.
func readOptionData(r io.Reader, n uint32) ([]byte, error) {
	const first = 4096
	if n <= first {
		b := make([]byte, n)
		_, err := io.ReadFull(r, b)
		return b, err
	}
	var buf bytes.Buffer
	if _, err := io.CopyN(&buf, r, int64(n)); err != nil {
		if err == io.EOF && buf.Len() > 0 {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf.Bytes(), nil
}

// option answers one option. done reports that transmission starts with
// export e.
func (c *conn) option(sess *session, opt uint32, data []byte) (e *export, done bool, err error) {
	if c.s.isClosing() && opt != optAbort {
		return nil, false, c.optReply(opt, repErrShutdown, "server shutting down")
	}
	if c.s.cfg.TLS == TLSRequire && !sess.tls {
		switch opt {
		case optStartTLS, optAbort:
		case optExportName:
			return nil, false, fmt.Errorf("%w: NBD_OPT_EXPORT_NAME before STARTTLS", ErrTLSRequired)
		default:
			return nil, false, c.optReply(opt, repErrTLSReqd, "TLS required: send NBD_OPT_STARTTLS first")
		}
	}
	switch opt {
	case optExportName:
		x := c.s.lookup(string(data))
		if x == nil {
			return nil, false, fmt.Errorf("%w: %q (NBD_OPT_EXPORT_NAME)", ErrUnknownExport, data)
		}
		if err := c.s.admit(c); err != nil {
			return nil, false, err // no error reply exists for EXPORT_NAME
		}
		b := be.AppendUint64(nil, uint64(x.size))
		b = be.AppendUint16(b, c.transmissionFlags(x, sess))
		if !sess.noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		_, err := c.rw().Write(b)
		return x, err == nil, err

	case optAbort:
		// The client may already have closed; a failed ACK is harmless.
		_ = c.optReply(opt, repAck, "")
		return nil, false, errAbort

	case optList:
		if len(data) != 0 {
			return nil, false, c.optReply(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, x := range c.s.exports {
			d := be.AppendUint32(nil, uint32(len(x.Name)))
			d = append(d, x.Name...)
			d = append(d, x.Description...)
			if err := c.optReplyData(opt, repServer, d); err != nil {
				return nil, false, err
			}
		}
		return nil, false, c.optReply(opt, repAck, "")

	case optStartTLS:
		switch {
		case len(data) != 0:
			return nil, false, c.optReply(opt, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
		case c.s.cfg.TLS == TLSOff:
			return nil, false, c.optReply(opt, repErrPolicy, "TLS is not enabled on this server")
		case sess.tls:
			return nil, false, c.optReply(opt, repErrInvalid, "TLS already started")
		case !sess.fixed:
			return nil, false, c.optReply(opt, repErrInvalid, "TLS needs fixed newstyle negotiation")
		}
		if err := c.optReply(opt, repAck, ""); err != nil {
			return nil, false, err
		}
		if err := c.startTLS(); err != nil {
			return nil, false, err
		}
		// No negotiation state survives STARTTLS.
		*sess = session{tls: true, fixed: sess.fixed, noZeroes: sess.noZeroes}
		return nil, false, nil

	case optInfo, optGo:
		req, err := parseInfoRequest(data)
		if err != nil {
			return nil, false, c.optReply(opt, repErrInvalid, err.Error())
		}
		x := c.s.lookup(req.name)
		if x == nil {
			return nil, false, c.optReply(opt, repErrUnknown, fmt.Sprintf("no export named %q", req.name))
		}
		if opt == optGo {
			if err := c.s.admit(c); errors.Is(err, ErrTooManyConnections) {
				c.log.Debug("nbd: client refused", "err", err)
				return nil, false, c.optReply(opt, repErrPolicy, fmt.Sprintf("too many connections (%d), try again later", c.s.cfg.MaxConnections))
			} else if err != nil {
				return nil, false, err
			}
		}
		wantName, wantDesc, wantBS := false, false, false
		for _, t := range req.infos {
			switch t {
			case infoName:
				wantName = true
			case infoDescription:
				wantDesc = true
			case infoBlockSize:
				wantBS = true
			}
		}
		info := be.AppendUint16(nil, infoExport)
		info = be.AppendUint64(info, uint64(x.size))
		info = be.AppendUint16(info, c.transmissionFlags(x, sess))
		if err := c.optReplyData(opt, repInfo, info); err != nil {
			return nil, false, err
		}
		if wantName || req.name == "" {
			d := be.AppendUint16(nil, infoName)
			if err := c.optReplyData(opt, repInfo, append(d, x.Name...)); err != nil {
				return nil, false, err
			}
		}
		if wantDesc && x.Description != "" {
			d := be.AppendUint16(nil, infoDescription)
			if err := c.optReplyData(opt, repInfo, append(d, x.Description...)); err != nil {
				return nil, false, err
			}
		}
		// Block sizes are always sent: clients that did not ask may
		// still use them as a hint (the preferred size is the sector).
		d := be.AppendUint16(nil, infoBlockSize)
		d = be.AppendUint32(d, x.minBlock)
		d = be.AppendUint32(d, x.prefBlock)
		d = be.AppendUint32(d, c.s.cfg.MaxPayload)
		if err := c.optReplyData(opt, repInfo, d); err != nil {
			return nil, false, err
		}
		if err := c.optReply(opt, repAck, ""); err != nil {
			return nil, false, err
		}
		if opt == optGo {
			sess.blockSizes = wantBS
			return x, true, nil
		}
		return nil, false, nil

	case optStructuredReply:
		if len(data) != 0 {
			return nil, false, c.optReply(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		sess.structured = true
		return nil, false, c.optReply(opt, repAck, "")

	case optListMetaContext, optSetMetaContext:
		set := opt == optSetMetaContext
		if set {
			sess.metaSet, sess.metaExport = false, ""
		}
		if !sess.structured {
			return nil, false, c.optReply(opt, repErrInvalid, "negotiate structured replies first")
		}
		req, err := parseMetaRequest(data)
		if err != nil {
			return nil, false, c.optReply(opt, repErrInvalid, err.Error())
		}
		x := c.s.lookup(req.name)
		if x == nil {
			return nil, false, c.optReply(opt, repErrUnknown, fmt.Sprintf("no export named %q", req.name))
		}
		match := !set && len(req.queries) == 0
		for _, q := range req.queries {
			if metaMatches(q, !set) {
				match = true
			}
		}
		if match {
			id := uint32(0)
			if set {
				id = metaIDAllocation
				sess.metaSet, sess.metaExport = true, x.Name
			}
			d := be.AppendUint32(nil, id)
			if err := c.optReplyData(opt, repMetaContext, append(d, metaBaseAllocation...)); err != nil {
				return nil, false, err
			}
		}
		return nil, false, c.optReply(opt, repAck, "")

	default: // includes NBD_OPT_EXTENDED_HEADERS, not implemented
		return nil, false, c.optReply(opt, repErrUnsup, fmt.Sprintf("option %d not supported", opt))
	}
}

// transmissionFlags are the flags advertised for x in this session.
func (c *conn) transmissionFlags(x *export, sess *session) uint16 {
	f := tflagHasFlags | tflagSendFlush | tflagCanMultiConn | tflagSendCache
	if x.readOnly {
		f |= tflagReadOnly
	} else {
		f |= tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
	}
	if sess.structured {
		f |= tflagSendDF
	}
	return f
}

// optReply sends an option reply whose data is msg (used for the
// human-readable text of error replies; empty for ACK).
func (c *conn) optReply(opt, typ uint32, msg string) error {
	return c.optReplyData(opt, typ, []byte(msg))
}

func (c *conn) optReplyData(opt, typ uint32, data []byte) error {
	_, err := c.rw().Write(appendOptReply(nil, opt, typ, data))
	return err
}

// startTLS upgrades the connection after the STARTTLS ACK was sent.
func (c *conn) startTLS() error {
	// The handshake deadline set on the raw connection covers TLS too.
	tc := tls.Server(c.rw(), c.s.cfg.TLSConfig)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	c.setRW(tc)
	return nil
}

// readUnframedInfo reads the data of a GO or INFO option whose header said
// length 0 (see Config.AcceptUnframedGo) and returns it as the option data.
func (c *conn) readUnframedInfo() ([]byte, error) {
	var b [4]byte
	if _, err := io.ReadFull(c.rw(), b[:4]); err != nil {
		return nil, err
	}
	n := be.Uint32(b[:4])
	if n > maxStringLen {
		return nil, fmt.Errorf("%w: unframed export name of %d bytes", ErrProtocol, n)
	}
	data := append(make([]byte, 0, 4+n+2), b[:4]...)
	data = append(data, make([]byte, n+2)...)
	if _, err := io.ReadFull(c.rw(), data[4:]); err != nil {
		return nil, err
	}
	count := int(be.Uint16(data[4+n:]))
	infos := make([]byte, 2*count)
	if _, err := io.ReadFull(c.rw(), infos); err != nil {
		return nil, err
	}
	return append(data, infos...), nil
}
