// Package nbd is sparsedisk's Network Block Device server: it serves one or
// more [blockif.Device]s (normally *blockif.Disk images) to NBD clients such as
// qemu, the libnbd tools (nbdinfo, nbdcopy, nbdsh), nbd-client and the
// Linux kernel's /dev/nbdX.
//
// It is written against the NBD protocol specification (doc/proto.md in
// the NetworkBlockDevice/nbd project), not ported from another server.
//
// # Design
//
// Only fixed newstyle negotiation is spoken. The options understood are
// EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED_REPLY,
// LIST_META_CONTEXT and SET_META_CONTEXT (for the one context this server
// has, base:allocation); every other option, extended headers included, is
// answered with NBD_REP_ERR_UNSUP. Option data is parsed by pure functions
// (parseInfoRequest, parseMetaRequest) and a malformed option gets
// NBD_REP_ERR_INVALID; only violations that cannot be answered (bad magic,
// unknown client flags, an EXPORT_NAME for a missing export) drop the
// connection, and only that one.
//
// Every export advertises HAS_FLAGS, SEND_FLUSH, SEND_CACHE and
// CAN_MULTI_CONN; writable exports add SEND_FUA, SEND_TRIM,
// SEND_WRITE_ZEROES and SEND_FAST_ZERO, read-only ones READ_ONLY; SEND_DF
// is set once structured replies are negotiated.
//
// Any alignment is served: NBD_INFO_BLOCK_SIZE advertises a minimum block
// size of 1, the image's sector size (at least 512) as preferred block
// size and Config.MaxPayload (32 MiB) as maximum payload, as qemu-nbd and
// nbdkit do for files. The engine turns a partial sector into a
// read-modify-write under its per-sector range lock, so unaligned writes
// from any number of connections never tear a sector, and TRIM and
// WRITE_ZEROES zero partial edge sectors and free only whole ones.
// Config.MinBlock (`serve --min-block`) advertises a larger minimum
// instead; it is enforced with NBD_EINVAL for clients that asked for
// block sizes with NBD_OPT_GO (as the protocol allows), and the engine
// still serves the others at any alignment. BLOCK_STATUS descriptors are
// multiples of the sector size and of the minimum block size (a partly
// allocated block is reported allocated), except where the query itself
// starts or ends unaligned.
//
// With structured replies, a READ of 64 KiB or more is answered from the
// engine's allocation map (shorter ones are one data chunk): unallocated runs become NBD_REPLY_TYPE_OFFSET_HOLE chunks, allocated
// runs NBD_REPLY_TYPE_OFFSET_DATA (a single data chunk when the client sets
// DF). All data is read before the first chunk is sent, so errors are
// always reported as one error chunk and the last content chunk carries
// NBD_REPLY_FLAG_DONE. BLOCK_STATUS for base:allocation reports unallocated
// runs as HOLE|ZERO and allocated ones as 0, straight from the LUT.
//
// Engine errors become NBD error values in exactly one place, errnoFor:
// read-only is EPERM, out of range is EINVAL (ENOSPC for writes and
// write-zeroes), a full disk ENOSPC, corruption and anything unexpected
// EIO. A failed request never ends the connection.
//
// FLUSH, FUA and DISC share one group-committing flusher per export: all
// callers waiting at the same time are served by a single engine Flush
// that started after they called, so many parallel FUA writes cost one
// durable sync per round, not one each. Because every connection to an
// export shares that engine, a flush covers writes from all connections,
// which is what CAN_MULTI_CONN promises.
//
// WRITE_ZEROES without NO_HOLE deallocates through the engine (fast, so
// FAST_ZERO succeeds). With NO_HOLE, allocated runs are overwritten with
// zeros in place and unallocated runs, which already read as zeros and
// which the sparse layout never stores, are left alone; FAST_ZERO together
// with NO_HOLE fails with ENOTSUP, as that path is no faster than writing.
//
// TLS ([TLSOn], [TLSRequire]) uses crypto/tls through NBD_OPT_STARTTLS;
// client certificates are demanded by setting ClientAuth and ClientCAs in
// Config.TLSConfig (ServerTLSConfig builds such a configuration; with
// client certificates it stays at TLS 1.2, for GnuTLS clients holding RSA
// certificates). In require mode nothing but STARTTLS and ABORT is
// answered before TLS is up, so export names and data never travel in
// clear text.
//
// TCP connections between two loopback addresses (the default listener is
// 127.0.0.1) are switched to the cubic congestion control: BBR, the
// default of many hosts, paces sends to a bandwidth estimate that is
// meaningless on loopback and was measured to cost this server a third of
// its sequential read throughput there (see tcp.go). Other connections
// keep the system's choice.
//
// [ClientGo] is the client side of a handshake, for a socket that is
// then handed to a client that cannot negotiate itself (the Linux
// kernel's NBD driver, in `sparsedisk attach`).
//
// # Concurrency
//
// A [Server] is safe for concurrent use. Each connection has one goroutine
// that performs the handshake and then reads requests. Admitted
// requests run on worker goroutines that live as long as the connection
// (at most Config.MaxInFlight of them), so requests of one connection
// execute in parallel; a limiter bounds them to Config.MaxInFlight requests and
// Config.MaxInFlightBytes of payload per connection, and the reader stops
// reading while the bound is reached (back-pressure through TCP). Replies
// are queued whole on a per-connection queue; whichever request finds no
// write in progress becomes the writer and sends everything queued with
// writev, so chunks of different replies never interleave on the wire and
// a deep queue of small replies costs few system calls. Replies may leave
// in any order, which the protocol allows.
//
// # Limits
//
// Every resource a client can make the server hold is bounded, and the
// zero Config is already bounded:
//
//   - Negotiated sessions and pending handshakes have separate budgets,
//     so idle sockets cannot lock real clients out.
//     Config.MaxHandshakes (default 128) bounds the connections still
//     negotiating: a connection accepted while the budget is full evicts
//     (resets) the oldest pending one, never the newcomer, so a real
//     client is refused only if that many newer connections arrive while
//     it negotiates; evictions are logged at most once a second.
//     Config.MaxConnections (default 128) bounds negotiated sessions: a
//     client asking for an export beyond it gets NBD_REP_ERR_POLICY (a
//     dropped connection after NBD_OPT_EXPORT_NAME) and may retry. A
//     connection frees its slot before its socket is closed, so a client
//     that reconnects as soon as it sees the close finds the slot free.
//     Running out of file descriptors (EMFILE, ENFILE) makes Serve back
//     off and retry, never return.
//   - Config.HandshakeTimeout (default 10 s) is one absolute deadline for
//     the whole negotiation, TLS included, so a client that trickles bytes
//     is dropped as surely as a silent one.
//   - Option data is buffered only as it arrives and up to 64 KiB; a longer
//     option is skipped (until the handshake deadline) and refused with
//     NBD_REP_ERR_TOO_BIG, an over-long export name drops the connection.
//   - Config.MaxInFlight (default 16) requests and Config.MaxInFlightBytes
//     (default 64 MiB) of payload execute per connection; a write payload
//     above Config.MaxPayload drops the connection rather than being
//     buffered. Replies queued behind a client that does not read them
//     count too: while more than MaxInFlightBytes wait, no further request
//     is read. A connection's buffers therefore stay within a small
//     multiple of MaxInFlightBytes (requests executing, replies queued,
//     the batch being written), and the server's within MaxConnections
//     times that, plus MaxHandshakes times one option's data (64 KiB),
//     a goroutine and, during STARTTLS, the TLS handshake state.
//   - Config.WriteTimeout (default 2 min) bounds the sending of each reply,
//     TCP keep-alive finds vanished peers, and the optional
//     Config.IdleTimeout closes connections that send nothing.
//
// The hostile-client tests (hostile_test.go) check each bound with raw
// connections sending garbage, cut handshakes, lying lengths, absurd
// requests, floods and unread replies.
//
// [Server.Shutdown] stops the listeners, cuts handshakes in progress, stops
// each transmitting connection from reading further requests, waits until
// every request already received has been answered, closes the
// connections and flushes the exports. It does not close the backends:
// their owner does, after Shutdown returns.
package nbd
