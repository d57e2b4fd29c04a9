package nbd

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// pipeConn is a net.Conn that reads a fixed client stream and records
// what the server writes; it lets the fuzz targets drive the real
// handshake and request loop without sockets.
type pipeConn struct {
	r *bytes.Reader
	w bytes.Buffer
}

func (p *pipeConn) Read(b []byte) (int, error)       { return p.r.Read(b) }
func (p *pipeConn) Write(b []byte) (int, error)      { return p.w.Write(b) }
func (p *pipeConn) Close() error                     { return nil }
func (p *pipeConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (p *pipeConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (p *pipeConn) SetDeadline(time.Time) error      { return nil }
func (p *pipeConn) SetReadDeadline(time.Time) error  { return nil }
func (p *pipeConn) SetWriteDeadline(time.Time) error { return nil }

func fuzzServer(t testing.TB) *Server {
	s, err := NewServer(Config{MaxPayload: 1 << 20},
		Export{Name: "disk", Description: "fuzz", Backend: newMem(64<<10, 512)},
		Export{Name: "ro", Backend: newMem(8<<10, 4096), ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func optionBytes(opt uint32, data []byte) []byte {
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// handshakeSeeds are valid and near-valid client streams.
func handshakeSeeds() [][]byte {
	flags := be.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	meta := appendMetaRequest(nil, metaRequest{"disk", []string{metaBaseAllocation, "base:"}})
	return [][]byte{
		cat(flags, optionBytes(optList, nil), optionBytes(optAbort, nil)),
		cat(flags, optionBytes(optStructuredReply, nil), optionBytes(optListMetaContext, meta),
			optionBytes(optSetMetaContext, meta),
			optionBytes(optGo, appendInfoRequest(nil, infoRequest{"disk", []uint16{infoBlockSize, infoName, infoDescription}}))),
		cat(flags, optionBytes(optInfo, appendInfoRequest(nil, infoRequest{"", nil})), optionBytes(optExportName, []byte("ro"))),
		cat(be.AppendUint32(nil, 0), optionBytes(optExportName, nil)),
		cat(flags, optionBytes(optStartTLS, nil), optionBytes(77, []byte{1, 2, 3}), optionBytes(optGo, []byte{0, 0, 0, 200})),
	}
}

// FuzzHandshake feeds arbitrary client bytes to the option haggling. It
// must never panic, and everything the server sends before transmission
// must be well-formed.
func FuzzHandshake(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(s)
	}
	s := fuzzServer(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		pc := &pipeConn{r: bytes.NewReader(in)}
		c := newConn(s, pc)
		x, sess, err := c.handshake()
		if err == nil && (x == nil || sess == nil) {
			t.Fatal("handshake succeeded without an export")
		}
		out := pc.w.Bytes()
		if len(out) < 18 || be.Uint64(out) != magicInit || be.Uint64(out[8:]) != magicOpt {
			t.Fatalf("bad greeting % x", out[:min(len(out), 18)])
		}
		out = out[18:]
		for len(out) >= 20 && be.Uint64(out) == magicOptReply {
			n := int(be.Uint32(out[16:]))
			if len(out) < 20+n {
				t.Fatalf("option reply truncated")
			}
			out = out[20+n:]
		}
		// Anything left must be the EXPORT_NAME reply (10 or 134 bytes).
		if len(out) != 0 && len(out) != 10 && len(out) != 134 {
			t.Fatalf("%d unexplained bytes after option replies", len(out))
		}
	})
}

// requestSeeds are request streams for FuzzRequest.
func requestSeeds() [][]byte {
	var b []byte
	b = appendRequest(b, request{typ: cmdWrite, flags: cflagFUA, cookie: 1, offset: 100, length: 5})
	b = append(b, "hello"...)
	b = appendRequest(b, request{typ: cmdRead, cookie: 2, offset: 0, length: 4096})
	b = appendRequest(b, request{typ: cmdBlockStatus, cookie: 3, offset: 0, length: 64 << 10})
	b = appendRequest(b, request{typ: cmdTrim, cookie: 4, offset: 0, length: 512})
	b = appendRequest(b, request{typ: cmdWriteZeroes, flags: cflagNoHole, cookie: 5, offset: 512, length: 1024})
	b = appendRequest(b, request{typ: cmdFlush, cookie: 6})
	b = appendRequest(b, request{typ: cmdRead, flags: cflagDF, cookie: 7, offset: 60 << 10, length: 8 << 10})
	seeds := [][]byte{b, appendRequest(b, request{typ: cmdDisc})}
	seeds = append(seeds, appendRequest(nil, request{typ: cmdCache, cookie: 9, offset: 1 << 62, length: 1 << 31}))
	seeds = append(seeds, appendRequest(nil, request{typ: 99, flags: 0xffff, cookie: 10}))
	seeds = append(seeds, append(appendRequest(nil, request{typ: cmdWrite, cookie: 11, length: 1 << 30}), 1, 2, 3))
	return seeds
}

// FuzzRequest feeds arbitrary bytes to the transmission phase of a session
// with structured replies and base:allocation. It must never panic and
// every reply must be a whole, well-formed reply chunk.
func FuzzRequest(f *testing.F) {
	for _, s := range requestSeeds() {
		f.Add(s)
	}
	s := fuzzServer(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		pc := &pipeConn{r: bytes.NewReader(in)}
		c := newConn(s, pc)
		tr := &transmission{c: c, x: s.exports[0], nc: pc,
			sess: &session{structured: true, metaSet: true, metaExport: "disk"}}
		tr.lim.init(4, 1<<20)
		tr.run()
		out := pc.w.Bytes()
		for len(out) > 0 {
			if len(out) < 4 {
				t.Fatalf("truncated reply")
			}
			switch be.Uint32(out) {
			case magicSimpleReply:
				if len(out) < 16 {
					t.Fatalf("truncated simple reply")
				}
				out = out[16:]
			case magicStructuredReply:
				if len(out) < 20 {
					t.Fatalf("truncated chunk header")
				}
				n := int(be.Uint32(out[16:]))
				if len(out) < 20+n {
					t.Fatalf("truncated chunk payload")
				}
				out = out[20+n:]
			default:
				t.Fatalf("bad reply magic %#x", be.Uint32(out))
			}
		}
	})
}

// TestWriteFuzzCorpus regenerates testdata/fuzz from the seed functions
// when NBD_WRITE_CORPUS=1; otherwise it checks that the corpus exists.
func TestWriteFuzzCorpus(t *testing.T) {
	sets := map[string][][]byte{"FuzzHandshake": handshakeSeeds(), "FuzzRequest": requestSeeds()}
	for name, seeds := range sets {
		dir := filepath.Join("testdata", "fuzz", name)
		if os.Getenv("NBD_WRITE_CORPUS") != "1" {
			if ents, err := os.ReadDir(dir); err != nil || len(ents) == 0 {
				t.Errorf("seed corpus %s missing (run with NBD_WRITE_CORPUS=1)", dir)
			}
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, s := range seeds {
			body := fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(s)))
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
