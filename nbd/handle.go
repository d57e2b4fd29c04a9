package nbd

import (
	"fmt"
	"net"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
)

// maxStatusQuery bounds the range one BLOCK_STATUS request looks up; the
// protocol lets the server describe less than asked.
const maxStatusQuery = 2 << 30

// minHoleRead is the smallest structured read that consults the
// allocation map to send holes; shorter reads are sent as one data chunk,
// which saves a map lookup where holes would save little.
const minHoleRead = 64 << 10

// maxStatusExtents is the protocol's recommended limit of descriptors per
// status chunk.
const maxStatusExtents = 1 << 20

// allowedFlags lists the command flags valid for each command. FUA is
// accepted on every command, as the protocol requires once advertised.
func (t *transmission) allowedFlags(typ uint16) uint16 {
	switch typ {
	case cmdRead:
		if t.sess.structured {
			return cflagFUA | cflagDF
		}
		return cflagFUA
	case cmdWriteZeroes:
		return cflagFUA | cflagNoHole | cflagFastZero
	case cmdBlockStatus:
		return cflagFUA | cflagReqOne
	}
	return cflagFUA
}

// check validates flags, range and alignment of a request that touches
// [offset, offset+length).
func (t *transmission) check(req request) error {
	if req.flags&^t.allowedFlags(req.typ) != 0 {
		return fmt.Errorf("%w: flags %#x on %s", ErrInvalidRequest, req.flags, cmdName(req.typ))
	}
	switch req.typ {
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if t.x.readOnly {
			return ErrReadOnly
		}
	}
	size := uint64(t.x.size)
	if req.offset > size || uint64(req.length) > size-req.offset {
		return fmt.Errorf("%w: %s of %d bytes at %d (size %d)", ErrOutOfRange, cmdName(req.typ), req.length, req.offset, size)
	}
	if t.sess.blockSizes {
		m := uint64(t.x.minBlock)
		if req.offset%m != 0 || uint64(req.length)%m != 0 {
			return fmt.Errorf("%w: %s of %d bytes at %d (block %d)", ErrUnaligned, cmdName(req.typ), req.length, req.offset, m)
		}
	}
	return nil
}

// handle executes one request and sends its reply.
func (t *transmission) handle(req request, payload []byte) {
	var err error
	switch req.typ {
	case cmdRead:
		t.read(req)
		return
	case cmdBlockStatus:
		t.blockStatus(req)
		return
	case cmdWrite:
		if err = t.check(req); err == nil && req.length > 0 {
			_, err = t.x.Backend.WriteAt(payload, int64(req.offset))
		}
	case cmdFlush:
		if req.flags&^cflagFUA != 0 {
			err = fmt.Errorf("%w: flags %#x on flush", ErrInvalidRequest, req.flags)
		} else if !t.x.readOnly {
			err = t.x.flush.Flush()
		}
	case cmdTrim:
		if err = t.check(req); err == nil && req.length > 0 {
			err = t.x.Backend.Trim(int64(req.offset), int64(req.length))
		}
	case cmdWriteZeroes:
		if err = t.check(req); err == nil && req.length > 0 {
			err = t.writeZeroes(req)
		}
	case cmdCache:
		// Reads are served from the page cache of the segment files;
		// there is nothing useful to prefetch, so CACHE only validates.
		err = t.check(req)
	default:
		err = fmt.Errorf("%w: command %d", ErrInvalidRequest, req.typ)
	}
	if err == nil && req.flags&cflagFUA != 0 && !t.x.readOnly &&
		(req.typ == cmdWrite || req.typ == cmdTrim || req.typ == cmdWriteZeroes) {
		err = t.x.flush.Flush()
	}
	t.reply(req, err)
}

// writeZeroes zeroes the request range. Without NO_HOLE the engine
// deallocates (fast, any size). With NO_HOLE the client asks for the range
// to stay provisioned, so allocated runs get zero data written in place;
// unallocated runs already read as zeros and the sparse engine never
// stores all-zero sectors, so they are left alone. That path is no faster
// than a write, hence FAST_ZERO together with NO_HOLE fails with ENOTSUP.
func (t *transmission) writeZeroes(req request) error {
	off, n := int64(req.offset), int64(req.length)
	if req.flags&cflagNoHole == 0 {
		return t.x.Backend.WriteZeroes(off, n)
	}
	if req.flags&cflagFastZero != 0 {
		return ErrNotFast
	}
	exts, err := t.x.Backend.Extents(off, n)
	if err != nil {
		return err
	}
	for _, e := range exts {
		if !e.Allocated {
			continue
		}
		for p := e.Offset; p < e.Offset+e.Length; {
			k := min(int64(len(zeroBuf)), e.Offset+e.Length-p)
			if _, err := t.x.Backend.WriteAt(zeroBuf[:k], p); err != nil {
				return err
			}
			p += k
		}
	}
	return nil
}

