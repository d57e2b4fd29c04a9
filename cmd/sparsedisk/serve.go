package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/nbd"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "serve",
		Usage:     "serve images over NBD (qemu, libnbd tools, nbd-client, /dev/nbdX)",
		ArgsUsage: "IMAGE[:NAME] ...",
		Description: "Serves each IMAGE as an NBD export called NAME (default: the image's file name);\n" +
			"the first one is also the default export (empty name). All connections share one\n" +
			"engine per image, so multi-conn clients and FLUSH across connections are safe.\n\n" +
			"Listens on 127.0.0.1:10809 unless --listen or --socket say otherwise; under systemd\n" +
			"socket activation (LISTEN_FDS) it uses the sockets it was given. Prints the nbd://\n" +
			"URI of every export. SIGINT or SIGTERM stop it gracefully: no new connections,\n" +
			"requests in flight are answered, images are flushed and closed clean, exit 0.\n\n" +
			"Examples:\n" +
			"   sparsedisk serve disk.img\n" +
			"   qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809/disk.img,format=raw,if=virtio\n" +
			"   sparsedisk serve --listen 0.0.0.0:10809 --tls require --tls-cert s.pem --tls-key s.key vm1.img:vm1 vm2.img:vm2\n" +
			"   sparsedisk serve --socket /run/disk.sock --read-only base.img\n\n" +
			"Any offset and length is accepted (the minimum block size advertised is 1, the\n" +
			"preferred one the sector size); --min-block N advertises and enforces N instead.\n\n" +
			"Limits (see SECURITY.md): at most --max-connections negotiated clients at once (a\n" +
			"client asking for an export beyond that is refused and may retry), each with at most\n" +
			"--max-in-flight requests executing; at most --max-handshakes connections still\n" +
			"negotiating, a new one evicting the oldest, so idle sockets cannot lock clients out;\n" +
			"a client that has not finished negotiating after --handshake-timeout is dropped, and with\n" +
			"--idle-timeout a connected client that sends nothing for that long is too. A Unix\n" +
			"socket is created with --socket-mode (default 0600: only the serving user may connect).\n\n" +
			"Space: slots freed by TRIM are reused once a flush has made the trim durable, and a\n" +
			"background compactor moves data from the end of each segment file into the holes and\n" +
			"truncates the file, throttled to leave the disk to clients (--no-compact turns it off;\n" +
			"it logs what it moved and truncated).",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Aliases: []string{"l"}, Value: "127.0.0.1:10809", Usage: "TCP `ADDRESS` to listen on"},
			&cli.StringFlag{Name: "socket", Usage: "Unix socket `PATH` to listen on (instead of TCP unless --listen is given too)"},
			&cli.BoolFlag{Name: "read-only", Aliases: []string{"r"}, Usage: "serve every image read-only"},
			&cli.BoolFlag{Name: "sync", Usage: "make every write durable before it is acknowledged (slow)"},
			&cli.StringFlag{Name: "socket-mode", Value: "0600", Usage: "permission bits (octal `MODE`) of the --socket file; connecting needs write permission"},
			&cli.IntFlag{Name: "max-connections", Value: nbd.DefaultMaxConnections, Usage: "serve at most `N` negotiated connections at once; a client asking for an export beyond that is refused (0 = unlimited)"},
			&cli.IntFlag{Name: "max-handshakes", Value: nbd.DefaultMaxHandshakes, Usage: "keep at most `N` connections that are still negotiating; a new one evicts the oldest (0 = unlimited)"},
			&cli.UintFlag{Name: "min-block", Value: 1, Usage: "minimum block size `N` to advertise and enforce (a power of two up to 65536; 1 = any offset and length)"},
			&cli.IntFlag{Name: "max-in-flight", Value: nbd.DefaultMaxInFlight, Usage: "execute at most `N` requests of one connection at once; the connection is not read further meanwhile"},
			&cli.DurationFlag{Name: "handshake-timeout", Value: nbd.DefaultHandshakeTimeout, Usage: "drop clients that do not finish negotiating (TLS included) in this time"},
			&cli.DurationFlag{Name: "idle-timeout", Usage: "close connections that send no request for this long (0 = never; kernel clients idle for hours)"},
			&cli.DurationFlag{Name: "shutdown-timeout", Value: 30 * time.Second, Usage: "on SIGINT/SIGTERM, wait this long for requests in flight (a second signal stops waiting)"},
			&cli.StringFlag{Name: "tcp-congestion", Value: nbd.DefaultLoopbackCongestion, Usage: "TCP congestion control `ALGO` for connections from loopback addresses; \"\" or \"" + nbd.KeepCongestion + "\" keeps the system's default"},
			&cli.BoolFlag{Name: "debug", Usage: "also log refused requests (read-only, out of range) and connection detail; failures of the image (EIO, ENOSPC) are always logged"},
		}, append(compactFlags(), tlsFlags()...)...),
		Action: serveAction,
	})
}

