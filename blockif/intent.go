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
// back) the operation, and a read-only Open refuses the image.
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
	desc, err := ReadDescriptor(fsys, path)
	if err != nil {
		return err
	}
	return finishIntent(fsys, path, desc)
}

// finishIntent is FinishIntent with the descriptor already read.
func finishIntent(fsys vfs.FS, path string, desc Descriptor) error {
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
	return WriteDescriptor(fsys, path, desc)
}

// setIntent durably records intent in the descriptor.
func setIntent(fsys vfs.FS, path string, desc *Descriptor, intent string) error {
	desc.Intent = intent
	return WriteDescriptor(fsys, path, *desc)
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
