package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
)

// TestErrnoFor checks the error each failure is answered with against the
// numeric values of the NBD protocol specification (doc/proto.md in the
// NetworkBlockDevice/nbd project, section "Error values"), written out
// here rather than taken from the server's own constants.
func TestErrnoFor(t *testing.T) {
	wrap := func(err error) error { return errors.Join(errors.New("context"), err) }
	tests := []struct {
		name string
		cmd  uint16
		err  error
		want uint32
	}{
		{"nil", cmdRead, nil, 0},
		{"engine read-only", cmdWrite, blockif.ErrReadOnly, 1 /* NBD_EPERM */},
		{"export read-only", cmdTrim, ErrReadOnly, 1 /* NBD_EPERM */},
		{"read out of range", cmdRead, blockif.ErrOutOfRange, 22 /* NBD_EINVAL */},
		{"trim out of range", cmdTrim, ErrOutOfRange, 22 /* NBD_EINVAL */},
		{"status out of range", cmdBlockStatus, ErrOutOfRange, 22 /* NBD_EINVAL */},
		{"write past end", cmdWrite, blockif.ErrOutOfRange, 28 /* NBD_ENOSPC */},
		{"write zeroes past end", cmdWriteZeroes, ErrOutOfRange, 28 /* NBD_ENOSPC */},
		{"disk full", cmdWrite, wrap(syscall.ENOSPC), 28 /* NBD_ENOSPC */},
		{"quota", cmdWrite, syscall.EDQUOT, 28 /* NBD_ENOSPC */},
		{"file too big", cmdWrite, syscall.EFBIG, 28 /* NBD_ENOSPC */},
		{"corrupt", cmdRead, wrap(blockif.ErrCorrupt), 5 /* NBD_EIO */},
		{"os eio", cmdRead, syscall.EIO, 5 /* NBD_EIO */},
		{"unknown", cmdFlush, errors.New("boom"), 5 /* NBD_EIO */},
		{"unaligned", cmdWrite, ErrUnaligned, 22 /* NBD_EINVAL */},
		{"bad flags", cmdRead, ErrInvalidRequest, 22 /* NBD_EINVAL */},
		{"engine invalid", cmdTrim, blockif.ErrInvalid, 22 /* NBD_EINVAL */},
		{"read too large", cmdRead, ErrTooLarge, 75 /* NBD_EOVERFLOW */},
		{"fast zero", cmdWriteZeroes, ErrNotFast, 95 /* NBD_ENOTSUP */},
		{"shutdown", cmdWrite, ErrShutdown, 108 /* NBD_ESHUTDOWN */},
		{"closed disk", cmdRead, blockif.ErrClosed, 108 /* NBD_ESHUTDOWN */},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := errnoFor(tc.cmd, tc.err); got != tc.want {
				t.Errorf("errnoFor(%s, %v) = %d, want %d", cmdName(tc.cmd), tc.err, got, tc.want)
			}
		})
	}
}

func TestParseInfoRequest(t *testing.T) {
	good := appendInfoRequest(nil, infoRequest{"disk", []uint16{infoBlockSize, infoName}})
	r, err := parseInfoRequest(good)
	if err != nil || r.name != "disk" || len(r.infos) != 2 || r.infos[0] != infoBlockSize {
		t.Fatalf("parse good: %+v %v", r, err)
	}
	bad := map[string][]byte{
		"empty":          nil,
		"short":          {0, 0, 0},
		"name too long":  be.AppendUint16(be.AppendUint32(nil, 100), 0),
		"count too big":  be.AppendUint16(be.AppendUint32(nil, 0), 3),
		"trailing bytes": append(appendInfoRequest(nil, infoRequest{"", nil}), 1),
		"odd infos":      append(appendInfoRequest(nil, infoRequest{"", []uint16{1}}), 0),
	}
	for name, b := range bad {
		if _, err := parseInfoRequest(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err %v, want ErrMalformed", name, err)
		}
	}
}

func TestParseMetaRequest(t *testing.T) {
	good := appendMetaRequest(nil, metaRequest{"disk", []string{"base:allocation", "qemu:dirty-bitmap:x"}})
	r, err := parseMetaRequest(good)
	if err != nil || r.name != "disk" || len(r.queries) != 2 || r.queries[1] != "qemu:dirty-bitmap:x" {
		t.Fatalf("parse good: %+v %v", r, err)
	}
	bad := map[string][]byte{
		"empty":          nil,
		"no count":       be.AppendUint32(nil, 0),
		"name overflow":  be.AppendUint32(nil, 5),
		"query overflow": be.AppendUint32(be.AppendUint32(be.AppendUint32(nil, 0), 1), 9),
		"missing query":  be.AppendUint32(be.AppendUint32(nil, 0), 1),
		"trailing":       append(appendMetaRequest(nil, metaRequest{"", nil}), 0),
		"too many":       be.AppendUint32(be.AppendUint32(nil, 0), maxMetaQueries+1),
	}
	for name, b := range bad {
		if _, err := parseMetaRequest(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err %v, want ErrMalformed", name, err)
		}
	}
}

