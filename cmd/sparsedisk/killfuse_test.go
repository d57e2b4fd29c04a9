package main

import (
	"bytes"
	enc "encoding/binary"
	"hash/crc64"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"golang.org/x/sys/unix"
)

// kfSector is the unit the FUSE kill harness stamps and classifies; the
// test image (testImage) has 4 KiB sectors too.
const kfSector = 4096

// kfMagic starts every stamp.
var kfMagic = [8]byte{'K', 'F', 'S', 'T', 'A', 'M', 'P', '1'}

var kfCRC = crc64.MakeTable(crc64.ECMA)

// kfStamp fills b (one sector) with the stamp of write id to sector s:
// magic, sector, id, a filler derived from both, and a CRC of the rest.
func kfStamp(b []byte, s int64, id uint64) {
	copy(b, kfMagic[:])
	enc.LittleEndian.PutUint64(b[8:], uint64(s))
	enc.LittleEndian.PutUint64(b[16:], id)
	x := uint64(s)<<40 ^ id*0x9e3779b97f4a7c15
	for i := 24; i < kfSector-8; i += 8 {
		x = x*6364136223846793005 + 1442695040888963407
		enc.LittleEndian.PutUint64(b[i:], x)
	}
	enc.LittleEndian.PutUint64(b[kfSector-8:], crc64.Checksum(b[:kfSector-8], kfCRC))
}

// kfClass is what a sector read back holds.
type kfClass int

const (
	kfZero    kfClass = iota // all zeros
	kfStamped                // a well-formed stamp (sector and id decoded)
	kfGarbage                // anything else
)

func kfClassify(b []byte) (kfClass, int64, uint64) {
	if bytes.Equal(b, make([]byte, kfSector)) {
		return kfZero, 0, 0
	}
	if !bytes.Equal(b[:8], kfMagic[:]) || enc.LittleEndian.Uint64(b[kfSector-8:]) != crc64.Checksum(b[:kfSector-8], kfCRC) {
		return kfGarbage, 0, 0
	}
	return kfStamped, int64(enc.LittleEndian.Uint64(b[8:])), enc.LittleEndian.Uint64(b[16:])
}

// kfLedger is what the harness knows about every sector in one round.
// Each sector is written by one goroutine only, so its writes are ordered.
type kfLedger struct {
	mu sync.Mutex // protects everything below
	// base is the sector's content at the start of the round, as verified
	// (0: zeros, else a write id).
	base []uint64
	// sent lists the ids of this round's writes to the sector, in order,
	// recorded before each pwrite is issued.
	sent [][]uint64
	// acked is the number of sent writes whose pwrite returned success.
	acked []int
	// durable is the number of sent writes covered by a completed fsync:
	// acknowledged before an fsync that then returned success.
	durable []int

	writes, ackedWrites, fsyncs int
}

func newKFLedger(n int) *kfLedger {
	return &kfLedger{base: make([]uint64, n)}
}

func (l *kfLedger) startRound() {
	n := len(l.base)
	l.sent, l.acked, l.durable = make([][]uint64, n), make([]int, n), make([]int, n)
}

// kfWriter owns sectors [lo, hi) and writes runs of stamped sectors into
// them through f, with an fsync now and then, until an I/O error (the
// mount process was killed) or stop. With churn, a quarter of its
// operations punch holes instead (recorded as writes of id 0: zeros).
func kfWriter(f *os.File, l *kfLedger, rng *rand.Rand, nextID func() uint64, lo, hi int64, churn bool, stop <-chan struct{}) {
	buf := make([]byte, 8*kfSector)
	for {
		select {
		case <-stop:
			return
		default:
		}
		if rng.IntN(10) == 0 {
			l.mu.Lock()
			snap := append([]int(nil), l.acked...)
			l.mu.Unlock()
			if err := f.Sync(); err != nil {
				return
			}
			l.mu.Lock()
			for s, n := range snap {
				l.durable[s] = max(l.durable[s], n)
			}
			l.fsyncs++
			l.mu.Unlock()
			continue
		}
		n := 1 + rng.Int64N(8)
		s := lo + rng.Int64N(hi-lo-n+1)
		if churn && rng.IntN(4) == 0 {
			l.mu.Lock()
			for k := range n {
				l.sent[s+k] = append(l.sent[s+k], 0)
			}
			l.writes++
			l.mu.Unlock()
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, s*kfSector, n*kfSector); err != nil {
				return
			}
			l.mu.Lock()
			for k := range n {
				l.acked[s+k] = len(l.sent[s+k])
			}
			l.ackedWrites++
			l.mu.Unlock()
			continue
		}
		l.mu.Lock()
		for k := range n {
			id := nextID()
			l.sent[s+k] = append(l.sent[s+k], id)
			kfStamp(buf[k*kfSector:(k+1)*kfSector], s+k, id)
		}
		l.writes++
		l.mu.Unlock()
		if _, err := f.WriteAt(buf[:n*kfSector], s*kfSector); err != nil {
			return
		}
		l.mu.Lock()
		for k := range n {
			l.acked[s+k] = len(l.sent[s+k])
		}
		l.ackedWrites++
		l.mu.Unlock()
	}
}

