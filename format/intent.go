package format

import (
	"errors"
	"fmt"
	"strings"

	"github.com/sparsedisk/sparsedisk/vfs"
)

// Intent records written to the descriptor's `intent` key by the offline
// tools. While one is present, Open for writing first finishes (or rolls
// back) the operation, and a read-only Open refuses the image.
const (
	// IntentShrink: a shrink is compacting segments; the journal
	// P.shrink-journal (if valid) holds the segment being committed.
	IntentShrink = "shrink"
	// IntentResize: a resize is adjusting files to the descriptor's size;
	// recovery trims every file to the geometry the descriptor states.
	IntentResize = "resize"
)

// FinishIntent finishes or rolls back the offline operation recorded in
// desc, the descriptor of the image at path, then clears the record with
// write (which rewrites the descriptor, moving the caller's lock along:
// [ImageLock.Write] or an open Disk's own rewrite). It does nothing if
// there is none. The caller must hold the image's exclusive lock.
func FinishIntent(fsys vfs.FS, path string, desc Descriptor, write func(Descriptor) error) error {
	if desc.Intent == "" {
		return nil
	}
	kind, _, _ := strings.Cut(desc.Intent, " ")
	var err error
	switch kind {
	case IntentShrink:
		err = recoverShrink(fsys, path, desc)
	case IntentResize:
		err = TrimToGeometry(fsys, path, desc.Params)
	default:
		return fmt.Errorf("%w: %s: intent %q", ErrIntent, path, desc.Intent)
	}
	if err != nil {
		return fmt.Errorf("finish %s of %s: %w", kind, path, err)
	}
	desc.Intent = ""
	return write(desc)
}

// ImageLock is a lock on an image: on the descriptor (or raw file),
// following the descriptor's rewrites. An open Disk holds one; so does an
// offline tool for its whole run. It is not safe for concurrent use.
type ImageLock struct {
	fs        vfs.FS
	path      string
	exclusive bool
	l         vfs.Lock
}

// LockImage locks the image at path, exclusively (writers) or shared
// (readers); ErrInUse if someone holds it in a conflicting mode. It
// retries if a concurrent descriptor rewrite replaced the file between
// the lock and the check.
func LockImage(fsys vfs.FS, path string, exclusive bool) (*ImageLock, error) {
	for try := 0; ; try++ {
		l, err := fsys.Lock(path, exclusive)
		if err != nil {
			if errors.Is(err, vfs.ErrLocked) {
				mode := "for writing"
				if !exclusive {
					mode = "for reading (another process writes it)"
				}
				return nil, fmt.Errorf("%w: %s cannot be opened %s", ErrInUse, path, mode)
			}
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		ok, err := l.Current(path)
		if err == nil && ok {
			return &ImageLock{fs: fsys, path: path, exclusive: exclusive, l: l}, nil
		}
		l.Close()
		if err != nil || try == 10 {
			return nil, fmt.Errorf("lock %s: the file keeps being replaced: %v", path, err)
		}
	}
}

// Write durably replaces the descriptor, moving the lock to the new file
// before it becomes visible.
func (o *ImageLock) Write(desc Descriptor) error {
	return o.WriteRaw(desc.Marshal())
}

// WriteRaw is Write with the descriptor's text given byte for byte (an
// undo puts back the very file a repair replaced, comments included).
func (o *ImageLock) WriteRaw(data []byte) error {
	l, err := replaceDescriptor(o.fs, o.path, data, true, o.exclusive)
	if err != nil {
		return err
	}
	o.l.Close()
	o.l = l
	return nil
}

// Close releases the lock.
func (o *ImageLock) Close() error { return o.l.Close() }

// SetIntent durably records intent in the descriptor.
func (o *ImageLock) SetIntent(desc *Descriptor, intent string) error {
	desc.Intent = intent
	return o.Write(*desc)
}
