package offline

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// The undo log of a repair.
//
// # On-disk format
//
// P.undo.N ([format.UndoName]) starts with the 8 bytes "sdundo1\n", then
// holds records, each: a uint32 LE length, that many bytes of JSON (an
// undoOp), a uint64 LE length and that many bytes of saved data. Records
// are appended and fsynced before the change they describe, so a repair
// interrupted at any point can still be undone. Undo applies them from
// last to first, then puts back the descriptor saved by the first record.
//
//	| op         | data             | undo                                          |
//	|------------|------------------|-----------------------------------------------|
//	| descriptor | descriptor bytes | rewrite the descriptor byte for byte (last)   |
//	| bytes      | old bytes        | write them back at off, cut file to old_size  |
//	| size       | old tail, if any | set the length to old_size, write the tail    |
//	| created    | -                | remove the file                               |
//	| renamed    | -                | rename to back to from                        |
const undoMagic = "sdundo1\n"

type undoOp struct {
	Op      string `json:"op"`
	File    string `json:"file,omitempty"`
	Off     int64  `json:"off,omitempty"`
	OldSize int64  `json:"old_size,omitempty"`
	From    string `json:"from,omitempty"`
	To      string `json:"to,omitempty"`
}

// undoLog records what a repair changes. It is not safe for concurrent use.
type undoLog struct {
	fsys vfs.FS
	name string
	f    vfs.File
	off  int64
	ops  int
}

// newUndo creates the next undo log of the image at path and records its
// descriptor.
func newUndo(fsys vfs.FS, path string) (*undoLog, error) {
	n := 1
	for ; ; n++ {
		if _, err := fsys.Stat(format.UndoName(path, n)); errors.Is(err, fs.ErrNotExist) {
			break
		}
	}
	u := &undoLog{fsys: fsys, name: format.UndoName(path, n)}
	f, err := fsys.OpenFile(u.name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create undo log: %w", err)
	}
	u.f = f
	if _, err := f.WriteAt([]byte(undoMagic), 0); err != nil {
		u.abandon()
		return nil, fmt.Errorf("write undo log %s: %w", u.name, err)
	}
	u.off = int64(len(undoMagic))
	desc, err := format.ReadFile(fsys, path)
	if err == nil {
		err = u.add(undoOp{Op: "descriptor", File: path}, desc)
	}
	if err == nil {
		err = format.SyncDirOf(fsys, path)
	}
	if err != nil {
		u.abandon()
		return nil, err
	}
	u.ops = 0 // the descriptor alone is no change
	return u, nil
}

// abandon removes a log that recorded nothing.
func (u *undoLog) abandon() {
	u.f.Close()
	u.fsys.Remove(u.name)
}

// finish closes the log; one that recorded no change is removed.
func (u *undoLog) finish(changedDescriptor bool) error {
	if u.ops == 0 && !changedDescriptor {
		u.abandon()
		return nil
	}
	return u.f.Close()
}

// add appends one record and makes it durable.
func (u *undoLog) add(op undoOp, data []byte) error {
	js, err := json.Marshal(op)
	if err != nil {
		return err
	}
	rec := make([]byte, 0, 12+len(js)+len(data))
	rec = binary.LittleEndian.AppendUint32(rec, uint32(len(js)))
	rec = append(rec, js...)
	rec = binary.LittleEndian.AppendUint64(rec, uint64(len(data)))
	rec = append(rec, data...)
	if _, err := u.f.WriteAt(rec, u.off); err != nil {
		return fmt.Errorf("write undo log %s: %w", u.name, err)
	}
	if err := u.f.Sync(); err != nil {
		return fmt.Errorf("sync undo log %s: %w", u.name, err)
	}
	u.off += int64(len(rec))
	u.ops++
	return nil
}

// saveBytes records [off, off+n) of the open file f (named name) before
// it is overwritten or punched.
func (u *undoLog) saveBytes(f vfs.File, name string, off, n int64) error {
	size, err := f.Size()
	if err != nil {
		return err
	}
	n = max(min(n, size-off), 0)
	buf := make([]byte, n)
	if got, err := f.ReadAt(buf, off); int64(got) != n {
		return fmt.Errorf("save %s at %d for undo: %w", name, off, err)
	}
	return u.add(undoOp{Op: "bytes", File: name, Off: off, OldSize: size}, buf)
}