// kfVerify reads every sector through r and checks it against the
// ledger: a sector must hold the last write covered by a completed fsync
// or a later write to it; with no such write, its content at the start of
// the round or any write of this round to it. Zeros are allowed only where
// that rule allows the start-of-round zeros. It then makes what it read
// the next round's base, and returns the stamped sectors verified and the
// violations.
func kfVerify(t *testing.T, r io.ReaderAt, l *kfLedger, where string) (verified, violations int) {
	t.Helper()
	n := int64(len(l.base))
	data := make([]byte, n*kfSector)
	if _, err := r.ReadAt(data, 0); err != nil {
		t.Fatalf("%s: read the disk: %v", where, err)
	}
	for s := int64(0); s < n; s++ {
		class, sec, id := kfClassify(data[s*kfSector : (s+1)*kfSector])
		var allowed []uint64 // ids allowed; 0 = zeros
		if d := l.durable[s]; d > 0 {
			allowed = l.sent[s][d-1:]
		} else {
			allowed = append([]uint64{l.base[s]}, l.sent[s]...)
		}
		bad := ""
		switch {
		case class == kfGarbage:
			bad = "garbage (neither zeros nor a whole stamp)"
		case class == kfStamped && sec != s:
			bad = "the stamp of sector " + strconv.FormatInt(sec, 10)
		default:
			found := false
			for _, a := range allowed {
				found = found || a == id
			}
			if !found && class == kfZero {
				bad = "zeros, but an fsynced write is missing"
			} else if !found {
				bad = "stamp of write " + strconv.FormatUint(id, 10) + ", never written there or older than an fsynced write"
			}
		}
		if bad != "" {
			violations++
			if violations <= 10 {
				t.Errorf("%s: sector %d holds %s (allowed ids %v)", where, s, bad, allowed)
			}
			continue
		}
		l.base[s] = id
		if class == kfStamped {
			verified++
		}
	}
	return verified, violations
}

