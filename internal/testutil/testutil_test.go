package testutil

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	switch ChildRole() {
	case "":
		os.Exit(m.Run())
	case "echo":
		os.Stdout.WriteString(strings.Join(ChildArgs(), " "))
		os.Exit(0)
	}
	os.Exit(3)
}

// recorder is a testing.TB that records Fatalf and Skipf instead of
// ending the test.
type recorder struct {
	testing.TB
	fatal, skip string
}

func (r *recorder) Helper()                        {}
func (r *recorder) Fatalf(format string, a ...any) { r.fatal = fmt.Sprintf(format, a...) }
func (r *recorder) Skipf(format string, a ...any)  { r.skip = fmt.Sprintf(format, a...) }

// TestUnavailable: a missing prerequisite skips the test locally and fails
// it under CI=true.
func TestUnavailable(t *testing.T) {
	t.Setenv("CI", "true")
	r := &recorder{}
	Unavailable(r, "no %s", "widget")
	if r.fatal != "CI=true but no widget" || r.skip != "" {
		t.Errorf("CI=true: fatal %q, skip %q; want a failure, no skip", r.fatal, r.skip)
	}
	t.Setenv("CI", "")
	r = &recorder{}
	Unavailable(r, "no %s", "widget")
	if r.fatal != "" || r.skip != "no widget" {
		t.Errorf("CI unset: fatal %q, skip %q; want a skip", r.fatal, r.skip)
	}
}

func TestChildCommand(t *testing.T) {
	out, err := ChildCommand("echo", nil, "a", "--", "b").Output()
	if err != nil || string(out) != "a -- b" {
		t.Fatalf("child printed %q, %v; want \"a -- b\"", out, err)
	}
}

func TestAwait(t *testing.T) {
	var n atomic.Int32
	go func() {
		for range 3 {
			n.Add(1)
		}
	}()
	if err := Await(WaitTimeout, func() bool { return n.Load() == 3 }); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := Await(50*time.Millisecond, func() bool { return false }); err == nil {
		t.Fatal("Await of a condition never true returned nil")
	}
	if time.Since(start) < 50*time.Millisecond {
		t.Fatal("Await gave up before its limit")
	}
}

func TestSyncBuffer(t *testing.T) {
	var b SyncBuffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 100 {
			b.Write([]byte("x"))
		}
	}()
	for b.Len() < 100 {
		_ = b.String()
	}
	<-done
	if b.String() != strings.Repeat("x", 100) {
		t.Fatalf("got %q", b.String())
	}
}
