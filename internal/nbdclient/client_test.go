package nbdclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/nbd"
)

const sector = 4096

// serve starts an in-process nbd.Server on a loopback port with a fresh
// sparse image (export "disk", the default) and a read-only export "ro"
// of a second image. The server and images are shut down when the test
// ends.
func serve(t *testing.T, cfg nbd.Config, size int64) string {
	t.Helper()
	open := func(name string, ro bool) *blockif.Disk {
		path := filepath.Join(t.TempDir(), name)
		p := format.Params{Layout: format.LayoutSparse, Size: size, Split: 1 << 20, SectorSize: sector}
		if err := blockif.Create(path, p, nil); err != nil {
			t.Fatal(err)
		}
		d, err := blockif.Open(path, &blockif.Options{ReadOnly: ro})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	rw, ro := open("disk.img", false), open("ro.img", true)
	srv, err := nbd.NewServer(cfg, nbd.Export{Name: "disk", Backend: rw}, nbd.Export{Name: "ro", Backend: ro})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
		for _, d := range []*blockif.Disk{rw, ro} {
			if err := d.Close(); err != nil {
				t.Errorf("close image: %v", err)
			}
		}
	})
	return l.Addr().String()
}

func dial(t *testing.T, addr, export string) *Client {
	t.Helper()
	c, err := Dial("tcp", addr, export, &Options{HandshakeTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func fill(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*13) ^ seed | 1
	}
	return b
}

func TestHandshake(t *testing.T) {
	addr := serve(t, nbd.Config{}, 8<<20)
	for _, name := range []string{"disk", ""} { // "" is the default export
		c := dial(t, addr, name)
		if c.Size() != 8<<20 || c.ReadOnly() {
			t.Errorf("export %q: size %d read-only %v", name, c.Size(), c.ReadOnly())
		}
		want := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn
		if c.Flags()&want != want {
			t.Errorf("export %q: flags %#x lack %#x", name, c.Flags(), want)
		}
		if mn, pref, mx := c.BlockSize(); mn != 1 || pref != sector || mx != nbd.DefaultMaxPayload {
			t.Errorf("block sizes %d/%d/%d", mn, pref, mx)
		}
	}
	ro := dial(t, addr, "ro")
	if !ro.ReadOnly() {
		t.Error("export ro not read-only")
	}

	_, err := Dial("tcp", addr, "missing", nil)
	var oe *OptionError
	if !errors.As(err, &oe) || oe.Reply != repErrUnknown || oe.Option != optGo || !errors.Is(err, ErrRefused) {
		t.Errorf("unknown export: %v", err)
	}
	if _, err := Dial("tcp", addr, string(make([]byte, maxNameLen+1)), nil); !errors.Is(err, ErrRange) {
		t.Errorf("overlong name: %v", err)
	}
}

// TestRequests runs each command against a real server and checks the
// result, including the server's error values.
func TestRequests(t *testing.T) {
	// A strict minimum block size, so that an unaligned request from this
	// client (which asks for block sizes) is an error to check.
	addr := serve(t, nbd.Config{MinBlock: sector}, 8<<20)
	c := dial(t, addr, "disk")
	ro := dial(t, addr, "ro")
	size := c.Size()
	zero := make([]byte, 3*sector)
	data := fill(3*sector, 7)

	type step struct {
		name  string
		do    func() error
		errno syscall.Errno // expected server error, 0 = success
		is    error         // expected local error (errors.Is)
		after []byte        // expected content of [sector, 4*sector) after the step
	}
	w := func(p []byte, off int64) func() error {
		return func() error { _, err := c.WriteAt(p, off); return err }
	}
	steps := []step{
		{name: "fresh image reads zeros", do: func() error { return nil }, after: zero},
		{name: "write", do: w(data, sector), after: data},
		{name: "flush", do: c.Flush, after: data},
		{name: "trim middle sector", do: func() error { return c.Trim(2*sector, sector) },
			after: append(append(append([]byte{}, data[:sector]...), zero[:sector]...), data[2*sector:]...)},
		{name: "FUA write", do: func() error { _, err := c.WriteAtFUA(fill(3*sector, 9), sector); return err }, after: fill(3*sector, 9)},
		{name: "write zeroes no-hole", do: func() error { return c.WriteZeroes(sector, sector, true) },
			after: append(append([]byte{}, zero[:sector]...), fill(3*sector, 9)[sector:]...)},
		{name: "write zeroes", do: func() error { return c.WriteZeroes(sector, 3*sector, false) }, after: zero},
		{name: "unaligned read", do: func() error { _, err := c.ReadAt(make([]byte, 100), 1); return err }, errno: syscall.EINVAL, after: zero},
		{name: "write past the end", do: w(data, size-sector), errno: syscall.ENOSPC, after: zero},
		{name: "trim past the end", do: func() error { return c.Trim(size, sector) }, errno: syscall.EINVAL, after: zero},
		{name: "write to read-only export", do: func() error { _, err := ro.WriteAt(data, 0); return err }, errno: syscall.EPERM, after: zero},
		{name: "trim on read-only export", do: func() error { return ro.Trim(0, sector) }, is: ErrUnsupported, after: zero},
		{name: "negative offset", do: w(data, -sector), is: ErrRange, after: zero},
		{name: "empty write", do: w(nil, 0), after: zero},
	}
	for _, s := range steps {
		err := s.do()
		switch {
		case s.errno != 0:
			var e *Error
			if !errors.As(err, &e) || syscall.Errno(e.Errno) != s.errno || !errors.Is(err, s.errno) {
				t.Errorf("%s: got %v, want server error %v", s.name, err, s.errno)
			} else if e.Op == "" {
				t.Errorf("%s: error without operation: %v", s.name, err)
			}
		case s.is != nil:
			if !errors.Is(err, s.is) {
				t.Errorf("%s: got %v, want %v", s.name, err, s.is)
			}
		case err != nil:
			t.Errorf("%s: %v", s.name, err)
		}
		got := make([]byte, 3*sector)
		if n, err := c.ReadAt(got, sector); err != nil || n != len(got) {
			t.Fatalf("%s: read back: %d %v", s.name, n, err)
		}
		if !bytes.Equal(got, s.after) {
			t.Errorf("%s: content differs from expected", s.name)
		}
	}

	// io.ReaderAt behaviour at the end of the export.
	tail := make([]byte, 2*sector)
	if n, err := c.ReadAt(tail, size-sector); n != sector || err != io.EOF {
		t.Errorf("read across the end: %d %v", n, err)
	}
	if n, err := c.ReadAt(tail, size); n != 0 || err != io.EOF {
		t.Errorf("read at the end: %d %v", n, err)
	}
	// A failed request leaves the connection usable.
	if _, err := c.WriteAt(data, 0); err != nil {
		t.Errorf("write after errors: %v", err)
	}
}

// TestSplitPayload writes and reads more than the server's maximum payload:
// the client must split the request.
func TestSplitPayload(t *testing.T) {
	addr := serve(t, nbd.Config{MaxPayload: 1 << 20}, 8<<20)
	c := dial(t, addr, "disk")
	if _, _, mx := c.BlockSize(); mx != 1<<20 {
		t.Fatalf("max payload %d", mx)
	}
	data := fill(3<<20+sector, 3)
	if _, err := c.WriteAt(data, 5*sector); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := c.ReadAt(got, 5*sector); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("split read: %v, equal %v", err, bytes.Equal(got, data))
	}
}