// compactFlags are shared by the commands that keep an image open for
// writing (serve, mount).
func compactFlags() []cli.Flag {
	return []cli.Flag{
		// The online compactor is off and hidden until the SIGKILL harness
		// passes with it: TestKillCrashNBD run with --experimental-compact
		// finds acknowledged, flushed writes reading back as zeros.
		&cli.BoolFlag{Name: "experimental-compact", Hidden: true, Usage: "run the background compactor (experimental: not yet safe against a killed server)"},
		&cli.BoolFlag{Name: "experimental-reuse", Hidden: true, Usage: "hand freed slots out again (experimental: not yet safe against a killed server)"},
		&cli.DurationFlag{Name: "compact-interval", Hidden: true, Value: time.Second, Usage: "how often the compactor looks for work when no flush wakes it"},
	}
}

// engineOptions are the blockif options the serve and mount flags set.
func engineOptions(c *cli.Context, ro bool, log *slog.Logger) *blockif.Options {
	return &blockif.Options{ReadOnly: ro, Sync: c.Bool("sync"), Logger: log,
		Compact: c.Bool("experimental-compact"), ReuseSlots: c.Bool("experimental-reuse"), CompactInterval: c.Duration("compact-interval")}
}

// tlsFlags are shared by commands that serve NBD over the network.
func tlsFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "tls", Value: "off", Usage: "TLS `MODE`: off, on (clients may upgrade) or require (nothing is revealed before STARTTLS)"},
		&cli.StringFlag{Name: "tls-cert", Usage: "server certificate `FILE` (PEM)"},
		&cli.StringFlag{Name: "tls-key", Usage: "server private key `FILE` (PEM)"},
		&cli.StringFlag{Name: "tls-ca", Usage: "CA `FILE` (PEM): clients must present a certificate it signed (needs --tls require)"},
	}
}

// tlsConfig builds the server's TLS setup from the flags.
func tlsConfig(c *cli.Context) (nbd.TLSMode, *tls.Config, error) {
	mode, err := nbd.ParseTLSMode(c.String("tls"))
	if err != nil {
		return mode, nil, err
	}
	if mode == nbd.TLSOff {
		if c.IsSet("tls-cert") || c.IsSet("tls-key") || c.IsSet("tls-ca") {
			return mode, nil, errors.New("--tls-cert, --tls-key and --tls-ca need --tls on or --tls require")
		}
		return mode, nil, nil
	}
	if mode == nbd.TLSOn && c.IsSet("tls-ca") {
		// In "on" mode a client may skip STARTTLS and is then served
		// without any certificate, so --tls-ca would promise a check that
		// a plain client simply avoids.
		return mode, nil, errors.New("--tls-ca needs --tls require: with --tls on, clients that skip TLS need no certificate")
	}
	if c.String("tls-cert") == "" || c.String("tls-key") == "" {
		return mode, nil, fmt.Errorf("--tls %s needs --tls-cert and --tls-key", mode)
	}
	cert, err := tls.LoadX509KeyPair(c.String("tls-cert"), c.String("tls-key"))
	if err != nil {
		return mode, nil, fmt.Errorf("loading TLS certificate: %w", err)
	}
	var pool *x509.CertPool
	if ca := c.String("tls-ca"); ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return mode, nil, fmt.Errorf("reading TLS CA: %w", err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return mode, nil, fmt.Errorf("%s holds no PEM certificate", ca)
		}
	}
	return mode, nbd.ServerTLSConfig(cert, pool), nil
}

// imageArg splits IMAGE[:NAME]. A path that exists as given is taken whole,
// so image paths containing colons still work. Otherwise the last colon
// splits, if the part before it exists or the part after it has no "/"
// (then it cannot be a path's tail): export names may contain "/".
func imageArg(arg string) (path, name string) {
	path = arg
	if _, err := os.Stat(arg); err != nil {
		if i := strings.LastIndexByte(arg, ':'); i > 0 {
			_, serr := os.Stat(arg[:i])
			if serr == nil || !strings.Contains(arg[i+1:], "/") {
				path, name = arg[:i], arg[i+1:]
			}
		}
	}
	if name == "" {
		name = filepath.Base(path)
	}
	return path, name
}