func TestHandshakeOptions(t *testing.T) {
	a, b := newMem(1<<20, 4096), newMem(2<<20, 512)
	_, addr := startServer(t, Config{}, Export{Name: "a", Description: "first", Backend: a}, Export{Name: "b", Backend: b, ReadOnly: true})
	c := dial(t, addr)
	c.hello(clientFixedNewstyle)

	// LIST: both exports, description after the name.
	rs := c.expect(optList, nil, repAck)
	if len(rs) != 2 || string(rs[0].data[4:]) != "afirst" || string(rs[1].data[4:]) != "b" {
		t.Fatalf("list replies %+v", rs)
	}
	c.expect(optList, []byte{1}, repErrInvalid)
	// Unknown and unimplemented options.
	c.expect(99, []byte("junk"), repErrUnsup)
	c.expect(optExtendedHeaders, nil, repErrUnsup)
	c.expect(optPeekExport, nil, repErrUnsup)
	// STARTTLS on a plain server.
	c.expect(optStartTLS, nil, repErrPolicy)
	// INFO: malformed, unknown export, then a good one with all infos.
	c.expect(optInfo, []byte{0, 0, 0, 9, 'x'}, repErrInvalid)
	c.expect(optInfo, appendInfoRequest(nil, infoRequest{"nope", nil}), repErrUnknown)
	rs = c.expect(optInfo, appendInfoRequest(nil, infoRequest{"b", []uint16{infoName, infoDescription, infoBlockSize, 77}}), repAck)
	got := map[uint16][]byte{}
	for _, r := range rs {
		got[be.Uint16(r.data)] = r.data[2:]
	}
	if e := got[infoExport]; len(e) != 10 || be.Uint64(e) != 2<<20 || be.Uint16(e[8:])&tflagReadOnly == 0 {
		t.Fatalf("info export %x", e)
	}
	if bs := got[infoBlockSize]; len(bs) != 12 || be.Uint32(bs) != 1 || be.Uint32(bs[4:]) != 512 || be.Uint32(bs[8:]) != DefaultMaxPayload {
		t.Fatalf("block size info %x", bs)
	}
	if string(got[infoName]) != "b" {
		t.Fatalf("name info %q", got[infoName])
	}
	// Meta contexts need structured replies first.
	mr := appendMetaRequest(nil, metaRequest{"a", []string{metaBaseAllocation}})
	c.expect(optSetMetaContext, mr, repErrInvalid)
	c.expect(optStructuredReply, []byte{0}, repErrInvalid)
	c.expect(optStructuredReply, nil, repAck)
	c.expect(optListMetaContext, []byte{0, 0}, repErrInvalid)
	c.expect(optListMetaContext, appendMetaRequest(nil, metaRequest{"zz", nil}), repErrUnknown)
	for _, q := range [][]string{nil, {"base:"}, {metaBaseAllocation}} {
		rs = c.expect(optListMetaContext, appendMetaRequest(nil, metaRequest{"a", q}), repAck)
		if len(rs) != 1 || string(rs[0].data[4:]) != metaBaseAllocation {
			t.Fatalf("list meta %q: %+v", q, rs)
		}
	}
	if rs = c.expect(optListMetaContext, appendMetaRequest(nil, metaRequest{"a", []string{"x-other:thing"}}), repAck); len(rs) != 0 {
		t.Fatalf("unknown namespace listed: %+v", rs)
	}
	rs = c.expect(optSetMetaContext, mr, repAck)
	if len(rs) != 1 || be.Uint32(rs[0].data) != metaIDAllocation {
		t.Fatalf("set meta %+v", rs)
	}
	// Oversized option data is skipped and refused.
	c.expect(optInfo, make([]byte, maxOptionLen+1), repErrTooBig)
	// Default export via empty name, then transmission works.
	rs = c.expect(optGo, appendInfoRequest(nil, infoRequest{"", nil}), repAck)
	if len(rs) < 2 {
		t.Fatalf("go replies %+v", rs)
	}
	c.request(cmdRead, 0, 1, 0, 512, nil)
	if _, errno, _, _ := c.structuredRead(0, 512); errno != 0 {
		t.Fatalf("read errno %d", errno)
	}
	c.request(cmdDisc, 0, 2, 0, 0, nil)
	c.expectClosed()
}

func TestHandshakeExportName(t *testing.T) {
	m := newMem(1<<20, 4096)
	_, addr := startServer(t, Config{}, Export{Name: "disk", Backend: m})
	for _, noZeroes := range []bool{false, true} {
		c := dial(t, addr)
		f := clientFixedNewstyle
		if noZeroes {
			f |= clientNoZeroes
		}
		c.hello(f)
		c.option(optExportName, []byte("disk"))
		r := c.readN(10)
		if be.Uint64(r) != 1<<20 || be.Uint16(r[8:])&tflagHasFlags == 0 || be.Uint16(r[8:])&tflagSendDF != 0 {
			t.Fatalf("export name reply % x", r)
		}
		if !noZeroes {
			if z := c.readN(124); !bytes.Equal(z, make([]byte, 124)) {
				t.Fatal("padding not zero")
			}
		}
		c.request(cmdWrite, 0, 7, 4096, 4, []byte("abcd"))
		if errno, cookie, _ := c.simpleReply(0); errno != 0 || cookie != 7 {
			t.Fatalf("write: errno %d cookie %d", errno, cookie)
		}
		c.request(cmdRead, 0, 8, 4096, 4, nil)
		if errno, _, d := c.simpleReply(4); errno != 0 || string(d) != "abcd" {
			t.Fatalf("read: errno %d data %q", errno, d)
		}
	}
}

