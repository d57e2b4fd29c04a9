package nbd

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// testPKI is a throw-away CA with a server and a client certificate,
// written as PEM files in the layout libnbd's set_tls_certificates expects
// (ca-cert.pem, client-cert.pem, client-key.pem) plus server files.
type testPKI struct {
	dir                           string
	caPool                        *x509.CertPool
	server, client                tls.Certificate
	caFile, serverCert, serverKey string
}

func newTestPKI(t testing.TB) *testPKI { return newTestPKIKeys(t, false) }

// genKey makes an RSA 2048 or ECDSA P-256 key and its PEM form.
func genKey(t testing.TB, rsaKey bool) (crypto.Signer, string, []byte) {
	t.Helper()
	if rsaKey {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		der, _ := x509.MarshalPKCS8PrivateKey(k)
		return k, "PRIVATE KEY", der
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalECPrivateKey(k)
	return k, "EC PRIVATE KEY", der
}

// newTestPKIKeys is newTestPKI with RSA keys (CA and leaves, signed with
// RSA PKCS#1 v1.5 as openssl and certtool do by default) if rsaKeys.
func newTestPKIKeys(t testing.TB, rsaKeys bool) *testPKI {
	t.Helper()
	dir := t.TempDir()
	p := &testPKI{dir: dir}
	caKey, _, _ := genKey(t, rsaKeys)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sparsedisk test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	p.caPool = x509.NewCertPool()
	p.caPool.AddCert(caCert)
	write := func(name, typ string, der []byte) string {
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	p.caFile = write("ca-cert.pem", "CERTIFICATE", caDER)
	leaf := func(serial int64, cn string, usage x509.ExtKeyUsage, certName, keyName string) (tls.Certificate, string, string) {
		key, keyType, kder := genKey(t, rsaKeys)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
		if err != nil {
			t.Fatal(err)
		}
		cf := write(certName, "CERTIFICATE", der)
		kf := write(keyName, keyType, kder)
		c, err := tls.LoadX509KeyPair(cf, kf)
		if err != nil {
			t.Fatal(err)
		}
		return c, cf, kf
	}
	p.server, p.serverCert, p.serverKey = leaf(2, "localhost", x509.ExtKeyUsageServerAuth, "server-cert.pem", "server-key.pem")
	p.client, _, _ = leaf(3, "client", x509.ExtKeyUsageClientAuth, "client-cert.pem", "client-key.pem")
	return p
}

func (p *testPKI) serverConfig(requireClient bool) *tls.Config {
	if requireClient {
		return ServerTLSConfig(p.server, p.caPool)
	}
	return ServerTLSConfig(p.server, nil)
}

// startTLS sends STARTTLS and upgrades the client side.
func (c *client) startTLS(cfg *tls.Config) error {
	c.t.Helper()
	c.expect(optStartTLS, nil, repAck)
	tc := tls.Client(c.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return err
	}
	c.nc = tc
	return nil
}

func TestTLSRequire(t *testing.T) {
	p := newTestPKI(t)
	m := newMem(1<<20, 4096)
	_, addr := startServer(t, Config{TLS: TLSRequire, TLSConfig: p.serverConfig(true)}, Export{Name: "secret", Backend: m})
	clientCfg := &tls.Config{RootCAs: p.caPool, ServerName: "localhost", Certificates: []tls.Certificate{p.client}}

	// Before STARTTLS nothing is revealed.
	c := dial(t, addr)
	c.hello(clientFixedNewstyle)
	for _, opt := range []uint32{optList, optStructuredReply, optInfo, optGo, 99} {
		data := []byte(nil)
		if opt == optInfo || opt == optGo {
			data = appendInfoRequest(nil, infoRequest{"secret", nil})
		}
		if rs := c.expect(opt, data, repErrTLSReqd); len(rs) != 0 {
			t.Fatalf("option %d leaked %d replies", opt, len(rs))
		}
	}
	c.option(optExportName, []byte("secret"))
	c.expectClosed()

	// With TLS and a client certificate everything works.
	c = dial(t, addr)
	c.hello(clientFixedNewstyle)
	c.expect(optStructuredReply, nil, repErrTLSReqd)
	if err := c.startTLS(clientCfg); err != nil {
		t.Fatal(err)
	}
	c.expect(optStartTLS, nil, repErrInvalid)
	if rs := c.expect(optList, nil, repAck); len(rs) != 1 {
		t.Fatalf("list over TLS: %+v", rs)
	}
	c.expect(optGo, appendInfoRequest(nil, infoRequest{"secret", nil}), repAck)
	c.request(cmdWrite, 0, 1, 0, 5, []byte("hello"))
	if errno, _, _ := c.simpleReply(0); errno != 0 {
		t.Fatalf("write over TLS errno %d", errno)
	}
	c.request(cmdRead, 0, 2, 0, 5, nil)
	if errno, _, d := c.simpleReply(5); errno != 0 || string(d) != "hello" {
		t.Fatalf("read over TLS: %d %q", errno, d)
	}

	// Without a client certificate the TLS handshake fails and the
	// connection is dropped.
	c = dial(t, addr)
	c.hello(clientFixedNewstyle)
	noCert := &tls.Config{RootCAs: p.caPool, ServerName: "localhost"}
	if err := c.startTLS(noCert); err == nil {
		// TLS 1.3 reports the missing certificate on the first read.
		c.option(optList, nil)
		buf := make([]byte, 1)
		if _, err := c.nc.Read(buf); err == nil {
			t.Fatal("server accepted a client without certificate")
		}
	}
}

func TestTLSOn(t *testing.T) {
	p := newTestPKI(t)
	m := newMem(1<<20, 4096)
	_, addr := startServer(t, Config{TLS: TLSOn, TLSConfig: p.serverConfig(false)}, Export{Name: "d", Backend: m})
	// Plain clients are served.
	c := dial(t, addr)
	c.connect("d", connectOpts{})
	// State negotiated before STARTTLS is forgotten.
	c = dial(t, addr)
	c.hello(clientFixedNewstyle)
	c.expect(optStructuredReply, nil, repAck)
	if err := c.startTLS(&tls.Config{RootCAs: p.caPool, ServerName: "localhost"}); err != nil {
		t.Fatal(err)
	}
	c.expect(optSetMetaContext, appendMetaRequest(nil, metaRequest{"d", []string{metaBaseAllocation}}), repErrInvalid)
	rs := c.expect(optGo, appendInfoRequest(nil, infoRequest{"d", nil}), repAck)
	if f := be.Uint16(rs[0].data[10:]); f&tflagSendDF != 0 {
		t.Fatalf("structured replies survived STARTTLS: flags %#x", f)
	}
}
