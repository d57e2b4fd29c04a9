package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
)

func TestCreateAsWritten(t *testing.T) {
	dir := t.TempDir()
	wd, _ := os.Getwd()
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	defer os.Chdir(wd)
	out, errs, code := sdRun(t, "create", "size=20G", "split=1G", "sectorsize=4096")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	if !strings.Contains(out, "20 GiB") {
		t.Errorf("output lacks a human size: %q", out)
	}
	desc, err := format.ReadDescriptor(nil, filepath.Join(dir, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	want := format.Params{Layout: format.LayoutSparse, Size: 20 << 30, Split: 1 << 30, SectorSize: 4096}
	if desc.Params != want {
		t.Errorf("descriptor %+v, want %+v", desc.Params, want)
	}
	if _, err := os.Stat(filepath.Join(dir, "disk.img.0019")); err != nil {
		t.Errorf("segment 19: %v", err)
	}
	if _, _, code := sdRun(t, "create", "size=1G"); code == 0 {
		t.Error("create over an existing image succeeded")
	}
}

func TestCreateForms(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		args []string
		want format.Params
	}{
		{[]string{"a.img", "size=1m"}, format.Params{Layout: format.LayoutSparse, Size: 1 << 20, Split: 1 << 20, SectorSize: 4096}},
		{[]string{"b.img", "--size", "3M", "--split=1M", "--sectorsize", "512"}, format.Params{Layout: format.LayoutSparse, Size: 3 << 20, Split: 1 << 20, SectorSize: 512}},
		{[]string{"c.img", "size=2MB", "split=512k", "layout=split"}, format.Params{Layout: format.LayoutSplit, Size: 2 << 20, Split: 512 << 10, SectorSize: 4096}},
	}
	for _, c := range cases {
		args := append([]string{"create"}, c.args...)
		args[1] = filepath.Join(dir, args[1])
		_, errs, code := sdRun(t, args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", c.args, code, errs)
		}
		d, err := format.ReadDescriptor(nil, args[1])
		if err != nil {
			t.Fatal(err)
		}
		if d.Params != c.want {
			t.Errorf("%v: %+v, want %+v", c.args, d.Params, c.want)
		}
	}
	// raw: one plain file of the size, no descriptor
	raw := filepath.Join(dir, "r.img")
	if _, errs, code := sdRun(t, "create", raw, "size=1M", "layout=raw"); code != 0 {
		t.Fatalf("raw: %s", errs)
	}
	if fi, err := os.Stat(raw); err != nil || fi.Size() != 1<<20 {
		t.Errorf("raw image: %v %v", fi, err)
	}
}

func TestCreateBadInput(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "x.img")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{p}, "size= is required"},
		{[]string{p, "size=1.5G"}, "whole number"},
		{[]string{p, "size=10Q"}, "whole number"},
		{[]string{p, "size=1G", "sectorsize=1000"}, "power of two"},
		{[]string{p, "size=1G", "split=1000"}, "multiple of sectorsize"},
		{[]string{p, "size=4097"}, "not a multiple of sectorsize"},
		{[]string{p, "size=1G", "colour=red"}, "unknown setting"},
		{[]string{p, "size=1G", "layout=qcow2"}, "layout"},
	} {
		_, errs, code := sdRun(t, append([]string{"create"}, c.args...)...)
		if code == 0 || !strings.Contains(errs, c.want) {
			t.Errorf("create %v: exit %d, stderr %q, want it to say %q", c.args, code, errs, c.want)
		}
		if _, err := os.Stat(p); err == nil {
			t.Errorf("create %v left %s behind", c.args, p)
		}
	}
}
