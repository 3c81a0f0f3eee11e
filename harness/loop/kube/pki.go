package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// writePKI writes a day-long PKI into dir: ca.crt, apiserver.{crt,key} (for 127.0.0.1, the
// addresses given after dir and the in-cluster names), admin.{crt,key} (system:masters) and
// sa.{key,pub}, the service-account signing key pair the apiserver and the token controller
// share.
func writePKI(args []string) error {
	if len(args) < 1 {
		return fmt.Errorf("usage: kube pki <dir> [ip...]")
	}
	dir := args[0]
	addresses := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")}
	for _, arg := range args[1:] {
		address := net.ParseIP(arg)
		if address == nil {
			return fmt.Errorf("not an IP address: %q", arg)
		}
		addresses = append(addresses, address)
	}
	caKey, err := newKey()
	if err != nil {
		return err
	}
	ca := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "loop-ca"},
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	caDER, err := sign(ca, ca, caKey, caKey)
	if err != nil {
		return err
	}
	if ca, err = x509.ParseCertificate(caDER); err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, "ca.crt"), "CERTIFICATE", caDER); err != nil {
		return err
	}
	leaves := []struct {
		name string
		cert *x509.Certificate
	}{
		{"apiserver", &x509.Certificate{
			Subject:     pkix.Name{CommonName: "kube-apiserver"},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			IPAddresses: addresses,
			DNSNames: []string{"localhost", "kubernetes", "kubernetes.default",
				"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		}},
		{"admin", &x509.Certificate{
			Subject:     pkix.Name{CommonName: "loop-admin", Organization: []string{"system:masters"}},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}},
	}
	for _, leaf := range leaves {
		key, err := newKey()
		if err != nil {
			return err
		}
		leaf.cert.KeyUsage = x509.KeyUsageDigitalSignature
		der, err := sign(leaf.cert, ca, key, caKey)
		if err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, leaf.name+".crt"), "CERTIFICATE", der); err != nil {
			return err
		}
		if err := writeKey(filepath.Join(dir, leaf.name+".key"), key); err != nil {
			return err
		}
	}
	saKey, err := newKey()
	if err != nil {
		return err
	}
	if err := writeKey(filepath.Join(dir, "sa.key"), saKey); err != nil {
		return err
	}
	public, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, "sa.pub"), "PUBLIC KEY", public)
}

func newKey() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }

var serial int64

func sign(template, parent *x509.Certificate, key *ecdsa.PrivateKey, parentKey crypto.Signer) ([]byte, error) {
	serial++
	template.SerialNumber = big.NewInt(serial)
	template.NotBefore = time.Now().Add(-time.Hour)
	template.NotAfter = time.Now().Add(24 * time.Hour)
	return x509.CreateCertificate(rand.Reader, template, parent, key.Public(), parentKey)
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "EC PRIVATE KEY", der)
}

func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}