func TestHandshakeDrops(t *testing.T) {
	m := newMem(1<<20, 4096)
	// No test waits for this timeout: each close below is the server
	// dropping the client for what it sent, not the timer.
	_, addr := startServer(t, Config{HandshakeTimeout: 10 * time.Minute}, Export{Name: "disk", Backend: m})
	t.Run("unknown client flags", func(t *testing.T) {
		c := dial(t, addr)
		c.hello(1 << 7)
		c.expectClosed()
	})
	t.Run("bad option magic", func(t *testing.T) {
		c := dial(t, addr)
		c.hello(clientFixedNewstyle)
		c.write(make([]byte, 16))
		c.expectClosed()
	})
	t.Run("unknown export name", func(t *testing.T) {
		c := dial(t, addr)
		c.hello(clientFixedNewstyle)
		c.option(optExportName, []byte("nope"))
		c.expectClosed()
	})
	t.Run("abort", func(t *testing.T) {
		c := dial(t, addr)
		c.hello(clientFixedNewstyle)
		c.expect(optAbort, nil, repAck)
		c.expectClosed()
	})
	t.Run("handshake timeout", func(t *testing.T) {
		_, addr := startServer(t, Config{HandshakeTimeout: 500 * time.Millisecond}, Export{Name: "disk", Backend: m})
		start := time.Now() // before the server can start its timer
		c := dial(t, addr)
		c.hello(clientFixedNewstyle)
		c.expectClosed() // silent client is cut after HandshakeTimeout
		if d := time.Since(start); d < 500*time.Millisecond {
			t.Fatalf("closed after %v, before the handshake timeout", d)
		}
	})
	t.Run("truncated option", func(t *testing.T) {
		c := dial(t, addr)
		c.hello(clientFixedNewstyle)
		b := be.AppendUint64(nil, magicOpt)
		b = be.AppendUint32(b, optGo)
		c.write(be.AppendUint32(b, 100)) // promises 100 bytes, sends none
		c.nc.(interface{ CloseWrite() error }).CloseWrite()
		c.expectClosed()
	})
	// The server keeps serving others.
	c := dial(t, addr)
	c.connect("disk", connectOpts{})
	c.request(cmdFlush, 0, 1, 0, 0, nil)
	if errno, _, _ := c.simpleReply(0); errno != 0 {
		t.Fatalf("flush errno %d", errno)
	}
}

