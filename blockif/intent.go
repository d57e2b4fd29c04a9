package blockif

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"github.com/sparsedisk/sparsedisk/vfs"
)

// Intent records written to the descriptor's `intent` key by the offline
// tools. While one is present, Open for writing first finishes (or rolls
// back) the operation, and a read-only Open refuses the image. FORMAT.md
// (section 8) states how each is finished.
const (
	// IntentShrink: a shrink is compacting segments; the journal
	// P.shrink-journal (if valid) holds the segment being committed.
	IntentShrink = "shrink"
	// IntentResize: a resize is adjusting files to the descriptor's size;
	// recovery trims every file to the geometry the descriptor states.
	IntentResize = "resize"
)

// FinishIntent finishes or rolls back the offline operation recorded in the
// image's descriptor, then clears the record. It does nothing if there is
// none. The caller must hold the image's exclusive lock (or know that no
// one else uses the image).
func FinishIntent(path string, o *Options) error {
	fsys := o.fs()
	il, err := lockOffline(fsys, path, true)
	if err != nil {
		return err
	}
	defer il.Close()
	desc, err := ReadDescriptor(fsys, path)
	if err != nil {
		return err
	}
	return finishIntent(fsys, path, desc, il.write)
}

// finishIntent is FinishIntent with the descriptor already read; write
// rewrites the descriptor (moving the caller's lock along).
func finishIntent(fsys vfs.FS, path string, desc Descriptor, write func(Descriptor) error) error {
	if desc.Intent == "" {
		return nil
	}
	kind, _, _ := strings.Cut(desc.Intent, " ")
	var err error
	switch kind {
	case IntentShrink:
		err = recoverShrink(fsys, path, desc)
	case IntentResize:
		err = trimToGeometry(fsys, path, desc.Params)
	default:
		return fmt.Errorf("%w: %s: intent %q", ErrIntent, path, desc.Intent)
	}
	if err != nil {
		return fmt.Errorf("finish %s of %s: %w", kind, path, err)
	}
	desc.Intent = ""
	return write(desc)
}

// offlineLock is an offline tool's lock on an image: on the descriptor
// (or raw file), following the descriptor's rewrites like an open Disk's.
type offlineLock struct {
	fs        vfs.FS
	path      string
	exclusive bool
	l         vfs.Lock
}

// lockOffline locks the image at path; ErrInUse if someone holds it in a
// conflicting mode.
func lockOffline(fsys vfs.FS, path string, exclusive bool) (*offlineLock, error) {
	l, err := lockImage(fsys, path, exclusive)
	if err != nil {
		return nil, err
	}
	return &offlineLock{fs: fsys, path: path, exclusive: exclusive, l: l}, nil
}

// write durably replaces the descriptor, moving the lock to the new file
// before it becomes visible.
func (o *offlineLock) write(desc Descriptor) error {
	l, err := replaceDescriptor(o.fs, o.path, desc, true, o.exclusive)
	if err != nil {
		return err
	}
	o.l.Close()
	o.l = l
	return nil
}

// Close releases the lock.
func (o *offlineLock) Close() error { return o.l.Close() }

// setIntent durably records intent in the descriptor.
func (o *offlineLock) setIntent(desc *Descriptor, intent string) error {
	desc.Intent = intent
	return o.write(*desc)
}

// removeIfExists removes name; a missing file is not an error. It reports
// whether something was removed.
func removeIfExists(fsys vfs.FS, name string) (bool, error) {
	if _, err := fsys.Stat(name); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	if err := fsys.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("remove %s: %w", name, err)
	}
	return true, nil
}

func syncDirOf(fsys vfs.FS, path string) error {
	return fsys.SyncDir(filepath.Dir(path))
}
