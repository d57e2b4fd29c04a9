// Package nbdclient is a small Network Block Device client for sparsedisk's
// tests and tools. It connects to an NBD server (normally `sparsedisk
// serve`), negotiates one export and then reads, writes, flushes, trims and
// zeroes ranges of it.
//
// It is written against the NBD protocol specification (doc/proto.md of the
// NetworkBlockDevice/nbd project) and speaks a deliberately small part of
// it:
//
//   - fixed newstyle negotiation only, entering transmission with
//     NBD_OPT_GO (so an unknown export is a clean error, not a dropped
//     connection); NBD_INFO_BLOCK_SIZE is requested and reported by
//     [Client.BlockSize];
//   - simple replies only: structured replies and extended headers are
//     never negotiated, so every reply is one 16-byte header followed, for
//     a successful read, by the data;
//   - the commands READ, WRITE (optionally with FUA), FLUSH, TRIM,
//     WRITE_ZEROES and DISC. A command the export does not advertise
//     (FLUSH, FUA, TRIM, WRITE_ZEROES) fails locally with
//     [ErrUnsupported] without reaching the server.
//
// Every multi-byte field is encoded and decoded with binary.BigEndian
// explicitly, as the protocol requires.
//
// Reads and writes longer than the export's maximum payload are split into
// several requests; the call returns when all of them have been answered.
// An error reply from the server is returned as an [*Error] carrying the
// NBD error value; errors.Is(err, syscall.EIO) and the like work because
// the NBD values are the Linux errno values and [Error] unwraps to a
// syscall.Errno. A broken connection fails every outstanding and later
// request with an error that wraps [ErrDisconnected]; the client does not
// reconnect.
//
// The wire constants (magics, option, reply and command numbers) are
// written out here again from the protocol document rather than imported
// from package nbd, on purpose: the client exists to test the server, and
// a constant shared by both would let a wrong value pass every test.
//
// # Concurrency
//
// A [Client] is safe for concurrent use by many goroutines, and that is the
// intended way to load a server: requests are pipelined on the one
// connection. A caller registers its request under a fresh cookie, writes
// it (a mutex keeps the header and payload of one request together on the
// wire) and waits; a single reader goroutine per connection receives the
// replies in whatever order the server sends them, matches them to their
// requests by cookie, copies read data straight into the caller's buffer
// and wakes the caller. The number of requests in flight is bounded only
// by the callers; the server applies back-pressure through TCP.
//
// The NBD protocol gives no ordering between requests that are in flight
// at the same time: two overlapping writes issued concurrently may land in
// either order, and a FLUSH covers only the writes that had been answered
// before it was sent. Callers that need an order must wait for a reply
// before issuing the dependent request.
//
// [Client.Close] waits for requests in flight (bounded by a timeout), sends
// NBD_CMD_DISC and closes the connection; calls made after Close fail with
// [ErrClosed].
package nbdclient