func TestTransmissionSimple(t *testing.T) {
	m := newMem(1<<20, 4096)
	ro := newMem(1<<20, 4096)
	_, addr := startServer(t, Config{}, Export{Name: "rw", Backend: m}, Export{Name: "ro", Backend: ro, ReadOnly: true})
	c := dial(t, addr)
	size, flags := c.connect("rw", connectOpts{})
	if size != 1<<20 {
		t.Fatalf("size %d", size)
	}
	want := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes |
		tflagSendFastZero | tflagCanMultiConn | tflagSendCache
	if flags != want {
		t.Fatalf("flags %#x, want %#x", flags, want)
	}
	type step struct {
		name         string
		typ, flags   uint16
		off          uint64
		n            uint32
		payload      []byte
		errno        uint32
		flushesAfter int64
	}
	data := pattern(10000, 3)
	steps := []step{
		{"unaligned write", cmdWrite, 0, 100, 10000, data, 0, 0},
		{"fua write", cmdWrite, cflagFUA, 20000, 3, []byte("xyz"), 0, 1},
		{"write past end", cmdWrite, 0, 1<<20 - 2, 4, []byte("abcd"), errnoNoSpc, 1},
		{"write zeroes past end", cmdWriteZeroes, 0, 1 << 20, 1, nil, errnoNoSpc, 1},
		{"trim past end", cmdTrim, 0, 1<<20 - 4096, 8192, nil, errnoInval, 1},
		{"read past end", cmdRead, 0, 1 << 40, 1, nil, errnoInval, 1},
		{"cache past end", cmdCache, 0, 1 << 20, 4096, nil, errnoInval, 1},
		{"cache", cmdCache, 0, 0, 4096, nil, 0, 1},
		{"bad flag", cmdWrite, cflagDF, 0, 1, []byte("q"), errnoInval, 1},
		{"DF without structured", cmdRead, cflagDF, 0, 1, nil, errnoInval, 1},
		{"unknown command", 42, 0, 0, 0, nil, errnoInval, 1},
		{"status without context", cmdBlockStatus, 0, 0, 4096, nil, errnoInval, 1},
		{"flush", cmdFlush, 0, 0, 0, nil, 0, 2},
		{"fast zero with no-hole", cmdWriteZeroes, cflagNoHole | cflagFastZero, 0, 4096, nil, errnoNotSup, 2},
		{"read too large", cmdRead, 0, 0, DefaultMaxPayload + 1, nil, errnoInval, 2},
	}
	for i, s := range steps {
		c.request(s.typ, s.flags, uint64(i), s.off, s.n, s.payload)
		wantData := 0
		if s.typ == cmdRead && s.errno == 0 {
			wantData = int(s.n)
		}
		errno, cookie, _ := c.simpleReply(wantData)
		if cookie != uint64(i) {
			t.Fatalf("%s: cookie %d", s.name, cookie)
		}
		if errno != s.errno && !(s.name == "read too large" && errno == errnoOverflow) {
			t.Errorf("%s: errno %d, want %d", s.name, errno, s.errno)
		}
		if f := m.flushes.Load(); f != s.flushesAfter {
			t.Errorf("%s: %d flushes, want %d", s.name, f, s.flushesAfter)
		}
	}
	c.request(cmdRead, 0, 100, 100, 10000, nil)
	if errno, _, d := c.simpleReply(10000); errno != 0 || !bytes.Equal(d, data) {
		t.Fatalf("read back: errno %d equal %v", errno, bytes.Equal(d, data))
	}
	// Zeroing with and without NO_HOLE both read back as zeros.
	for i, f := range []uint16{0, cflagNoHole, cflagFastZero} {
		c.request(cmdWrite, 0, 1, 8192, 4096, pattern(4096, 9))
		c.simpleReply(0)
		c.request(cmdWriteZeroes, f, 2, 8192, 4096, nil)
		if errno, _, _ := c.simpleReply(0); errno != 0 {
			t.Fatalf("write zeroes %d: errno %d", i, errno)
		}
		c.request(cmdRead, 0, 3, 8192, 4096, nil)
		if _, _, d := c.simpleReply(4096); !bytes.Equal(d, make([]byte, 4096)) {
			t.Fatalf("write zeroes %d: data not zero", i)
		}
	}

	// Read-only export: writes are EPERM, reads work, connection survives.
	r := dial(t, addr)
	_, flags = r.connect("ro", connectOpts{})
	if flags&tflagReadOnly == 0 || flags&tflagSendTrim != 0 {
		t.Fatalf("ro flags %#x", flags)
	}
	for i, typ := range []uint16{cmdWrite, cmdTrim, cmdWriteZeroes} {
		var p []byte
		if typ == cmdWrite {
			p = []byte("z")
		}
		r.request(typ, 0, uint64(i), 0, 1, p)
		if errno, _, _ := r.simpleReply(0); errno != errnoPerm {
			t.Errorf("%s on read-only: errno %d", cmdName(typ), errno)
		}
	}
	r.request(cmdFlush, 0, 9, 0, 0, nil)
	if errno, _, _ := r.simpleReply(0); errno != 0 {
		t.Errorf("flush on read-only: errno %d", errno)
	}
	r.request(cmdRead, 0, 10, 0, 4, nil)
	if errno, _, _ := r.simpleReply(4); errno != 0 {
		t.Errorf("read on read-only: errno %d", errno)
	}
}

func TestEngineErrors(t *testing.T) {
	m := newMem(1<<20, 4096)
	m.readHook = func(off int64) error {
		if off == 12288 {
			return errors.Join(blockif.ErrCorrupt, errors.New("lut entry past end"))
		}
		return nil
	}
	m.writeHook = func(off int64) error {
		if off == 8192 {
			return syscall.ENOSPC
		}
		return nil
	}
	_, addr := startServer(t, Config{}, Export{Name: "d", Backend: m})
	for _, structured := range []bool{false, true} {
		c := dial(t, addr)
		c.connect("d", connectOpts{structured: structured})
		c.request(cmdWrite, 0, 1, 8192, 4, []byte("full"))
		if ch := c.chunk(); structured && (ch.typ != chunkError || be.Uint32(ch.payload) != errnoNoSpc) {
			t.Fatalf("write on full disk: %+v", ch)
		} else if !structured && be.Uint32(ch.payload) != errnoNoSpc {
			t.Fatalf("write on full disk: errno %d", be.Uint32(ch.payload))
		}
		c.request(cmdWrite, 0, 1, 0, 4096, pattern(4096, 1)) // allocate, so the read path reads
		c.chunk()
		c.request(cmdWrite, 0, 1, 8192+4096, 4096, pattern(4096, 1))
		c.chunk()
		c.request(cmdRead, 0, 2, 12288, 4096, nil)
		if structured {
			if _, errno, _, _ := c.structuredRead(12288, 4096); errno != errnoIO {
				t.Fatalf("structured read of corrupt sector: errno %d", errno)
			}
		} else if errno, _, _ := c.simpleReply(4096); errno != errnoIO {
			t.Fatalf("read of corrupt sector: errno %d", errno)
		}
		c.request(cmdRead, 0, 3, 0, 4096, nil) // connection still usable
		if structured {
			if _, errno, _, _ := c.structuredRead(0, 4096); errno != 0 {
				t.Fatalf("read after error: errno %d", errno)
			}
		} else if errno, _, _ := c.simpleReply(4096); errno != 0 {
			t.Fatalf("read after error: errno %d", errno)
		}
	}
}

