// Package sparsedisk is the repository root. It holds no code: the engine is
// package blockif, the command is cmd/sparsedisk, and FORMAT.md beside this
// file is the reference for the on-disk format.
//
// The tests of this package check the repository itself: that no file
// cites material outside the repository (repo_test.go), and that FORMAT.md
// agrees with the format constants in the code (format_doc_test.go).
package sparsedisk