// saveSize records the length of the open file f (named name) before it
// changes to newSize, with the bytes a shortening cuts off.
func (u *undoLog) saveSize(f vfs.File, name string, newSize int64) error {
	size, err := f.Size()
	if err != nil {
		return err
	}
	var tail []byte
	if newSize < size {
		tail = make([]byte, size-newSize)
		if got, err := f.ReadAt(tail, newSize); got != len(tail) {
			return fmt.Errorf("save tail of %s for undo: %w", name, err)
		}
	}
	return u.add(undoOp{Op: "size", File: name, Off: newSize, OldSize: size}, tail)
}

func (u *undoLog) created(name string) error {
	return u.add(undoOp{Op: "created", File: name}, nil)
}

func (u *undoLog) renamed(from, to string) error {
	return u.add(undoOp{Op: "renamed", From: from, To: to}, nil)
}

// UndoReport tells what Undo did.
type UndoReport struct {
	Log     string `json:"log"`     // the undo log applied (now removed)
	Changes int    `json:"changes"` // changes reverted, the descriptor included
}

// Undo reverts the latest repair of the image at path from its undo log
// P.undo.N (the highest N), under an exclusive lock: files it created are
// removed, renamed files renamed back, overwritten, punched or cut bytes
// written back, lengths restored, and the descriptor put back byte for
// byte. The log is removed once all of that is durable; running Undo
// again reverts the repair before.
func Undo(path string, o *blockif.Options) (*UndoReport, error) {
	fsys := fsOf(o)
	n := 0
	for ; ; n++ {
		if _, err := fsys.Stat(format.UndoName(path, n+1)); errors.Is(err, fs.ErrNotExist) {
			break
		}
	}
	if n == 0 {
		return nil, fmt.Errorf("%w: %s has no undo log (%s): no repair to undo", ErrInvalid, path, format.UndoName(path, 1))
	}
	name := format.UndoName(path, n)
	lock, err := format.LockImage(fsys, path, true)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	raw, err := format.ReadFile(fsys, name)
	if err != nil {
		return nil, err
	}
	type rec struct {
		op   undoOp
		data []byte
	}
	var recs []rec
	if len(raw) < len(undoMagic) || string(raw[:len(undoMagic)]) != undoMagic {
		return nil, fmt.Errorf("%w: %s is not an undo log", ErrCorrupt, name)
	}
	for p := raw[len(undoMagic):]; len(p) > 0; {
		if len(p) < 4 {
			break // a record torn by a crash: the change it announced was not made
		}
		jl := int(binary.LittleEndian.Uint32(p))
		if len(p) < 4+jl+8 {
			break
		}
		var op undoOp
		if err := json.Unmarshal(p[4:4+jl], &op); err != nil {
			return nil, fmt.Errorf("%w: %s: record %d: %v", ErrCorrupt, name, len(recs), err)
		}
		dl := binary.LittleEndian.Uint64(p[4+jl:])
		if uint64(len(p)-4-jl-8) < dl {
			break
		}
		recs = append(recs, rec{op, p[4+jl+8 : 4+jl+8+int(dl)]})
		p = p[4+jl+8+int(dl):]
	}
	if len(recs) == 0 || recs[0].op.Op != "descriptor" {
		return nil, fmt.Errorf("%w: %s does not start with the descriptor", ErrCorrupt, name)
	}
	for i := len(recs) - 1; i >= 1; i-- {
		if err := applyUndo(fsys, recs[i].op, recs[i].data); err != nil {
			return nil, fmt.Errorf("undo %s record %d (%s %s): %w", name, i, recs[i].op.Op, recs[i].op.File+recs[i].op.From, err)
		}
	}
	if err := format.SyncDirOf(fsys, path); err != nil {
		return nil, err
	}
	if err := lock.WriteRaw(recs[0].data); err != nil {
		return nil, err
	}
	if err := fsys.Remove(name); err != nil {
		return nil, fmt.Errorf("remove %s: %w", name, err)
	}
	if err := format.SyncDirOf(fsys, path); err != nil {
		return nil, err
	}
	return &UndoReport{Log: name, Changes: len(recs)}, nil
}

func applyUndo(fsys vfs.FS, op undoOp, data []byte) error {
	switch op.Op {
	case "created":
		_, err := format.RemoveIfExists(fsys, op.File)
		return err
	case "renamed":
		return fsys.Rename(op.To, op.From)
	case "bytes", "size":
		f, err := fsys.OpenFile(op.File, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := f.Truncate(op.OldSize); err != nil {
			return err
		}
		if len(data) > 0 {
			if _, err := f.WriteAt(data, op.Off); err != nil {
				return err
			}
		}
		return f.Sync()
	}
	return fmt.Errorf("unknown undo record %q", op.Op)
}