// activationListeners returns the sockets passed by systemd socket
// activation (LISTEN_PID/LISTEN_FDS, first fd 3), or nil.
func activationListeners() ([]net.Listener, error) {
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return nil, nil
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n <= 0 {
		return nil, nil
	}
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	var ls []net.Listener
	for fd := 3; fd < 3+n; fd++ {
		syscall.CloseOnExec(fd)
		f := os.NewFile(uintptr(fd), fmt.Sprintf("LISTEN_FD_%d", fd))
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, fmt.Errorf("socket activation fd %d: %w", fd, err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// exportURI is the URI a client uses to reach export name on l.
func exportURI(l net.Listener, name string, tlsOn bool) string {
	scheme := "nbd"
	if tlsOn {
		scheme = "nbds"
	}
	if ua, ok := l.Addr().(*net.UnixAddr); ok {
		return fmt.Sprintf("%s+unix:///%s?socket=%s", scheme, url.PathEscape(name), url.QueryEscape(ua.Name))
	}
	host := l.Addr().String()
	if ta, ok := l.Addr().(*net.TCPAddr); ok && ta.IP.IsUnspecified() {
		host = net.JoinHostPort("localhost", strconv.Itoa(ta.Port))
	}
	return fmt.Sprintf("%s://%s/%s", scheme, host, url.PathEscape(name))
}

func serveAction(c *cli.Context) error {
	if c.NArg() == 0 {
		return errors.New("serve needs at least one IMAGE[:NAME]")
	}
	level := slog.LevelInfo
	if c.Bool("debug") {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(c.App.ErrWriter, &slog.HandlerOptions{Level: level}))
	mode, tcfg, err := tlsConfig(c)
	if err != nil {
		return err
	}
	limits, err := serveLimitFlags(c)
	if err != nil {
		return err
	}

	ro := c.Bool("read-only")
	var disks []*blockif.Disk
	closeAll := func() error {
		var first error
		for _, d := range disks {
			if err := d.Close(); err != nil {
				log.Error("closing image", "image", d.Path(), "err", err)
				first = firstErr(first, err)
				continue
			}
			log.Info("image closed clean", "image", d.Path())
		}
		return first
	}
	var exports []nbd.Export
	seen := map[string]string{} // absolute image path -> argument
	for _, arg := range c.Args().Slice() {
		path, name := imageArg(arg)
		if abs, err := filepath.Abs(path); err == nil {
			if prev, dup := seen[abs]; dup {
				closeAll()
				return fmt.Errorf("%s is given twice (%q and %q): one process serves an image once, under one name", path, prev, arg)
			}
			seen[abs] = arg
		}
		d, err := blockif.Open(path, engineOptions(c, ro, log))
		if err != nil {
			closeAll()
			if errors.Is(err, blockif.ErrInUse) {
				return fmt.Errorf("%s is in use by another process (served or mounted elsewhere?): %w", path, err)
			}
			return fmt.Errorf("open %s: %w", path, err)
		}
		disks = append(disks, d)
		// The description names the image file, not its directory: any
		// client may read it, and the server's layout is not its business.
		desc := fmt.Sprintf("sparsedisk %s image %s, %s", d.Params().Layout, filepath.Base(path), format.HumanSize(d.Size()))
		exports = append(exports, nbd.Export{Name: name, Description: desc, Backend: d})
	}
	srv, err := nbd.NewServer(nbd.Config{
		TLS:              mode,
		TLSConfig:        tcfg,
		MaxConnections:   limits.maxConns,
		MaxHandshakes:    limits.maxHandshakes,
		MinBlock:         limits.minBlock,
		MaxInFlight:      limits.maxInFlight,
		HandshakeTimeout: limits.handshake,
		IdleTimeout:      limits.idle,
		Logger:           log,
		// An explicitly empty flag means the same as "system".
		LoopbackCongestion: cmp.Or(c.String("tcp-congestion"), nbd.KeepCongestion),
	}, exports...)
	if err != nil {
		closeAll()
		return err
	}

	listeners, err := activationListeners()
	if err != nil {
		closeAll()
		return err
	}
	if listeners != nil {
		log.Info("using socket activation", "sockets", len(listeners))
	} else {
		if p := c.String("socket"); p != "" {
			if err := removeStaleSocket(p); err != nil {
				closeAll()
				return err
			}
			l, err := listenUnix(p, limits.socketMode)
			if err != nil {
				closeAll()
				return err
			}
			listeners = append(listeners, l)
		}
		if c.String("socket") == "" || c.IsSet("listen") {
			l, err := net.Listen("tcp", c.String("listen"))
			if err != nil {
				for _, l := range listeners {
					l.Close()
				}
				closeAll()
				return err
			}
			listeners = append(listeners, l)
		}
	}
	for _, l := range listeners {
		for _, e := range exports {
			fmt.Fprintln(c.App.Writer, exportURI(l, e.Name, mode != nbd.TLSOff))
		}
	}
	log.Info("serving", "exports", len(exports), "read_only", ro, "sync", c.Bool("sync"), "tls", mode.String())

	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		go func() { errc <- srv.Serve(l) }()
	}
	var serveErr error
	select {
	case <-ctx.Done():
		log.Info("stopping: finishing requests in flight")
	case serveErr = <-errc:
		log.Error("listener failed, stopping", "err", serveErr)
	}
	sctx, cancel := context.WithTimeout(context.Background(), c.Duration("shutdown-timeout"))
	defer cancel()
	// A second SIGINT/SIGTERM stops waiting for requests in flight (a
	// client that does not read its replies can hold them until
	// --shutdown-timeout); the images are still flushed and closed.
	again := make(chan os.Signal, 1)
	signal.Notify(again, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(again)
	go func() {
		select {
		case s := <-again:
			log.Warn("second signal: closing connections without waiting for requests in flight", "signal", s.String())
			cancel()
		case <-sctx.Done():
		}
	}()
	if err := srv.Shutdown(sctx); err != nil {
		log.Error("shutdown", "err", err)
		serveErr = firstErr(serveErr, err)
	}
	// The socket file is removed by its listener's Close (net.UnixListener
	// unlinks what it created), never by path: the path may meanwhile
	// belong to someone else.
	if err := closeAll(); err != nil {
		serveErr = firstErr(serveErr, err)
	}
	log.Info("stopped")
	return serveErr
}

// serveLimits are the connection limits and the socket mode from the flags.
type serveLimits struct {
	maxConns, maxHandshakes, maxInFlight int
	minBlock                             uint32
	handshake, idle                      time.Duration
	socketMode                           os.FileMode
}

func serveLimitFlags(c *cli.Context) (serveLimits, error) {
	l := serveLimits{
		maxConns:      c.Int("max-connections"),
		maxHandshakes: c.Int("max-handshakes"),
		maxInFlight:   c.Int("max-in-flight"),
		handshake:     c.Duration("handshake-timeout"),
		idle:          c.Duration("idle-timeout"),
	}
	if l.maxConns <= 0 {
		l.maxConns = -1 // nbd.Config: negative = unlimited
	}
	if l.maxHandshakes <= 0 {
		l.maxHandshakes = -1
	}
	mb, err := minBlockFlag(c)
	if err != nil {
		return l, err
	}
	l.minBlock = mb
	if l.maxInFlight < 1 {
		return l, fmt.Errorf("--max-in-flight %d: need at least 1", l.maxInFlight)
	}
	if l.handshake <= 0 {
		return l, fmt.Errorf("--handshake-timeout %v: need a positive duration", l.handshake)
	}
	if l.idle < 0 {
		return l, fmt.Errorf("--idle-timeout %v: need 0 (never) or a positive duration", l.idle)
	}
	m, err := strconv.ParseUint(c.String("socket-mode"), 8, 32)
	if err != nil || m > 0o777 {
		return l, fmt.Errorf("--socket-mode %q: want octal permission bits such as 0600 or 0660", c.String("socket-mode"))
	}
	l.socketMode = os.FileMode(m)
	return l, nil
}

// minBlockFlag reads --min-block: a power of two from 1 to 65536.
func minBlockFlag(c *cli.Context) (uint32, error) {
	n := c.Uint("min-block")
	if n < 1 || n > 65536 || n&(n-1) != 0 {
		return 0, fmt.Errorf("--min-block %d: want a power of two from 1 to 65536 (e.g. 512 or 4096)", n)
	}
	return uint32(n), nil
}

// listenUnix listens on a Unix socket at path whose permission bits are
// exactly mode. The umask is narrowed around bind(2), so the socket never
// exists with wider permissions, not even between bind and a chmod (a
// client could connect in that window, and its connection would be
// accepted later). The umask is process-wide; serve changes it only here,
// at start-up, before any connection is served.
func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	old := syscall.Umask(int(0o777 &^ mode))
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	// The umask cannot add bits the process does not request; chmod
	// makes the mode exact whatever the platform's default.
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return l, nil
}

// firstErr returns the first non-nil error.
func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// removeStaleSocket removes the Unix socket at p if it is left over from a
// server that is gone (connecting is refused), so a restart can bind it
// again. A socket something still listens on is refused: removing it
// would cut that server off from its clients. Anything at p that is not a
// socket is left for listen to report.
func removeStaleSocket(p string) error {
	st, err := os.Lstat(p)
	if err != nil || st.Mode()&os.ModeSocket == 0 {
		return nil
	}
	c, err := net.DialTimeout("unix", p, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("socket %s is in use: another server listens on it (stop it, or choose another --socket)", p)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket %s exists and could not be probed (%v); remove it if no server uses it", p, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", p, err)
	}
	return nil
}