// TestConcurrent has many goroutines share one connection, each on its
// own sectors, writing, flushing and reading back.
func TestConcurrent(t *testing.T) {
	addr := serve(t, nbd.Config{}, 8<<20)
	c := dial(t, addr, "disk")
	const workers, rounds = 32, 40
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for i := range rounds {
				// Worker w owns sectors w, w+workers, w+2*workers, ...
				off := int64(w+workers*rng.IntN(int(c.Size()/sector/workers))) * sector
				data := fill(sector, byte(w*rounds+i))
				var err error
				if i%5 == 0 {
					_, err = c.WriteAtFUA(data, off)
				} else {
					_, err = c.WriteAt(data, off)
				}
				if err == nil && i%7 == 0 {
					err = c.Flush()
				}
				got := make([]byte, sector)
				if err == nil {
					_, err = c.ReadAt(got, off)
				}
				if err == nil && !bytes.Equal(got, data) {
					err = fmt.Errorf("worker %d: sector at %d reads back wrong", w, off)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestClose(t *testing.T) {
	addr := serve(t, nbd.Config{}, 8<<20)
	c := dial(t, addr, "disk")
	// Requests in flight when Close is called are answered first: every
	// one of them succeeds and its data is on the disk.
	var wg sync.WaitGroup
	results := make([]error, 8)
	for i := range results {
		wg.Go(func() { _, results[i] = c.WriteAt(fill(64<<10, byte(i+1)), int64(i)<<16) })
	}
	testutil.WaitFor(t, "8 writes in flight", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.cookie == uint64(len(results)) // each registered before it is sent
	})
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	wg.Wait()
	for i, err := range results {
		if err != nil {
			t.Errorf("write %d in flight at Close: %v", i, err)
		}
	}
	if _, err := c.ReadAt(make([]byte, sector), 0); !errors.Is(err, ErrClosed) {
		t.Errorf("read after close: %v", err)
	}
	if err := c.Flush(); !errors.Is(err, ErrClosed) {
		t.Errorf("flush after close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	// The server saw a clean disconnect: a new connection works and
	// reads what the writes in flight wrote.
	c2 := dial(t, addr, "disk")
	for i := range results {
		got := make([]byte, 64<<10)
		if _, err := c2.ReadAt(got, int64(i)<<16); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, fill(64<<10, byte(i+1))) {
			t.Errorf("write %d, answered before Close, is not on the disk", i)
		}
	}
}

// fakeServer negotiates export "x" (size 1 MiB, flags flush+trim) on the
// server end of a pipe and then runs script on it.
func fakeServer(t *testing.T, script func(nc net.Conn)) *Client {
	t.Helper()
	cs, ss := net.Pipe()
	go func() {
		defer ss.Close()
		g := be.AppendUint64(nil, magicInit)
		g = be.AppendUint64(g, magicOpt)
		g = be.AppendUint16(g, hflagFixedNewstyle|hflagNoZeroes)
		if _, err := ss.Write(g); err != nil {
			return
		}
		hdr := make([]byte, 4+16)
		if _, err := io.ReadFull(ss, hdr); err != nil {
			return
		}
		if _, err := io.ReadFull(ss, make([]byte, be.Uint32(hdr[16:]))); err != nil {
			return
		}
		rep := func(typ uint32, body []byte) []byte {
			b := be.AppendUint64(nil, magicOptReply)
			b = be.AppendUint32(b, optGo)
			b = be.AppendUint32(b, typ)
			b = be.AppendUint32(b, uint32(len(body)))
			return append(b, body...)
		}
		info := be.AppendUint16(nil, infoExport)
		info = be.AppendUint64(info, 1<<20)
		info = be.AppendUint16(info, FlagHasFlags|FlagSendFlush|FlagSendTrim)
		if _, err := ss.Write(append(rep(repInfo, info), rep(repAck, nil)...)); err != nil {
			return
		}
		script(ss)
	}()
	c, err := New(cs, "x", &Options{HandshakeTimeout: 5 * time.Second, CloseTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readRequest reads one request header from the client.
func readRequest(nc net.Conn) (typ uint16, cookie uint64, err error) {
	h := make([]byte, requestLen)
	if _, err = io.ReadFull(nc, h); err != nil {
		return
	}
	return be.Uint16(h[6:]), be.Uint64(h[8:]), nil
}

func reply(nc net.Conn, magic, errno uint32, cookie uint64) {
	b := be.AppendUint32(nil, magic)
	b = be.AppendUint32(b, errno)
	b = be.AppendUint64(b, cookie)
	nc.Write(b)
}

// TestBrokenServer checks that protocol violations and a vanishing server
// fail requests with ErrDisconnected instead of hanging, and that replies
// out of order reach the right callers.
func TestBrokenServer(t *testing.T) {
	t.Run("out of order", func(t *testing.T) {
		// The server answers the second request it reads first; a
		// FLUSH fails with EIO, a TRIM succeeds. Each caller must get
		// its own request's answer, whichever was sent first.
		c := fakeServer(t, func(nc net.Conn) {
			errno := func(typ uint16) uint32 {
				if typ == cmdFlush {
					return 5 // EIO
				}
				return 0
			}
			t1, c1, _ := readRequest(nc)
			t2, c2, _ := readRequest(nc)
			reply(nc, magicSimpleReply, errno(t2), c2)
			reply(nc, magicSimpleReply, errno(t1), c1)
			readRequest(nc) // DISC
		})
		flushErr, trimErr := make(chan error, 1), make(chan error, 1)
		go func() { flushErr <- c.Flush() }()
		go func() { trimErr <- c.Trim(0, sector) }()
		if err := <-flushErr; !errors.Is(err, syscall.EIO) {
			t.Errorf("flush: %v, want EIO (its own reply)", err)
		}
		if err := <-trimErr; err != nil {
			t.Errorf("trim: %v, want success (its own reply)", err)
		}
	})
	t.Run("unknown cookie", func(t *testing.T) {
		c := fakeServer(t, func(nc net.Conn) {
			_, ck, _ := readRequest(nc)
			reply(nc, magicSimpleReply, 0, ck+100)
		})
		if err := c.Flush(); !errors.Is(err, ErrProtocol) || !errors.Is(err, ErrDisconnected) {
			t.Errorf("flush: %v", err)
		}
		if err := c.Flush(); !errors.Is(err, ErrDisconnected) {
			t.Errorf("flush after failure: %v", err)
		}
	})
	t.Run("structured reply magic", func(t *testing.T) {
		c := fakeServer(t, func(nc net.Conn) {
			_, ck, _ := readRequest(nc)
			reply(nc, 0x668e33ef, 0, ck)
		})
		if err := c.Flush(); !errors.Is(err, ErrProtocol) {
			t.Errorf("flush: %v", err)
		}
	})
	t.Run("hang up with data pending", func(t *testing.T) {
		c := fakeServer(t, func(nc net.Conn) {
			_, ck, _ := readRequest(nc)
			reply(nc, magicSimpleReply, 0, ck) // header, then no data
		})
		if _, err := c.ReadAt(make([]byte, sector), 0); !errors.Is(err, ErrDisconnected) {
			t.Errorf("read: %v", err)
		}
	})
	t.Run("unadvertised commands", func(t *testing.T) {
		c := fakeServer(t, func(nc net.Conn) { readRequest(nc) })
		if _, err := c.WriteAtFUA(make([]byte, sector), 0); !errors.Is(err, ErrUnsupported) {
			t.Errorf("FUA: %v", err)
		}
		if err := c.WriteZeroes(0, sector, false); !errors.Is(err, ErrUnsupported) {
			t.Errorf("write zeroes: %v", err)
		}
	})
	t.Run("refused", func(t *testing.T) {
		cs, ss := net.Pipe()
		go func() {
			defer ss.Close()
			g := be.AppendUint64(nil, magicInit)
			g = be.AppendUint64(g, magicOpt)
			ss.Write(be.AppendUint16(g, hflagFixedNewstyle))
			hdr := make([]byte, 4+16)
			io.ReadFull(ss, hdr)
			io.ReadFull(ss, make([]byte, be.Uint32(hdr[16:])))
			b := be.AppendUint64(nil, magicOptReply)
			b = be.AppendUint32(b, optGo)
			b = be.AppendUint32(b, repErrTLSReqd)
			b = be.AppendUint32(b, 8)
			ss.Write(append(b, "use TLS!"...))
		}()
		_, err := New(cs, "x", nil)
		var oe *OptionError
		if !errors.As(err, &oe) || oe.Reply != repErrTLSReqd || oe.Message != "use TLS!" {
			t.Errorf("refusal: %v", err)
		}
	})
	t.Run("not newstyle", func(t *testing.T) {
		cs, ss := net.Pipe()
		go func() {
			defer ss.Close()
			ss.Write(make([]byte, 18))
		}()
		if _, err := New(cs, "x", nil); !errors.Is(err, ErrProtocol) {
			t.Errorf("greeting: %v", err)
		}
	})
}