// zeroBuf is a read-only source of zeros.
var zeroBuf = make([]byte, 1<<20)

// reply sends the reply of a request without payload.
func (t *transmission) reply(req request, err error) {
	errno := errnoFor(req.typ, err)
	if err != nil {
		logFailed(t.c.s, t.c.log, t.x, req, errno, err)
	}
	if t.sess.structured && errno != 0 {
		t.send(errorChunk(req.cookie, errno, err), nil)
		return
	}
	t.send(net.Buffers{appendSimpleReply(make([]byte, 0, simpleReplyHeaderLen), errno, req.cookie)}, nil)
}

// errorChunk is a final NBD_REPLY_TYPE_ERROR chunk carrying err's text.
func errorChunk(cookie uint64, errno uint32, err error) net.Buffers {
	msg := err.Error()
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	b := appendChunkHeader(nil, replyFlagDone, chunkError, cookie, uint32(6+len(msg)))
	b = be.AppendUint32(b, errno)
	b = be.AppendUint16(b, uint16(len(msg)))
	return net.Buffers{append(b, msg...)}
}

// send queues one whole reply for writing and returns without waiting
// for the write. release, if not nil, is a pooled buffer the reply refers
// to; it is returned to the pool once written. Replies are combined: the
// first sender to find no write in progress becomes the writer and sends
// everything queued, its own and what others queue meanwhile, in as few
// writev calls as possible, so a deep queue of small replies costs few
// system calls. Replies never interleave: each is queued whole.
func (t *transmission) send(bufs net.Buffers, release []byte) {
	q := &t.c.out
	q.mu.Lock()
	q.pending = append(q.pending, bufs...)
	for _, b := range bufs {
		q.queued += int64(len(b))
	}
	if release != nil {
		q.release = append(q.release, release)
	}
	if q.writing {
		q.mu.Unlock()
		return
	}
	q.writing = true
	for len(q.pending) > 0 {
		batch, rel := q.pending, q.release
		q.pending, q.release = q.spare, q.spareRel
		q.queued = 0
		if q.drained.L != nil {
			q.drained.Broadcast() // a reader may wait in waitBacklog
		}
		q.mu.Unlock()
		if !q.failed {
			_ = t.nc.SetWriteDeadline(time.Now().Add(t.c.s.cfg.WriteTimeout))
			if _, err := batch.WriteTo(t.nc); err != nil {
				// The client is gone or stuck: close, which also ends the
				// request reader; later replies are dropped.
				t.c.log.Debug("nbd: reply failed, closing", "err", err)
				q.failed = true
				t.nc.Close()
			}
		}
		for i, b := range rel {
			putBuf(b)
			rel[i] = nil
		}
		q.mu.Lock()
		q.spare, q.spareRel = batch[:0], rel[:0]
	}
	q.writing = false
	q.mu.Unlock()
}

// read answers NBD_CMD_READ: a simple reply with the data, or structured
// chunks that send unallocated runs as holes (one data chunk with DF).
func (t *transmission) read(req request) {
	err := t.check(req)
	if err == nil && req.length > t.c.s.cfg.MaxPayload {
		err = fmt.Errorf("%w: read of %d bytes", ErrTooLarge, req.length)
	}
	if err != nil {
		t.reply(req, err)
		return
	}
	off, n := int64(req.offset), int64(req.length)
	if t.sess.structured && n == 0 {
		t.send(net.Buffers{appendChunkHeader(nil, replyFlagDone, chunkNone, req.cookie, 0)}, nil)
		return
	}
	buf := getBuf(int(n))
	if !t.sess.structured {
		if _, err := t.x.Backend.ReadAt(buf, off); err != nil {
			putBuf(buf)
			t.reply(req, err)
			return
		}
		t.send(net.Buffers{appendSimpleReply(nil, 0, req.cookie), buf}, buf)
		return
	}
	runs := []blockif.Extent{{Offset: off, Length: n, Allocated: true}}
	if req.flags&cflagDF == 0 && n >= minHoleRead {
		exts, err := t.x.Backend.Extents(off, n)
		if err != nil {
			putBuf(buf)
			t.reply(req, err)
			return
		}
		runs = mergeRuns(exts, off, n)
	}
	if len(runs) == 1 && runs[0].Allocated {
		// One data run: a single read.
		if _, err := t.x.Backend.ReadAt(buf, off); err != nil {
			putBuf(buf)
			t.reply(req, err)
			return
		}
	} else {
		for _, r := range runs {
			if !r.Allocated {
				continue
			}
			if _, err := t.x.Backend.ReadAt(buf[r.Offset-off:r.Offset-off+r.Length], r.Offset); err != nil {
				putBuf(buf)
				t.reply(req, err)
				return
			}
		}
	}
	// Every read succeeded before the first byte is sent, so the last
	// content chunk can carry the DONE flag.
	out := make(net.Buffers, 0, 2*len(runs))
	for i, r := range runs {
		flags := uint16(0)
		if i == len(runs)-1 {
			flags = replyFlagDone
		}
		if r.Allocated {
			h := appendChunkHeader(make([]byte, 0, structuredReplyHeaderLen+8), flags, chunkOffsetData, req.cookie, uint32(8+r.Length))
			h = be.AppendUint64(h, uint64(r.Offset))
			out = append(out, h, buf[r.Offset-off:r.Offset-off+r.Length])
		} else {
			h := appendChunkHeader(make([]byte, 0, structuredReplyHeaderLen+12), flags, chunkOffsetHole, req.cookie, 12)
			h = be.AppendUint64(h, uint64(r.Offset))
			h = be.AppendUint32(h, uint32(r.Length))
			out = append(out, h)
		}
	}
	t.send(out, buf)
}