func TestStructuredReadsAndBlockStatus(t *testing.T) {
	m := newMem(64<<10, 4096)
	_, addr := startServer(t, Config{}, Export{Name: "d", Backend: m})
	c := dial(t, addr)
	_, flags := c.connect("d", connectOpts{structured: true, meta: true, blockSize: true})
	if flags&tflagSendDF == 0 {
		t.Fatalf("DF not advertised: %#x", flags)
	}
	w := pattern(8192, 5)
	c.request(cmdWrite, 0, 1, 16384, 8192, w) // sectors 4,5 allocated
	if ch := c.chunk(); be.Uint32(ch.payload) != 0 {
		t.Fatal("write failed")
	}
	c.request(cmdRead, 0, 2, 0, 64<<10, nil)
	data, errno, holes, _ := c.structuredRead(0, 64<<10)
	if errno != 0 || holes != 2 || !bytes.Equal(data[16384:24576], w) || !bytes.Equal(data[:16384], make([]byte, 16384)) {
		t.Fatalf("sparse read: errno %d holes %d", errno, holes)
	}
	c.request(cmdRead, cflagDF, 3, 0, 64<<10, nil)
	data, errno, holes, chunks := c.structuredRead(0, 64<<10)
	if errno != 0 || holes != 0 || chunks != 1 || !bytes.Equal(data[16384:24576], w) {
		t.Fatalf("DF read: errno %d holes %d chunks %d", errno, holes, chunks)
	}
	c.request(cmdRead, 0, 4, 0, 0, nil)
	if ch := c.chunk(); ch.typ != chunkNone || ch.flags&replyFlagDone == 0 {
		t.Fatalf("zero-length read: %+v", ch)
	}
	c.request(cmdRead, 0, 5, 16384+100, 4096, nil) // unaligned: the minimum block size is 1
	if data, errno, _, _ := c.structuredRead(16384+100, 4096); errno != 0 || !bytes.Equal(data, w[100:4196]) {
		t.Fatalf("unaligned read errno %d", errno)
	}
	status := func(flags uint16, off uint64, n uint32) [][2]uint32 {
		c.request(cmdBlockStatus, flags, 6, off, n, nil)
		ch := c.chunk()
		if ch.typ != chunkBlockStatus || ch.flags&replyFlagDone == 0 || be.Uint32(ch.payload) != metaIDAllocation {
			t.Fatalf("block status chunk %+v", ch)
		}
		var out [][2]uint32
		for p := ch.payload[4:]; len(p) >= 8; p = p[8:] {
			out = append(out, [2]uint32{be.Uint32(p), be.Uint32(p[4:])})
		}
		return out
	}
	got := status(0, 0, 64<<10)
	want := [][2]uint32{{16384, stateHole | stateZero}, {8192, 0}, {40960, stateHole | stateZero}}
	if len(got) != len(want) {
		t.Fatalf("block status %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("block status %v, want %v", got, want)
		}
	}
	if got = status(cflagReqOne, 16384, 4096); len(got) != 1 || got[0] != [2]uint32{4096, 0} {
		t.Fatalf("REQ_ONE status %v", got)
	}
	// Trim punches a hole that block status and reads see.
	c.request(cmdTrim, 0, 7, 16384, 8192, nil)
	c.chunk()
	if got = status(0, 0, 64<<10); len(got) != 1 || got[0] != [2]uint32{64 << 10, stateHole | stateZero} {
		t.Fatalf("status after trim %v", got)
	}
	c.request(cmdBlockStatus, 0, 8, 60<<10, 8192, nil)
	if ch := c.chunk(); ch.typ != chunkError || be.Uint32(ch.payload) != errnoInval {
		t.Fatalf("status past end %+v", ch)
	}
}

// TestParallelRequests proves that requests of one connection run in
// parallel: a read blocks in the backend while a later write on the same
// connection is executed and answered; the replies come back out of order.
func TestParallelRequests(t *testing.T) {
	m := newMem(1<<20, 4096)
	release := make(chan struct{})
	m.readHook = func(off int64) error {
		if off == 0 {
			select {
			case <-release:
			case <-time.After(10 * time.Second):
				return errors.New("read never released")
			}
		}
		return nil
	}
	_, addr := startServer(t, Config{}, Export{Name: "d", Backend: m})
	c := dial(t, addr)
	c.connect("d", connectOpts{})
	c.request(cmdRead, 0, 1, 0, 4096, nil)
	c.request(cmdWrite, 0, 2, 8192, 4, []byte("abcd"))
	if errno, cookie, _ := c.simpleReply(0); cookie != 2 || errno != 0 {
		t.Fatalf("first reply cookie %d errno %d, want the write", cookie, errno)
	}
	close(release)
	if errno, cookie, _ := c.simpleReply(4096); cookie != 1 || errno != 0 {
		t.Fatalf("second reply cookie %d errno %d", cookie, errno)
	}
}

