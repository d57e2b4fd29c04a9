package nbd

import "fmt"

// Parsers for option data. They are pure functions of the bytes the client
// sent, so the fuzz targets can drive them directly.

// maxOptionLen bounds the data of one option the server is willing to
// buffer. Longer options are skipped and refused with NBD_REP_ERR_TOO_BIG.
const maxOptionLen = 64 << 10

// maxMetaQueries bounds the queries of one (LIST|SET)_META_CONTEXT.
const maxMetaQueries = 128

// infoRequest is the data of NBD_OPT_INFO and NBD_OPT_GO.
type infoRequest struct {
	name  string
	infos []uint16
}

// parseInfoRequest decodes: 32-bit name length, name, 16-bit count,
// count 16-bit information types. The data must be consumed exactly.
func parseInfoRequest(b []byte) (infoRequest, error) {
	var r infoRequest
	if len(b) < 6 {
		return r, fmt.Errorf("%w: info request of %d bytes", ErrMalformed, len(b))
	}
	n := be.Uint32(b)
	if uint64(n) > uint64(len(b)-6) {
		return r, fmt.Errorf("%w: export name length %d exceeds option", ErrMalformed, n)
	}
	if n > maxStringLen {
		return r, fmt.Errorf("%w: export name of %d bytes", ErrMalformed, n)
	}
	r.name = string(b[4 : 4+n])
	rest := b[4+n:]
	count := int(be.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return r, fmt.Errorf("%w: %d information requests in %d bytes", ErrMalformed, count, len(rest))
	}
	for i := 0; i < count; i++ {
		r.infos = append(r.infos, be.Uint16(rest[2*i:]))
	}
	return r, nil
}

// appendInfoRequest encodes r (tests and fuzz seeds).
func appendInfoRequest(b []byte, r infoRequest) []byte {
	b = be.AppendUint32(b, uint32(len(r.name)))
	b = append(b, r.name...)
	b = be.AppendUint16(b, uint16(len(r.infos)))
	for _, t := range r.infos {
		b = be.AppendUint16(b, t)
	}
	return b
}

// metaRequest is the data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
type metaRequest struct {
	name    string
	queries []string
}

// parseMetaRequest decodes: 32-bit export name length, name, 32-bit query
// count, then per query a 32-bit length and the string. The data must be
// consumed exactly.
func parseMetaRequest(b []byte) (metaRequest, error) {
	var r metaRequest
	s, rest, err := takeString(b)
	if err != nil {
		return r, err
	}
	r.name = s
	if len(rest) < 4 {
		return r, fmt.Errorf("%w: missing query count", ErrMalformed)
	}
	count := be.Uint32(rest)
	rest = rest[4:]
	if count > maxMetaQueries {
		return r, fmt.Errorf("%w: %d queries", ErrMalformed, count)
	}
	for i := uint32(0); i < count; i++ {
		s, rest, err = takeString(rest)
		if err != nil {
			return r, err
		}
		r.queries = append(r.queries, s)
	}
	if len(rest) != 0 {
		return r, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(rest))
	}
	return r, nil
}

// appendMetaRequest encodes r (tests and fuzz seeds).
func appendMetaRequest(b []byte, r metaRequest) []byte {
	b = be.AppendUint32(b, uint32(len(r.name)))
	b = append(b, r.name...)
	b = be.AppendUint32(b, uint32(len(r.queries)))
	for _, q := range r.queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// takeString splits a 32-bit length-prefixed string off b.
func takeString(b []byte) (string, []byte, error) {
	if len(b) < 4 {
		return "", nil, fmt.Errorf("%w: missing string length", ErrMalformed)
	}
	n := be.Uint32(b)
	b = b[4:]
	if uint64(n) > uint64(len(b)) {
		return "", nil, fmt.Errorf("%w: string length %d exceeds option", ErrMalformed, n)
	}
	if n > maxStringLen {
		return "", nil, fmt.Errorf("%w: string of %d bytes", ErrMalformed, n)
	}
	return string(b[:n]), b[n:], nil
}

// metaMatches reports whether query selects base:allocation. For LIST, the
// namespace wildcard "base:" matches too.
func metaMatches(query string, list bool) bool {
	if query == metaBaseAllocation {
		return true
	}
	return list && query == "base:"
}