func kfRounds() int {
	if n, err := strconv.Atoi(os.Getenv("SPARSEDISK_KILL_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return 10
}

// TestKillCrashFUSE runs `sparsedisk mount` as a child, writes stamped
// sectors through the mounted file from two goroutines with fsyncs at
// random points, SIGKILLs the mount at a random moment with writes in
// flight, clears the stale mount, remounts and checks every sector: every
// write acknowledged before the last completed fsync is there (or a later
// write to that sector), and no sector holds a stamp never written to it or
// garbage. After the last round Check must find no corruption.
// SPARSEDISK_KILL_ROUNDS sets the rounds (default 10), SPARSEDISK_KILL_SEED
// replays a seed.
func TestKillCrashFUSE(t *testing.T) {
	testutil.NeedFUSE(t)
	rounds := kfRounds()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SPARSEDISK_KILL_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("seed %d (SPARSEDISK_KILL_SEED=%d to replay the choices; timing still varies)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0xf05e))
	binary(t) // build before the first round's clock starts
	image := testImage(t)
	const sectors = 16 << 20 / kfSector
	l := newKFLedger(sectors)
	var idMu sync.Mutex
	var lastID uint64
	nextID := func() uint64 {
		idMu.Lock()
		defer idMu.Unlock()
		lastID++
		return lastID
	}
	var totalVerified, totalViolations, staleUmounts int
	var totalWrites, totalAcked, totalFsyncs, compactions int
	start := time.Now()
	for round := range rounds {
		// The compactor runs (mount's default) and looks for work often;
		// odd rounds churn: writers stay in an eighth of their range and
		// punch holes too, so slots are freed, reused and moved.
		churn := round%2 == 1
		p := startMount(t, image, killCompactArgs()...)
		if round > 0 {
			rf, err := os.Open(p.file)
			if err != nil {
				t.Fatal(err)
			}
			v, bad := kfVerify(t, rf, l, "round "+strconv.Itoa(round)+" after remount")
			rf.Close() // open files would keep the next kill's mount busy
			totalVerified += v
			totalViolations += bad
			if bad > 0 {
				t.Fatalf("round %d: %d violations (seed %d)", round, bad, seed)
			}
		}
		l.startRound()
		f, err := os.OpenFile(p.file, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		const writers = 2
		for w := range writers {
			wr := rand.New(rand.NewPCG(rng.Uint64(), uint64(w)))
			lo, hi := int64(w)*sectors/writers, int64(w+1)*sectors/writers
			if churn {
				hi = lo + (hi-lo)/8
			}
			wg.Go(func() { kfWriter(f, l, wr, nextID, lo, hi, churn, stop) })
		}
		time.Sleep(time.Duration(20+rng.IntN(250)) * time.Millisecond)
		if err := p.cmd.Process.Kill(); err != nil {
			t.Fatalf("kill: %v", err)
		}
		p.wait(t)
		compactions += strings.Count(p.stderr.String(), "compactor ")
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			close(stop)
			t.Fatalf("round %d: writers still blocked 30 s after the mount process died", round)
		}
		f.Close() // the connection is gone: the error says nothing
		// Clear the stale mount the way a user would.
		if _, errOut, code := sdRun(t, "umount", p.dir); code != 0 {
			t.Errorf("round %d: umount of the stale mount: exit %d %s", round, code, errOut)
			_ = unix.Unmount(p.dir, unix.MNT_DETACH)
		} else {
			staleUmounts++
		}
		l.mu.Lock()
		totalWrites += l.writes
		totalAcked += l.ackedWrites
		totalFsyncs += l.fsyncs
		l.writes, l.ackedWrites, l.fsyncs = 0, 0, 0
		l.mu.Unlock()
	}
	// The last round is verified offline: Check first, then the data.
	r, err := blockif.Check(image, nil)
	if err != nil {
		t.Fatalf("check after the last kill: %v", err)
	}
	if r.Corruptions > 0 {
		t.Fatalf("check after the last kill: %d corruption(s): %v (seed %d)", r.Corruptions, r.Findings, seed)
	}
	d, err := blockif.Open(image, &blockif.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	v, bad := kfVerify(t, d, l, "after the last kill")
	d.Close()
	totalVerified += v
	totalViolations += bad
	if bad > 0 {
		t.Fatalf("after the last kill: %d violations (seed %d)", bad, seed)
	}
	if totalAcked == 0 || totalFsyncs == 0 {
		t.Fatalf("the workload did nothing: %d acknowledged writes, %d fsyncs", totalAcked, totalFsyncs)
	}
	t.Logf("%d rounds in %v: %d writes and punches sent (%d acknowledged), %d fsyncs completed, %d SIGKILLs, %d stale mounts cleared by `sparsedisk umount`, %d non-zero sectors verified, check: %d corruptions, %d leaked slots, %d compactor log lines; violations=%d",
		rounds, time.Since(start).Round(time.Millisecond), totalWrites, totalAcked, totalFsyncs, rounds, staleUmounts, totalVerified, r.Corruptions, r.LeakedSlots, compactions, totalViolations)
	if len(killCompactArgs()) > 1 && compactions == 0 {
		t.Errorf("the compactor never moved or truncated anything in %d rounds", rounds)
	}
	testutil.Figure("TestKillCrashFUSE", "%d rounds, %d writes acknowledged, %d fsyncs, %d stale mounts cleared, %d sectors verified, %d violations",
		rounds, totalAcked, totalFsyncs, staleUmounts, totalVerified, totalViolations)
}
