package nbd

import (
	"crypto/tls"
	"crypto/x509"
)

// ServerTLSConfig returns the TLS configuration for Config.TLSConfig: the
// server's certificate, TLS 1.2 at least and, when clientCAs is not nil,
// a client certificate signed by one of them required and verified.
//
// With client certificates the version is capped at TLS 1.2. Go's TLS 1.3
// certificate request lists only the signature algorithms allowed for
// TLS 1.3 handshake signatures and no separate list for certificates, and
// GnuTLS (the TLS of libnbd and qemu) reads that as refusing certificates
// signed with RSA PKCS#1 v1.5, the usual RSA CA signature: it then sends no
// certificate and the handshake fails. Measured with nbdinfo and qemu-img
// against an openssl-made RSA CA: refused at TLS 1.3, accepted at TLS 1.2;
// ECDSA certificates work with either. TLS 1.2 keeps Go's default
// forward-secret AEAD suites.
func ServerTLSConfig(cert tls.Certificate, clientCAs *x509.CertPool) *tls.Config {
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if clientCAs != nil {
		cfg.ClientCAs, cfg.ClientAuth = clientCAs, tls.RequireAndVerifyClientCert
		cfg.MaxVersion = tls.VersionTLS12
	}
	return cfg
}
