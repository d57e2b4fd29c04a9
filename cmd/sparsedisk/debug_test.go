package main

import (
	"encoding/json"
	"io"
	"net/http"
	"testing"
)

// TestDebugServer: the debug endpoints answer with the runtime's memory
// statistics and the pprof index.
func TestDebugServer(t *testing.T) {
	l, err := startDebugServer("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	base := "http://" + l.Addr().String()
	resp, err := http.Get(base + "/debug/vars")
	if err != nil {
		t.Fatal(err)
	}
	var vars struct {
		Memstats struct{ Mallocs uint64 }
	}
	err = json.NewDecoder(resp.Body).Decode(&vars)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if vars.Memstats.Mallocs == 0 {
		t.Fatalf("/debug/vars: memstats.Mallocs is 0")
	}
	resp, err = http.Get(base + "/debug/pprof/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || len(body) == 0 {
		t.Fatalf("/debug/pprof/: status %d, %d bytes", resp.StatusCode, len(body))
	}
}
