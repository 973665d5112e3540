package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// runInit writes everything a fresh cluster needs into --dir: a CA, the
// apiserver's serving cert, client certs for the admin and each component,
// the service-account key pair, one kubeconfig per client and kwok's stages.
func runInit(args []string) int {
	fs := flag.NewFlagSet("init", flag.ContinueOnError)
	dir := fs.String("dir", "", "state directory")
	server := fs.String("server", "", "apiserver URL, e.g. https://127.0.0.1:6443")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dir == "" || *server == "" {
		fmt.Fprintln(os.Stderr, "init: --dir and --server are required")
		return 2
	}
	if err := initState(*dir, *server); err != nil {
		fmt.Fprintf(os.Stderr, "init: %v\n", err)
		return 1
	}
	return 0
}

type issuer struct {
	cert *x509.Certificate
	key  crypto.Signer
	pki  string
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err)
	}
	return n
}

func writePEM(path, kind string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), mode)
}

func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func newCA(pkiDir string) (*issuer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "kuwa-local-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	if err := writePEM(filepath.Join(pkiDir, "ca.crt"), "CERTIFICATE", der, 0o644); err != nil {
		return nil, err
	}
	if err := writeKey(filepath.Join(pkiDir, "ca.key"), key); err != nil {
		return nil, err
	}
	return &issuer{cert: cert, key: key, pki: pkiDir}, nil
}

// issue writes <name>.crt and <name>.key signed by the CA.
func (ca *issuer) issue(name, cn string, orgs []string, server bool, dns []string, ips []net.IP) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	usage := x509.ExtKeyUsageClientAuth
	if server {
		usage = x509.ExtKeyUsageServerAuth
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(ca.pki, name+".crt"), "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	return writeKey(filepath.Join(ca.pki, name+".key"), key)
}

func writeKubeconfig(path, server, pkiDir, user string) error {
	read := func(name string) ([]byte, error) { return os.ReadFile(filepath.Join(pkiDir, name)) }
	ca, err := read("ca.crt")
	if err != nil {
		return err
	}
	crt, err := read(user + ".crt")
	if err != nil {
		return err
	}
	key, err := read(user + ".key")
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kuwa-local"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: crt, ClientKeyData: key}
	cfg.Contexts["kuwa-local"] = &clientcmdapi.Context{Cluster: "kuwa-local", AuthInfo: user, Namespace: "default"}
	cfg.CurrentContext = "kuwa-local"
	return clientcmd.WriteToFile(*cfg, path)
}

func initState(dir, server string) error {
	pkiDir := filepath.Join(dir, "pki")
	if err := os.MkdirAll(pkiDir, 0o700); err != nil {
		return err
	}
	ca, err := newCA(pkiDir)
	if err != nil {
		return fmt.Errorf("CA: %w", err)
	}
	loopback := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), net.ParseIP("10.96.0.1")}
	dns := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	if err := ca.issue("apiserver", "kube-apiserver", nil, true, dns, loopback); err != nil {
		return fmt.Errorf("apiserver cert: %w", err)
	}
	clients := []struct {
		name, cn string
		orgs     []string
	}{
		{"admin", "kuwa-admin", []string{"system:masters"}},
		{"controller-manager", "system:kube-controller-manager", nil},
		{"scheduler", "system:kube-scheduler", nil},
		// kwok writes node and pod status, leases and deletes pods; a
		// fake kubelet for many nodes, so it gets full rights.
		{"kwok", "kwok-controller", []string{"system:masters"}},
	}
	for _, c := range clients {
		if err := ca.issue(c.name, c.cn, c.orgs, false, nil, nil); err != nil {
			return fmt.Errorf("%s cert: %w", c.name, err)
		}
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(pkiDir, "sa.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey), 0o600); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(pkiDir, "sa.pub"), "PUBLIC KEY", pub, 0o644); err != nil {
		return err
	}
	for _, kc := range []struct{ file, user string }{
		{"kubeconfig", "admin"},
		{"controller-manager.kubeconfig", "controller-manager"},
		{"scheduler.kubeconfig", "scheduler"},
		{"kwok.kubeconfig", "kwok"},
	} {
		if err := writeKubeconfig(filepath.Join(dir, kc.file), server, pkiDir, kc.user); err != nil {
			return fmt.Errorf("%s: %w", kc.file, err)
		}
	}
	return os.WriteFile(filepath.Join(dir, "kwok-stages.yaml"), []byte(kwokStages()), 0o644)
}