// TestInFlightBound checks that no more than MaxInFlight requests of one
// connection execute at once.
func TestInFlightBound(t *testing.T) {
	m := newMem(1<<20, 4096)
	var cur, peak atomic.Int64
	full := make(chan struct{}) // closed once 3 reads run at once
	var once sync.Once
	m.readHook = func(int64) error {
		defer cur.Add(-1)
		n := cur.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		if n >= 3 {
			once.Do(func() { close(full) })
		}
		// Every read waits until the bound is reached, so a server
		// admitting fewer than 3 at once never gets there.
		select {
		case <-full:
		case <-time.After(testutil.WaitTimeout):
		}
		return nil
	}
	_, addr := startServer(t, Config{MaxInFlight: 3}, Export{Name: "d", Backend: m})
	c := dial(t, addr)
	c.connect("d", connectOpts{})
	go func() {
		for i := 0; i < 40; i++ {
			c.request(cmdRead, 0, uint64(i), 0, 512, nil)
		}
	}()
	for i := 0; i < 40; i++ {
		if errno, _, _ := c.simpleReply(512); errno != 0 {
			t.Fatalf("errno %d", errno)
		}
	}
	if p := peak.Load(); p != 3 {
		t.Fatalf("peak parallel requests %d, want 3", p)
	}
}

func TestBadRequestDropsOnlyThatConnection(t *testing.T) {
	m := newMem(1<<20, 4096)
	_, addr := startServer(t, Config{MaxPayload: 1 << 20}, Export{Name: "d", Backend: m})
	good := dial(t, addr)
	good.connect("d", connectOpts{})

	bad := dial(t, addr)
	bad.connect("d", connectOpts{})
	bad.write(make([]byte, requestHeaderLen)) // zero magic
	bad.expectClosed()

	big := dial(t, addr)
	big.connect("d", connectOpts{})
	big.request(cmdWrite, 0, 1, 0, 2<<20, nil) // payload above the cap
	big.expectClosed()

	good.request(cmdWrite, 0, 1, 0, 3, []byte("ok!"))
	if errno, _, _ := good.simpleReply(0); errno != 0 {
		t.Fatalf("errno %d", errno)
	}
}

func TestDisconnectFlushes(t *testing.T) {
	m := newMem(1<<20, 4096)
	_, addr := startServer(t, Config{}, Export{Name: "d", Backend: m})
	c := dial(t, addr)
	c.connect("d", connectOpts{})
	c.request(cmdWrite, 0, 1, 0, 3, []byte("abc"))
	c.simpleReply(0)
	c.request(cmdDisc, 0, 2, 0, 0, nil)
	c.expectClosed()
	if m.flushes.Load() != 1 {
		t.Fatalf("%d flushes after DISC, want 1", m.flushes.Load())
	}
}

// TestMaxConnections: MaxConnections bounds negotiated sessions. A client
// asking for an export while the only slot is taken gets
// NBD_REP_ERR_POLICY and may retry; the slot is free before the server's
// close reaches the client, so reconnecting right after EOF works at the
// first attempt (no retry loop here: a refusal would fail the test).
func TestMaxConnections(t *testing.T) {
	m := newMem(1<<20, 4096)
	_, addr := startServer(t, Config{MaxConnections: 1}, Export{Name: "d", Backend: m})
	a := dial(t, addr)
	a.connect("d", connectOpts{})
	b := dial(t, addr)
	b.hello(clientFixedNewstyle | clientNoZeroes)
	b.expect(optGo, appendInfoRequest(nil, infoRequest{name: "d"}), repErrPolicy)
	b.expect(optList, nil, repAck) // still negotiating
	e := dial(t, addr)
	e.hello(clientFixedNewstyle | clientNoZeroes)
	e.option(optExportName, []byte("d")) // no error reply exists: dropped
	e.expectClosed()
	for round := range 20 {
		a.request(cmdDisc, 0, 1, 0, 0, nil)
		a.expectClosed()
		a = dial(t, addr)
		a.connect("d", connectOpts{}) // fails the test if refused
		a.request(cmdWrite, 0, 2, 0, 1, []byte{byte(round)})
		if errno, _, _ := a.simpleReply(0); errno != 0 {
			t.Fatalf("round %d: write errno %d", round, errno)
		}
	}
	a.request(cmdDisc, 0, 1, 0, 0, nil)
	a.expectClosed()
	b.connect2("d") // the refused client retries and gets the slot
}

// connect2 sends NBD_OPT_GO on an already greeted connection.
func (c *client) connect2(name string) {
	c.t.Helper()
	c.expect(optGo, appendInfoRequest(nil, infoRequest{name: name}), repAck)
}

