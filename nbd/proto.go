package nbd

import "encoding/binary"

// Wire constants, named after the NBD protocol specification (doc/proto.md
// of the NetworkBlockDevice/nbd project), section 'Values'. All multi-byte
// fields on the wire are big-endian; every encoder and decoder in this
// package uses binary.BigEndian explicitly.

// Magic numbers.
const (
	magicInit            uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt             uint64 = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply        uint64 = 0x3e889045565a9
	magicRequest         uint32 = 0x25609513
	magicExtendedRequest uint32 = 0x21e41c71
	magicSimpleReply     uint32 = 0x67446698
	magicStructuredReply uint32 = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle   uint16 = 1 << 0
	flagNoZeroes        uint16 = 1 << 1
	clientFixedNewstyle uint32 = 1 << 0
	clientNoZeroes      uint32 = 1 << 1
	clientKnownFlags           = clientFixedNewstyle | clientNoZeroes
)

// Transmission flags.
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagReadOnly        uint16 = 1 << 1
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagRotational      uint16 = 1 << 4
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagSendDF          uint16 = 1 << 7
	tflagCanMultiConn    uint16 = 1 << 8
	tflagSendResize      uint16 = 1 << 9
	tflagSendCache       uint16 = 1 << 10
	tflagSendFastZero    uint16 = 1 << 11
)

// Option types.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
	optExtendedHeaders uint32 = 11
)

// Option reply types. Errors have bit 31 set.
const (
	repAck         uint32 = 1
	repServer      uint32 = 2
	repInfo        uint32 = 3
	repMetaContext uint32 = 4

	repErrUnsup         uint32 = 1<<31 + 1
	repErrPolicy        uint32 = 1<<31 + 2
	repErrInvalid       uint32 = 1<<31 + 3
	repErrPlatform      uint32 = 1<<31 + 4
	repErrTLSReqd       uint32 = 1<<31 + 5
	repErrUnknown       uint32 = 1<<31 + 6
	repErrShutdown      uint32 = 1<<31 + 7
	repErrBlockSizeReqd uint32 = 1<<31 + 8
	repErrTooBig        uint32 = 1<<31 + 9
	repErrExtHeaderReqd uint32 = 1<<31 + 10
)

// NBD_INFO types carried in NBD_REP_INFO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Commands.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cflagFUA        uint16 = 1 << 0
	cflagNoHole     uint16 = 1 << 1
	cflagDF         uint16 = 1 << 2
	cflagReqOne     uint16 = 1 << 3
	cflagFastZero   uint16 = 1 << 4
	cflagPayloadLen uint16 = 1 << 5
)

// Structured reply flags and chunk types.
const (
	replyFlagDone uint16 = 1 << 0

	chunkNone        uint16 = 0
	chunkOffsetData  uint16 = 1
	chunkOffsetHole  uint16 = 2
	chunkBlockStatus uint16 = 5
	chunkError       uint16 = 1<<15 + 1
	chunkErrorOffset uint16 = 1<<15 + 2
)

// Error values carried in replies.
const (
	errnoPerm     uint32 = 1
	errnoIO       uint32 = 5
	errnoNoMem    uint32 = 12
	errnoInval    uint32 = 22
	errnoNoSpc    uint32 = 28
	errnoOverflow uint32 = 75
	errnoNotSup   uint32 = 95
	errnoShutdown uint32 = 108
)

// base:allocation status flags.
const (
	stateHole uint32 = 1 << 0
	stateZero uint32 = 1 << 1
)

// metaBaseAllocation is the only metadata context this server offers;
// metaIDAllocation is the context ID it is given by SET_META_CONTEXT.
const (
	metaBaseAllocation        = "base:allocation"
	metaIDAllocation   uint32 = 1
)

// Sizes of fixed-length wire structures.
const (
	requestHeaderLen         = 28 // magic, flags, type, cookie, offset, length
	optionHeaderLen          = 16 // magic, option, length
	simpleReplyHeaderLen     = 16 // magic, error, cookie
	structuredReplyHeaderLen = 20 // magic, flags, type, cookie, length
	maxStringLen             = 4096
)

var be = binary.BigEndian

// request is one decoded transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

// parseRequest decodes a compact request header. It fails with
// ErrBadMagic when the magic is wrong, including the extended-header magic,
// which this server never negotiates.
func parseRequest(b []byte) (request, error) {
	if len(b) < requestHeaderLen {
		return request{}, ErrShortMessage
	}
	if m := be.Uint32(b[0:4]); m != magicRequest {
		return request{}, ErrBadMagic
	}
	return request{
		flags:  be.Uint16(b[4:6]),
		typ:    be.Uint16(b[6:8]),
		cookie: be.Uint64(b[8:16]),
		offset: be.Uint64(b[16:24]),
		length: be.Uint32(b[24:28]),
	}, nil
}

// appendRequest encodes r (used by tests and fuzz seeds).
func appendRequest(b []byte, r request) []byte {
	b = be.AppendUint32(b, magicRequest)
	b = be.AppendUint16(b, r.flags)
	b = be.AppendUint16(b, r.typ)
	b = be.AppendUint64(b, r.cookie)
	b = be.AppendUint64(b, r.offset)
	return be.AppendUint32(b, r.length)
}

// appendSimpleReply encodes a simple reply header.
func appendSimpleReply(b []byte, errno uint32, cookie uint64) []byte {
	b = be.AppendUint32(b, magicSimpleReply)
	b = be.AppendUint32(b, errno)
	return be.AppendUint64(b, cookie)
}

// appendChunkHeader encodes a structured reply chunk header.
func appendChunkHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) []byte {
	b = be.AppendUint32(b, magicStructuredReply)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	return be.AppendUint32(b, length)
}

// appendOptReply encodes an option reply header followed by its data.
func appendOptReply(b []byte, opt, typ uint32, data []byte) []byte {
	b = be.AppendUint64(b, magicOptReply)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, typ)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// cmdName names a command for logs.
func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write_zeroes"
	case cmdBlockStatus:
		return "block_status"
	}
	return "unknown"
}
