package main

import (
	"expvar"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
)

// debugAddrEnv names a TCP address on which any subcommand serves Go's
// runtime introspection over HTTP while it runs: /debug/pprof/ (CPU
// profile of a chosen window, heap, goroutines) and /debug/vars (expvar,
// including runtime.MemStats: the benchmark harness reads Mallocs before
// and after a fixed number of requests for the allocations per request).
// Meant for loopback; it has no authentication.
const debugAddrEnv = "SPARSEDISK_DEBUG_ADDR"

// startDebugServer serves the debug endpoints on addr until the process
// exits and returns the listener (its address when addr's port is 0).
func startDebugServer(addr string) (net.Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", debugAddrEnv, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.Handle("/debug/vars", expvar.Handler())
	go func() {
		if err := http.Serve(l, mux); err != nil {
			fmt.Fprintf(os.Stderr, "sparsedisk: %s: %v\n", debugAddrEnv, err)
		}
	}()
	return l, nil
}