// TestMaxHandshakesEvictsOldest: with MaxHandshakes pending connections, a
// new one evicts the oldest pending one, never itself and never a
// negotiated session.
func TestMaxHandshakesEvictsOldest(t *testing.T) {
	m := newMem(1<<20, 4096)
	s, addr := startServer(t, Config{MaxHandshakes: 3}, Export{Name: "d", Backend: m})
	session := dial(t, addr)
	session.connect("d", connectOpts{})
	var idle []*client
	for range 3 {
		c := dial(t, addr)
		c.readN(18) // greeted: the server holds it as pending
		idle = append(idle, c)
	}
	for i := range 3 {
		// Each newcomer evicts the oldest idle one, in order.
		c := dial(t, addr)
		c.readN(18)
		idle[i].expectClosed()
		for _, later := range idle[i+1:] {
			_ = later.nc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if n, err := later.nc.Read(make([]byte, 1)); err == nil || !os.IsTimeout(err) {
				t.Fatalf("newer idle connection closed too (read %d, %v)", n, err)
			}
			_ = later.nc.SetReadDeadline(time.Now().Add(30 * time.Second))
		}
		idle = append(idle, c)
	}
	s.mu.Lock()
	pending, sessions := s.pending.Len(), s.sessions
	s.mu.Unlock()
	if pending != 3 || sessions != 1 {
		t.Fatalf("pending %d sessions %d, want 3 and 1", pending, sessions)
	}
	// The session was never touched.
	session.request(cmdWrite, 0, 1, 0, 3, []byte("abc"))
	if errno, _, _ := session.simpleReply(0); errno != 0 {
		t.Fatalf("session write errno %d", errno)
	}
	// A newcomer negotiates although the pending budget is full.
	c := dial(t, addr)
	c.connect("d", connectOpts{})
	idle[3].expectClosed()
}

// TestMinBlock: the default minimum block size is 1 and any request
// alignment is served; Config.MinBlock advertises a larger one and
// enforces it for clients that requested block sizes, and block-status
// descriptors are then multiples of it.
func TestMinBlock(t *testing.T) {
	for _, bad := range []uint32{3, 1 << 17} {
		if _, err := NewServer(Config{MinBlock: bad}, Export{Backend: newMem(1<<20, 512)}); !errors.Is(err, ErrConfig) {
			t.Errorf("MinBlock %d: %v", bad, err)
		}
	}
	if _, err := NewServer(Config{MinBlock: 4096}, Export{Backend: newMem(4096+512, 512)}); !errors.Is(err, ErrConfig) {
		t.Errorf("size not a multiple of MinBlock: %v", err)
	}
	m := newMem(64<<10, 512)
	_, addr := startServer(t, Config{MinBlock: 4096}, Export{Name: "d", Backend: m})

	strict := dial(t, addr)
	strict.connect("d", connectOpts{structured: true, meta: true, blockSize: true})
	strict.request(cmdWrite, 0, 1, 100, 3, []byte("abc"))
	if ch := strict.chunk(); ch.typ != chunkError || be.Uint32(ch.payload) != errnoInval {
		t.Fatalf("unaligned write from a client that agreed to 4096: %+v", ch)
	}
	// One 512-byte sector allocated inside the first 4 KiB block.
	block := make([]byte, 4096)
	copy(block[1024:], pattern(512, 3))
	strict.request(cmdWrite, 0, 2, 0, 4096, block)
	if ch := strict.chunk(); be.Uint32(ch.payload) != 0 {
		t.Fatalf("aligned write failed: %+v", ch)
	}
	strict.request(cmdBlockStatus, 0, 3, 0, 16384, nil)
	ch := strict.chunk()
	var descs [][2]uint32
	for p := ch.payload[4:]; len(p) >= 8; p = p[8:] {
		descs = append(descs, [2]uint32{be.Uint32(p), be.Uint32(p[4:])})
	}
	if fmt.Sprint(descs) != fmt.Sprint([][2]uint32{{4096, 0}, {12288, stateHole | stateZero}}) {
		t.Fatalf("block status with minimum block 4096 on 512-byte sectors: %v", descs)
	}

	// A client that did not ask for block sizes is served at any alignment.
	loose := dial(t, addr)
	loose.connect("d", connectOpts{})
	loose.request(cmdWrite, 0, 1, 100, 3, []byte("abc"))
	if errno, _, _ := loose.simpleReply(0); errno != 0 {
		t.Fatalf("unaligned write from a client without block sizes: errno %d", errno)
	}
	got := make([]byte, 3)
	if m.ReadAt(got, 100); string(got) != "abc" {
		t.Fatalf("data %q", got)
	}
}

// TestShutdownFinishesInFlight: Shutdown waits for a request already
// received, answers it, flushes and closes.
func TestShutdownFinishesInFlight(t *testing.T) {
	m := newMem(1<<20, 4096)
	started, release := make(chan struct{}), make(chan struct{})
	m.writeHook = func(int64) error {
		close(started)
		<-release // until Shutdown has begun
		return nil
	}
	s, err := NewServer(Config{}, Export{Name: "d", Backend: m})
	if err != nil {
		t.Fatal(err)
	}
	l, err := netListen(t)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	c := dial(t, l.Addr().String())
	c.connect("d", connectOpts{})
	idle := dial(t, l.Addr().String()) // stuck in handshake
	idle.hello(clientFixedNewstyle)
	c.request(cmdWrite, 0, 1, 0, 4, []byte("last"))
	<-started
	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(context.Background()) }()
	testutil.WaitFor(t, "Shutdown to begin", s.isClosing)
	// The handshaking connection is cut at once, the write still runs.
	idle.expectClosed()
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) while a write was in flight", err)
	default:
	}
	close(release)
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	if errno, _, _ := c.simpleReply(0); errno != 0 {
		t.Fatalf("in-flight write errno %d", errno)
	}
	c.expectClosed()
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	if m.flushes.Load() < 1 || string(m.data[:4]) != "last" {
		t.Fatalf("flushes %d data %q", m.flushes.Load(), m.data[:4])
	}
}