// mergeRuns turns the backend's extents into runs that cover exactly
// [off, off+n), adjacent runs of equal allocation merged. Gaps or overlaps
// (a misbehaving backend) are served as data, which is always correct.
func mergeRuns(exts []blockif.Extent, off, n int64) []blockif.Extent {
	var runs []blockif.Extent
	add := func(o, l int64, alloc bool) {
		if l <= 0 {
			return
		}
		if k := len(runs); k > 0 && runs[k-1].Allocated == alloc && runs[k-1].Offset+runs[k-1].Length == o {
			runs[k-1].Length += l
			return
		}
		runs = append(runs, blockif.Extent{Offset: o, Length: l, Allocated: alloc})
	}
	pos, end := off, off+n
	for _, e := range exts {
		s, f := max(e.Offset, pos), min(e.Offset+e.Length, end)
		if f <= s {
			continue
		}
		add(pos, s-pos, true) // gap before this extent
		add(s, f-s, e.Allocated)
		pos = f
	}
	add(pos, end-pos, true)
	return runs
}

// coarsen makes every boundary between runs, except the start and end of
// the range they cover, fall on a multiple of b: holes shrink to the
// whole b-blocks they contain and the rest is reported allocated, which
// is always safe (status 0). The protocol wants block-status descriptors
// to be multiples of the minimum block size, and of 512 bytes where
// possible, whatever the backend's granularity.
func coarsen(runs []blockif.Extent, b int64) []blockif.Extent {
	if b <= 1 || len(runs) == 0 {
		return runs
	}
	start, end := runs[0].Offset, runs[len(runs)-1].Offset+runs[len(runs)-1].Length
	out := make([]blockif.Extent, 0, len(runs))
	add := func(o, l int64, alloc bool) {
		if l <= 0 {
			return
		}
		if k := len(out) - 1; k >= 0 && out[k].Allocated == alloc {
			out[k].Length += l
			return
		}
		out = append(out, blockif.Extent{Offset: o, Length: l, Allocated: alloc})
	}
	for _, r := range runs {
		rs, re := r.Offset, r.Offset+r.Length
		if r.Allocated {
			add(rs, r.Length, true)
			continue
		}
		hs, he := rs, re
		if hs != start {
			hs = (hs + b - 1) / b * b
		}
		if he != end {
			he = he / b * b
		}
		if he <= hs {
			add(rs, r.Length, true)
			continue
		}
		add(rs, hs-rs, true)
		add(hs, he-hs, false)
		add(he, re-he, true)
	}
	return out
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation straight
// from the engine's extents: unallocated is HOLE|ZERO, allocated is 0.
func (t *transmission) blockStatus(req request) {
	err := t.check(req)
	switch {
	case err != nil:
	case !t.sess.structured || !t.sess.metaSet || t.sess.metaExport != t.x.Name:
		err = fmt.Errorf("%w: block status without base:allocation negotiated", ErrInvalidRequest)
	case req.length == 0:
		err = fmt.Errorf("%w: block status of length 0", ErrInvalidRequest)
	}
	if err != nil {
		t.reply(req, err)
		return
	}
	off, n := int64(req.offset), min(int64(req.length), maxStatusQuery)
	exts, err := t.x.Backend.Extents(off, n)
	if err != nil {
		t.reply(req, err)
		return
	}
	runs := coarsen(mergeRuns(exts, off, n), max(int64(t.x.minBlock), 512))
	if req.flags&cflagReqOne != 0 {
		runs = runs[:1]
	}
	if len(runs) > maxStatusExtents {
		runs = runs[:maxStatusExtents]
	}
	b := appendChunkHeader(make([]byte, 0, structuredReplyHeaderLen+4+8*len(runs)),
		replyFlagDone, chunkBlockStatus, req.cookie, uint32(4+8*len(runs)))
	b = be.AppendUint32(b, metaIDAllocation)
	for _, r := range runs {
		st := uint32(0)
		if !r.Allocated {
			st = stateHole | stateZero
		}
		b = be.AppendUint32(b, uint32(r.Length))
		b = be.AppendUint32(b, st)
	}
	t.send(net.Buffers{b}, nil)
}
