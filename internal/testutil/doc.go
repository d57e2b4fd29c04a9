// Package testutil holds the helpers the test suites of sparsedisk share:
// prerequisite checks that skip locally but fail under CI=true, waiting on
// a condition with a deadline instead of sleeping, a thread-safe buffer, a
// size-limited tmpfs for fault tests and re-executing the test binary as a
// child process.
//
// It is imported by _test.go files only.
//
// # CI
//
// A test needing FUSE, root, a loop device or a peer tool skips when that
// is missing, except under CI=true (exported by .ci/run), where the CI
// machine is set up to have everything and a missing prerequisite is a
// failure: Unavailable calls t.Fatalf there instead of t.Skipf.
//
// # Concurrency
//
// The functions may be called from any test goroutine that may call
// t.Fatal (the test's own). SyncBuffer is safe for concurrent use.
package testutil
