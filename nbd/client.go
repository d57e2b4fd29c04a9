package nbd

import (
	"fmt"
	"io"
)

// ExportInfo is what a server told a client about an export in answer to
// NBD_OPT_GO. It is plain data.
type ExportInfo struct {
	Size  uint64 // export size in bytes
	Flags uint16 // transmission flags (NBD_FLAG_HAS_FLAGS, SEND_TRIM, ...)
	// Block size constraints from NBD_INFO_BLOCK_SIZE; zero if the server
	// sent none (then the protocol's defaults apply: 1, 4096, 32 MiB).
	MinBlock, PrefBlock, MaxPayload uint32
}

// Transmission flags as the kernel's NBD_SET_FLAGS expects them (the wire
// values of the protocol).
const (
	FlagHasFlags  = tflagHasFlags
	FlagReadOnly  = tflagReadOnly
	FlagSendFlush = tflagSendFlush
	FlagSendFUA   = tflagSendFUA
	FlagSendTrim  = tflagSendTrim
)

// maxClientInfo bounds an option reply the client accepts; the replies to
// GO are a few dozen bytes.
const maxClientInfo = 64 << 10

// ClientGo performs the client side of a fixed-newstyle handshake on rw
// and selects export name with NBD_OPT_GO, asking for its block sizes
// (and thereby promising to honour them). On success rw is in the
// transmission phase, ready to be handed to a client such as the Linux
// kernel's NBD driver. It speaks no TLS and no structured replies: the
// kernel client uses neither. Errors from the server are returned with
// the server's message.
func ClientGo(rw io.ReadWriter, name string) (ExportInfo, error) {
	var info ExportInfo
	var hello [18]byte
	if _, err := io.ReadFull(rw, hello[:]); err != nil {
		return info, fmt.Errorf("nbd: read greeting: %w", err)
	}
	if be.Uint64(hello[0:]) != magicInit || be.Uint64(hello[8:]) != magicOpt {
		return info, fmt.Errorf("%w: not a newstyle NBD server", ErrBadMagic)
	}
	sflags := be.Uint16(hello[16:])
	if sflags&flagFixedNewstyle == 0 {
		return info, fmt.Errorf("%w: server does not speak fixed newstyle", ErrProtocol)
	}
	cflags := clientFixedNewstyle
	if sflags&flagNoZeroes != 0 {
		cflags |= clientNoZeroes
	}
	req := be.AppendUint32(nil, cflags)
	data := appendInfoRequest(nil, infoRequest{name: name, infos: []uint16{infoBlockSize}})
	req = append(req, optionHeader(optGo, uint32(len(data)))...)
	req = append(req, data...)
	if _, err := rw.Write(req); err != nil {
		return info, fmt.Errorf("nbd: send NBD_OPT_GO: %w", err)
	}
	gotExport := false
	for {
		var h [20]byte
		if _, err := io.ReadFull(rw, h[:]); err != nil {
			return info, fmt.Errorf("nbd: read option reply: %w", err)
		}
		if be.Uint64(h[0:]) != magicOptReply || be.Uint32(h[8:]) != optGo {
			return info, fmt.Errorf("%w: option reply header %x", ErrProtocol, h)
		}
		typ, n := be.Uint32(h[12:]), be.Uint32(h[16:])
		if n > maxClientInfo {
			return info, fmt.Errorf("%w: option reply of %d bytes", ErrProtocol, n)
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(rw, payload); err != nil {
			return info, fmt.Errorf("nbd: read option reply: %w", err)
		}
		switch {
		case typ == repAck:
			if !gotExport {
				return info, fmt.Errorf("%w: NBD_OPT_GO acknowledged without NBD_INFO_EXPORT", ErrProtocol)
			}
			return info, nil
		case typ&(1<<31) != 0:
			return info, fmt.Errorf("nbd: server refused export %q (reply %#x): %s", name, typ, payload)
		case typ != repInfo:
			continue // ignored, as the protocol asks of unknown replies
		case len(payload) >= 12 && be.Uint16(payload) == infoExport:
			info.Size, info.Flags = be.Uint64(payload[2:]), be.Uint16(payload[10:])
			gotExport = true
		case len(payload) >= 14 && be.Uint16(payload) == infoBlockSize:
			info.MinBlock, info.PrefBlock, info.MaxPayload = be.Uint32(payload[2:]), be.Uint32(payload[6:]), be.Uint32(payload[10:])
		}
	}
}

// optionHeader encodes a client option header.
func optionHeader(opt, n uint32) []byte {
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, opt)
	return be.AppendUint32(b, n)
}