func TestFlusherGroupCommit(t *testing.T) {
	m := newMem(4096, 512)
	gate := make(chan struct{})
	var calls atomic.Int64
	m.flushHook = func() error {
		if calls.Add(1) == 1 {
			<-gate // hold the first flush while others queue up
		}
		return nil
	}
	f := &flusher{b: m}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); f.Flush() }()
	testutil.WaitFor(t, "the first flush to start", func() bool { return calls.Load() == 1 })
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); f.Flush() }()
	}
	// All 20 queue behind the running flush before it ends.
	testutil.WaitFor(t, "20 callers waiting", func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.waiting == 20
	})
	close(gate)
	wg.Wait()
	if n := calls.Load(); n != 2 {
		t.Fatalf("%d backend flushes for 21 callers, want 2", n)
	}
	m.flushHook = func() error { return syscall.EIO }
	if err := f.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush error %v", err)
	}
}

func TestNewServerRejects(t *testing.T) {
	m := newMem(4096, 512)
	cases := map[string]struct {
		cfg  Config
		exps []Export
	}{
		"no exports":   {Config{}, nil},
		"nil backend":  {Config{}, []Export{{Name: "x"}}},
		"duplicate":    {Config{}, []Export{{Name: "x", Backend: m}, {Name: "x", Backend: m}}},
		"tls no conf":  {Config{TLS: TLSRequire}, []Export{{Name: "x", Backend: m}}},
		"tiny payload": {Config{MaxPayload: 4096}, []Export{{Name: "x", Backend: m}}},
	}
	for name, tc := range cases {
		if _, err := NewServer(tc.cfg, tc.exps...); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: %v, want ErrConfig", name, err)
		}
	}
	for _, s := range []string{"off", "on", "require"} {
		if m, err := ParseTLSMode(s); err != nil || m.String() != s {
			t.Errorf("ParseTLSMode(%q) = %v, %v", s, m, err)
		}
	}
	if _, err := ParseTLSMode("maybe"); !errors.Is(err, ErrConfig) {
		t.Errorf("ParseTLSMode(maybe): %v", err)
	}
}

func TestIdleTimeout(t *testing.T) {
	m := newMem(1<<20, 4096)
	_, addr := startServer(t, Config{IdleTimeout: 200 * time.Millisecond}, Export{Name: "d", Backend: m})
	c := dial(t, addr)
	c.connect("d", connectOpts{})
	// The idle timer restarts after each request is read, so the close
	// cannot come sooner than the timeout after the request is sent.
	start := time.Now()
	c.request(cmdFlush, 0, 1, 0, 0, nil)
	if errno, _, _ := c.simpleReply(0); errno != 0 {
		t.Fatalf("flush errno %d", errno)
	}
	c.expectClosed()
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Fatalf("closed after %v, before the idle timeout", d)
	}
}

// TestUnframedGo speaks like github.com/pojntfx/go-nbd v0.3.2's client
// (used by `sparsedisk attach`): client flags 0 and a GO whose header says
// length 0, followed by its data.
func TestUnframedGo(t *testing.T) {
	m := newMem(1<<20, 4096)
	unframed := func(c *client, name string) {
		b := be.AppendUint64(nil, magicOpt)
		b = be.AppendUint32(b, optGo)
		b = be.AppendUint32(b, 0)
		b = be.AppendUint32(b, uint32(len(name)))
		b = append(b, name...)
		c.write(be.AppendUint16(b, 0))
	}
	_, addr := startServer(t, Config{AcceptUnframedGo: true}, Export{Name: "disk", Backend: m})
	c := dial(t, addr)
	c.hello(0)
	unframed(c, "disk")
	var infos []uint16
	for {
		r := c.optReply()
		if r.typ == repAck {
			break
		}
		if r.typ != repInfo {
			t.Fatalf("reply %#x", r.typ)
		}
		infos = append(infos, be.Uint16(r.data))
	}
	// go-nbd's client rejects unknown info types: only EXPORT and BLOCK_SIZE.
	if len(infos) != 2 || infos[0] != infoExport || infos[1] != infoBlockSize {
		t.Fatalf("infos %v", infos)
	}
	c.request(cmdWrite, 0, 1, 4096, 4096, pattern(4096, 1))
	if errno, _, _ := c.simpleReply(0); errno != 0 {
		t.Fatalf("write errno %d", errno)
	}

	// Without the option, the same bytes are a malformed GO.
	_, addr = startServer(t, Config{HandshakeTimeout: time.Second}, Export{Name: "disk", Backend: m})
	c = dial(t, addr)
	c.hello(0)
	unframed(c, "disk")
	if r := c.optReply(); r.typ != repErrInvalid {
		t.Fatalf("reply %#x, want NBD_REP_ERR_INVALID", r.typ)
	}
	c.expectClosed() // the rest is read as an option header with a bad magic
}
